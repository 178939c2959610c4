//! Filesystems whose master key is wrapped by a KMIP server: `create`,
//! `mount` (with the boot-time wait), `rewrap --new-key`, `slot add` across
//! KMS kinds and `kms check`, through the binary, against a real PyKMIP
//! server (keys made with PyKMIP's own client) and a real OpenBao.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kmsfs_e2e::cli::{kmsfs_bin, CliEnv, Kmsfs};
use kmsfs_e2e::fuse::{daemon_pids, is_mounted, CliMountGuard};
use kmsfs_e2e::pykmip::PykmipServer;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `kms set kmip` for `server` and `key` with the configuration at `config`.
fn kmip_config(server: &PykmipServer, config: &Path, key: &str) -> Kmsfs {
    let k = Kmsfs::new(config);
    k.run([
        "kms",
        "set",
        "kmip",
        &server.addr(),
        key,
        "--ca-cert",
        s(&server.pki.ca_cert),
        "--client-cert",
        s(&server.client.cert),
        "--client-key",
        s(&server.client.key),
        "--timeout",
        "5",
    ])
    .ok();
    k
}

/// A PyKMIP server with one active key, a directory, and a `kmsfs`
/// configured for that key by its Unique Identifier.
struct KmipEnv {
    server: PykmipServer,
    dir: tempfile::TempDir,
    kmsfs: Kmsfs,
    uid: String,
}

impl KmipEnv {
    fn new() -> KmipEnv {
        let server = PykmipServer::start().expect("pykmip server");
        let uid = server.create_key(Some("kmsfs-fs"), true).expect("key");
        let dir = tempfile::tempdir().expect("tempdir");
        let kmsfs = kmip_config(&server, &dir.path().join("etc/kms.toml"), &uid);
        KmipEnv {
            server,
            dir,
            kmsfs,
            uid,
        }
    }

    /// A new filesystem in `<name>-cipher` and an empty `<name>-plain`.
    fn create(&self, name: &str) -> (PathBuf, PathBuf) {
        let cipher = self.dir.path().join(format!("{name}-cipher"));
        let plain = self.dir.path().join(format!("{name}-plain"));
        fs::create_dir_all(&plain).expect("mountpoint");
        let r = self.kmsfs.run(["create", s(&cipher)]).ok();
        assert!(
            r.stderr.contains(&format!("KMIP key '{}'", self.uid)),
            "{}",
            r.stderr
        );
        (cipher, plain)
    }
}

/// `kmsfs umount` and wait for the daemon to exit (it holds the backing
/// directory's lock until then).
fn umount(k: &Kmsfs, plain: &Path) {
    k.run(["umount", s(plain)]).ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon_pids(plain).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon_pids(plain).is_empty(), "daemon still running");
    assert!(!is_mounted(plain));
}

/// The header's slots as `kmsfs slot list --json` reports them.
fn slots(k: &Kmsfs, cipher: &Path) -> serde_json::Value {
    k.run(["slot", "list", s(cipher), "--json"]).ok().json()
}

#[test]
fn kmip_create_mount_write_remount_and_check() {
    let env = KmipEnv::new();
    let (cipher, plain) = env.create("main");
    let list = env.kmsfs.run(["slot", "list", s(&cipher)]).ok();
    assert!(
        list.stdout.contains("kmip") && list.stdout.contains(&env.uid),
        "{}",
        list.stdout
    );
    let _guard = CliMountGuard(plain.clone());
    env.kmsfs.run(["mount", s(&cipher), s(&plain)]).ok();
    assert!(is_mounted(&plain));
    fs::write(plain.join("notes.txt"), b"wrapped by KMIP").unwrap();
    umount(&env.kmsfs, &plain);

    env.kmsfs.run(["unlock-check", s(&cipher)]).ok();
    env.kmsfs.run(["mount", s(&cipher), s(&plain)]).ok();
    assert_eq!(
        fs::read(plain.join("notes.txt")).unwrap(),
        b"wrapped by KMIP"
    );
    umount(&env.kmsfs, &plain);
    env.kmsfs.run(["fsck", s(&cipher)]).ok();

    let check = env.kmsfs.run(["kms", "check"]).ok();
    assert!(
        check.stdout.contains("OK   filesystem") && check.stdout.contains("opens"),
        "{}",
        check.stdout
    );
}

#[test]
fn kmip_server_down_at_mount_then_up_is_waited_for() {
    let mut env = KmipEnv::new();
    let (cipher, plain) = env.create("late");
    let _guard = CliMountGuard(plain.clone());
    env.server.stop();

    // With a short wait, the mount gives up and says the KMS was down.
    let r = env
        .kmsfs
        .run(["mount", "--kms-timeout", "2", s(&cipher), s(&plain)])
        .failed();
    assert!(r.stderr.contains("gave up after"), "{}", r.stderr);
    assert!(!is_mounted(&plain));

    let mut child = Command::new(kmsfs_bin())
        .arg("--config")
        .arg(env.dir.path().join("etc/kms.toml"))
        .args(["mount", "--kms-timeout", "90"])
        .arg(&cipher)
        .arg(&plain)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "mount gave up early");
    env.server.restart().expect("restart pykmip");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&plain));
    fs::write(plain.join("x"), b"late but fine").unwrap();
    assert_eq!(fs::read(plain.join("x")).unwrap(), b"late but fine");
    umount(&env.kmsfs, &plain);
}

#[test]
fn kmip_rewrap_new_key_then_mount_with_the_old_key_revoked() {
    let env = KmipEnv::new();
    let (cipher, plain) = env.create("rot");
    let _guard = CliMountGuard(plain.clone());
    env.kmsfs.run(["mount", s(&cipher), s(&plain)]).ok();
    fs::write(plain.join("kept.txt"), b"survives rotation").unwrap();
    umount(&env.kmsfs, &plain);

    // Without --new-key a KMIP slot has nothing to move to.
    let same = env.kmsfs.run(["rewrap", s(&cipher)]).ok();
    assert!(same.stdout.contains("unchanged"), "{}", same.stdout);

    let new_uid = env.server.create_key(Some("kmsfs-fs-2"), true).unwrap();
    assert_ne!(new_uid, env.uid);
    let r = env
        .kmsfs
        .run(["rewrap", s(&cipher), "--new-key", &new_uid])
        .ok();
    assert!(
        r.stdout
            .contains(&format!("slot 0 'primary': {} -> {new_uid}", env.uid)),
        "{}",
        r.stdout
    );
    let js = slots(&env.kmsfs, &cipher);
    assert!(js.to_string().contains(&new_uid), "{js}");
    assert!(
        !js.to_string().contains(&format!("\"{}\"", env.uid)),
        "{js}"
    );

    // The old key is gone for good: only the new wrapping can open it.
    env.server.revoke(&env.uid, false).unwrap();
    env.kmsfs.run(["mount", s(&cipher), s(&plain)]).ok();
    assert_eq!(
        fs::read(plain.join("kept.txt")).unwrap(),
        b"survives rotation"
    );
    umount(&env.kmsfs, &plain);
}

#[test]
fn a_revoked_kmip_key_fails_the_mount_naming_the_slot() {
    let env = KmipEnv::new();
    let (cipher, plain) = env.create("revoked");
    let _guard = CliMountGuard(plain.clone());
    env.server.revoke(&env.uid, false).unwrap();
    let r = env
        .kmsfs
        .run(["mount", "--kms-timeout", "30", s(&cipher), s(&plain)])
        .failed();
    assert!(
        r.stderr
            .contains(&format!("slot 0 'primary' (kmip key id '{}'", env.uid)),
        "{}",
        r.stderr
    );
    // Refused, not unreachable: no waiting for the KMS timeout.
    assert!(!r.stderr.contains("gave up after"), "{}", r.stderr);
    assert!(!is_mounted(&plain));
    let check = env.kmsfs.run(["kms", "check"]).failed();
    assert!(
        check.stdout.contains("FAIL filesystem") && check.stdout.contains("CANNOT be opened"),
        "{}",
        check.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_and_kmip_slots_in_one_header_each_kms_stopped_in_turn() {
    let mut vault = CliEnv::new().await;
    let mut kmip = tokio::task::spawn_blocking(KmipEnv::new).await.unwrap();
    let vault_cfg = vault.path("etc/kms.toml");
    let kmip_cfg = kmip.dir.path().join("etc/kms.toml");

    // A Vault filesystem gains a KMIP slot; a KMIP filesystem a Vault slot.
    let (v_cipher, v_plain) = vault.create("from-vault").await;
    let (k_cipher, k_plain) = kmip.create("from-kmip");
    let _g1 = CliMountGuard(v_plain.clone());
    let _g2 = CliMountGuard(k_plain.clone());
    let added = vault.kmsfs.run([
        "slot",
        "add",
        s(&v_cipher),
        "--kms-config",
        s(&kmip_cfg),
        "--label",
        "kmip",
    ]);
    let added = added.ok();
    assert!(
        added.stdout.contains("slot 1 'kmip' (kmip key id"),
        "{}",
        added.stdout
    );
    kmip.kmsfs
        .run([
            "slot",
            "add",
            s(&k_cipher),
            "--kms-config",
            s(&vault_cfg),
            "--label",
            "vault",
        ])
        .ok();
    // Adding the same KMIP key again is refused.
    let again = vault
        .kmsfs
        .run(["slot", "add", s(&v_cipher), "--kms-config", s(&kmip_cfg)])
        .failed();
    assert!(again.stderr.contains("already wraps"), "{}", again.stderr);

    for (cipher, plain) in [(&v_cipher, &v_plain), (&k_cipher, &k_plain)] {
        vault.kmsfs.run(["mount", s(cipher), s(plain)]).ok();
        fs::write(plain.join("both.txt"), b"two keys, one file").unwrap();
        umount(&vault.kmsfs, plain);
    }

    // KMIP stopped: the Vault configuration opens both.
    kmip.server.stop();
    for (cipher, plain) in [(&v_cipher, &v_plain), (&k_cipher, &k_plain)] {
        vault.kmsfs.run(["mount", s(cipher), s(plain)]).ok();
        assert_eq!(
            fs::read(plain.join("both.txt")).unwrap(),
            b"two keys, one file"
        );
        umount(&vault.kmsfs, plain);
    }

    // Vault stopped (a dev server: its keys die with it): KMIP opens both.
    kmip.server.restart().unwrap();
    drop(vault.server.take());
    for (cipher, plain) in [(&v_cipher, &v_plain), (&k_cipher, &k_plain)] {
        kmip.kmsfs.run(["mount", s(cipher), s(plain)]).ok();
        assert_eq!(
            fs::read(plain.join("both.txt")).unwrap(),
            b"two keys, one file"
        );
        umount(&kmip.kmsfs, plain);
    }
    kmip.kmsfs.run(["unlock-check", s(&v_cipher)]).ok();
}
