//! Key slots for a disaster-recovery KMS (issue 9): `kmsfs slot add` wraps
//! the master key with a second, independent OpenBao server; with the
//! primary stopped, a host configured for the DR server mounts and reads
//! the data. `slot remove` refuses the last slot and the only slot the
//! current configuration opens; `rewrap` reports each slot; `kms check`
//! warns per slot; a slot removed without the key is refused.
//!
//! Two real OpenBao dev servers (primary and DR), the real `kmsfs` binary,
//! real FUSE mounts (unmounted by guards even when an assertion fails).

use std::fs;
use std::path::{Path, PathBuf};

use kmsfs_e2e::bao::{write_token_file, BaoServer};
use kmsfs_e2e::cli::{CliEnv, Kmsfs, Run};
use kmsfs_e2e::fuse::{is_mounted, CliMountGuard};
use sha2::{Digest, Sha256};

const KEY: &str = "kmsfs";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A primary host (its own server, registry, configuration) and a DR
/// server with a configuration file for it in a separate directory (as a
/// DR host would have: no registry, nothing else).
struct Env {
    primary: CliEnv,
    dr_server: Option<BaoServer>,
    /// `kmsfs` configured for the DR server only.
    dr: Kmsfs,
}

impl Env {
    async fn new() -> Env {
        let primary = CliEnv::new().await;
        let dr_server = BaoServer::start().await.expect("DR bao server");
        // The same key name as the primary's: an independent key on another
        // cluster, which the slot's recorded address tells apart.
        dr_server.create_key(KEY, false).await.expect("DR key");
        dr_server
            .put_policy("kmsfs", &BaoServer::transit_policy(KEY))
            .await
            .expect("DR policy");
        let token = dr_server
            .create_token(&["kmsfs"], "1h")
            .await
            .expect("DR token");
        let dr_dir = primary.path("dr-host");
        fs::create_dir_all(&dr_dir).expect("dr dir");
        let tf = write_token_file(&dr_dir, "token", &token).expect("DR token file");
        let dr = Kmsfs::new(dr_dir.join("kms.toml"));
        dr.run_async(&[
            "kms",
            "set",
            "vault",
            dr_server.addr(),
            KEY,
            "--token-file",
            s(&tf),
        ])
        .await
        .ok();
        Env {
            primary,
            dr_server: Some(dr_server),
            dr,
        }
    }

    fn host(&self) -> &Kmsfs {
        &self.primary.kmsfs
    }

    fn primary_server(&self) -> &BaoServer {
        self.primary.server.as_ref().expect("primary server")
    }

    fn dr_server(&self) -> &BaoServer {
        self.dr_server.as_ref().expect("DR server")
    }

    async fn run(&self, host: &Kmsfs, args: &[&str]) -> Run {
        host.run_async(args).await
    }

    /// `slot add CIPHER --kms-config <DR config> --label LABEL` on the primary host.
    async fn add_dr_slot(&self, cipher: &Path, label: &str) -> Run {
        self.run(
            self.host(),
            &[
                "slot",
                "add",
                s(cipher),
                "--kms-config",
                s(&self.dr.config),
                "--label",
                label,
            ],
        )
        .await
    }

    async fn slots_json(&self, cipher: &Path) -> Vec<serde_json::Value> {
        let v = self
            .run(self.host(), &["slot", "list", s(cipher), "--json"])
            .await
            .ok()
            .json();
        v["slots"].as_array().expect("slots array").clone()
    }
}

fn header(cipher: &Path) -> PathBuf {
    cipher.join("kmsfs.header")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dr_slot_mounts_with_the_primary_kms_stopped() {
    let mut env = Env::new().await;
    let (cipher, plain) = env.primary.create("fs").await;
    let _guard = CliMountGuard(plain.clone());

    // Data written through the primary KMS.
    env.primary.mount(&cipher, &plain, &[]).await.ok();
    fs::create_dir(plain.join("docs")).expect("mkdir");
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(plain.join("docs/ledger.bin"), &payload).expect("write");
    env.run(env.host(), &["umount", s(&plain)]).await.ok();
    assert!(!is_mounted(&plain));

    let r = env.add_dr_slot(&cipher, "dr").await.ok();
    assert!(
        r.stdout.contains("slot 1 'dr'") && r.stdout.contains(env.dr_server().addr()),
        "{}",
        r.stdout
    );
    assert_eq!(
        fs::read_dir(&cipher)
            .expect("ls")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".bak"))
            .count(),
        0,
        "the backup is removed after a successful change"
    );

    // list: text and JSON.
    let text = env
        .run(env.host(), &["slot", "list", s(&cipher)])
        .await
        .ok()
        .stdout;
    println!("slot list:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let cells = |l: &str| -> Vec<String> { l.split_whitespace().map(String::from).collect() };
    assert_eq!(
        cells(lines[0]),
        [
            "INDEX",
            "LABEL",
            "TYPE",
            "KEY",
            "VERSION",
            "MOUNT",
            "NAMESPACE",
            "CREATED",
            "ADDRESSES"
        ]
    );
    for (line, (i, label, addr)) in lines[1..].iter().zip([
        ("0", "primary", env.primary_server().addr()),
        ("1", "dr", env.dr_server().addr()),
    ]) {
        let c = cells(line);
        assert_eq!(
            c[..7],
            [i, label, "vault", KEY, "v1", "transit", "-"],
            "{text}"
        );
        assert!(c[7].ends_with('Z'), "{text}");
        assert_eq!(c[8], addr, "{text}");
    }
    let slots = env.slots_json(&cipher).await;
    assert_eq!(slots.len(), 2);
    assert_eq!(slots[0]["label"], "primary");
    assert_eq!(slots[1]["label"], "dr");
    assert_eq!(slots[1]["index"], 1);
    assert_eq!(slots[1]["kms_type"], "vault");
    assert_eq!(slots[1]["key_name"], KEY);
    assert_eq!(slots[1]["key_version"], 1);
    assert_eq!(slots[1]["transit_path"], "transit");
    assert_eq!(slots[1]["namespace"], serde_json::Value::Null);
    assert_eq!(
        slots[1]["addresses"],
        serde_json::json!([env.dr_server().addr()])
    );
    assert!(
        slots[1]["created"]
            .as_str()
            .is_some_and(|c| c.ends_with('Z')),
        "{slots:?}"
    );

    // A second slot for the same KMS key is refused.
    let r = env.add_dr_slot(&cipher, "dr-again").await.failed();
    assert!(r.stderr.contains("already wraps"), "{}", r.stderr);
    // A duplicate label is refused.
    let other = env.primary.path("other.toml");
    fs::copy(&env.primary.kmsfs.config, &other).expect("copy config");
    let r = env
        .run(
            env.host(),
            &[
                "slot",
                "add",
                s(&cipher),
                "--kms-config",
                s(&other),
                "--label",
                "dr",
            ],
        )
        .await
        .failed();
    assert!(r.stderr.contains("already labelled 'dr'"), "{}", r.stderr);

    // A KMS that does not answer: refused, header unchanged.
    let before = fs::read(header(&cipher)).expect("header");
    let dead = Kmsfs::new(env.primary.path("dead/kms.toml"));
    dead.run_async(&[
        "kms",
        "set",
        "vault",
        &kmsfs_e2e::bao::dead_address().expect("port"),
        KEY,
        "--token-file",
        s(&env.primary.token_file),
        "--timeout",
        "2",
        "--skip-kms-test",
    ])
    .await
    .ok();
    let r = env
        .run(
            env.host(),
            &["slot", "add", s(&cipher), "--kms-config", s(&dead.config)],
        )
        .await
        .failed();
    assert!(
        r.stderr.contains("unreachable") && r.stderr.contains("header unchanged"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(header(&cipher)).expect("header"), before);

    // The primary KMS goes away.
    drop(env.primary.server.take());
    let r = env
        .run(env.host(), &["unlock-check", s(&cipher)])
        .await
        .failed();
    // The error lists each slot tried and why.
    println!("unlock with the primary down:\n{}", r.stderr);
    assert!(
        r.stderr.contains("slot 0 'primary'") && r.stderr.contains("slot 1 'dr'"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("unreachable"), "{}", r.stderr);

    // A DR host: only the DR configuration, no registry, no primary.
    let r = env
        .run(
            &env.dr,
            &["mount", s(&cipher), s(&plain), "--kms-timeout", "2"],
        )
        .await
        .ok();
    assert!(is_mounted(&plain), "{}", r.stderr);
    assert_eq!(
        fs::read(plain.join("docs/ledger.bin")).expect("read back"),
        payload
    );
    fs::write(plain.join("docs/after-dr.txt"), b"written at the DR site").expect("write");
    env.run(&env.dr, &["umount", s(&plain)]).await.ok();
    let r = env.run(&env.dr, &["unlock-check", s(&cipher)]).await.ok();
    assert_eq!(r.stdout.trim(), "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_refuses_the_last_slot_and_the_only_slot_this_config_opens() {
    let env = Env::new().await;
    let (cipher, _plain) = env.primary.create("fs").await;
    let hp = header(&cipher);

    let before = fs::read(&hp).expect("header");
    let r = env
        .run(env.host(), &["slot", "remove", s(&cipher), "primary"])
        .await
        .failed();
    assert!(r.stderr.contains("last key slot"), "{}", r.stderr);
    let r = env
        .run(env.host(), &["slot", "remove", s(&cipher), "0", "--force"])
        .await
        .failed();
    assert!(r.stderr.contains("last key slot"), "{}", r.stderr);
    assert_eq!(fs::read(&hp).expect("header"), before);

    env.add_dr_slot(&cipher, "dr").await.ok();
    let before = fs::read(&hp).expect("header");
    // The primary slot is the only one the primary configuration opens.
    let r = env
        .run(env.host(), &["slot", "remove", s(&cipher), "primary"])
        .await
        .failed();
    assert!(
        r.stderr.contains("only slot this KMS configuration")
            && r.stderr.contains("--force")
            && r.stderr.contains("slot 1 'dr'"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(&hp).expect("header"), before);
    let r = env
        .run(env.host(), &["slot", "remove", s(&cipher), "7"])
        .await
        .failed();
    assert!(r.stderr.contains("no key slot 7"), "{}", r.stderr);
    let r = env
        .run(env.host(), &["slot", "remove", s(&cipher), "nope"])
        .await
        .failed();
    assert!(
        r.stderr.contains("no key slot labelled 'nope'"),
        "{}",
        r.stderr
    );

    // Removing the DR slot is fine: the primary still opens it.
    let r = env
        .run(env.host(), &["slot", "remove", s(&cipher), "dr"])
        .await
        .ok();
    assert!(r.stdout.contains("removed slot 1 'dr'"), "{}", r.stdout);
    assert_eq!(env.slots_json(&cipher).await.len(), 1);
    env.run(&env.dr, &["unlock-check", s(&cipher)])
        .await
        .failed();

    // Hand the filesystem over to the DR KMS entirely.
    env.add_dr_slot(&cipher, "dr-2").await.ok();
    env.run(
        env.host(),
        &["slot", "remove", s(&cipher), "primary", "--force"],
    )
    .await
    .ok();
    let slots = env.slots_json(&cipher).await;
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0]["label"], "dr-2");
    let r = env
        .run(env.host(), &["unlock-check", s(&cipher)])
        .await
        .failed();
    assert!(r.stderr.contains("slot 0 'dr-2'"), "{}", r.stderr);
    env.run(&env.dr, &["unlock-check", s(&cipher)]).await.ok();
    // The DR configuration can now remove nothing: the last slot.
    let r = env
        .run(&env.dr, &["slot", "remove", s(&cipher), "dr-2", "--force"])
        .await
        .failed();
    assert!(r.stderr.contains("last key slot"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrap_reports_each_slot_and_kms_check_warns_per_slot() {
    let env = Env::new().await;
    let (cipher, _plain) = env.primary.create("fs").await;
    env.add_dr_slot(&cipher, "dr").await.ok();
    let dir = s(&cipher);

    env.primary_server().rotate_key(KEY).await.expect("rotate");
    let r = env.run(env.host(), &["rewrap", dir]).await.ok();
    let out: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(out.len(), 2, "{}", r.stdout);
    assert_eq!(
        out[0],
        format!("{dir}: slot 0 'primary': kmsfs v1 -> kmsfs v2")
    );
    assert!(
        out[1].starts_with(&format!(
            "{dir}: slot 1 'dr': not reached by this KMS configuration, unchanged"
        )),
        "{}",
        r.stdout
    );

    env.dr_server().rotate_key(KEY).await.expect("rotate");
    env.dr_server().rotate_key(KEY).await.expect("rotate");
    let r = env.run(&env.dr, &["rewrap", dir]).await.ok();
    let out: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(out.len(), 2, "{}", r.stdout);
    assert!(
        out[0].starts_with(&format!("{dir}: slot 0 'primary': not reached")),
        "{}",
        r.stdout
    );
    assert_eq!(out[1], format!("{dir}: slot 1 'dr': kmsfs v1 -> kmsfs v3"));
    let slots = env.slots_json(&cipher).await;
    assert_eq!(slots[0]["key_version"], 2);
    assert_eq!(slots[1]["key_version"], 3);
    env.run(env.host(), &["unlock-check", dir]).await.ok();
    env.run(&env.dr, &["unlock-check", dir]).await.ok();

    // Nothing to do: unchanged, header byte for byte the same.
    let before = fs::read(header(&cipher)).expect("header");
    let r = env.run(env.host(), &["rewrap", dir]).await.ok();
    assert!(
        r.stdout.contains(
            "slot 0 'primary': kmsfs v2 -> kmsfs v2 (already the newest version, unchanged)"
        ),
        "{}",
        r.stdout
    );
    assert_eq!(fs::read(header(&cipher)).expect("header"), before);

    // kms check: a planned raise to 3 would cut the primary slot off.
    env.primary_server().rotate_key(KEY).await.expect("rotate");
    let r = env
        .run(
            env.host(),
            &[
                "kms",
                "check",
                "--planned-min-decryption-version",
                "kmsfs=3",
            ],
        )
        .await
        .ok();
    let warn = r
        .stdout
        .lines()
        .find(|l| l.starts_with("WARN filesystem") && l.contains("slot 0 'primary'"))
        .unwrap_or_else(|| panic!("no warning for slot 0:\n{}", r.stdout));
    assert!(
        warn.contains("planned min_decryption_version 3 would cut it off")
            && warn.contains(&format!("kmsfs rewrap {dir} --slot primary"))
            && warn.contains("other slots: 1 'dr'"),
        "{warn}"
    );
    assert!(
        r.stdout.lines().any(|l| l.starts_with("OK   filesystem")
            && l.contains("slot 1 'dr'")
            && l.contains("not this KMS")),
        "{}",
        r.stdout
    );
    // Without the plan nothing warns about the slot.
    let r = env.run(env.host(), &["kms", "check"]).await.ok();
    assert!(
        !r.stdout.lines().any(|l| l.starts_with("WARN filesystem")),
        "{}",
        r.stdout
    );
    let r = env
        .run(
            env.host(),
            &["kms", "check", "--planned-min-decryption-version", "kmsfs"],
        )
        .await
        .failed();
    assert!(r.stderr.contains("KEY=VERSION"), "{}", r.stderr);

    // Raised anyway: the slot can no longer be opened, and kms check says
    // which rewrap to run once it is lowered again.
    env.primary_server()
        .set_min_decryption_version(KEY, 3)
        .await
        .expect("min version");
    let r = env.run(env.host(), &["kms", "check"]).await.ok();
    assert!(
        r.stdout.lines().any(|l| l.starts_with("WARN filesystem")
            && l.contains("slot 0 'primary'")
            && l.contains("CANNOT be opened")
            && l.contains(&format!("kmsfs rewrap {dir} --slot primary"))),
        "{}",
        r.stdout
    );
    // The DR slot still opens it.
    env.run(&env.dr, &["unlock-check", dir]).await.ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_removed_without_the_key_is_refused() {
    let env = Env::new().await;
    let (cipher, plain) = env.primary.create("fs").await;
    let _guard = CliMountGuard(plain.clone());
    env.add_dr_slot(&cipher, "dr").await.ok();
    let hp = header(&cipher);
    let bytes = fs::read(&hp).expect("header");

    // Cut slot 1 (type 1, no flags, label "dr" up to the trailer), set the
    // slot count to 1, fix the length and the checksum; keep the MAC.
    let body_end = bytes.len() - 64;
    let marker = b"\x01\x00\x02dr";
    let start = bytes[..body_end]
        .windows(marker.len())
        .rposition(|w| w == marker)
        .expect("slot 1 in the header");
    let mut forged = bytes[..start].to_vec();
    forged[48] = 1;
    let len = (forged.len() + 64) as u16;
    forged[10..12].copy_from_slice(&len.to_le_bytes());
    let sum = Sha256::digest(&forged);
    forged.extend_from_slice(&sum);
    forged.extend_from_slice(&bytes[bytes.len() - 32..]);
    fs::write(&hp, &forged).expect("write forged header");

    // It parses (info, slot list show one slot) ...
    let slots = env.slots_json(&cipher).await;
    assert_eq!(slots.len(), 1);
    // ... but nothing opens it.
    let r = env
        .run(env.host(), &["unlock-check", s(&cipher)])
        .await
        .failed();
    assert!(
        r.stderr.contains("header authentication failed"),
        "{}",
        r.stderr
    );
    let r = env
        .primary
        .mount(&cipher, &plain, &["--kms-timeout", "2"])
        .await;
    assert_ne!(r.code, 0, "mounted a forged header:\n{}", r.stderr);
    assert!(
        r.stderr.contains("header authentication failed"),
        "{}",
        r.stderr
    );
    assert!(!is_mounted(&plain));
    // Nor is it re-signed by a slot command.
    let r = env
        .run(env.host(), &["slot", "remove", s(&cipher), "0", "--force"])
        .await
        .failed();
    assert!(
        r.stderr.contains("header authentication failed"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(&hp).expect("header"), forged);

    // The genuine header still works.
    fs::write(&hp, &bytes).expect("restore");
    env.run(env.host(), &["unlock-check", s(&cipher)])
        .await
        .ok();
}
