//! A replaced `kmsfs.header` is refused at mount (issue 8 §4): a forged
//! header (the victim's UUID, a master key of the attacker's choice wrapped
//! by the same Transit key, a valid MAC), another filesystem's header, a
//! changed root directory IV, and a wrong `-o kcv=`. Also: a mount host
//! needs only Transit `decrypt`.
//!
//! Real OpenBao dev server, the real `kmsfs` binary, real FUSE mounts
//! (unmounted by guards even when an assertion fails).

use kmsfs_core::header::{Header, KeySlot, SlotKms, UnverifiedHeader, VaultSlot};
use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_core::secret::SecretBytes;
use kmsfs_e2e::bao::{write_token_file, BaoServer};
use kmsfs_e2e::cli::{kmsfs_bin, CliEnv, Kmsfs, Run};
use kmsfs_e2e::fuse::{is_mounted, CliMountGuard};
use kmsfs_keystore::{AuthConfig, KmsConfig, VaultClient};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const KEY: &str = "kmsfs";

struct Env {
    /// The KMS and the host that creates the filesystems (its registry
    /// records them).
    cli: CliEnv,
    /// Another host with the same KMS access that created nothing.
    other: Kmsfs,
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

impl Env {
    async fn new() -> Env {
        let cli = CliEnv::new().await;
        let other = Kmsfs::new(cli.path("other/kms.toml"));
        let addr = cli.server.as_ref().expect("server").addr().to_string();
        other
            .run_async(&[
                "kms",
                "set",
                "vault",
                &addr,
                KEY,
                "--token-file",
                s(&cli.token_file),
            ])
            .await
            .ok();
        Env { cli, other }
    }

    fn server(&self) -> &BaoServer {
        self.cli.server.as_ref().expect("server")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.cli.path(name)
    }

    /// Creates `<name>-cipher` on the creating host; returns it, an empty
    /// mountpoint `<name>-plain`, and the key check value create printed.
    async fn create(&self, name: &str) -> (PathBuf, PathBuf, String) {
        let cipher = self.path(&format!("{name}-cipher"));
        let plain = self.path(&format!("{name}-plain"));
        fs::create_dir_all(&plain).expect("mountpoint");
        let run = self.cli.kmsfs.run_async(&["create", s(&cipher)]).await.ok();
        let kcv = printed_kcv(&run);
        // `info` shows the same value from the registry, without the KMS.
        let info = self
            .cli
            .kmsfs
            .run_async(&["info", s(&cipher), "--json"])
            .await
            .ok()
            .json();
        assert_eq!(info["key_check_value"].as_str(), Some(kcv.as_str()));
        (cipher, plain, kcv)
    }

    async fn mount(&self, host: &Kmsfs, cipher: &Path, plain: &Path, extra: &[&str]) -> Run {
        let mut args = vec!["mount", s(cipher), s(plain), "--kms-timeout", "2"];
        args.extend_from_slice(extra);
        host.run_async(&args).await
    }

    async fn umount(&self, plain: &Path) {
        self.cli.kmsfs.run_async(&["umount", s(plain)]).await.ok();
        assert!(!is_mounted(plain));
    }

    /// Mounts on the creating host, writes `files` into the root, unmounts.
    async fn populate(&self, cipher: &Path, plain: &Path, files: &[&str]) {
        self.mount(&self.cli.kmsfs, cipher, plain, &[]).await.ok();
        for f in files {
            fs::write(plain.join(f), f.as_bytes()).expect("write");
        }
        self.umount(plain).await;
    }

    /// A KMS client with the hosts' token (allowed to encrypt with `kmsfs`).
    fn client(&self) -> VaultClient {
        let mut cfg = KmsConfig::new(
            vec![self.server().addr().to_string()],
            KEY,
            AuthConfig::Token {
                token_file: Some(self.cli.token_file.clone()),
            },
        );
        cfg.timeout_secs = 5;
        VaultClient::new(&cfg).expect("client")
    }
}

/// The key check value from `kmsfs create`'s stderr.
fn printed_kcv(run: &Run) -> String {
    let line = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("key check value: "))
        .unwrap_or_else(|| panic!("create printed no key check value:\n{}", run.stderr));
    let kcv: String = line.chars().take_while(char::is_ascii_hexdigit).collect();
    assert_eq!(kcv.len(), 32, "{line}");
    kcv
}

fn assert_refused(run: &Run, cipher: &Path, plain: &Path, needles: &[&str]) {
    assert_ne!(run.code, 0, "mount succeeded:\n{}", run.stderr);
    assert!(run.stderr.contains(s(cipher)), "{}", run.stderr);
    for n in needles {
        assert!(run.stderr.contains(n), "missing {n:?} in:\n{}", run.stderr);
    }
    assert!(!is_mounted(plain), "mounted despite the error");
}

/// Writes over `cipher/kmsfs.header` a header with the victim's UUID and a
/// master key of the attacker's choice, wrapped by the victim's Transit key
/// through an ordinary `encrypt` call, with a valid MAC.
async fn forge_header(env: &Env, cipher: &Path) {
    let path = cipher.join("kmsfs.header");
    let victim = UnverifiedHeader::parse(&fs::read(&path).expect("read header")).expect("parse");
    let uuid = victim.unverified().uuid;
    let attacker_key = MasterKey::generate().expect("key");
    let wrapped = env
        .client()
        .wrap(KEY, &SecretBytes::from_slice(attacker_key.expose()), None)
        .await
        .expect("Transit encrypt");
    let forged = Header {
        features: 0,
        uuid,
        created: victim.unverified().created,
        slots: vec![KeySlot {
            label: "primary".into(),
            created: victim.unverified().created,
            kms: SlotKms::Vault(VaultSlot {
                addresses: vec![env.server().addr().to_string()],
                transit_path: "transit".into(),
                namespace: None,
                key_name: KEY.into(),
                key_version: wrapped.key_version,
                uses_context: false,
                wrapped_key: wrapped.ciphertext,
            }),
        }],
    };
    let bytes = forged
        .encode(&FsKeys::derive(&attacker_key, &uuid))
        .expect("encode");
    fs::write(&path, bytes).expect("write forged header");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_header_with_the_victims_uuid_and_kms_key_is_refused() {
    let env = Env::new().await;
    let (cipher, plain, kcv) = env.create("victim").await;
    let _guard = CliMountGuard(plain.clone());
    env.populate(&cipher, &plain, &["ledger"]).await;
    let original = fs::read(cipher.join("kmsfs.header")).expect("header");
    forge_header(&env, &cipher).await;

    // The forgery is a valid header: the KMS unwraps it and its MAC holds.
    let check = env
        .cli
        .kmsfs
        .run_async(&["unlock-check", s(&cipher)])
        .await
        .ok();
    assert_eq!(check.stdout.trim(), "ok");

    // The creating host knows the key check value from its registry.
    let run = env.mount(&env.cli.kmsfs, &cipher, &plain, &[]).await;
    assert_refused(
        &run,
        &cipher,
        &plain,
        &[
            "key check value",
            &kcv,
            "registry.toml",
            "replaced or forged",
        ],
    );
    // A host that recorded nothing still sees that no root name decrypts.
    let run = env.mount(&env.other, &cipher, &plain, &[]).await;
    assert_refused(
        &run,
        &cipher,
        &plain,
        &["none of the 1 entries", "kmsfs.header or kmsfs.diriv"],
    );
    // One pinned with -o kcv= is told the key is the wrong one.
    let run = env
        .mount(&env.other, &cipher, &plain, &["-o", &format!("kcv={kcv}")])
        .await;
    assert_refused(&run, &cipher, &plain, &["the mount option kcv="]);

    // The genuine header mounts again, with the data intact.
    fs::write(cipher.join("kmsfs.header"), original).expect("restore");
    env.mount(&env.cli.kmsfs, &cipher, &plain, &[]).await.ok();
    assert_eq!(fs::read(plain.join("ledger")).expect("read"), b"ledger");
    env.umount(&plain).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn another_filesystems_header_copied_over_is_refused() {
    let env = Env::new().await;
    let (a, plain, kcv_a) = env.create("a").await;
    let (b, _, kcv_b) = env.create("b").await;
    assert_ne!(kcv_a, kcv_b);
    let _guard = CliMountGuard(plain.clone());
    env.populate(&a, &plain, &["only-in-a"]).await;
    fs::copy(b.join("kmsfs.header"), a.join("kmsfs.header")).expect("copy header");
    let uuid_b = env
        .cli
        .kmsfs
        .run_async(&["info", s(&b), "--json"])
        .await
        .ok()
        .json()["uuid"]
        .as_str()
        .expect("uuid")
        .to_string();

    let run = env.mount(&env.cli.kmsfs, &a, &plain, &[]).await;
    assert_refused(
        &run,
        &a,
        &plain,
        &[
            &format!("belongs to filesystem {uuid_b}"),
            "another filesystem's header",
        ],
    );
    let info = env.cli.kmsfs.run_async(&["info", s(&a)]).await.ok();
    assert!(
        info.stderr.contains("the header was replaced"),
        "{}",
        info.stderr
    );

    let run = env.mount(&env.other, &a, &plain, &[]).await;
    assert_refused(
        &run,
        &a,
        &plain,
        &["none of the 1 entries", "copied from another filesystem"],
    );
    let run = env
        .mount(&env.other, &a, &plain, &["-o", &format!("kcv={kcv_a}")])
        .await;
    assert_refused(&run, &a, &plain, &[&kcv_a, &kcv_b, "replaced or forged"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_altered_root_directory_iv_is_refused() {
    let env = Env::new().await;
    let (cipher, plain, _) = env.create("iv").await;
    let _guard = CliMountGuard(plain.clone());
    env.populate(&cipher, &plain, &["one", "two"]).await;
    let iv_path = cipher.join("kmsfs.diriv");
    let iv = fs::read(&iv_path).expect("iv");

    let mut changed = iv.clone();
    changed[0] ^= 1;
    fs::remove_file(&iv_path).expect("rm");
    fs::write(&iv_path, &changed).expect("write");
    let run = env.mount(&env.cli.kmsfs, &cipher, &plain, &[]).await;
    assert_refused(
        &run,
        &cipher,
        &plain,
        &["none of the 2 entries", "kmsfs.diriv"],
    );

    // A symlink to the right IV is not followed; a FIFO does not block.
    fs::remove_file(&iv_path).expect("rm");
    fs::write(env.path("iv-copy"), &iv).expect("copy");
    std::os::unix::fs::symlink(env.path("iv-copy"), &iv_path).expect("symlink");
    let run = env.mount(&env.cli.kmsfs, &cipher, &plain, &[]).await;
    assert_refused(&run, &cipher, &plain, &["kmsfs.diriv", "symbolic link"]);
    fs::remove_file(&iv_path).expect("rm");
    let st = Command::new("mkfifo")
        .arg(&iv_path)
        .status()
        .expect("mkfifo");
    assert!(st.success());
    let run = env.mount(&env.cli.kmsfs, &cipher, &plain, &[]).await;
    assert_refused(
        &run,
        &cipher,
        &plain,
        &["kmsfs.diriv", "not a regular file"],
    );

    fs::remove_file(&iv_path).expect("rm");
    fs::write(&iv_path, &iv).expect("restore");
    env.mount(&env.cli.kmsfs, &cipher, &plain, &[]).await.ok();
    assert_eq!(fs::read(plain.join("two")).expect("read"), b"two");
    env.umount(&plain).await;
}

/// Runs the binary as `mount.kmsfs` (through a symlink of that name in a
/// private directory, not /sbin) the way mount(8) calls it.
fn mount_helper(env: &Env, cipher: &Path, plain: &Path, options: &str) -> (i32, String) {
    let link = env.path("mount.kmsfs");
    if !link.exists() {
        std::os::unix::fs::symlink(kmsfs_bin(), &link).expect("symlink");
    }
    let out = Command::new(&link)
        .arg(cipher)
        .arg(plain)
        .arg("-o")
        .arg(options)
        .env_remove("KMSFS_CONFIG")
        .output()
        .expect("run mount.kmsfs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn kcv_option_pins_the_key_on_hosts_that_did_not_create_it() {
    let env = Env::new().await;
    let (cipher, plain, kcv) = env.create("pin").await;
    let (_, _, kcv_other) = env.create("unrelated").await;
    let _guard = CliMountGuard(plain.clone());
    env.populate(&cipher, &plain, &["f"]).await;
    let other_cfg = s(&env.other.config).to_string();

    // Unpinned: mounts, with exactly one warning that gives the value to pin.
    let run = env.mount(&env.other, &cipher, &plain, &[]).await.ok();
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", run.stderr);
    assert!(
        warnings[0].contains(&format!("-o kcv={kcv}")),
        "{}",
        warnings[0]
    );
    env.umount(&plain).await;

    // A wrong value is refused, by `kmsfs mount` and by mount.kmsfs (fstab).
    let run = env
        .mount(
            &env.other,
            &cipher,
            &plain,
            &["-o", &format!("kcv={kcv_other}")],
        )
        .await;
    assert_refused(
        &run,
        &cipher,
        &plain,
        &["the mount option kcv=", &kcv_other],
    );
    let (code, err) = mount_helper(
        &env,
        &cipher,
        &plain,
        &format!("_netdev,kcv={kcv_other},kms_config={other_cfg},kms_timeout=2"),
    );
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("the mount option kcv="), "{err}");
    assert!(!is_mounted(&plain));
    let (code, err) = mount_helper(&env, &cipher, &plain, "kcv=xyz");
    assert_ne!(code, 0);
    assert!(err.contains("32 hex digits"), "{err}");

    // The right value (any case) mounts without a warning.
    let upper = kcv.to_uppercase();
    let (code, err) = mount_helper(
        &env,
        &cipher,
        &plain,
        &format!("_netdev,kcv={upper},kms_config={other_cfg}"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
    assert_eq!(fs::read(plain.join("f")).expect("read"), b"f");
    env.umount(&plain).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_decrypt_only_token_mounts_but_cannot_create() {
    let env = Env::new().await;
    let (cipher, plain, kcv) = env.create("ro-host").await;
    let _guard = CliMountGuard(plain.clone());
    env.populate(&cipher, &plain, &["report"]).await;
    // The mount host's policy, exactly as docs/kms.md gives it.
    env.server()
        .put_policy(
            "kmsfs-mount",
            r#"path "transit/decrypt/kmsfs" { capabilities = ["update"] }"#,
        )
        .await
        .expect("policy");
    let token = env
        .server()
        .create_token(&["kmsfs-mount"], "1h")
        .await
        .expect("token");
    let tf = write_token_file(env.cli.dir.path(), "mount-token", &token).expect("token file");
    let host = Kmsfs::new(env.path("mount-host/kms.toml"));
    // `kms set` would probe encrypt, which this host may not do.
    host.run_async(&[
        "kms",
        "set",
        "vault",
        env.server().addr(),
        KEY,
        "--token-file",
        s(&tf),
        "--skip-kms-test",
    ])
    .await
    .ok();

    let run = env
        .mount(&host, &cipher, &plain, &["-o", &format!("kcv={kcv}")])
        .await
        .ok();
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
    assert_eq!(fs::read(plain.join("report")).expect("read"), b"report");
    fs::write(plain.join("written-by-mount-host"), b"yes").expect("write");
    env.umount(&plain).await;

    // `kms check` may not read the key on such a host.
    let check = host.run_async(&["kms", "check"]).await.failed();
    assert!(
        check.stdout.lines().any(|l| l.starts_with("FAIL key ")),
        "{}",
        check.stdout
    );

    let target = env.path("new-fs");
    let run = host.run_async(&["create", s(&target)]).await.failed();
    assert!(run.stderr.contains("permission denied"), "{}", run.stderr);
    assert!(
        !target.exists(),
        "a failed create left {}",
        target.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_header_after_a_rewrap_mounts_until_the_old_version_is_retired() {
    let env = Env::new().await;
    let (cipher, plain, _) = env.create("replay").await;
    let _guard = CliMountGuard(plain.clone());
    env.populate(&cipher, &plain, &["kept"]).await;
    let old = fs::read(cipher.join("kmsfs.header")).expect("header");
    env.server().rotate_key(KEY).await.expect("rotate");
    env.cli.kmsfs.run_async(&["rewrap", s(&cipher)]).await.ok();
    assert_ne!(fs::read(cipher.join("kmsfs.header")).expect("new"), old);

    // Not detected: the old header holds the same master key (same key
    // check value), and the KMS still decrypts key version 1.
    fs::write(cipher.join("kmsfs.header"), &old).expect("replay");
    env.mount(&env.cli.kmsfs, &cipher, &plain, &[]).await.ok();
    assert_eq!(fs::read(plain.join("kept")).expect("read"), b"kept");
    env.umount(&plain).await;

    // Retiring version 1 on the KMS is what makes the old header useless.
    env.server()
        .set_min_decryption_version(KEY, 2)
        .await
        .expect("retire v1");
    let run = env.mount(&env.cli.kmsfs, &cipher, &plain, &[]).await;
    assert_refused(&run, &cipher, &plain, &["KMS rejected the wrapped key"]);
}
