//! The Vault / OpenBao client in production conditions (issue 10): token
//! files that appear or change while kmsfs runs, plain-HTTP refusal, TLS
//! error classification. Real OpenBao dev servers, real binary, real mounts;
//! every server is stopped by PID on drop, every mount by a guard.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kmsfs_core::secret::SecretBytes;
use kmsfs_e2e::bao::{write_token_file, BaoServer};
use kmsfs_e2e::cli::{kmsfs_bin, CliEnv};
use kmsfs_e2e::fuse::{force_unmount, is_mounted, CliMountGuard};
use kmsfs_keystore::{AuthConfig, KmsConfig, KmsError, VaultClient};

fn token_config(addr: &str, token_file: &Path) -> KmsConfig {
    let mut cfg = KmsConfig::new(
        vec![addr.to_string()],
        "kmsfs",
        AuthConfig::Token {
            token_file: Some(token_file.to_path_buf()),
        },
    );
    cfg.timeout_secs = 5;
    cfg
}

async fn server_with_key() -> BaoServer {
    let server = BaoServer::start().await.unwrap();
    server.create_key("kmsfs", false).await.unwrap();
    server
        .put_policy("kmsfs", &BaoServer::transit_policy("kmsfs"))
        .await
        .unwrap();
    server
}

/// A token file that does not exist yet does not stop the client from
/// being built; requests say it is missing (retryable) until it appears,
/// and a token replaced in the file (old one revoked) is picked up by the
/// same client without a restart.
#[tokio::test]
async fn token_file_is_read_at_every_request() {
    let server = server_with_key().await;
    let dir = tempfile::tempdir().unwrap();
    let tf = dir.path().join("sink");
    let client = VaultClient::new(&token_config(server.addr(), &tf)).unwrap();

    let key = SecretBytes::random(32).unwrap();
    let err = client.wrap("kmsfs", &key, None).await.unwrap_err();
    assert!(
        matches!(err, KmsError::CredentialsNotReady { .. }),
        "{err:?}"
    );
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("sink"), "{err}");

    let first = server.create_token(&["kmsfs"], "1h").await.unwrap();
    write_token_file(dir.path(), "sink", &first).unwrap();
    let wrapped = client.wrap("kmsfs", &key, None).await.unwrap();

    // Rotate: a new token in the file, the old one revoked.
    let second = server.create_token(&["kmsfs"], "1h").await.unwrap();
    write_token_file(dir.path(), "sink", &second).unwrap();
    server
        .api(
            "POST",
            "auth/token/revoke",
            Some(serde_json::json!({ "token": first })),
        )
        .await
        .unwrap();
    let back = client
        .unwrap("kmsfs", &wrapped.ciphertext, None)
        .await
        .unwrap();
    assert_eq!(back.expose(), key.expose());

    // A revoked token left in the file is an expired token, not a wait.
    let third = server.create_token(&["kmsfs"], "1h").await.unwrap();
    write_token_file(dir.path(), "sink", &third).unwrap();
    server
        .api(
            "POST",
            "auth/token/revoke",
            Some(serde_json::json!({ "token": third })),
        )
        .await
        .unwrap();
    let err = client.wrap("kmsfs", &key, None).await.unwrap_err();
    assert!(matches!(err, KmsError::TokenExpired { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

/// A boot-time mount whose token file (a Vault Agent sink) is written only
/// after the mount started waits for it within `--kms-timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_file_that_appears_after_boot_is_waited_for() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("sink").await;
    let _guard = CliMountGuard(plain.clone());
    let token = fs::read_to_string(&env.token_file).unwrap();
    fs::remove_file(&env.token_file).unwrap();

    let mut child = Command::new(kmsfs_bin())
        .arg("--config")
        .arg(env.path("etc/kms.toml"))
        .args(["mount", "--kms-timeout", "60"])
        .arg(&cipher)
        .arg(&plain)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(child.try_wait().unwrap().is_none(), "mount gave up early");
    write_token_file(env.dir.path(), "token", token.trim()).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains(token.trim()), "token leaked: {stderr}");
    assert!(is_mounted(&plain));
    fs::write(plain.join("x"), b"agent was late").unwrap();
    assert_eq!(fs::read(plain.join("x")).unwrap(), b"agent was late");
    force_unmount(&plain);
}

/// Without a token file and with no token in the environment, a mount
/// that never gets one fails after the timeout naming the file.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_file_that_never_appears_fails_after_the_timeout() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("nosink").await;
    let _guard = CliMountGuard(plain.clone());
    fs::remove_file(&env.token_file).unwrap();
    let run = env
        .mount(&cipher, &plain, &["--kms-timeout", "3"])
        .await
        .failed();
    assert!(run.stderr.contains("token"), "{}", run.stderr);
    assert!(run.stderr.contains("gave up"), "{}", run.stderr);
    assert!(!is_mounted(&plain));
}

/// `kms set` refuses plain http:// to another machine, saying why, unless
/// `--allow-insecure-http`, which is saved and honoured on the next load.
#[tokio::test(flavor = "multi_thread")]
async fn plain_http_to_another_host_needs_allow_insecure_http() {
    let dir = tempfile::tempdir().unwrap();
    let tf = write_token_file(dir.path(), "token", "s.placeholder").unwrap();
    let kmsfs = kmsfs_e2e::cli::Kmsfs::new(dir.path().join("kms.toml"));
    let args = [
        "kms",
        "set",
        "vault",
        "http://vault.example.invalid:8200",
        "kmsfs",
        "--token-file",
        tf.to_str().unwrap(),
        "--skip-kms-test",
    ];
    let run = kmsfs.run_async(&args).await.failed();
    assert!(
        run.stderr.contains("unencrypted") && run.stderr.contains("--allow-insecure-http"),
        "{}",
        run.stderr
    );
    assert!(!dir.path().join("kms.toml").exists());
    let mut allowed = args.to_vec();
    allowed.push("--allow-insecure-http");
    kmsfs.run_async(&allowed).await.ok();
    let saved = fs::read_to_string(dir.path().join("kms.toml")).unwrap();
    assert!(saved.contains("allow_insecure_http = true"), "{saved}");
    let cfg = KmsConfig::load(&dir.path().join("kms.toml")).unwrap();
    assert!(cfg.allow_insecure_http);
}
