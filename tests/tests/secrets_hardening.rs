//! Secrets stay secret, end to end with the real `kmsfs` binary:
//!
//! * every command that holds a master key or a token runs non-dumpable
//!   with a core size limit of 0 (observed in `/proc` while the command
//!   waits on a KMS that never answers);
//! * the KMS configuration and token files are refused when others could
//!   change or read them, when they are symbolic links, or when another
//!   user owns them, with the exact `chmod`/`chown` in the error;
//! * mounts are `nosuid,nodev` unless `allow_suid_dev` opts in.
//!
//! The tests run as root and use uid 65534 as "another user".

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kmsfs_e2e::bao::{dead_address, write_token_file, BaoServer, ROOT_TOKEN};
use kmsfs_e2e::cli::{kmsfs_bin, Kmsfs};
use kmsfs_e2e::fuse::{force_unmount, is_mounted, CliMountGuard};
use tempfile::TempDir;

const NOBODY: u32 = 65534;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A KMS configuration for `address` with token auth from `token_file`.
fn config_text(address: &str, token_file: &Path) -> String {
    format!(
        "type = \"vault\"\naddresses = [\"{address}\"]\nkey_name = \"kmsfs\"\n\
         timeout_secs = 300\nattempts = 1\n\n[auth]\nmethod = \"token\"\ntoken_file = \"{}\"\n",
        token_file.display()
    )
}

/// A directory others can traverse (tempdirs are 0700), for runs as `NOBODY`.
fn open_tempdir() -> TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// Writes `text` to `path` with `mode`, owned by `uid`.
fn write_owned(path: &Path, text: &str, mode: u32, uid: u32) {
    fs::write(path, text).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
}

/// A KMS that accepts connections and never answers.
struct StalledKms {
    listener: TcpListener,
}

impl StalledKms {
    fn start() -> StalledKms {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        StalledKms { listener }
    }

    fn address(&self) -> String {
        format!(
            "http://{}",
            self.listener.local_addr().expect("local address")
        )
    }

    /// Waits until `child` connects, which it does only after hardening
    /// itself and reading its configuration. Panics (with its stderr) if
    /// it exits first. The connection is kept open, unanswered.
    fn wait_for(&self, child: &mut Child) -> std::net::TcpStream {
        loop {
            match self.listener.accept() {
                Ok((conn, _)) => return conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            if let Some(status) = child.try_wait().expect("try_wait") {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("kmsfs exited ({status}) before contacting the KMS:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `kmsfs --config CONFIG ARGS` as `uid`, with a clean environment.
fn spawn_kmsfs(uid: u32, config: &Path, args: &[&str]) -> Child {
    let mut cmd = Command::new(kmsfs_bin());
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if uid != 0 {
        cmd.uid(uid).gid(uid);
    }
    cmd.spawn().expect("spawn kmsfs")
}

/// The soft and hard "Max core file size" of a process.
fn core_limits(pid: u32) -> (String, String) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core limit line");
    let f: Vec<&str> = line["Max core file size".len()..]
        .split_whitespace()
        .collect();
    (f[0].to_string(), f[1].to_string())
}

/// The real uid of a process, from /proc/PID/status.
fn real_uid(pid: u32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    line.split_whitespace()
        .nth(1)
        .expect("uid")
        .parse()
        .expect("uid number")
}

/// Owner of /proc/PID/environ: the process's uid when it is dumpable, root
/// when it is not (proc(5)), which is what keeps other users (and
/// ptrace-less tools running as the same user) out of its memory.
fn proc_owner(pid: u32) -> u32 {
    fs::metadata(format!("/proc/{pid}/environ"))
        .expect("environ")
        .uid()
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `args` as `uid` against a KMS that never answers and checks, while
/// the command waits for it, that the process cannot dump core and (when
/// not root) that its /proc files belong to root.
fn assert_hardened_while_waiting(uid: u32, config: &Path, args: &[&str]) {
    let stalled = StalledKms::start();
    let text = fs::read_to_string(config).expect("config");
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token_file = \""))
        .and_then(|l| l.strip_suffix('"'))
        .map(PathBuf::from)
        .expect("token_file in config");
    write_owned(config, &config_text(&stalled.address(), &token), 0o600, uid);
    let mut child = spawn_kmsfs(uid, config, args);
    let _conn = stalled.wait_for(&mut child);
    let pid = child.id();
    let limits = core_limits(pid);
    let owner = proc_owner(pid);
    let ruid = real_uid(pid);
    kill(child);
    assert_eq!(limits, ("0".into(), "0".into()), "{args:?}: core limit");
    assert_eq!(ruid, uid, "{args:?} runs as uid {uid}");
    if uid != 0 {
        assert_eq!(
            owner, 0,
            "{args:?}: /proc/PID owned by uid {owner}: dumpable"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn key_holding_commands_are_not_dumpable() {
    // Control: an ordinary process of the same user owns its /proc files,
    // so the root owner observed below really is the non-dumpable flag.
    let mut sleeper = Command::new("sleep");
    sleeper.arg("60").uid(NOBODY).gid(NOBODY);
    let sleeper = sleeper.spawn().expect("sleep");
    let control = proc_owner(sleeper.id());
    kill(sleeper);
    assert_eq!(control, NOBODY);

    // A real filesystem to unlock and rewrap, created by root, then handed
    // to `NOBODY` with its configuration and token.
    let server = BaoServer::start().await.expect("bao");
    server.create_key("kmsfs", false).await.expect("key");
    let dir = open_tempdir();
    let token = write_token_file(dir.path(), "token", ROOT_TOKEN).expect("token file");
    let config = dir.path().join("kms.toml");
    write_owned(&config, &config_text(server.addr(), &token), 0o600, 0);
    let cipher = dir.path().join("cipher");
    Kmsfs::new(&config).run(["create", s(&cipher)]).ok();
    let parent = dir.path().join("new");
    fs::create_dir(&parent).expect("mkdir");
    for p in [&token, &cipher, &parent] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).expect("chown");
    }
    for e in fs::read_dir(&cipher).expect("read_dir").flatten() {
        std::os::unix::fs::chown(e.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
    }
    drop(server);

    let new = parent.join("fs");
    assert_hardened_while_waiting(NOBODY, &config, &["create", s(&new)]);
    assert!(!new.exists(), "nothing is written before the KMS answers");
    assert_hardened_while_waiting(NOBODY, &config, &["unlock-check", s(&cipher)]);
    assert_hardened_while_waiting(NOBODY, &config, &["rewrap", s(&cipher)]);
    assert_hardened_while_waiting(NOBODY, &config, &["kms", "check"]);

    // The mount daemon, in the foreground, as root (FUSE needs it).
    std::os::unix::fs::chown(&token, Some(0), Some(0)).expect("chown");
    let plain = dir.path().join("plain");
    fs::create_dir(&plain).expect("mkdir");
    let _guard = CliMountGuard(plain.clone());
    assert_hardened_while_waiting(0, &config, &["mount", "-f", s(&cipher), s(&plain)]);
    assert!(!is_mounted(&plain));
}

/// Runs `kmsfs create` with `config` and returns its stderr; it must fail.
fn create_fails(config: &Path, dir: &Path) -> String {
    Kmsfs::new(config)
        .run(["create", s(&dir.join("fs"))])
        .failed()
        .stderr
}

#[test]
fn unsafe_config_and_token_files_are_refused_with_the_fix() {
    let dir = open_tempdir();
    let d = dir.path();
    let addr = dead_address().expect("address");
    let token = write_token_file(d, "token", "s.TopSecretToken").expect("token");
    let config = d.join("kms.toml");
    let cfg_text = config_text(&addr, &token);
    write_owned(&config, &cfg_text, 0o644, 0);

    // Baseline: safe files get as far as the (dead) KMS.
    let err = create_fails(&config, d);
    assert!(err.contains("unreachable"), "{err}");

    // A configuration anyone may change (measured before: used as is).
    write_owned(&config, &cfg_text, 0o666, 0);
    let err = create_fails(&config, d);
    assert!(
        err.contains(&format!("chmod go-w {}", config.display())),
        "{err}"
    );
    assert!(err.contains("mode 0666"), "{err}");
    write_owned(&config, &cfg_text, 0o620, 0);
    assert!(create_fails(&config, d).contains("chmod go-w"));

    // A configuration owned by another user.
    write_owned(&config, &cfg_text, 0o644, NOBODY);
    let err = create_fails(&config, d);
    assert!(
        err.contains(&format!("chown root:root {}", config.display())) && err.contains("65534"),
        "{err}"
    );
    write_owned(&config, &cfg_text, 0o644, 0);

    // A configuration reached through a symbolic link.
    let link = d.join("link.toml");
    std::os::unix::fs::symlink(&config, &link).expect("symlink");
    let err = create_fails(&link, d);
    assert!(
        err.contains(s(&link)) && err.contains("symbolic link"),
        "{err}"
    );

    // A token file others can read, and one they can write.
    for mode in [0o644, 0o640, 0o604, 0o620] {
        fs::set_permissions(&token, fs::Permissions::from_mode(mode)).expect("chmod");
        let err = create_fails(&config, d);
        assert!(
            err.contains(&format!("chmod 600 {}", token.display())),
            "{mode:o}: {err}"
        );
        assert!(!err.contains("TopSecretToken"), "{err}");
    }
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).expect("chmod");

    // A token file owned by another user.
    std::os::unix::fs::chown(&token, Some(NOBODY), None).expect("chown");
    let err = create_fails(&config, d);
    assert!(
        err.contains(&format!("chown root:root {}", token.display())),
        "{err}"
    );
    std::os::unix::fs::chown(&token, Some(0), None).expect("chown");

    // A token file that is a symbolic link (to a perfectly good token).
    let token_link = d.join("token-link");
    std::os::unix::fs::symlink(&token, &token_link).expect("symlink");
    write_owned(&config, &config_text(&addr, &token_link), 0o644, 0);
    let err = create_fails(&config, d);
    assert!(
        err.contains(s(&token_link)) && err.contains("symbolic link"),
        "{err}"
    );

    // Files the caller owns are fine for a non-root caller too.
    write_owned(&config, &cfg_text, 0o600, NOBODY);
    std::os::unix::fs::chown(&token, Some(NOBODY), Some(NOBODY)).expect("chown");
    let parent = d.join("nobody");
    fs::create_dir(&parent).expect("mkdir");
    std::os::unix::fs::chown(&parent, Some(NOBODY), Some(NOBODY)).expect("chown");
    let out = spawn_kmsfs(NOBODY, &config, &["create", s(&parent.join("fs"))])
        .wait_with_output()
        .expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unreachable"), "{err}");
    // A configuration owned by root is trusted by any caller.
    write_owned(&config, &cfg_text, 0o644, 0);
    let out = spawn_kmsfs(NOBODY, &config, &["create", s(&parent.join("fs"))])
        .wait_with_output()
        .expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unreachable"), "{err}");
}

/// Mount options of `mountpoint` in /proc/mounts.
fn mount_options(mountpoint: &Path) -> Vec<String> {
    let want = mountpoint.canonicalize().expect("canonicalize");
    let mounts = fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    let line = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(s(&want)))
        .unwrap_or_else(|| panic!("{} not in /proc/mounts", want.display()));
    let opts = line.split_whitespace().nth(3).expect("options");
    opts.split(',').map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn mounts_are_nosuid_nodev_unless_opted_in() {
    let server = BaoServer::start().await.expect("bao");
    server.create_key("kmsfs", false).await.expect("key");
    let dir = open_tempdir();
    let token = write_token_file(dir.path(), "token", ROOT_TOKEN).expect("token file");
    let config = dir.path().join("kms.toml");
    write_owned(&config, &config_text(server.addr(), &token), 0o600, 0);
    let kmsfs = Kmsfs::new(&config);
    let cipher = dir.path().join("cipher");
    let plain = dir.path().join("plain");
    fs::create_dir(&plain).expect("mkdir");
    kmsfs.run_async(&["create", s(&cipher)]).await.ok();
    let _guard = CliMountGuard(plain.clone());

    kmsfs
        .run_async(&["mount", s(&cipher), s(&plain)])
        .await
        .ok();
    let opts = mount_options(&plain);
    assert!(
        opts.contains(&"nosuid".into()) && opts.contains(&"nodev".into()),
        "{opts:?}"
    );
    kmsfs.run_async(&["umount", s(&plain)]).await.ok();

    for asked in ["suid", "dev"] {
        let r = kmsfs
            .run_async(&["mount", s(&cipher), s(&plain), "-o", asked])
            .await
            .failed();
        assert!(r.stderr.contains("allow_suid_dev"), "{}", r.stderr);
        assert!(!is_mounted(&plain));
    }

    kmsfs
        .run_async(&["mount", s(&cipher), s(&plain), "-o", "allow_suid_dev,suid"])
        .await
        .ok();
    let opts = mount_options(&plain);
    assert!(!opts.contains(&"nosuid".into()), "{opts:?}");
    assert!(opts.contains(&"nodev".into()), "{opts:?}");
    kmsfs.run_async(&["umount", s(&plain)]).await.ok();
    force_unmount(&plain);
}
