//! kmsfs-keystore against a real OpenBao dev server (no mocks).
//!
//! Each test starts its own server on its own ports and kills it on drop.

use std::path::Path;
use std::time::{Duration, Instant};

use kmsfs_core::secret::SecretBytes;
use kmsfs_e2e::bao::{dead_address, write_secret_file, write_token_file, BaoServer};
use kmsfs_keystore::{AuthConfig, KmsConfig, KmsError, NodeState, VaultClient};

fn token_config(addresses: Vec<String>, key: &str, token_file: &Path) -> KmsConfig {
    let mut cfg = KmsConfig::new(
        addresses,
        key,
        AuthConfig::Token {
            token_file: Some(token_file.to_path_buf()),
        },
    );
    cfg.timeout_secs = 5;
    cfg
}

/// A client authenticated with a token limited to `key` by policy.
async fn limited_client(server: &BaoServer, key: &str) -> VaultClient {
    server
        .put_policy("kmsfs", &BaoServer::transit_policy(key))
        .await
        .unwrap();
    let token = server.create_token(&["kmsfs"], "1h").await.unwrap();
    let tf = write_token_file(server.dir(), "token", &token).unwrap();
    VaultClient::new(&token_config(vec![server.addr().into()], key, &tf)).unwrap()
}

/// A client with the root token (which may create keys).
fn root_client(server: &BaoServer, key: &str) -> VaultClient {
    let tf = write_token_file(server.dir(), "root-token", kmsfs_e2e::bao::ROOT_TOKEN).unwrap();
    VaultClient::new(&token_config(vec![server.addr().into()], key, &tf)).unwrap()
}

fn master_key() -> SecretBytes {
    SecretBytes::random(32).unwrap()
}

#[tokio::test]
async fn token_auth_round_trip_and_diagnostics() {
    let server = BaoServer::start().await.unwrap();
    server.create_key("kmsfs", false).await.unwrap();
    let client = limited_client(&server, "kmsfs").await;

    let key = master_key();
    let wrapped = client.wrap("kmsfs", &key, None).await.unwrap();
    assert!(
        wrapped.ciphertext.starts_with("vault:v1:"),
        "{}",
        wrapped.ciphertext
    );
    assert_eq!(wrapped.key_version, 1);
    let back = client
        .unwrap("kmsfs", &wrapped.ciphertext, None)
        .await
        .unwrap();
    assert_eq!(back, key);

    let info = client.read_key("kmsfs").await.unwrap();
    assert_eq!(info.name, "kmsfs");
    assert_eq!(info.key_type, "aes256-gcm96");
    assert!(!info.derived && !info.exportable && !info.deletion_allowed);
    assert_eq!(info.latest_version, 1);
    assert_eq!(info.min_decryption_version, 1);
    assert_eq!(info.versions, vec![1]);

    let health = client.health().await;
    assert_eq!(health.len(), 1);
    assert_eq!(health[0].state, NodeState::Active);
    let seal = client.seal_status().await.unwrap();
    assert!(!seal.sealed && seal.initialized);
    assert!(seal.is_in_memory(), "{seal:?}");
    let ti = client.token_info().await.unwrap();
    assert!(ti.ttl > 0 && ti.ttl <= 3600, "{ti:?}");
    assert!(ti.renewable);
    assert!(ti.expire_time.is_some());
    assert!(ti.policies.iter().any(|p| p == "kmsfs"));
}

#[tokio::test]
async fn approle_login_and_relogin_after_expiry() {
    let server = BaoServer::start().await.unwrap();
    server.create_key("kmsfs", false).await.unwrap();
    server
        .put_policy("kmsfs", &BaoServer::transit_policy("kmsfs"))
        .await
        .unwrap();
    server.enable_approle().await.unwrap();
    let (role_id, secret_id) = server
        .create_approle("kmsfs", &["kmsfs"], "2s")
        .await
        .unwrap();
    let sid = write_token_file(server.dir(), "secret-id", &secret_id).unwrap();
    let mut cfg = KmsConfig::new(
        vec![server.addr().into()],
        "kmsfs",
        AuthConfig::AppRole {
            role_id: role_id.clone(),
            secret_id_file: sid.clone(),
            path: "approle".into(),
        },
    );
    cfg.timeout_secs = 5;
    let client = VaultClient::new(&cfg).unwrap();
    client.login().await.unwrap();
    let key = master_key();
    let wrapped = client.wrap("kmsfs", &key, None).await.unwrap();
    assert_eq!(
        client
            .unwrap("kmsfs", &wrapped.ciphertext, None)
            .await
            .unwrap(),
        key
    );

    // The AppRole token lives 2 s: the next request gets 403, logs in again
    // and succeeds.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        client
            .unwrap("kmsfs", &wrapped.ciphertext, None)
            .await
            .unwrap(),
        key
    );

    // A wrong secret id is an authentication failure that names the file
    // but not the secret.
    let bad = write_token_file(
        server.dir(),
        "bad-secret-id",
        "00000000-0000-0000-0000-000000000000",
    )
    .unwrap();
    cfg.auth = AuthConfig::AppRole {
        role_id,
        secret_id_file: bad.clone(),
        path: "approle".into(),
    };
    let client = VaultClient::new(&cfg).unwrap();
    let err = client
        .unwrap("kmsfs", &wrapped.ciphertext, None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::AuthFailed { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&bad.display().to_string()), "{msg}");
    assert!(!msg.contains("00000000-0000"), "{msg}");
    assert!(!msg.contains(&secret_id), "{msg}");
}

#[tokio::test]
async fn rotation_then_rewrap_then_unwrap() {
    let server = BaoServer::start().await.unwrap();
    server.create_key("kmsfs", false).await.unwrap();
    let client = limited_client(&server, "kmsfs").await;
    let key = master_key();
    let w1 = client.wrap("kmsfs", &key, None).await.unwrap();
    assert_eq!(w1.key_version, 1);

    server.rotate_key("kmsfs").await.unwrap();
    let info = client.read_key("kmsfs").await.unwrap();
    assert_eq!(info.latest_version, 2);
    assert_eq!(info.versions, vec![1, 2]);

    let w2 = client
        .rewrap("kmsfs", &w1.ciphertext, None, None)
        .await
        .unwrap();
    assert_eq!(w2.key_version, 2);
    assert!(w2.ciphertext.starts_with("vault:v2:"));
    assert_eq!(
        client.unwrap("kmsfs", &w2.ciphertext, None).await.unwrap(),
        key
    );
    // Old ciphertext still decrypts until min_decryption_version is raised.
    assert_eq!(
        client.unwrap("kmsfs", &w1.ciphertext, None).await.unwrap(),
        key
    );
    // New wraps use the latest version.
    assert_eq!(
        client.wrap("kmsfs", &key, None).await.unwrap().key_version,
        2
    );
}

#[tokio::test]
async fn rewrap_to_a_second_key() {
    let server = BaoServer::start().await.unwrap();
    server.create_key("old", false).await.unwrap();
    server.create_key("new", false).await.unwrap();
    let client = root_client(&server, "old");
    let key = master_key();
    let w = client.wrap("old", &key, None).await.unwrap();
    let moved = client
        .rewrap_to("old", &w.ciphertext, None, "new", None)
        .await
        .unwrap();
    assert_eq!(
        client.unwrap("new", &moved.ciphertext, None).await.unwrap(),
        key
    );
    // The old key cannot open the new ciphertext.
    let err = client
        .unwrap("old", &moved.ciphertext, None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, KmsError::CiphertextRejected { .. }),
        "{err:?}"
    );
    // Moving to a key that does not exist fails before unwrapping and
    // creates nothing.
    let err = client
        .rewrap_to("old", &w.ciphertext, None, "absent", None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, KmsError::KeyNotFound { ref key } if key == "absent"),
        "{err:?}"
    );
    assert!(!server.key_exists("absent").await.unwrap());
}

#[tokio::test]
async fn wrong_token_is_token_expired_and_narrow_policy_is_permission_denied() {
    let server = BaoServer::start().await.unwrap();
    server.create_key("kmsfs", false).await.unwrap();
    let tf = write_token_file(server.dir(), "token", "s.NotARealTokenValue").unwrap();
    let client = VaultClient::new(&token_config(vec![server.addr().into()], "kmsfs", &tf)).unwrap();
    let err = client.wrap("kmsfs", &master_key(), None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::TokenExpired { .. }), "{err:?}");
    assert!(!err.to_string().contains("NotARealTokenValue"), "{err}");

    // A valid token whose policy covers another key only.
    server.create_key("other", false).await.unwrap();
    let client = limited_client(&server, "kmsfs").await;
    let err = client.wrap("other", &master_key(), None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::PermissionDenied { .. }), "{err:?}");
}

#[tokio::test]
async fn missing_key_is_not_created() {
    let server = BaoServer::start().await.unwrap();
    // The root token may create keys: wrap must refuse anyway.
    let client = root_client(&server, "absent");
    let err = client
        .wrap("absent", &master_key(), None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, KmsError::KeyNotFound { ref key } if key == "absent"),
        "{err:?}"
    );
    assert!(!server.key_exists("absent").await.unwrap());
    let err = client.read_key("absent").await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err:?}");
    let err = client
        .unwrap(
            "absent",
            "vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            None,
        )
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::KeyNotFound { .. }), "{err:?}");
    assert!(!server.key_exists("absent").await.unwrap());
}

#[tokio::test]
async fn kms_down_is_unreachable_within_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let tf = write_token_file(dir.path(), "token", "s.whatever").unwrap();
    let mut cfg = token_config(
        vec![dead_address().unwrap(), dead_address().unwrap()],
        "kmsfs",
        &tf,
    );
    cfg.timeout_secs = 2;
    cfg.attempts = 3;
    let client = VaultClient::new(&cfg).unwrap();
    let t0 = Instant::now();
    let err = client.wrap("kmsfs", &master_key(), None).await.unwrap_err();
    let elapsed = t0.elapsed();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err:?}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");

    // A server that accepts connections but never answers: bounded by the
    // one deadline of `timeout_secs`, whatever the attempts (issue 10).
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", blackhole.local_addr().unwrap());
    let mut cfg = token_config(vec![addr], "kmsfs", &tf);
    cfg.timeout_secs = 1;
    cfg.attempts = 2;
    let client = VaultClient::new(&cfg).unwrap();
    let t0 = Instant::now();
    let err = client.wrap("kmsfs", &master_key(), None).await.unwrap_err();
    let elapsed = t0.elapsed();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(2),
        "took {elapsed:?}"
    );
    drop(blackhole);
}

#[tokio::test]
async fn sealed_server_is_reported_sealed() {
    let server = BaoServer::start().await.unwrap();
    server.create_key("kmsfs", false).await.unwrap();
    let client = root_client(&server, "kmsfs");
    let w = client.wrap("kmsfs", &master_key(), None).await.unwrap();
    server.seal().await.unwrap();
    let err = client
        .unwrap("kmsfs", &w.ciphertext, None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, KmsError::Sealed { ref address } if address == server.addr()),
        "{err:?}"
    );
    assert!(err.to_string().contains("unseal"), "{err}");
    let seal = client.seal_status().await.unwrap();
    assert!(seal.sealed);
    assert_eq!(client.health().await[0].state, NodeState::Sealed);
}

#[tokio::test]
async fn first_address_dead_still_works() {
    let server = BaoServer::start().await.unwrap();
    server.create_key("kmsfs", false).await.unwrap();
    let tf = write_token_file(server.dir(), "root", kmsfs_e2e::bao::ROOT_TOKEN).unwrap();
    let dead = dead_address().unwrap();
    let client = VaultClient::new(&token_config(
        vec![dead.clone(), server.addr().into()],
        "kmsfs",
        &tf,
    ))
    .unwrap();
    let key = master_key();
    let w = client.wrap("kmsfs", &key, None).await.unwrap();
    assert_eq!(
        client.unwrap("kmsfs", &w.ciphertext, None).await.unwrap(),
        key
    );
    assert_eq!(client.active_address().as_deref(), Some(server.addr()));
    let health = client.health().await;
    assert!(
        matches!(health[0].state, NodeState::Unreachable(_)),
        "{health:?}"
    );
    assert_eq!(health[1].state, NodeState::Active);
}

#[tokio::test]
async fn derived_key_needs_the_right_context() {
    let server = BaoServer::start().await.unwrap();
    server.create_key("derived", true).await.unwrap();
    let client = limited_client(&server, "derived").await;
    assert!(client.read_key("derived").await.unwrap().derived);
    let fs_uuid = *b"0123456789abcdef";
    let other_uuid = *b"fedcba9876543210";
    let key = master_key();
    let w = client.wrap("derived", &key, Some(&fs_uuid)).await.unwrap();
    assert_eq!(
        client
            .unwrap("derived", &w.ciphertext, Some(&fs_uuid))
            .await
            .unwrap(),
        key
    );
    let err = client
        .unwrap("derived", &w.ciphertext, Some(&other_uuid))
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, KmsError::CiphertextRejected { .. }),
        "{err:?}"
    );
    let err = client
        .unwrap("derived", &w.ciphertext, None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, KmsError::CiphertextRejected { .. }),
        "{err:?}"
    );
    // Rewrap keeps the context binding.
    server.rotate_key("derived").await.unwrap();
    let w2 = client
        .rewrap("derived", &w.ciphertext, Some(&fs_uuid), None)
        .await
        .unwrap();
    assert_eq!(w2.key_version, 2);
    assert_eq!(
        client
            .unwrap("derived", &w2.ciphertext, Some(&fs_uuid))
            .await
            .unwrap(),
        key
    );
    // Wrapping with a derived key and no context fails before sending.
    let err = client.wrap("derived", &key, None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::Config { .. }), "{err:?}");
}

#[tokio::test]
async fn min_decryption_version_and_tampering_are_rejected() {
    let server = BaoServer::start().await.unwrap();
    server.create_key("kmsfs", false).await.unwrap();
    let client = limited_client(&server, "kmsfs").await;
    let key = master_key();
    let w1 = client.wrap("kmsfs", &key, None).await.unwrap();

    // Tampered ciphertext.
    let mut tampered = w1.ciphertext.clone().into_bytes();
    let last = tampered.len() - 3;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let err = client.unwrap("kmsfs", &tampered, None).await.unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, KmsError::CiphertextRejected { .. }),
        "{err:?}"
    );
    let err = client
        .unwrap("kmsfs", "not-a-ciphertext", None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, KmsError::CiphertextRejected { .. }),
        "{err:?}"
    );

    server.rotate_key("kmsfs").await.unwrap();
    server.set_min_decryption_version("kmsfs", 2).await.unwrap();
    let err = client
        .unwrap("kmsfs", &w1.ciphertext, None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, KmsError::CiphertextRejected { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("min_decryption_version"), "{err}");
    let err = client
        .rewrap("kmsfs", &w1.ciphertext, None, None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, KmsError::CiphertextRejected { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn https_with_and_without_the_ca() {
    let server = BaoServer::start_tls().await.unwrap();
    assert!(server.addr().starts_with("https://"));
    server.create_key("kmsfs", false).await.unwrap();
    let tf = write_token_file(server.dir(), "root", kmsfs_e2e::bao::ROOT_TOKEN).unwrap();
    let mut cfg = token_config(vec![server.addr().into()], "kmsfs", &tf);
    cfg.ca_cert = Some(server.ca_cert().unwrap().to_path_buf());
    let client = VaultClient::new(&cfg).unwrap();
    let key = master_key();
    let w = client.wrap("kmsfs", &key, None).await.unwrap();
    assert_eq!(
        client.unwrap("kmsfs", &w.ciphertext, None).await.unwrap(),
        key
    );

    // Without the CA (and without VAULT_CACERT in the environment).
    if std::env::var_os("VAULT_CACERT").is_none() && std::env::var_os("BAO_CACERT").is_none() {
        cfg.ca_cert = None;
        let client = VaultClient::new(&cfg).unwrap();
        let t0 = Instant::now();
        let err = client
            .unwrap("kmsfs", &w.ciphertext, None)
            .await
            .unwrap_err();
        eprintln!("{err}");
        assert!(matches!(err, KmsError::Tls { .. }), "{err:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "TLS errors are not retried"
        );
    }

    // Plain HTTP client against the HTTPS listener is not a hang either.
    let mut cfg2 = cfg.clone();
    cfg2.addresses = vec![server.addr().replace("https://", "http://")];
    cfg2.ca_cert = None;
    let client = VaultClient::new(&cfg2).unwrap();
    let err = client.read_key("kmsfs").await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::Tls { .. }), "{err:?}");
    assert!(err.to_string().contains("https://"), "{err}");

    // An unreadable CA file is a clear TLS configuration error.
    cfg.ca_cert = Some(server.dir().join("no-such-ca.pem"));
    let err = VaultClient::new(&cfg).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::Tls { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-ca.pem"), "{err}");
}

#[tokio::test]
async fn token_file_checks() {
    let dir = tempfile::tempdir().unwrap();
    let addr = vec!["http://127.0.0.1:1".to_string()];

    let world = write_secret_file(dir.path(), "world", "s.TopSecretToken\n", 0o644).unwrap();
    let err = VaultClient::new(&token_config(addr.clone(), "k", &world)).unwrap_err();
    let msg = err.to_string();
    eprintln!("{err}");
    assert!(matches!(err, KmsError::SecretFile { .. }), "{err:?}");
    assert!(
        msg.contains(&world.display().to_string()) && msg.contains("chmod 600"),
        "{msg}"
    );
    assert!(!msg.contains("TopSecretToken"), "{msg}");

    // A missing file is waited for (an agent sink written after boot): the
    // client builds, and each request says the file is not there yet.
    let missing = dir.path().join("missing-token");
    let client = VaultClient::new(&token_config(addr.clone(), "k", &missing)).unwrap();
    let err = client
        .wrap("k", &SecretBytes::random(32).unwrap(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, KmsError::CredentialsNotReady { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("missing-token"), "{err}");
    assert!(err.to_string().contains("not found"), "{err}");

    let empty = write_secret_file(dir.path(), "empty", "\n", 0o600).unwrap();
    let err = VaultClient::new(&token_config(addr, "k", &empty)).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
}

#[tokio::test]
async fn saved_config_loads_and_works() {
    let server = BaoServer::start().await.unwrap();
    server.create_key("kmsfs", false).await.unwrap();
    let client = limited_client(&server, "kmsfs").await;
    let cfg_path = server.dir().join("kms.toml");
    let mut cfg = token_config(
        vec![server.addr().into()],
        "kmsfs",
        &server.dir().join("token"),
    );
    cfg.namespace = None;
    cfg.save(&cfg_path).unwrap();
    let loaded = KmsConfig::load(&cfg_path).unwrap();
    assert_eq!(loaded, cfg);
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(text.contains("type = \"vault\""), "{text}");
    let from_file = VaultClient::new(&loaded).unwrap();
    let key = master_key();
    let w = client.wrap(from_file.key_name(), &key, None).await.unwrap();
    assert_eq!(
        from_file
            .unwrap("kmsfs", &w.ciphertext, None)
            .await
            .unwrap(),
        key
    );
}

/// `scripts/dev-kms` starts a usable KMS whose printed environment is what
/// `KmsConfig::from_env` reads; `stop` kills it.
#[tokio::test]
async fn dev_kms_script_and_env_config() {
    let state = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dev-kms");
    let run = |arg: &str| {
        std::process::Command::new("bash")
            .arg(&script)
            .arg(arg)
            .env("KMSFS_DEV_KMS_DIR", state.path())
            .env_remove("KMSFS_KMS_KEY")
            .output()
            .unwrap()
    };
    let out = run("start");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let vars: std::collections::HashMap<String, String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let token_file = Path::new(&vars["KMSFS_TOKEN_FILE"]).to_path_buf();
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(
        !stdout.contains(token.trim()),
        "the token must not be printed"
    );
    // Idempotent: a second start keeps the same server.
    let again = run("start");
    assert!(again.status.success());
    assert_eq!(String::from_utf8(again.stdout).unwrap(), stdout);

    let cfg = KmsConfig::from_env_with(|k| vars.get(k).cloned()).unwrap();
    assert_eq!(cfg.key_name, "kmsfs");
    let client = VaultClient::new(&cfg).unwrap();
    let key = master_key();
    let w = client.wrap("kmsfs", &key, None).await.unwrap();
    assert_eq!(
        client.unwrap("kmsfs", &w.ciphertext, None).await.unwrap(),
        key
    );
    drop(client);

    let out = run("stop");
    assert!(out.status.success());
    let client = VaultClient::with_credentials(
        &cfg,
        kmsfs_keystore::Credentials::Token(SecretBytes::from_slice(token.trim().as_bytes())),
    )
    .unwrap();
    let err = client.read_key("kmsfs").await.unwrap_err();
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err:?}");
}

#[tokio::test]
async fn an_expired_token_is_reported_as_expired() {
    let server = BaoServer::start().await.unwrap();
    server.create_key("kmsfs", false).await.unwrap();
    server
        .put_policy("kmsfs", &BaoServer::transit_policy("kmsfs"))
        .await
        .unwrap();
    let token = server.create_token(&["kmsfs"], "2s").await.unwrap();
    let tf = write_token_file(server.dir(), "short-token", &token).unwrap();
    let client = VaultClient::new(&token_config(vec![server.addr().into()], "kmsfs", &tf)).unwrap();
    client.wrap("kmsfs", &master_key(), None).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let err = client.wrap("kmsfs", &master_key(), None).await.unwrap_err();
    assert!(matches!(err, KmsError::TokenExpired { .. }), "{err:?}");
    assert!(!err.to_string().contains(&token), "{err}");
}

/// The backend-neutral `KmsClient` over Vault: wrap, unwrap, and the
/// context bound only when the Transit key is derived.
#[tokio::test]
async fn kms_client_wraps_master_keys_with_vault() {
    use kmsfs_core::keys::MasterKey;
    use kmsfs_keystore::{KmsClient, KmsKind};
    let server = BaoServer::start().await.unwrap();
    server.create_key("plain", false).await.unwrap();
    server.create_key("derived", true).await.unwrap();
    let tf = write_token_file(server.dir(), "root-token", kmsfs_e2e::bao::ROOT_TOKEN).unwrap();
    let master = MasterKey::generate().unwrap();
    let ctx = [7u8; 16];
    for (key, derived) in [("plain", false), ("derived", true)] {
        let kms = KmsClient::new(&token_config(vec![server.addr().into()], key, &tf)).unwrap();
        assert_eq!(kms.kind(), KmsKind::Vault);
        let w = kms.wrap(&master, Some(&ctx)).await.unwrap();
        assert_eq!(
            (w.kind, w.key_id.as_str(), w.key_version),
            (KmsKind::Vault, key, 1)
        );
        assert!(w.blob.starts_with("vault:v1:"), "{}", w.blob);
        assert_eq!(w.uses_context, derived);
        assert_eq!(kms.unwrap(&w, Some(&ctx)).await.unwrap(), master);
        if derived {
            let e = kms.unwrap(&w, Some(&[8u8; 16])).await.unwrap_err();
            assert!(matches!(e, KmsError::CiphertextRejected { .. }), "{e:?}");
        }
    }
}
