//! kmsfs against a real 3-node OpenBao cluster with Raft storage (issue
//! 10, HA): `create` and `mount` through any single node's address,
//! standbys (429) included; with every address configured they keep
//! working after the active node is SIGKILLed and another is elected; a
//! node restarted sealed shows in `kms check` as sealed, with the seal
//! type. One cluster for the whole file (starting one is the slow part);
//! every node is stopped by PID on drop, every mount by a guard.

use std::fs;
use std::path::{Path, PathBuf};

use kmsfs_e2e::bao::write_token_file;
use kmsfs_e2e::bao_cluster::BaoCluster;
use kmsfs_e2e::cli::{Kmsfs, Run};
use kmsfs_e2e::fuse::{is_mounted, CliMountGuard};
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

async fn set(k: &Kmsfs, addrs: &str, token: &Path) -> Run {
    k.run_async(&[
        "kms",
        "set",
        "vault",
        addrs,
        "kmsfs",
        "--token-file",
        s(token),
        "--timeout",
        "15",
    ])
    .await
}

/// Mounts `cipher` on `plain`, checks (or writes) `note`, unmounts.
async fn mount_and_use(k: &Kmsfs, cipher: &Path, plain: &Path, note: &[u8], write: bool) {
    fs::create_dir_all(plain).expect("mountpoint");
    let guard = CliMountGuard(plain.to_path_buf());
    k.run_async(&["mount", s(cipher), s(plain)]).await.ok();
    assert!(is_mounted(plain));
    let f = plain.join("note");
    if write {
        fs::write(&f, note).expect("write through the mount");
    }
    assert_eq!(fs::read(&f).expect("read through the mount"), note);
    k.run_async(&["umount", s(plain)]).await.ok();
    drop(guard);
}

/// The `node` lines of `kms check --json`: (status, message).
fn node_lines(v: &Value) -> Vec<(String, String)> {
    v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["check"] == "node")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn check_message(v: &Value, name: &str) -> String {
    v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["check"] == name)
        .map(|c| format!("{} {}", c["status"], c["message"]))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raft_cluster_serves_through_any_node_and_survives_the_active_one() {
    let mut cluster = BaoCluster::start(3).await.expect("3-node cluster");
    let token = cluster.key_and_token("kmsfs").await.expect("key and token");
    let work = tempfile::tempdir().expect("tempdir");
    let tf = write_token_file(work.path(), "token", &token).expect("token file");
    let k = Kmsfs::new(work.path().join("etc/kms.toml"));
    let leader = cluster.wait_leader(&[]).await.expect("leader");
    let path = |n: &str| -> PathBuf { work.path().join(n) };

    // Through each single node's address, the two standbys (429)
    // included: `kms set` verifies, `create` wraps, `mount` unwraps.
    for i in 0..3 {
        let addr = cluster.addr(i);
        assert_eq!(
            cluster.health(i).await,
            Some(if i == leader { 200 } else { 429 })
        );
        set(&k, &addr, &tf).await.ok();
        let cipher = path(&format!("fs{i}"));
        k.run_async(&["create", s(&cipher)]).await.ok();
        mount_and_use(&k, &cipher, &path(&format!("mnt{i}")), b"hello", true).await;
    }

    // Every address: each node is reported, the active one and two
    // standbys, with the Shamir seal type.
    let all = cluster.addrs().join(",");
    set(&k, &all, &tf).await.ok();
    let v = k.run_async(&["kms", "check", "--json"]).await.ok().json();
    let nodes = node_lines(&v);
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    assert_eq!(
        nodes.iter().filter(|(_, m)| m.contains(": active")).count(),
        1,
        "{nodes:?}"
    );
    assert_eq!(
        nodes
            .iter()
            .filter(|(st, m)| st == "OK" && m.contains("standby (HTTP 429)"))
            .count(),
        2,
        "{nodes:?}"
    );
    assert!(check_message(&v, "seal-type").contains("shamir"), "{v}");
    assert!(
        check_message(&v, "unlock").matches("unlocks").count() == 3,
        "{v}"
    );

    // The active node dies without stepping down; once another is elected
    // the same configuration creates and mounts, old filesystems included.
    cluster.kill(leader);
    let next = cluster.wait_leader(&[leader]).await.expect("new leader");
    assert_ne!(next, leader);
    let after = path("fs-after");
    k.run_async(&["create", s(&after)]).await.ok();
    mount_and_use(&k, &after, &path("mnt-after"), b"after", true).await;
    mount_and_use(
        &k,
        &path(&format!("fs{leader}")),
        &path("mnt-old"),
        b"hello",
        false,
    )
    .await;

    // Restarted, the old leader stays sealed (Shamir): `kms check` says so
    // (a WARN: the other nodes serve) and names the seal type.
    cluster.restart(leader).await.expect("restart sealed");
    let v = k.run_async(&["kms", "check", "--json"]).await.ok().json();
    let dead = cluster.addr(leader);
    let line = node_lines(&v)
        .into_iter()
        .find(|(_, m)| m.starts_with(&format!("{dead}:")))
        .unwrap_or_else(|| panic!("no node line for {dead}: {v}"));
    assert_eq!(line.0, "WARN", "{line:?}");
    assert!(
        line.1.contains("sealed") && line.1.contains("seal type shamir"),
        "{line:?}"
    );

    // That node alone: `kms set` refuses it as sealed; saved without
    // verification, `kms check` FAILs on the seal and names the type.
    let only = Kmsfs::new(work.path().join("etc-sealed/kms.toml"));
    let r = set(&only, &dead, &tf).await.failed();
    assert!(r.stderr.contains("sealed"), "{}", r.stderr);
    only.run_async(&[
        "kms",
        "set",
        "vault",
        &dead,
        "kmsfs",
        "--token-file",
        s(&tf),
        "--skip-kms-test",
    ])
    .await
    .ok();
    let r = only.run_async(&["kms", "check"]).await.failed();
    assert!(
        r.stdout.contains("FAIL seal") && r.stdout.contains("seal type shamir"),
        "{}",
        r.stdout
    );

    // Unsealed again, it serves like any other node.
    cluster.unseal(leader).await.expect("unseal");
    cluster
        .wait_health(leader, &[200, 429])
        .await
        .expect("back as a standby");
    set(&only, &dead, &tf).await.ok();
}
