//! The `kmsfs` binary (kms set/show/unset/check, create, info, list, rewrap)
//! against a real OpenBao dev server. Each test has its own server, its own
//! configuration directory (`--config`) and its own backing directories.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kmsfs_e2e::bao::{dead_address, write_secret_file, write_token_file, BaoServer, ROOT_TOKEN};
use kmsfs_e2e::cli::{Kmsfs, Run};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// A server with `keys` created, a token limited to them, and a runner whose
/// configuration was saved with `kms set` (verified).
struct Setup {
    server: BaoServer,
    dir: TempDir,
    kmsfs: Kmsfs,
    token: String,
}

impl Setup {
    async fn new(keys: &[(&str, bool)]) -> Setup {
        let server = BaoServer::start().await.expect("bao server");
        let mut policy = String::new();
        for (k, derived) in keys {
            server.create_key(k, *derived).await.expect("create key");
            policy.push_str(&BaoServer::transit_policy(k));
        }
        server.put_policy("kmsfs", &policy).await.expect("policy");
        let token = server.create_token(&["kmsfs"], "1h").await.expect("token");
        let dir = tempfile::tempdir().expect("tempdir");
        let kmsfs = Kmsfs::new(dir.path().join("etc/kms.toml"));
        let tf = write_token_file(dir.path(), "token", &token).expect("token file");
        kmsfs
            .run([
                "kms",
                "set",
                "vault",
                server.addr(),
                keys[0].0,
                "--token-file",
                tf.to_str().expect("utf-8 path"),
            ])
            .ok();
        Setup {
            server,
            dir,
            kmsfs,
            token,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Run {
        self.kmsfs.run(args)
    }

    /// `kmsfs create DIR [extra...]`; returns the printed UUID.
    fn create(&self, dir: &Path, extra: &[&str]) -> String {
        let mut args = vec!["create", s(dir)];
        args.extend_from_slice(extra);
        let r = self.run(&args).ok();
        let uuid = r.stdout.trim().to_string();
        assert_eq!(uuid.len(), 36, "UUID expected on stdout: {r:?}");
        uuid
    }

    fn info(&self, dir: &Path) -> Value {
        self.run(&["info", s(dir), "--json"]).ok().json()
    }

    fn unlock_check(&self, dir: &Path) {
        let r = self.run(&["unlock-check", s(dir)]).ok();
        assert_eq!(r.stdout.trim(), "ok");
    }

    /// Asserts that no output of `r` contains the token.
    fn assert_no_token(&self, r: &Run) {
        for text in [&r.stdout, &r.stderr] {
            assert!(!text.contains(&self.token), "token leaked: {text}");
            assert!(!text.contains(ROOT_TOKEN), "root token leaked: {text}");
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn dir_entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn header(dir: &Path) -> PathBuf {
    dir.join("kmsfs.header")
}

#[tokio::test]
async fn kms_set_show_check() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    let mode = fs::metadata(&st.kmsfs.config)
        .expect("config")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let r = st.run(&["kms", "show"]).ok();
    st.assert_no_token(&r);
    assert!(r.stdout.contains(st.server.addr()), "{}", r.stdout);
    assert!(r.stdout.contains("file "), "{}", r.stdout);
    assert!(r.stdout.contains(s(&st.path("token"))), "{}", r.stdout);

    let r = st.run(&["kms", "show", "--json"]).ok();
    st.assert_no_token(&r);
    let v = r.json();
    assert_eq!(v["source"], "file");
    assert_eq!(v["config"]["key_name"], "kmsfs");
    assert_eq!(v["config"]["auth"]["token_file"], s(&st.path("token")));

    let r = st.run(&["kms", "check"]).ok();
    st.assert_no_token(&r);
    for needle in [
        "WARN storage",
        "WARN tls",
        "WARN ha",
        "OK   probe",
        "OK   key",
    ] {
        assert!(r.stdout.contains(needle), "missing {needle}:\n{}", r.stdout);
    }
    assert!(!r.stdout.contains("FAIL"), "{}", r.stdout);

    let v = st.run(&["kms", "check", "--json"]).ok().json();
    assert_eq!(v["ok"], true);
    let checks = v["checks"].as_array().expect("checks");
    let status = |name: &str| -> Vec<String> {
        checks
            .iter()
            .filter(|c| c["check"] == name)
            .map(|c| c["status"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(status("storage"), vec!["WARN"]);
    assert_eq!(status("ha"), vec!["WARN"]);
    assert_eq!(status("probe"), vec!["OK"]);
    // A 1-hour token: expiry warning.
    assert_eq!(status("token"), vec!["WARN"]);
}

#[tokio::test]
async fn kms_check_fails_when_unreachable_or_key_missing() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    // The key is deleted from under the configuration.
    st.server
        .api(
            "POST",
            "transit/keys/kmsfs/config",
            Some(serde_json::json!({"deletion_allowed": true})),
        )
        .await
        .expect("allow deletion");
    st.server
        .api("DELETE", "transit/keys/kmsfs", None)
        .await
        .expect("delete");
    let r = st.run(&["kms", "check"]).failed();
    assert!(r.stdout.contains("FAIL key"), "{}", r.stdout);
    assert!(
        r.stderr.contains("kmsfs: error: KMS check failed"),
        "{}",
        r.stderr
    );

    let Setup {
        server, kmsfs, dir, ..
    } = st;
    drop(server);
    let v = kmsfs.run(["kms", "check", "--json"]).failed().json();
    assert_eq!(v["ok"], false);
    assert!(v.to_string().contains("unreachable"), "{v}");
    drop(dir);
}

#[tokio::test]
async fn kms_set_missing_key_writes_nothing() {
    let server = BaoServer::start().await.expect("bao");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("kms.toml");
    let tf = write_token_file(dir.path(), "token", ROOT_TOKEN).expect("token");
    let r = Kmsfs::new(&cfg)
        .run([
            "kms",
            "set",
            "vault",
            server.addr(),
            "nokey",
            "--token-file",
            s(&tf),
        ])
        .failed();
    assert!(r.stderr.contains("'nokey' not found"), "{}", r.stderr);
    assert!(r.stderr.contains("NOT saved"), "{}", r.stderr);
    assert!(!r.stderr.contains(ROOT_TOKEN));
    assert!(!cfg.exists());
    // Even with a root token, nothing was created on the server.
    assert!(!server.key_exists("nokey").await.expect("key_exists"));
}

#[tokio::test]
async fn kms_set_refuses_world_readable_token_file() {
    let server = BaoServer::start().await.expect("bao");
    server.create_key("kmsfs", false).await.expect("key");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("kms.toml");
    let tf = write_secret_file(dir.path(), "token", ROOT_TOKEN, 0o644).expect("token");
    let r = Kmsfs::new(&cfg)
        .run([
            "kms",
            "set",
            "vault",
            server.addr(),
            "kmsfs",
            "--token-file",
            s(&tf),
        ])
        .failed();
    assert!(r.stderr.contains("chmod 600"), "{}", r.stderr);
    assert!(r.stderr.contains(s(&tf)), "{}", r.stderr);
    assert!(!r.stderr.contains(ROOT_TOKEN));
    assert!(!cfg.exists());
    // --skip-kms-test does not bypass the permission check either.
    Kmsfs::new(&cfg)
        .run([
            "kms",
            "set",
            "vault",
            server.addr(),
            "kmsfs",
            "--token-file",
            s(&tf),
            "--skip-kms-test",
        ])
        .failed();
    assert!(!cfg.exists());
}

#[test]
fn malformed_config_names_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("kms.toml");
    fs::write(
        &cfg,
        "type = \"vault\"\naddresses = [\"http://127.0.0.1:1\"]\nkey_name = kmsfs\n",
    )
    .expect("write");
    let r = Kmsfs::new(&cfg).run(["kms", "show"]).failed();
    assert!(r.stderr.starts_with("kmsfs: error: "), "{}", r.stderr);
    assert!(r.stderr.contains(s(&cfg)), "{}", r.stderr);
    assert!(r.stderr.contains("line 3"), "{}", r.stderr);
}

#[test]
fn unknown_kms_type_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("kms.toml");
    let r = Kmsfs::new(&cfg)
        .run([
            "kms",
            "set",
            "aws-kms",
            "https://kms:5696",
            "k",
            "--skip-kms-test",
        ])
        .failed();
    assert!(
        r.stderr.contains("unsupported KMS type 'aws-kms'")
            && r.stderr.contains("vault")
            && r.stderr.contains("kmip"),
        "{}",
        r.stderr
    );
    assert!(!cfg.exists());
    // KMIP without its certificates: a clear error even with --skip-kms-test.
    let r = Kmsfs::new(&cfg)
        .run(["kms", "set", "kmip", "kms:5696", "k", "--skip-kms-test"])
        .failed();
    assert!(
        r.stderr.contains("--ca-cert FILE is required"),
        "{}",
        r.stderr
    );
    assert!(!cfg.exists());
}

#[test]
fn no_configuration_tells_to_run_kms_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Kmsfs::new(dir.path().join("kms.toml"))
        .run(["create", s(&dir.path().join("fs"))])
        .failed();
    assert!(r.stderr.contains("kmsfs kms set"), "{}", r.stderr);
    assert!(!dir.path().join("fs").exists());
}

#[tokio::test]
async fn environment_fallback_is_reported() {
    let server = BaoServer::start().await.expect("bao");
    server.create_key("envkey", false).await.expect("key");
    let dir = tempfile::tempdir().expect("tempdir");
    let tf = write_token_file(dir.path(), "token", ROOT_TOKEN).expect("token");
    let k = Kmsfs::new(dir.path().join("kms.toml"))
        .with_env("BAO_ADDR", server.addr())
        .with_env("KMSFS_TOKEN_FILE", s(&tf))
        .with_env("KMSFS_KMS_KEY", "envkey");
    let r = k.run(["kms", "show"]).ok();
    assert!(r.stdout.contains("environment"), "{}", r.stdout);
    assert!(!r.stdout.contains(ROOT_TOKEN));
    let fsdir = dir.path().join("fs");
    k.run(["create", s(&fsdir)]).ok();
    let v = k.run(["info", s(&fsdir), "--json"]).ok().json();
    assert_eq!(v["key_name"], "envkey");
}

#[tokio::test]
async fn kms_unset_refused_while_filesystems_are_registered() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    st.create(&st.path("fs"), &[]);
    let r = st.run(&["kms", "unset"]).failed();
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    assert!(r.stderr.contains(s(&st.path("fs"))), "{}", r.stderr);
    assert!(st.kmsfs.config.exists());
    st.run(&["kms", "unset", "--force"]).ok();
    assert!(!st.kmsfs.config.exists());
    st.run(&["kms", "unset"]).failed();
}

#[tokio::test]
async fn create_then_info_even_with_the_kms_stopped() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    let fsdir = st.path("fs");
    let uuid = st.create(&fsdir, &[]);
    assert_eq!(dir_entries(&fsdir), vec!["kmsfs.diriv", "kmsfs.header"]);
    let iv = fs::metadata(fsdir.join("kmsfs.diriv")).expect("diriv");
    assert_eq!(iv.len(), 16);
    assert_eq!(iv.permissions().mode() & 0o777, 0o440);
    let hm = fs::metadata(header(&fsdir))
        .expect("header")
        .permissions()
        .mode();
    assert_eq!(hm & 0o777, 0o600);

    let v = st.info(&fsdir);
    assert_eq!(v["uuid"], uuid.as_str());
    assert_eq!(v["format_version"], 3);
    assert_eq!(v["slots"][0]["label"], "primary");
    assert_eq!(v["cipher"], "aes-256-xts");
    assert_eq!(v["names_cipher"], "aes-256-siv");
    assert_eq!(v["kms_type"], "vault");
    assert_eq!(v["key_name"], "kmsfs");
    assert_eq!(v["kms_key_version"], 1);
    assert_eq!(v["slot_count"], 1);
    let created = v["created"].as_str().expect("created");
    assert!(created.ends_with('Z') && created.len() == 20, "{created}");
    st.unlock_check(&fsdir);

    let text = st.run(&["info", s(&fsdir)]).ok().stdout;
    assert!(
        text.contains(&uuid) && text.contains("kms_key_version:  1"),
        "{text}"
    );

    let Setup {
        server, kmsfs, dir, ..
    } = st;
    drop(server);
    let v = kmsfs.run(["info", s(&fsdir), "--json"]).ok().json();
    assert_eq!(v["uuid"], uuid.as_str());
    assert_eq!(v["kms_key_version"], 1);
    drop(dir);
}

#[tokio::test]
async fn create_refuses_non_empty_and_existing() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    let d = st.path("busy");
    fs::create_dir(&d).expect("mkdir");
    fs::write(d.join("precious.txt"), b"keep me").expect("write");
    let r = st.run(&["create", s(&d)]).failed();
    assert!(
        r.stderr.contains(s(&d)) && r.stderr.contains("not empty"),
        "{}",
        r.stderr
    );
    assert_eq!(dir_entries(&d), vec!["precious.txt"]);
    assert_eq!(fs::read(d.join("precious.txt")).expect("read"), b"keep me");

    let fsdir = st.path("fs");
    st.create(&fsdir, &[]);
    let before = fs::read(header(&fsdir)).expect("header");
    let r = st.run(&["create", s(&fsdir)]).failed();
    assert!(
        r.stderr.contains("already holds a kmsfs filesystem"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(header(&fsdir)).expect("header"), before);

    let r = st.run(&["create", s(&st.path("no/such/parent"))]).failed();
    assert!(r.stderr.contains("parent directory"), "{}", r.stderr);
}

#[test]
fn create_with_kms_down_leaves_the_directory_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tf = write_token_file(dir.path(), "token", "s.unused").expect("token");
    let k = Kmsfs::new(dir.path().join("kms.toml"));
    let addr = dead_address().expect("dead address");
    k.run([
        "kms",
        "set",
        "vault",
        &addr,
        "kmsfs",
        "--token-file",
        s(&tf),
        "--timeout",
        "2",
        "--skip-kms-test",
    ])
    .ok();
    let r = k
        .run([
            "kms",
            "set",
            "vault",
            &addr,
            "kmsfs",
            "--token-file",
            s(&tf),
        ])
        .failed();
    assert!(r.stderr.contains("unreachable"), "{}", r.stderr);

    let new = dir.path().join("new");
    let r = k.run(["create", s(&new)]).failed();
    assert!(
        r.stderr.contains("unreachable") && r.stderr.contains(&addr),
        "{}",
        r.stderr
    );
    assert!(!new.exists());

    let empty = dir.path().join("empty");
    fs::create_dir(&empty).expect("mkdir");
    k.run(["create", s(&empty)]).failed();
    assert!(dir_entries(&empty).is_empty());
    assert!(!dir.path().join("registry.toml").exists());
}

#[tokio::test]
async fn create_with_missing_key_does_not_create_it() {
    let server = BaoServer::start().await.expect("bao");
    server.create_key("kmsfs", false).await.expect("key");
    let dir = tempfile::tempdir().expect("tempdir");
    // The root token could create keys: kmsfs must still not.
    let tf = write_token_file(dir.path(), "token", ROOT_TOKEN).expect("token");
    let k = Kmsfs::new(dir.path().join("kms.toml"));
    k.run([
        "kms",
        "set",
        "vault",
        server.addr(),
        "kmsfs",
        "--token-file",
        s(&tf),
    ])
    .ok();
    let fsdir = dir.path().join("fs");
    let r = k
        .run(["create", s(&fsdir), "--kms-key", "missing"])
        .failed();
    assert!(r.stderr.contains("'missing' not found"), "{}", r.stderr);
    assert!(!fsdir.exists());
    assert!(!server.key_exists("missing").await.expect("key_exists"));
}

#[tokio::test]
async fn rewrap_after_rotation() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    let fsdir = st.path("fs");
    let uuid = st.create(&fsdir, &[]);
    st.server.rotate_key("kmsfs").await.expect("rotate");
    let r = st.run(&["rewrap", s(&fsdir)]).ok();
    assert!(r.stdout.contains("kmsfs v1 -> kmsfs v2"), "{}", r.stdout);
    let v = st.info(&fsdir);
    assert_eq!(v["kms_key_version"], 2);
    assert_eq!(v["uuid"], uuid.as_str());
    st.unlock_check(&fsdir);
    assert_eq!(dir_entries(&fsdir), vec!["kmsfs.diriv", "kmsfs.header"]);
    let hm = fs::metadata(header(&fsdir))
        .expect("header")
        .permissions()
        .mode();
    assert_eq!(hm & 0o777, 0o600);

    // Already current: nothing changes.
    let before = fs::read(header(&fsdir)).expect("header");
    let r = st.run(&["rewrap", s(&fsdir)]).ok();
    assert!(r.stdout.contains("unchanged"), "{}", r.stdout);
    assert_eq!(fs::read(header(&fsdir)).expect("header"), before);

    // The old version can now be retired without locking the filesystem out.
    st.server
        .set_min_decryption_version("kmsfs", 2)
        .await
        .expect("min version");
    st.unlock_check(&fsdir);
}

#[tokio::test]
async fn rewrap_to_a_new_key() {
    let st = Setup::new(&[("kmsfs", false), ("kmsfs-2026", false)]).await;
    let fsdir = st.path("fs");
    st.create(&fsdir, &[]);
    let r = st
        .run(&["rewrap", s(&fsdir), "--new-key", "kmsfs-2026"])
        .ok();
    assert!(
        r.stdout.contains("kmsfs v1 -> kmsfs-2026 v1"),
        "{}",
        r.stdout
    );
    let v = st.info(&fsdir);
    assert_eq!(v["key_name"], "kmsfs-2026");
    assert_eq!(v["kms_key_version"], 1);
    st.unlock_check(&fsdir);

    // A missing destination key is refused and not created.
    let before = fs::read(header(&fsdir)).expect("header");
    let r = st
        .run(&["rewrap", s(&fsdir), "--new-key", "ghost"])
        .failed();
    assert!(
        r.stdout.contains("FAILED") && r.stdout.contains("ghost"),
        "{}",
        r.stdout
    );
    assert_eq!(fs::read(header(&fsdir)).expect("header"), before);
    assert!(!st.server.key_exists("ghost").await.expect("key_exists"));
}

#[tokio::test]
async fn rewrap_all_registered_filesystems() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    let dirs: Vec<PathBuf> = (0..5).map(|i| st.path(&format!("fs{i}"))).collect();
    for d in &dirs {
        st.create(d, &[]);
    }
    let v = st.run(&["list", "--json"]).ok().json();
    let listed = v.as_array().expect("array");
    assert_eq!(listed.len(), 5);
    assert!(listed.iter().all(|e| e["present"] == true), "{v}");

    st.server.rotate_key("kmsfs").await.expect("rotate");
    st.server.rotate_key("kmsfs").await.expect("rotate");
    let r = st.run(&["rewrap", "--all"]).ok();
    assert_eq!(
        r.stdout.matches("kmsfs v1 -> kmsfs v3").count(),
        5,
        "{}",
        r.stdout
    );
    for d in &dirs {
        assert_eq!(st.info(d)["kms_key_version"], 3);
        st.unlock_check(d);
    }

    // One filesystem vanished: the others are still done, exit is non-zero.
    fs::remove_dir_all(&dirs[0]).expect("rm");
    st.server.rotate_key("kmsfs").await.expect("rotate");
    let r = st.run(&["rewrap", "--all"]).failed();
    assert_eq!(
        r.stdout.matches("kmsfs v3 -> kmsfs v4").count(),
        4,
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("not a kmsfs filesystem"), "{}", r.stdout);
    assert!(r.stderr.contains("1 of 5"), "{}", r.stderr);
}

#[tokio::test]
async fn rewrap_with_the_kms_down_leaves_the_header_untouched() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    let fsdir = st.path("fs");
    st.create(&fsdir, &[]);
    let before = fs::read(header(&fsdir)).expect("header");
    let Setup {
        server, kmsfs, dir, ..
    } = st;
    drop(server);
    let r = kmsfs.run(["rewrap", s(&fsdir)]).failed();
    assert!(r.stdout.contains("unreachable"), "{}", r.stdout);
    assert_eq!(fs::read(header(&fsdir)).expect("header"), before);
    assert_eq!(dir_entries(&fsdir), vec!["kmsfs.diriv", "kmsfs.header"]);
    drop(dir);
}

#[tokio::test]
async fn sealed_kms_rewrap_fails_cleanly() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    let fsdir = st.path("fs");
    st.create(&fsdir, &[]);
    let before = fs::read(header(&fsdir)).expect("header");
    st.server.seal().await.expect("seal");
    let r = st.run(&["rewrap", s(&fsdir)]).failed();
    assert!(r.stdout.contains("sealed"), "{}", r.stdout);
    assert_eq!(fs::read(header(&fsdir)).expect("header"), before);
    let r = st.run(&["kms", "check"]).failed();
    assert!(r.stdout.contains("FAIL seal"), "{}", r.stdout);
}

#[tokio::test]
async fn derived_key_create_and_rewrap() {
    let st = Setup::new(&[("kmsfs-derived", true)]).await;
    st.run(&["kms", "check"]).ok();
    let fsdir = st.path("fs");
    st.create(&fsdir, &[]);
    let v = st.info(&fsdir);
    assert_eq!(v["derived_context"], true);
    assert_eq!(v["key_name"], "kmsfs-derived");
    st.unlock_check(&fsdir);
    st.server.rotate_key("kmsfs-derived").await.expect("rotate");
    st.run(&["rewrap", s(&fsdir)]).ok();
    let v = st.info(&fsdir);
    assert_eq!(v["kms_key_version"], 2);
    assert_eq!(v["derived_context"], true);
    st.unlock_check(&fsdir);

    // The wrapped key is bound to this filesystem's UUID: another
    // filesystem's header slot does not unlock here.
    let other = st.path("other");
    st.create(&other, &[]);
    assert_ne!(st.info(&other)["uuid"], st.info(&fsdir)["uuid"]);
}

#[tokio::test]
async fn rewrap_between_plain_and_derived_keys() {
    let st = Setup::new(&[("kmsfs", false), ("kmsfs-derived", true)]).await;
    let fsdir = st.path("fs");
    st.create(&fsdir, &[]);
    st.run(&["rewrap", s(&fsdir), "--new-key", "kmsfs-derived"])
        .ok();
    let v = st.info(&fsdir);
    assert_eq!(v["derived_context"], true);
    st.unlock_check(&fsdir);
    st.run(&["rewrap", s(&fsdir), "--new-key", "kmsfs"]).ok();
    let v = st.info(&fsdir);
    assert_eq!(v["derived_context"], false);
    assert_eq!(v["key_name"], "kmsfs");
    st.unlock_check(&fsdir);
}

#[tokio::test]
async fn damaged_header_is_reported_with_its_file() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    let fsdir = st.path("fs");
    st.create(&fsdir, &[]);
    let hp = header(&fsdir);
    let mut bytes = fs::read(&hp).expect("header");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&hp, &bytes).expect("write");
    let r = st.run(&["info", s(&fsdir)]).failed();
    assert!(r.stderr.contains(s(&hp)), "{}", r.stderr);
    assert!(r.stderr.contains("checksum"), "{}", r.stderr);

    // Truncated, and garbage.
    fs::write(&hp, &bytes[..40]).expect("write");
    let r = st.run(&["info", s(&fsdir)]).failed();
    assert!(
        r.stderr.contains(s(&hp)) && r.stderr.contains("truncated"),
        "{}",
        r.stderr
    );
    fs::write(&hp, b"this is not a header at all, just some text").expect("write");
    let r = st.run(&["info", s(&fsdir)]).failed();
    assert!(r.stderr.contains("bad magic"), "{}", r.stderr);

    let r = st.run(&["info", s(&st.path("nothing"))]).failed();
    assert!(r.stderr.contains("not a kmsfs filesystem"), "{}", r.stderr);
}

#[tokio::test]
async fn forged_header_is_refused_by_the_mac() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    let fsdir = st.path("fs");
    st.create(&fsdir, &[]);
    let hp = header(&fsdir);
    let mut bytes = fs::read(&hp).expect("header");
    // Change the creation time (offset 36) and fix the checksum: a forger
    // can do that, but cannot recompute the HMAC.
    bytes[40] ^= 0x01;
    let l = bytes.len();
    let sum = Sha256::digest(&bytes[..l - 64]);
    bytes[l - 64..l - 32].copy_from_slice(&sum);
    fs::write(&hp, &bytes).expect("write");

    st.run(&["info", s(&fsdir)]).ok();
    let r = st.run(&["unlock-check", s(&fsdir)]).failed();
    assert!(
        r.stderr.contains("header authentication failed"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(s(&hp)), "{}", r.stderr);

    // rewrap refuses to re-sign a forged header.
    st.server.rotate_key("kmsfs").await.expect("rotate");
    let r = st.run(&["rewrap", s(&fsdir)]).failed();
    assert!(
        r.stdout.contains("header authentication failed"),
        "{}",
        r.stdout
    );
    assert_eq!(fs::read(&hp).expect("header"), bytes);
}

#[tokio::test]
async fn list_and_check_know_registered_filesystems() {
    let st = Setup::new(&[("kmsfs", false)]).await;
    let a = st.path("a");
    let b = st.path("b");
    let ua = st.create(&a, &[]);
    let ub = st.create(&b, &[]);
    let v = st.run(&["list", "--json"]).ok().json();
    let rows = v.as_array().expect("array");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["path"], s(&a));
    assert_eq!(rows[0]["uuid"], ua.as_str());
    assert_eq!(rows[1]["uuid"], ub.as_str());
    assert!(rows.iter().all(|r| r["present"] == true));

    fs::remove_dir_all(&b).expect("rm");
    let v = st.run(&["list", "--json"]).ok().json();
    assert_eq!(v[1]["present"], false);
    let text = st.run(&["list"]).ok().stdout;
    assert!(
        text.contains(&ua) && text.contains("not a kmsfs filesystem"),
        "{text}"
    );

    // A filesystem still on version 1 while min_decryption_version is 2.
    st.server.rotate_key("kmsfs").await.expect("rotate");
    st.server
        .set_min_decryption_version("kmsfs", 2)
        .await
        .expect("min version");
    // Its only slot is cut off: the slot is named (WARN) and the
    // filesystem, which no mount can open now, FAILs the check.
    let r = st.run(&["kms", "check"]).failed();
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("WARN filesystem") && l.contains(s(&a)) && l.contains("CANNOT")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("FAIL unlock") && l.contains(s(&a))),
        "{}",
        r.stdout
    );
}
