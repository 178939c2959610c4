//! Vault / OpenBao authentication methods through the real binary (issue
//! 10): AppRole (its logins revoked when a command ends, and by a mount
//! daemon at unmount), TLS certificate login on an HTTPS listener, a
//! namespace with Transit mounted inside it, and `VAULT_AGENT_ADDR` through
//! a real `bao proxy` with auto-auth and no token file. Real OpenBao dev
//! servers and proxies stopped by PID, real mounts unmounted by guards.

use std::fs;
use std::path::Path;
use std::time::Duration;

use kmsfs_e2e::bao::{write_secret_file, write_token_file, BaoServer};
use kmsfs_e2e::bao_auth::{live_tokens_from, wait_for_live_tokens, BaoProxy, TlsBao};
use kmsfs_e2e::cli::Kmsfs;
use kmsfs_e2e::fuse::{daemon_pids, force_unmount, is_mounted, CliMountGuard};
use serde_json::json;

/// How long a revoke after a command or an unmount may take to show.
const SETTLE: Duration = Duration::from_secs(15);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn key_and_policy(server: &BaoServer) {
    server.create_key("kmsfs", false).await.unwrap();
    server
        .put_policy("kmsfs", &BaoServer::transit_policy("kmsfs"))
        .await
        .unwrap();
}

/// create, mount, write and read back, unmount (waiting for the daemon).
async fn create_mount_roundtrip(kmsfs: &Kmsfs, dir: &Path, name: &str) {
    let cipher = dir.join(format!("{name}-cipher"));
    let plain = dir.join(format!("{name}-plain"));
    fs::create_dir(&plain).unwrap();
    kmsfs.run_async(&["create", s(&cipher)]).await.ok();
    let _guard = CliMountGuard(plain.clone());
    kmsfs
        .run_async(&["mount", s(&cipher), s(&plain)])
        .await
        .ok();
    fs::write(plain.join("f"), name.as_bytes()).unwrap();
    assert_eq!(fs::read(plain.join("f")).unwrap(), name.as_bytes());
    kmsfs.run_async(&["umount", s(&plain)]).await.ok();
    wait_daemon_gone(&plain).await;
}

async fn wait_daemon_gone(plain: &Path) {
    for _ in 0..100 {
        if daemon_pids(plain).is_empty() {
            force_unmount(plain);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the mount daemon of {} did not exit", plain.display());
}

/// Every command that logs in with AppRole revokes its token when it ends
/// (no live token of the role is left); a mount daemon keeps its login
/// while mounted and revokes it at unmount.
#[tokio::test(flavor = "multi_thread")]
async fn approle_logins_are_revoked_when_commands_end_and_at_unmount() {
    const LOGIN: &str = "auth/approle/login";
    let server = BaoServer::start().await.unwrap();
    key_and_policy(&server).await;
    server.enable_approle().await.unwrap();
    let (role_id, secret_id) = server
        .create_approle("kmsfs-host", &["kmsfs"], "1h")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sid = write_secret_file(dir.path(), "secret-id", &secret_id, 0o600).unwrap();
    let kmsfs = Kmsfs::new(dir.path().join("kms.toml"));
    let live = || async { live_tokens_from(&server, LOGIN).await.unwrap().len() };

    kmsfs
        .run_async(&[
            "kms",
            "set",
            "vault",
            server.addr(),
            "kmsfs",
            "--role-id",
            &role_id,
            "--secret-id-file",
            s(&sid),
        ])
        .await
        .ok();
    assert_eq!(live().await, 0, "kms set left its login token alive");
    let cipher = dir.path().join("cipher");
    let plain = dir.path().join("plain");
    fs::create_dir(&plain).unwrap();
    kmsfs.run_async(&["create", s(&cipher)]).await.ok();
    assert_eq!(live().await, 0, "create left its login token alive");
    kmsfs.run_async(&["kms", "check"]).await.ok();
    assert_eq!(live().await, 0, "kms check left its login token alive");
    server.rotate_key("kmsfs").await.unwrap();
    kmsfs.run_async(&["rewrap", s(&cipher)]).await.ok();
    assert_eq!(live().await, 0, "rewrap left its login token alive");
    // A failing command revokes too (its login worked, the key is missing).
    let other = dir.path().join("other");
    let run = kmsfs
        .run_async(&["create", s(&other), "--kms-key", "missing"])
        .await
        .failed();
    assert!(run.stderr.contains("missing"), "{}", run.stderr);
    assert_eq!(
        live().await,
        0,
        "a failed create left its login token alive"
    );

    let _guard = CliMountGuard(plain.clone());
    kmsfs
        .run_async(&["mount", s(&cipher), s(&plain)])
        .await
        .ok();
    assert_eq!(live().await, 1, "the mount daemon keeps its login");
    fs::write(plain.join("f"), b"approle").unwrap();
    kmsfs.run_async(&["umount", s(&plain)]).await.ok();
    wait_daemon_gone(&plain).await;
    assert_eq!(
        wait_for_live_tokens(&server, LOGIN, 0, SETTLE)
            .await
            .unwrap(),
        0,
        "the daemon's login outlived the unmount"
    );
    assert!(!is_mounted(&plain));
}

/// TLS certificate login on an HTTPS listener: the client certificate is
/// the only credential. A certificate from another CA is refused with a
/// message naming the certificate login, and nothing is saved.
#[tokio::test(flavor = "multi_thread")]
async fn cert_auth_on_a_tls_listener() {
    let bao = TlsBao::start().await.unwrap();
    let server = &bao.server;
    key_and_policy(server).await;
    server
        .api("POST", "sys/auth/cert", Some(json!({"type": "cert"})))
        .await
        .unwrap();
    server
        .api(
            "POST",
            "auth/cert/certs/kmsfs-hosts",
            Some(json!({
                "certificate": fs::read_to_string(bao.ca_cert()).unwrap(),
                "token_policies": ["kmsfs"],
                "token_ttl": "1h",
            })),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kmsfs = Kmsfs::new(dir.path().join("kms.toml"));
    let set = |cert: &Path, key: &Path| {
        vec![
            "kms".to_string(),
            "set".into(),
            "vault".into(),
            bao.tls_addr.clone(),
            "kmsfs".into(),
            "--ca-cert".into(),
            s(bao.ca_cert()).into(),
            "--client-cert".into(),
            s(cert).into(),
            "--client-key".into(),
            s(key).into(),
            "--cert-auth".into(),
            "--cert-role".into(),
            "kmsfs-hosts".into(),
        ]
    };

    // A client certificate of another CA: the login is refused.
    let stranger = kmsfs_e2e::pykmip::Pki::new(&dir.path().join("other-pki"), "other", 2)
        .unwrap()
        .issue("stranger", 2)
        .unwrap();
    let run = kmsfs.run(set(&stranger.cert, &stranger.key)).failed();
    assert!(run.stderr.contains("certificate login"), "{}", run.stderr);
    assert!(!dir.path().join("kms.toml").exists());

    kmsfs.run(set(&bao.client.cert, &bao.client.key)).ok();
    let saved = fs::read_to_string(dir.path().join("kms.toml")).unwrap();
    assert!(saved.contains("method = \"cert\""), "{saved}");
    let show = kmsfs.run_async(&["kms", "show"]).await.ok();
    assert!(
        show.stdout.contains("TLS certificate login"),
        "{}",
        show.stdout
    );
    create_mount_roundtrip(&kmsfs, dir.path(), "cert").await;
    // Certificate logins are the command's own, revoked like AppRole's.
    assert_eq!(
        wait_for_live_tokens(server, "auth/cert/login", 0, SETTLE)
            .await
            .unwrap(),
        0
    );
}

/// A namespace with Transit mounted inside it: `--namespace` sends every
/// request there (the root namespace has no key of that name at all).
#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_with_transit_inside() {
    let server = BaoServer::start().await.unwrap();
    server
        .api("POST", "sys/namespaces/team-a", None)
        .await
        .unwrap();
    server
        .api(
            "POST",
            "team-a/sys/mounts/transit",
            Some(json!({"type": "transit"})),
        )
        .await
        .unwrap();
    server
        .api(
            "POST",
            "team-a/transit/keys/nskey",
            Some(json!({"type": "aes256-gcm96"})),
        )
        .await
        .unwrap();
    server
        .api(
            "POST",
            "team-a/sys/policies/acl/kmsfs",
            Some(json!({"policy": BaoServer::transit_policy("nskey")})),
        )
        .await
        .unwrap();
    let v = server
        .api(
            "POST",
            "team-a/auth/token/create",
            Some(json!({"policies": ["kmsfs"], "ttl": "1h"})),
        )
        .await
        .unwrap();
    let token = v["auth"]["client_token"].as_str().unwrap().to_string();
    assert!(!server.key_exists("nskey").await.unwrap());

    let dir = tempfile::tempdir().unwrap();
    let tf = write_token_file(dir.path(), "token", &token).unwrap();
    let kmsfs = Kmsfs::new(dir.path().join("kms.toml"));
    // Without the namespace the key is not found.
    let run = kmsfs
        .run_async(&[
            "kms",
            "set",
            "vault",
            server.addr(),
            "nskey",
            "--token-file",
            s(&tf),
        ])
        .await
        .failed();
    assert!(run.stderr.contains("NOT saved"), "{}", run.stderr);
    kmsfs
        .run_async(&[
            "kms",
            "set",
            "vault",
            server.addr(),
            "nskey",
            "--token-file",
            s(&tf),
            "--namespace",
            "team-a",
        ])
        .await
        .ok();
    create_mount_roundtrip(&kmsfs, dir.path(), "ns").await;
    let info = kmsfs
        .run_async(&["slot", "list", s(&dir.path().join("ns-cipher")), "--json"])
        .await
        .ok();
    assert!(info.stdout.contains("team-a"), "{}", info.stdout);
}

/// VAULT_AGENT_ADDR through a real `bao proxy` with AppRole auto-auth: no
/// token file, no token in the environment; every request goes through
/// the proxy (stop it, and the same commands fail while the server is up).
#[tokio::test(flavor = "multi_thread")]
async fn vault_agent_addr_through_a_real_bao_proxy() {
    let server = BaoServer::start().await.unwrap();
    key_and_policy(&server).await;
    server.enable_approle().await.unwrap();
    let (role_id, secret_id) = server
        .create_approle("proxy", &["kmsfs"], "1h")
        .await
        .unwrap();
    let mut proxy = BaoProxy::start(&server, &role_id, &secret_id)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kmsfs = Kmsfs::new(dir.path().join("kms.toml")).with_env("VAULT_AGENT_ADDR", &proxy.addr);
    kmsfs
        .run_async(&["kms", "set", "vault", server.addr(), "kmsfs"])
        .await
        .ok();
    let saved = fs::read_to_string(dir.path().join("kms.toml")).unwrap();
    assert!(!saved.contains("token_file"), "{saved}");
    create_mount_roundtrip(&kmsfs, dir.path(), "agent").await;
    assert!(
        proxy.log().contains("transit/decrypt/kmsfs"),
        "the unwrap did not go through the proxy:\n{}",
        proxy.log()
    );

    proxy.stop();
    let run = kmsfs
        .run_async(&["unlock-check", s(&dir.path().join("agent-cipher"))])
        .await
        .failed();
    assert!(run.stderr.contains("unreachable"), "{}", run.stderr);
}
