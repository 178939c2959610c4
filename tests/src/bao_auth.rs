//! OpenBao set-ups for authentication tests: a dev server with a TLS
//! listener whose CA the test makes with `openssl` ([`TlsBao`]), a real
//! `bao proxy` with AppRole auto-auth and an API proxy ([`BaoProxy`]), and
//! a count of the live tokens a login path made ([`live_tokens_from`]).
//! Every process is stopped by PID on drop, so also when a test panics.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::bao::{reserve_port_pair, write_secret_file, BaoServer, ROOT_TOKEN};
use crate::pykmip::{CertPair, Pki};

/// A dev server (plain HTTP on its dev port, for setup) with a second,
/// HTTPS listener on `127.0.0.1` whose certificate a test CA signed.
pub struct TlsBao {
    /// The server (setup calls go over its plain-HTTP dev listener).
    pub server: BaoServer,
    /// The CA that signed the server and client certificates.
    pub pki: Pki,
    /// A client certificate of the same CA (for cert auth).
    pub client: CertPair,
    /// `https://127.0.0.1:Q`, the TLS listener.
    pub tls_addr: String,
    _dir: tempfile::TempDir,
}

impl TlsBao {
    /// Makes the CA and certificates, starts the server, mounts Transit.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(&dir.path().join("pki"), "bao", 2)?;
        let srv = pki.issue("bao-server", 2)?;
        let client = pki.issue("kmsfs-host", 2)?;
        let port = reserve_port_pair()?;
        let hcl = format!(
            "listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  \
             tls_cert_file = \"{}\"\n  tls_key_file = \"{}\"\n}}\n",
            srv.cert.display(),
            srv.key.display()
        );
        let server = BaoServer::start_with_config(&hcl).await?;
        Ok(TlsBao {
            server,
            pki,
            client,
            tls_addr: format!("https://127.0.0.1:{port}"),
            _dir: dir,
        })
    }

    /// The CA certificate file.
    pub fn ca_cert(&self) -> &Path {
        &self.pki.ca_cert
    }
}

/// A running `bao proxy`: AppRole auto-auth against a server, and an API
/// proxy on a loopback port that adds the auto-auth token to every request.
pub struct BaoProxy {
    child: Child,
    /// `http://127.0.0.1:P`: what `VAULT_AGENT_ADDR` names.
    pub addr: String,
    dir: tempfile::TempDir,
}

impl BaoProxy {
    /// Starts a proxy for `server` that logs in with AppRole `role_id` and
    /// `secret_id` and waits until it answers with its auto-auth token.
    pub async fn start(server: &BaoServer, role_id: &str, secret_id: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let rid = write_secret_file(dir.path(), "role-id", role_id, 0o600)?;
        let sid = write_secret_file(dir.path(), "secret-id", secret_id, 0o600)?;
        let port = reserve_port_pair()?;
        let conf = dir.path().join("proxy.hcl");
        fs::write(
            &conf,
            format!(
                "vault {{ address = \"{}\" }}\n\
                 auto_auth {{\n  method \"approle\" {{\n    config = {{\n      \
                 role_id_file_path = \"{}\"\n      secret_id_file_path = \"{}\"\n      \
                 remove_secret_id_file_after_reading = false\n    }}\n  }}\n}}\n\
                 api_proxy {{ use_auto_auth_token = \"force\" }}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\n",
                server.addr(),
                rid.display(),
                sid.display()
            ),
        )?;
        let log = fs::File::create(dir.path().join("proxy.log"))?;
        let child = Command::new(std::env::var("KMSFS_BAO_BIN").unwrap_or_else(|_| "bao".into()))
            .arg("proxy")
            .arg(format!("-config={}", conf.display()))
            .env_remove("VAULT_TOKEN")
            .env_remove("BAO_TOKEN")
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning `bao proxy`")?;
        let mut me = BaoProxy {
            child,
            addr: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = me.child.try_wait()? {
                bail!("bao proxy exited ({status}): {}", me.log());
            }
            if Instant::now() > deadline {
                bail!("bao proxy did not authenticate in time: {}", me.log());
            }
            let url = format!("{}/v1/auth/token/lookup-self", me.addr);
            if let Ok(r) = http.get(&url).send().await {
                if r.status().as_u16() == 200 {
                    return Ok(me);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The proxy's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// Stops the proxy now (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own unreaped child; touches no memory.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BaoProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The accessors of the live tokens made by logins at `login_path` (e.g.
/// `auth/approle/login`), found with the root token.
pub async fn live_tokens_from(server: &BaoServer, login_path: &str) -> Result<Vec<String>> {
    let (status, v) = server
        .api_raw(ROOT_TOKEN, "LIST", "auth/token/accessors", None)
        .await?;
    if status != 200 {
        bail!("LIST auth/token/accessors: HTTP {status}: {v}");
    }
    let all = v["data"]["keys"]
        .as_array()
        .ok_or_else(|| anyhow!("no accessor list in {v}"))?;
    let mut out = Vec::new();
    for a in all.iter().filter_map(Value::as_str) {
        let (status, info) = server
            .api_raw(
                ROOT_TOKEN,
                "POST",
                "auth/token/lookup-accessor",
                Some(json!({ "accessor": a })),
            )
            .await?;
        // A token that expired between the list and the lookup is gone.
        if status == 200 && info["data"]["path"].as_str() == Some(login_path) {
            out.push(a.to_string());
        }
    }
    Ok(out)
}

/// Waits (up to `limit`) until `live_tokens_from` has `want` entries;
/// returns the last count seen.
pub async fn wait_for_live_tokens(
    server: &BaoServer,
    login_path: &str,
    want: usize,
    limit: Duration,
) -> Result<usize> {
    let deadline = Instant::now() + limit;
    loop {
        let n = live_tokens_from(server, login_path).await?.len();
        if n == want || Instant::now() > deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
