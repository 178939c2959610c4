//! Token lifetime and TLS trust through the real binary (issue 10): a
//! mount daemon renews a periodic token for as long as it is mounted,
//! `kms renew` extends a token, `kms set` saves the CA it verified with so
//! that a mount without VAULT_CACERT works, the OS trust store is used when
//! no CA is given, and `--no-verify` is gone in favour of
//! `--skip-kms-test`. Real OpenBao dev servers, real mounts; every server
//! is stopped by PID and every mount unmounted by a guard.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use kmsfs_e2e::bao::{write_token_file, BaoServer};
use kmsfs_e2e::bao_auth::TlsBao;
use kmsfs_e2e::cli::{kmsfs_bin, Kmsfs};
use kmsfs_e2e::fuse::{daemon_pids, force_unmount, is_mounted, CliMountGuard};
use serde_json::{json, Value};

/// The period of the periodic tokens: short, with a margin of half of it
/// for a loaded machine between two renewals.
const PERIOD_SECS: u64 = 10;

async fn server_with_key() -> BaoServer {
    let server = BaoServer::start().await.unwrap();
    server.create_key("kmsfs", false).await.unwrap();
    server
        .put_policy("kmsfs", &BaoServer::transit_policy("kmsfs"))
        .await
        .unwrap();
    server
}

/// `(token, accessor)` of a new token made with `body` by the root token.
async fn new_token(server: &BaoServer, body: Value) -> (String, String) {
    let v = server
        .api("POST", "auth/token/create", Some(body))
        .await
        .unwrap();
    (
        v["auth"]["client_token"].as_str().unwrap().to_string(),
        v["auth"]["accessor"].as_str().unwrap().to_string(),
    )
}

/// The remaining TTL of the token with `accessor`, or `None` once it is
/// gone (expired or revoked).
async fn ttl_by_accessor(server: &BaoServer, accessor: &str) -> Option<u64> {
    let (status, v) = server
        .api_raw(
            kmsfs_e2e::bao::ROOT_TOKEN,
            "POST",
            "auth/token/lookup-accessor",
            Some(json!({ "accessor": accessor })),
        )
        .await
        .unwrap();
    (status == 200).then(|| v["data"]["ttl"].as_u64().unwrap())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Waits until the mount daemon serving `plain` is gone (after an unmount).
async fn wait_daemon_gone(plain: &Path) {
    for _ in 0..100 {
        if daemon_pids(plain).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the mount daemon of {} did not exit", plain.display());
}

/// A periodic token used by a mount outlives several periods, because
/// the mount daemon renews it; a control token of the same period that
/// nobody renews expires. `bao token lookup` by accessor shows both.
#[tokio::test(flavor = "multi_thread")]
async fn a_mount_daemon_renews_a_periodic_token_across_several_periods() {
    kmsfs_bin(); // built before the clock of the short-lived tokens starts
    let server = server_with_key().await;
    let dir = tempfile::tempdir().unwrap();
    let kmsfs = Kmsfs::new(dir.path().join("kms.toml"));
    let period = json!({ "policies": ["kmsfs"], "period": format!("{PERIOD_SECS}s") });
    let (token, accessor) = new_token(&server, period.clone()).await;
    let (_, control) = new_token(&server, period).await;
    let tf = write_token_file(dir.path(), "token", &token).unwrap();
    kmsfs
        .run_async(&[
            "kms",
            "set",
            "vault",
            server.addr(),
            "kmsfs",
            "--token-file",
            s(&tf),
        ])
        .await
        .ok();
    let cipher = dir.path().join("cipher");
    let plain = dir.path().join("plain");
    fs::create_dir(&plain).unwrap();
    kmsfs.run_async(&["create", s(&cipher)]).await.ok();
    let _guard = CliMountGuard(plain.clone());
    kmsfs
        .run_async(&["mount", s(&cipher), s(&plain)])
        .await
        .ok();

    // Three and a half periods: the control token is long gone by then.
    tokio::time::sleep(Duration::from_secs(PERIOD_SECS * 7 / 2)).await;
    assert!(is_mounted(&plain));
    fs::write(plain.join("f"), b"still here").unwrap();
    assert_eq!(fs::read(plain.join("f")).unwrap(), b"still here");
    assert_eq!(
        ttl_by_accessor(&server, &control).await,
        None,
        "the control token should have expired"
    );
    let ttl = ttl_by_accessor(&server, &accessor).await;
    assert!(
        matches!(ttl, Some(t) if t > 0),
        "the mount's token expired: {ttl:?}"
    );
    // The same token still works for other commands on the host.
    kmsfs.run_async(&["kms", "check"]).await.ok();

    kmsfs.run_async(&["umount", s(&plain)]).await.ok();
    wait_daemon_gone(&plain).await;
    force_unmount(&plain);
}

/// `kms renew` extends a renewable token's TTL and says by how much; a
/// token that is not renewable is an error naming the fix; a token that
/// does not expire needs nothing.
#[tokio::test(flavor = "multi_thread")]
async fn kms_renew_extends_a_token_ttl() {
    let server = server_with_key().await;
    let dir = tempfile::tempdir().unwrap();
    let kmsfs = Kmsfs::new(dir.path().join("kms.toml"));
    let (token, accessor) = new_token(&server, json!({ "policies": ["kmsfs"], "ttl": "1h" })).await;
    let tf = write_token_file(dir.path(), "token", &token).unwrap();
    kmsfs
        .run_async(&[
            "kms",
            "set",
            "vault",
            server.addr(),
            "kmsfs",
            "--token-file",
            s(&tf),
        ])
        .await
        .ok();
    // Let the TTL run down a little, so that a renewal shows.
    let mut before = ttl_by_accessor(&server, &accessor).await.unwrap();
    while before >= 3599 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        before = ttl_by_accessor(&server, &accessor).await.unwrap();
    }
    let run = kmsfs.run_async(&["kms", "renew", "--json"]).await.ok();
    let v = run.json();
    assert_eq!(v["renewed"], true, "{v}");
    let ttl = v["ttl"].as_u64().unwrap();
    assert!(ttl > before, "{v} (before: {before})");
    assert!(v["previous_ttl"].as_u64().unwrap() <= before, "{v}");
    let after = ttl_by_accessor(&server, &accessor).await.unwrap();
    assert!(
        after > before,
        "lookup after renew: {after}, before: {before}"
    );
    assert!(!run.stdout.contains(&token) && !run.stderr.contains(&token));
    let text = kmsfs.run_async(&["kms", "renew"]).await.ok();
    assert!(
        text.stdout.contains("renewed: the token is valid for"),
        "{}",
        text.stdout
    );

    let (fixed, _) = new_token(
        &server,
        json!({ "policies": ["kmsfs"], "ttl": "1h", "renewable": false }),
    )
    .await;
    write_token_file(dir.path(), "token", &fixed).unwrap();
    let run = kmsfs.run_async(&["kms", "renew"]).await.failed();
    assert!(
        run.stderr.contains("not renewable") && run.stderr.contains("replace it"),
        "{}",
        run.stderr
    );

    write_token_file(dir.path(), "token", kmsfs_e2e::bao::ROOT_TOKEN).unwrap();
    let run = kmsfs.run_async(&["kms", "renew", "--json"]).await.ok();
    assert_eq!(run.json()["renewed"], false, "{}", run.stdout);
}

/// `kms set` with VAULT_CACERT saves a copy of that CA next to the
/// configuration (0644) and points the configuration at it; create and
/// mount then work with no VAULT_CACERT, even once the original file is
/// gone. Without any CA the OS trust store is used (SSL_CERT_FILE here).
#[tokio::test(flavor = "multi_thread")]
async fn kms_set_saves_the_ca_it_verified_with_for_boot_time_mounts() {
    let bao = TlsBao::start().await.unwrap();
    let server = &bao.server;
    server.create_key("kmsfs", false).await.unwrap();
    server
        .put_policy("kmsfs", &BaoServer::transit_policy("kmsfs"))
        .await
        .unwrap();
    let token = server.create_token(&["kmsfs"], "1h").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tf = write_token_file(dir.path(), "token", &token).unwrap();
    let shell_ca = dir.path().join("shell-ca.pem");
    fs::copy(bao.ca_cert(), &shell_ca).unwrap();
    let etc = dir.path().join("etc");
    let config = etc.join("kms.toml");
    let with_env = Kmsfs::new(&config).with_env("VAULT_CACERT", s(&shell_ca));
    with_env
        .run_async(&[
            "kms",
            "set",
            "vault",
            &bao.tls_addr,
            "kmsfs",
            "--token-file",
            s(&tf),
        ])
        .await
        .ok();
    let copy = etc.join("kms-ca.pem");
    assert_eq!(fs::read(&copy).unwrap(), fs::read(&shell_ca).unwrap());
    assert_eq!(
        fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let saved = fs::read_to_string(&config).unwrap();
    assert!(
        saved.contains(&format!("ca_cert = \"{}\"", copy.display())),
        "{saved}"
    );

    // A boot-time mount: no VAULT_CACERT, and the shell's file is gone.
    fs::remove_file(&shell_ca).unwrap();
    let boot = Kmsfs::new(&config);
    let cipher = dir.path().join("cipher");
    let plain = dir.path().join("plain");
    fs::create_dir(&plain).unwrap();
    boot.run_async(&["create", s(&cipher)]).await.ok();
    let _guard = CliMountGuard(plain.clone());
    boot.run_async(&["mount", s(&cipher), s(&plain)]).await.ok();
    fs::write(plain.join("f"), b"over TLS").unwrap();
    assert_eq!(fs::read(plain.join("f")).unwrap(), b"over TLS");
    boot.run_async(&["umount", s(&plain)]).await.ok();
    wait_daemon_gone(&plain).await;

    // No CA at all: the OS trust store decides. The test CA is not in it,
    // so the same server is a TLS error...
    let os_config = dir.path().join("os/kms.toml");
    let os = Kmsfs::new(&os_config);
    os.run_async(&[
        "kms",
        "set",
        "vault",
        &bao.tls_addr,
        "kmsfs",
        "--token-file",
        s(&tf),
        "--skip-kms-test",
    ])
    .await
    .ok();
    assert!(!fs::read_to_string(&os_config).unwrap().contains("ca_cert"));
    let run = os.run_async(&["unlock-check", s(&cipher)]).await.failed();
    assert!(run.stderr.contains("TLS"), "{}", run.stderr);
    // ...until the trust store (SSL_CERT_FILE, as OpenSSL reads it) holds it.
    let trusted = os.with_env("SSL_CERT_FILE", s(&copy));
    trusted.run_async(&["unlock-check", s(&cipher)]).await.ok();
}

/// `--no-verify` is refused with a message naming `--skip-kms-test`, for
/// Vault and KMIP alike, and nothing is saved.
#[tokio::test(flavor = "multi_thread")]
async fn no_verify_is_renamed_skip_kms_test() {
    let dir = tempfile::tempdir().unwrap();
    let tf = write_token_file(dir.path(), "token", "s.placeholder").unwrap();
    let kmsfs = Kmsfs::new(dir.path().join("kms.toml"));
    for args in [
        vec![
            "kms",
            "set",
            "vault",
            "http://127.0.0.1:1",
            "kmsfs",
            "--token-file",
            s(&tf),
            "--no-verify",
        ],
        vec!["kms", "set", "kmip", "127.0.0.1:1", "k", "--no-verify"],
    ] {
        let run = kmsfs.run_async(&args).await.failed();
        assert!(
            run.stderr.contains("--skip-kms-test") && run.stderr.contains("renamed"),
            "{}",
            run.stderr
        );
        assert!(!dir.path().join("kms.toml").exists());
    }
    kmsfs
        .run_async(&[
            "kms",
            "set",
            "vault",
            "http://127.0.0.1:1",
            "kmsfs",
            "--token-file",
            s(&tf),
            "--skip-kms-test",
        ])
        .await
        .ok();
    assert!(dir.path().join("kms.toml").exists());
}
