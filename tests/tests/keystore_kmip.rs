//! kmsfs-keystore's KMIP client against a real PyKMIP server (no mocks).
//!
//! Each test starts its own server with certificates it makes, creates
//! keys with PyKMIP's own Python client, and kills the server on drop.

use kmsfs_core::keys::MasterKey;
use kmsfs_core::secret::SecretBytes;
use kmsfs_e2e::bao::dead_address;
use kmsfs_e2e::pykmip::{Pki, PykmipServer};
use kmsfs_keystore::kmip::{CipherMode, KeyState, ProtocolVersion};
use kmsfs_keystore::{KmipCipher, KmipClient, KmsClient, KmsConfig, KmsError, KmsKind};

fn config(server: &PykmipServer, key: &str) -> KmsConfig {
    let mut cfg = KmsConfig::new_kmip(
        vec![server.addr()],
        key,
        server.pki.ca_cert.clone(),
        server.client.cert.clone(),
        server.client.key.clone(),
    );
    cfg.timeout_secs = 5;
    cfg
}

fn secret() -> SecretBytes {
    SecretBytes::random(32).unwrap()
}

#[tokio::test]
async fn wrap_unwrap_round_trip_gcm_and_cbc() {
    let server = PykmipServer::start().unwrap();
    let uid = server.create_key(Some("fs-key"), true).unwrap();
    let client = KmipClient::new(&config(&server, &uid)).unwrap();

    // PyKMIP speaks KMIP 1.4, so `auto` wraps with AES-GCM and binds the context.
    let key = secret();
    let ctx = b"filesystem-uuid-1";
    let w = client.wrap(&key, Some(ctx)).await.unwrap();
    assert_eq!(w.mode, CipherMode::Gcm);
    assert!(w.blob.starts_with("kmip:v1:gcm:"), "{}", w.blob);
    assert!(w.uses_context);
    assert_eq!(w.key_id, uid);
    assert_eq!(client.unwrap(&uid, &w.blob, Some(ctx)).await.unwrap(), key);
    // Another context, no context, or a flipped ciphertext bit: refused.
    for bad_ctx in [Some(&b"filesystem-uuid-2"[..]), None] {
        let e = client.unwrap(&uid, &w.blob, bad_ctx).await.unwrap_err();
        assert!(matches!(e, KmsError::CiphertextRejected { .. }), "{e:?}");
    }
    let mut parsed = kmsfs_keystore::kmip::Blob::parse(&w.blob).unwrap();
    parsed.ciphertext[0] ^= 1;
    let e = client
        .unwrap(&uid, &parsed.encode(), Some(ctx))
        .await
        .unwrap_err();
    assert!(matches!(e, KmsError::CiphertextRejected { .. }), "{e:?}");
    // Two wraps of the same key differ (the server's IV is random).
    let w2 = client.wrap(&key, Some(ctx)).await.unwrap();
    assert_ne!(w.blob, w2.blob);

    // cipher = "cbc": AES-CBC/PKCS#5 with the server's random IV in the blob.
    let mut cbc_cfg = config(&server, &uid);
    cbc_cfg.cipher = Some(KmipCipher::Cbc);
    let cbc = KmipClient::new(&cbc_cfg).unwrap();
    let wc = cbc.wrap(&key, Some(ctx)).await.unwrap();
    assert_eq!(wc.mode, CipherMode::Cbc);
    assert!(wc.blob.starts_with("kmip:v1:cbc:"), "{}", wc.blob);
    assert!(!wc.uses_context, "CBC cannot bind a context");
    let parsed = kmsfs_keystore::kmip::Blob::parse(&wc.blob).unwrap();
    assert_eq!((parsed.iv.len(), parsed.ciphertext.len()), (16, 48));
    assert_eq!(cbc.unwrap(&uid, &wc.blob, None).await.unwrap(), key);
    // Either client unwraps either blob: the blob records the mode.
    assert_eq!(client.unwrap(&uid, &wc.blob, None).await.unwrap(), key);
    assert_eq!(cbc.unwrap(&uid, &w.blob, Some(ctx)).await.unwrap(), key);

    // The backend-neutral interface, with a real master key.
    let kms = KmsClient::new(&config(&server, "name:fs-key")).unwrap();
    assert_eq!(kms.kind(), KmsKind::Kmip);
    assert!(kms.describe().contains("name:fs-key"), "{}", kms.describe());
    let master = MasterKey::generate().unwrap();
    let wrapped = kms.wrap(&master, Some(ctx)).await.unwrap();
    assert_eq!(
        wrapped.key_id, uid,
        "a name:NAME key is stored by its identifier"
    );
    assert!(wrapped.uses_context);
    assert_eq!(kms.unwrap(&wrapped, Some(ctx)).await.unwrap(), master);

    let st = client.status().await.unwrap();
    assert_eq!(st.version, ProtocolVersion::V1_4);
    assert_eq!(st.key.uid, uid);
    assert_eq!(st.key.state, Some(KeyState::Active));
    assert_eq!(st.key.usage_mask.map(|m| m & 0xC), Some(0xC));
    assert_eq!(st.key.length, Some(256));
    assert!(st.supports(31) && st.supports(32), "{:?}", st.operations);
}

#[tokio::test]
async fn locate_by_name() {
    let server = PykmipServer::start().unwrap();
    let uid = server.create_key(Some("kmsfs-prod"), true).unwrap();
    server.create_key(Some("other"), true).unwrap();
    let c = KmipClient::new(&config(&server, "name:kmsfs-prod")).unwrap();
    assert_eq!(c.resolve_key().await.unwrap(), uid);
    let w = c.wrap(&secret(), None).await.unwrap();
    assert_eq!(w.key_id, uid);
    assert!(!w.uses_context);

    let missing = KmipClient::new(&config(&server, "name:no-such-key")).unwrap();
    let e = missing.wrap(&secret(), None).await.unwrap_err();
    assert!(matches!(e, KmsError::KmipKeyNotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("name:no-such-key"), "{e}");

    // Two keys with one name: refused, naming both identifiers.
    let uid2 = server.create_key(Some("kmsfs-prod"), true).unwrap();
    let e = c.resolve_key().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, KmsError::Config { .. }), "{e:?}");
    assert!(msg.contains(&uid) && msg.contains(&uid2), "{msg}");
}

#[tokio::test]
async fn unknown_key_id_is_key_not_found() {
    let server = PykmipServer::start().unwrap();
    server.create_key(None, true).unwrap();
    let c = KmipClient::new(&config(&server, "4242")).unwrap();
    let e = c.wrap(&secret(), None).await.unwrap_err();
    assert!(matches!(e, KmsError::KmipKeyNotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("'4242'"), "{e}");
    let blob = "kmip:v1:cbc:AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let e = c.unwrap("4242", blob, None).await.unwrap_err();
    assert!(matches!(e, KmsError::KmipKeyNotFound { .. }), "{e:?}");
}

#[tokio::test]
async fn unusable_keys_are_refused_clearly() {
    let server = PykmipServer::start().unwrap();
    let uid = server.create_key(None, true).unwrap();
    let c = KmipClient::new(&config(&server, &uid)).unwrap();
    let key = secret();
    let w = c.wrap(&key, None).await.unwrap();

    // Revoked (cessation of operation): Deactivated, no wrap, no unwrap.
    server.revoke(&uid, false).unwrap();
    let e = c.wrap(&key, None).await.unwrap_err();
    assert!(matches!(e, KmsError::KeyNotUsable { .. }), "{e:?}");
    assert!(e.to_string().contains("Deactivated"), "{e}");
    let e = c.unwrap(&uid, &w.blob, None).await.unwrap_err();
    assert!(matches!(e, KmsError::KeyNotUsable { .. }), "{e:?}");
    assert!(e.to_string().contains("Deactivated"), "{e}");
    let st = c.status().await.unwrap();
    assert_eq!(st.key.state, Some(KeyState::Deactivated));

    // Never activated.
    let pre = server.create_key(None, false).unwrap();
    let e = KmipClient::new(&config(&server, &pre))
        .unwrap()
        .wrap(&key, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Pre-Active"), "{e}");

    // Usage mask without Encrypt.
    let dec_only = server
        .create_key_with_usage(None, &["DECRYPT"], true)
        .unwrap();
    let e = KmipClient::new(&config(&server, &dec_only))
        .unwrap()
        .wrap(&key, None)
        .await
        .unwrap_err();
    assert!(matches!(e, KmsError::KeyNotUsable { .. }), "{e:?}");
    assert!(e.to_string().contains("does not allow Encrypt"), "{e}");
}

#[tokio::test]
async fn wrong_certificates_are_clear_tls_errors() {
    let server = PykmipServer::start().unwrap();
    let uid = server.create_key(None, true).unwrap();
    let other = Pki::new(&server.dir().join("other"), "other", 365).unwrap();
    let foreign = other.issue("intruder", 365).unwrap();

    // A client certificate from a CA the server does not trust.
    let mut cfg = config(&server, &uid);
    cfg.client_cert = Some(foreign.cert.clone());
    cfg.client_key = Some(foreign.key.clone());
    let e = KmipClient::new(&cfg)
        .unwrap()
        .wrap(&secret(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, KmsError::Tls { .. }), "{e:?}");
    assert!(
        e.to_string().contains("refused the client certificate"),
        "{e}"
    );

    // A server certificate from a CA the client does not trust.
    let mut cfg = config(&server, &uid);
    cfg.ca_cert = Some(other.ca_cert.clone());
    let e = KmipClient::new(&cfg)
        .unwrap()
        .wrap(&secret(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, KmsError::Tls { .. }), "{e:?}");
    assert!(e.to_string().contains("server's certificate"), "{e}");

    // A client key readable by others is refused before any connection.
    let mut cfg = config(&server, &uid);
    std::fs::set_permissions(
        &server.client.key,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    cfg.timeout_secs = 1;
    let e = KmipClient::new(&cfg).unwrap_err();
    assert!(matches!(e, KmsError::SecretFile { .. }), "{e:?}");
    assert!(e.to_string().contains("chmod 600"), "{e}");
}

#[tokio::test]
async fn server_down_then_up_and_failover() {
    let mut server = PykmipServer::start().unwrap();
    let uid = server.create_key(None, true).unwrap();
    let mut cfg = config(&server, &uid);
    cfg.timeout_secs = 3;
    let c = KmipClient::new(&cfg).unwrap();
    let key = secret();
    let w = c.wrap(&key, None).await.unwrap();

    server.stop();
    let e = c.unwrap(&uid, &w.blob, None).await.unwrap_err();
    assert!(matches!(e, KmsError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains(&server.addr()), "{e}");

    server.restart().unwrap();
    assert_eq!(c.unwrap(&uid, &w.blob, None).await.unwrap(), key);

    // A dead first address is skipped for the live second one.
    let dead = dead_address()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    let mut two = config(&server, &uid);
    two.addresses = vec![dead, server.addr()];
    let c2 = KmipClient::new(&two).unwrap();
    assert_eq!(c2.unwrap(&uid, &w.blob, None).await.unwrap(), key);
}

#[test]
fn certificate_expiry_matches_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "exp", 400).unwrap();
    let leaf = pki.issue("soon", 10).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (path, _) in [(&pki.ca_cert, 400), (&leaf.cert, 10)] {
        let dates = kmsfs_keystore::kmip::cert::expiry_dates(path, "certificate").unwrap();
        assert_eq!(dates.len(), 1);
        let left = dates[0] - now;
        // openssl agrees to the minute: valid 60 s before our date, not 60 s after.
        let checkend = |secs: i64| {
            std::process::Command::new("openssl")
                .args(["x509", "-noout", "-checkend", &secs.to_string(), "-in"])
                .arg(path)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap()
                .success()
        };
        assert!(
            checkend(left - 60),
            "{} expires earlier than parsed",
            path.display()
        );
        assert!(
            !checkend(left + 60),
            "{} expires later than parsed",
            path.display()
        );
    }
}
