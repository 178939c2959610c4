//! Running the real `kmsfs` binary from end-to-end tests.
//!
//! [`kmsfs_bin`] builds the binary once per test process (`cargo build -p
//! kmsfs`, so it is never stale) and returns its path; [`Kmsfs`] runs it with
//! a private `--config` path and a clean environment (no `VAULT_*` / `BAO_*`
//! variables leak in from the developer's shell).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Environment variables removed from every run.
const SCRUBBED: &[&str] = &[
    "VAULT_ADDR",
    "BAO_ADDR",
    "VAULT_TOKEN",
    "BAO_TOKEN",
    "VAULT_NAMESPACE",
    "BAO_NAMESPACE",
    "VAULT_CACERT",
    "BAO_CACERT",
    "VAULT_CLIENT_CERT",
    "BAO_CLIENT_CERT",
    "VAULT_CLIENT_KEY",
    "BAO_CLIENT_KEY",
    "KMSFS_TOKEN_FILE",
    "KMSFS_KMS_KEY",
    "KMSFS_CONFIG",
    // Audit events go to the test's own journal socket, or nowhere: never
    // to the journald of a host that runs the suite under systemd.
    "KMSFS_JOURNAL_SOCKET",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The path of a freshly built `kmsfs` binary (built once per process).
///
/// Panics with cargo's output when the build fails.
pub fn kmsfs_bin() -> PathBuf {
    let r = BIN.get_or_init(|| {
        let root = workspace_root();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "-p", "kmsfs", "--bin", "kmsfs", "--quiet"])
            .current_dir(&root)
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build -p kmsfs failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map(|t| if t.is_absolute() { t } else { root.join(t) })
            .unwrap_or_else(|| root.join("target"));
        let bin = target.join("debug").join("kmsfs");
        if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("{} not found after cargo build", bin.display()))
        }
    });
    match r {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// The result of one run.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`-1` when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Panics (showing both streams) unless the run succeeded.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "kmsfs failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the run failed; returns it.
    pub fn failed(self) -> Self {
        assert_ne!(
            self.code, 0,
            "kmsfs unexpectedly succeeded\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Standard output parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs `kmsfs` with one configuration file path.
#[derive(Debug, Clone)]
pub struct Kmsfs {
    /// The `--config` path (its directory also holds `registry.toml`).
    pub config: PathBuf,
    env: Vec<(String, String)>,
    nofile: Option<u64>,
}

impl Kmsfs {
    /// A runner using `config` as `--config`.
    pub fn new(config: impl Into<PathBuf>) -> Self {
        Kmsfs {
            config: config.into(),
            env: Vec::new(),
            nofile: None,
        }
    }

    /// Adds an environment variable to every run.
    pub fn with_env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Runs every command (and so the mount daemons it starts) with an
    /// open-file limit of `n`, as `ulimit -n n` would.
    pub fn with_nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// Runs `kmsfs --config <config> ARGS...` (blocking).
    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(kmsfs_bin());
        cmd.arg("--config").arg(&self.config).args(args);
        for v in SCRUBBED {
            cmd.env_remove(v);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the
            // child between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Run::from(
            cmd.output()
                .unwrap_or_else(|e| panic!("cannot run kmsfs: {e}")),
        )
    }

    /// Like [`Kmsfs::run`] from async code (runs on a blocking thread).
    pub async fn run_async(&self, args: &[&str]) -> Run {
        let me = self.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || me.run(&args))
            .await
            .unwrap_or_else(|e| panic!("kmsfs runner panicked: {e}"))
    }
}

/// A ready-to-use host: a real OpenBao dev server with a Transit key
/// `kmsfs`, a token for it, and a `kmsfs` configured to use them. Tests
/// that need the real binary end to end start here.
pub struct CliEnv {
    /// The KMS (take it to stop the server).
    pub server: Option<crate::bao::BaoServer>,
    /// Holds the configuration, the token and the filesystems.
    pub dir: tempfile::TempDir,
    /// The configured runner.
    pub kmsfs: Kmsfs,
    /// The token file named in the configuration.
    pub token_file: PathBuf,
}

impl CliEnv {
    /// Starts the server and configures `kmsfs` (panics on failure: setup).
    pub async fn new() -> CliEnv {
        use crate::bao::{write_token_file, BaoServer};
        let server = BaoServer::start().await.expect("bao server");
        server.create_key("kmsfs", false).await.expect("key");
        server
            .put_policy("kmsfs", &BaoServer::transit_policy("kmsfs"))
            .await
            .expect("policy");
        let token = server.create_token(&["kmsfs"], "1h").await.expect("token");
        let dir = tempfile::tempdir().expect("tempdir");
        let token_file = write_token_file(dir.path(), "token", &token).expect("token file");
        let kmsfs = Kmsfs::new(dir.path().join("etc/kms.toml"));
        let env = CliEnv {
            server: Some(server),
            dir,
            kmsfs,
            token_file,
        };
        env.kms_set(&[], &[]).await.ok();
        env
    }

    /// `kmsfs GLOBAL... kms set vault ADDR kmsfs --token-file TOKEN EXTRA...`
    /// with this environment's server and token.
    pub async fn kms_set(&self, global: &[&str], extra: &[&str]) -> Run {
        let addr = self.server.as_ref().expect("server").addr().to_string();
        let token = self.token_file.to_str().expect("utf-8");
        let mut args = global.to_vec();
        args.extend(["kms", "set", "vault", &addr, "kmsfs", "--token-file", token]);
        args.extend_from_slice(extra);
        self.kmsfs.run_async(&args).await
    }

    /// A path inside the environment's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates a filesystem in `<name>-cipher` and an empty `<name>-plain`.
    pub async fn create(&self, name: &str) -> (PathBuf, PathBuf) {
        let cipher = self.path(&format!("{name}-cipher"));
        let plain = self.path(&format!("{name}-plain"));
        std::fs::create_dir_all(&plain).expect("mountpoint");
        self.kmsfs
            .run_async(&["create", cipher.to_str().expect("utf-8")])
            .await
            .ok();
        (cipher, plain)
    }

    /// `kmsfs mount CIPHER PLAIN EXTRA...`.
    pub async fn mount(&self, cipher: &Path, plain: &Path, extra: &[&str]) -> Run {
        let mut args = vec![
            "mount",
            cipher.to_str().expect("utf-8"),
            plain.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        self.kmsfs.run_async(&args).await
    }
}

/// `/sbin/mount.fuse.kmsfs`, the helper mount(8) runs for `mount -o
/// remount,... MOUNTPOINT` of a `fuse.kmsfs` mount, linked to the freshly
/// built `kmsfs` while this lives. An existing helper (an installed kmsfs)
/// is left as it is and used.
pub struct RemountHelper {
    made: Option<PathBuf>,
}

impl RemountHelper {
    /// Where mount(8) looks for the helper.
    pub const PATH: &'static str = "/sbin/mount.fuse.kmsfs";

    /// Links the helper unless one is there.
    pub fn install() -> RemountHelper {
        let link = Path::new(Self::PATH);
        if link.symlink_metadata().is_ok() {
            return RemountHelper { made: None };
        }
        std::os::unix::fs::symlink(kmsfs_bin(), link)
            .unwrap_or_else(|e| panic!("cannot link {}: {e}", link.display()));
        RemountHelper {
            made: Some(link.to_path_buf()),
        }
    }
}

impl Drop for RemountHelper {
    fn drop(&mut self) {
        if let Some(p) = self.made.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
