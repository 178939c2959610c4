//! `kmsfs snapshot` end to end: a real OpenBao dev server, a real SeaweedFS
//! S3 server (started here on free loopback ports, killed by PID), the real
//! binary and real FUSE mounts. Every mount is undone by a guard even when
//! an assertion fails.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kmsfs_e2e::bao::dead_address;
use kmsfs_e2e::cli::{kmsfs_bin, CliEnv, Kmsfs, Run};
use kmsfs_e2e::fuse::{CliMountGuard, Rng, Tmpfs};
use kmsfs_e2e::s3::SeaweedServer;
use sha2::{Digest, Sha256};

const MIB: usize = 1024 * 1024;

/// The plaintext tree under `root`: path → type, mode, size, mtime,
/// contents hash, link count or symlink target.
fn describe(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .collect();
        names.sort();
        for p in names {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).expect("stat");
            let mode = m.permissions().mode() & 0o7777;
            let d = if m.is_dir() {
                walk(root, &p, out);
                format!("dir {mode:o} mtime={}", m.mtime())
            } else if m.file_type().is_symlink() {
                format!("symlink -> {}", fs::read_link(&p).unwrap().display())
            } else {
                let data = fs::read(&p).expect("read");
                format!(
                    "file {mode:o} size={} mtime={} nlink={} sha256={}",
                    m.len(),
                    m.mtime(),
                    m.nlink(),
                    hex(&Sha256::digest(&data))
                )
            };
            out.insert(rel, d);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fills a mounted filesystem with a small but varied tree.
fn fill(plain: &Path, big: usize) {
    let mut rng = Rng::new(9);
    fs::create_dir_all(plain.join("docs")).unwrap();
    fs::create_dir_all(plain.join("a/b/c")).unwrap();
    fs::create_dir_all(plain.join("data")).unwrap();
    fs::write(
        plain.join("docs/readme.txt"),
        b"snapshot me, secret-marker-1234\n",
    )
    .unwrap();
    fs::write(plain.join("docs/tiny"), b"seven!!").unwrap();
    fs::write(plain.join("a/b/c/deep.txt"), rng.bytes(10_000)).unwrap();
    fs::write(plain.join("data/big.bin"), rng.bytes(big)).unwrap();
    fs::write(plain.join("data/empty"), b"").unwrap();
    let sparse = fs::File::create(plain.join("data/sparse")).unwrap();
    sparse.set_len(8 * MIB as u64).unwrap();
    sparse
        .write_all_at(b"end of a sparse file", 8 * MIB as u64)
        .unwrap();
    drop(sparse);
    fs::hard_link(plain.join("data/big.bin"), plain.join("data/big-link")).unwrap();
    std::os::unix::fs::symlink("docs/readme.txt", plain.join("link")).unwrap();
    fs::write(plain.join("n".repeat(255)), b"long name").unwrap();
    fs::set_permissions(plain.join("docs/tiny"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(plain.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();
}

/// A runner of `env`'s configuration with S3 credentials for `weed`.
fn with_s3(k: &Kmsfs, endpoint: &str) -> Kmsfs {
    k.clone()
        .with_env("AWS_ACCESS_KEY_ID", "kmsfs-test")
        .with_env("AWS_SECRET_ACCESS_KEY", "kmsfs-test-secret")
        .with_env("AWS_REGION", "us-east-1")
        .with_env("AWS_ENDPOINT_URL", endpoint)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

async fn umount(k: &Kmsfs, plain: &Path) {
    k.run_async(&["umount", s(plain)]).await.ok();
}

/// Unmounts `plain`, mounts it again and describes it, then unmounts: the
/// tree as the backing directory holds it (with the writeback cache, a
/// file's mtime seen before the unmount can be a second older than the one
/// its last flush stores).
async fn at_rest(env: &CliEnv, cipher: &Path, plain: &Path) -> BTreeMap<String, String> {
    umount(&env.kmsfs, plain).await;
    env.mount(cipher, plain, &[]).await.ok();
    let tree = describe(plain);
    umount(&env.kmsfs, plain).await;
    tree
}

/// A second host: its own configuration directory (empty registry), the
/// same KMS.
async fn fresh_host(env: &CliEnv, dir: &Path) -> Kmsfs {
    let k = Kmsfs::new(dir.join("etc/kms.toml"));
    let addr = env.server.as_ref().expect("server").addr().to_string();
    k.run_async(&[
        "kms",
        "set",
        "vault",
        &addr,
        "kmsfs",
        "--token-file",
        s(&env.token_file),
    ])
    .await
    .ok();
    k
}

/// Restores `id` from `target` into `dir/NAME-cipher`, mounts it and
/// describes the tree.
async fn restore_and_describe(
    k: &Kmsfs,
    target: &str,
    id: &str,
    dir: &Path,
    name: &str,
) -> BTreeMap<String, String> {
    let cipher = dir.join(format!("{name}-cipher"));
    let plain = dir.join(format!("{name}-plain"));
    fs::create_dir_all(&plain).unwrap();
    k.run_async(&["snapshot", "restore", target, id, s(&cipher)])
        .await
        .ok();
    let _g = CliMountGuard(plain.clone());
    k.run_async(&["mount", s(&cipher), s(&plain)]).await.ok();
    let tree = describe(&plain);
    umount(k, &plain).await;
    tree
}

/// The error of a failed run, checked to be one line (progress lines,
/// `kmsfs: snapshot: ...`, aside).
fn one_line(r: &Run) -> &str {
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| !l.starts_with("kmsfs: snapshot: "))
        .collect();
    assert_eq!(lines.len(), 1, "not one line:\n{}", r.stderr);
    lines[0]
}

/// The DR path end to end: snapshot, change, snapshot again; restore both
/// on a fresh host with the original directory gone, and compare with what
/// was there at each instant. Also: incremental sizes, list, delete
/// keeping shared objects.
#[tokio::test(flavor = "multi_thread")]
async fn snapshots_restore_on_a_fresh_host_as_they_were() {
    let env = CliEnv::new().await;
    let weed = SeaweedServer::start().await.expect("seaweedfs");
    weed.create_bucket("drill").await.expect("bucket");
    let k = with_s3(&env.kmsfs, &weed.endpoint());
    let target = "s3://drill/host1";
    let (cipher, plain) = env.create("main").await;
    let _g = CliMountGuard(plain.clone());

    env.mount(&cipher, &plain, &[]).await.ok();
    fill(&plain, 24 * MIB);
    // (Snapshots of a mounted filesystem: tests/tests/snapshots_live.rs.)
    let state_a = at_rest(&env, &cipher, &plain).await;

    let a = k
        .run_async(&[
            "snapshot",
            "create",
            s(&cipher),
            target,
            "--label",
            "first",
            "--json",
        ])
        .await
        .ok()
        .json();
    let id_a = a["id"].as_str().unwrap().to_string();
    assert!(a["objects_uploaded"].as_u64().unwrap() >= 24, "{a}");
    // The same instant under another prefix: never rewrapped below.
    let old_target = "s3://drill/host1-old";
    let id_old = k
        .run_async(&["snapshot", "create", s(&cipher), old_target])
        .await
        .ok()
        .stdout
        .trim()
        .to_string();
    assert!(
        a["bytes_uploaded"].as_u64().unwrap() >= 24 * MIB as u64,
        "{a}"
    );

    // Change one byte in the big file, add and remove a file.
    env.mount(&cipher, &plain, &[]).await.ok();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(plain.join("data/big.bin"))
        .unwrap();
    f.write_all_at(b"!", 10 * MIB as u64 + 5).unwrap();
    drop(f);
    fs::write(plain.join("new.txt"), b"written after the first snapshot").unwrap();
    fs::remove_file(plain.join("docs/tiny")).unwrap();
    let state_b = at_rest(&env, &cipher, &plain).await;
    assert_ne!(state_a, state_b);

    let b = k
        .run_async(&["snapshot", "create", s(&cipher), target, "--json"])
        .await
        .ok()
        .json();
    let id_b = b["id"].as_str().unwrap().to_string();
    // One changed chunk of the big file, the new file; nothing else.
    assert!(
        b["bytes_uploaded"].as_u64().unwrap() <= 2 * MIB as u64,
        "{b}"
    );
    assert!(b["objects_uploaded"].as_u64().unwrap() <= 3, "{b}");
    assert!(b["objects_reused"].as_u64().unwrap() >= 23, "{b}");
    // Nothing changed: nothing uploaded.
    let c = k
        .run_async(&["snapshot", "create", s(&cipher), target, "--json"])
        .await
        .ok()
        .json();
    assert_eq!(c["objects_uploaded"], 0, "{c}");
    assert_eq!(c["bytes_uploaded"], 0, "{c}");
    let id_c = c["id"].as_str().unwrap().to_string();

    let list = k
        .run_async(&["snapshot", "list", target, "--json"])
        .await
        .ok()
        .json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id_a.as_str(), id_b.as_str(), id_c.as_str()]);
    assert_eq!(list[0]["label"], "first");

    // The fresh host: new configuration, empty registry, no original.
    fs::remove_dir_all(&cipher).unwrap();
    let host2 = tempfile::tempdir().unwrap();
    let k2 = with_s3(&fresh_host(&env, host2.path()).await, &weed.endpoint());
    assert_eq!(
        restore_and_describe(&k2, target, &id_a, host2.path(), "a").await,
        state_a
    );
    assert_eq!(
        restore_and_describe(&k2, target, &id_b, host2.path(), "b").await,
        state_b
    );
    // Rotation: a planned raise of min_decryption_version is flagged for
    // every snapshot still wrapped with version 1, in both targets this
    // host used, with the rewrap to run.
    let bao = env.server.as_ref().expect("server");
    bao.rotate_key("kmsfs").await.expect("rotate");
    let r = k
        .run_async(&[
            "kms",
            "check",
            "--planned-min-decryption-version",
            "kmsfs=2",
        ])
        .await
        .ok();
    for (t, id) in [(target, &id_a), (target, &id_c), (old_target, &id_old)] {
        assert!(
            r.stdout.lines().any(|l| l.starts_with("WARN snapshot")
                && l.contains(&format!("{t} snapshot {id}: slot 0 'primary'"))
                && l.contains("planned min_decryption_version 2 would cut it off")
                && l.contains(&format!("kmsfs snapshot rewrap {t} {id} --slot primary"))),
            "{}",
            r.stdout
        );
    }
    // Rewrap every snapshot in the first target from the fresh host: one
    // line per slot; a second run changes nothing.
    let r = k2
        .run_async(&["snapshot", "rewrap", target, "--all"])
        .await
        .ok();
    for id in [&id_a, &id_b, &id_c] {
        let want = format!("{target} {id}: slot 0 'primary': kmsfs v1 -> kmsfs v2");
        assert!(r.stdout.lines().any(|l| l == want), "{}", r.stdout);
    }
    assert_eq!(r.stdout.lines().count(), 3, "{}", r.stdout);
    let r = k2
        .run_async(&["snapshot", "rewrap", target, &id_b])
        .await
        .ok();
    assert!(
        r.stdout.contains("already the newest version, unchanged"),
        "{}",
        r.stdout
    );
    bao.set_min_decryption_version("kmsfs", 2)
        .await
        .expect("min version");
    // Rewrapped snapshots restore as they were.
    assert_eq!(
        restore_and_describe(&k2, target, &id_a, host2.path(), "a-v2").await,
        state_a
    );
    assert_eq!(
        restore_and_describe(&k2, target, &id_b, host2.path(), "b-v2").await,
        state_b
    );
    // The one not rewrapped cannot be, and says what to do.
    let r = k2
        .run_async(&[
            "snapshot",
            "restore",
            old_target,
            &id_old,
            s(&host2.path().join("old")),
        ])
        .await
        .failed();
    let line = one_line(&r);
    assert!(
        line.contains("min_decryption_version")
            && line.contains(&format!("kmsfs snapshot rewrap {old_target} {id_old}")),
        "{line}"
    );
    assert!(!host2.path().join("old/kmsfs.header").exists());
    let r = k.run_async(&["kms", "check"]).await.ok();
    assert!(
        r.stdout.lines().any(|l| l.starts_with("WARN snapshot")
            && l.contains(&format!("{old_target} snapshot {id_old}"))
            && l.contains("CANNOT be opened")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with(&format!("OK   snapshot         {target}: 3 snapshot(s)"))),
        "{}",
        r.stdout
    );

    // The restored filesystems are registered on the new host.
    let listed = k2.run_async(&["list", "--json"]).await.ok().stdout;
    assert!(
        listed.contains("a-cipher") && listed.contains("b-cipher"),
        "{listed}"
    );
    // A non-empty destination is refused.
    let r = k2
        .run_async(&[
            "snapshot",
            "restore",
            target,
            &id_a,
            s(&host2.path().join("a-cipher")),
        ])
        .await
        .failed();
    assert!(one_line(&r).contains("not empty"), "{}", r.stderr);

    // C shares every object with B; A has the old chunk and the removed file.
    let dc = k2
        .run_async(&["snapshot", "delete", target, &id_c, "--json"])
        .await
        .ok()
        .json();
    assert_eq!(dc["objects_deleted"], 0, "{dc}");
    let da = k2
        .run_async(&["snapshot", "delete", target, &id_a, "--json"])
        .await
        .ok()
        .json();
    assert!(da["objects_deleted"].as_u64().unwrap() >= 2, "{da}");
    let list = k2
        .run_async(&["snapshot", "list", target, "--json"])
        .await
        .ok()
        .json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(
        restore_and_describe(&k2, target, &id_b, host2.path(), "b2").await,
        state_b
    );
    let r = k2
        .run_async(&[
            "snapshot",
            "restore",
            target,
            &id_a,
            s(&host2.path().join("gone")),
        ])
        .await
        .failed();
    assert!(one_line(&r).contains("no snapshot"), "{}", r.stderr);

    // An object store that is down is a warning in `kms check`, not a hang.
    drop(weed);
    let r = k.run_async(&["kms", "check"]).await.ok();
    assert!(
        r.stdout.lines().any(|l| l.starts_with("WARN snapshot")
            && l.contains(&format!("{target}: cannot check its snapshots"))),
        "{}",
        r.stdout
    );
}

fn all_bytes(dir: &Path, out: &mut Vec<u8>) {
    for e in fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        out.extend_from_slice(e.file_name().as_encoded_bytes());
        if p.is_dir() {
            all_bytes(&p, out);
        } else if let Ok(b) = fs::read(&p) {
            out.extend_from_slice(&b);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn chunk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in fs::read_dir(dir.join("chunks")).unwrap().flatten() {
        for f in fs::read_dir(sub.path()).unwrap().flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

/// A directory target (file://): nothing in it is plaintext; a missing or
/// tampered object or a tampered manifest makes restore refuse, naming it.
#[tokio::test(flavor = "multi_thread")]
async fn restore_refuses_missing_or_tampered_objects_by_name() {
    let env = CliEnv::new().await;
    let k = &env.kmsfs;
    let (cipher, plain) = env.create("t").await;
    let _g = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &[]).await.ok();
    fill(&plain, 3 * MIB);
    let state = at_rest(&env, &cipher, &plain).await;
    let store = env.path("store");
    let target = format!("file://{}", store.display());
    let id = k
        .run_async(&["snapshot", "create", s(&cipher), &target])
        .await
        .ok()
        .stdout
        .trim()
        .to_string();

    let mut everything = Vec::new();
    all_bytes(&store, &mut everything);
    for needle in [
        &b"secret-marker-1234"[..],
        b"readme.txt",
        b"deep.txt",
        b"nnnnnnnnnnnn",
    ] {
        assert!(
            !contains(&everything, needle),
            "plaintext {:?} in the store",
            String::from_utf8_lossy(needle)
        );
    }

    let victim = chunk_files(&store)
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let name = victim
        .strip_prefix(&store)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut n = 0;
    let mut restore = |label: &str| {
        n += 1;
        let dest = env.path(&format!("r{n}-{label}"));
        (
            dest.clone(),
            k.run(["snapshot", "restore", &target, &id, s(&dest)]),
        )
    };

    // Missing.
    let aside = env.path("aside");
    fs::rename(&victim, &aside).unwrap();
    let (dest, r) = restore("missing");
    let r = r.failed();
    let line = one_line(&r);
    assert!(line.contains(&name) && line.contains("missing"), "{line}");
    assert!(
        !dest.join("kmsfs.header").exists(),
        "a failed restore is mountable"
    );
    fs::rename(&aside, &victim).unwrap();

    // Tampered: one bit.
    let good = fs::read(&victim).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 1;
    fs::write(&victim, &bad).unwrap();
    let (_, r) = restore("tampered");
    let r = r.failed();
    let line = one_line(&r);
    assert!(line.contains(&name) && line.contains("tampered"), "{line}");
    fs::write(&victim, &good).unwrap();

    // Tampered manifest: a mode changed.
    let mpath = store.join(format!("snapshots/{id}.manifest"));
    let mgood = fs::read(&mpath).unwrap();
    let text = String::from_utf8(mgood.clone()).unwrap();
    let mbad = text.replacen("\"mode\":420", "\"mode\":511", 1);
    assert_ne!(mbad, text);
    fs::write(&mpath, mbad).unwrap();
    let (_, r) = restore("manifest");
    let r = r.failed();
    assert!(
        one_line(&r).contains("does not authenticate"),
        "{}",
        r.stderr
    );
    fs::write(&mpath, &mgood).unwrap();

    // Repaired: the restore works and the tree is as it was.
    let tree = restore_and_describe(k, &target, &id, env.dir.path(), "ok").await;
    assert_eq!(tree, state);
}

/// The object store is SIGKILLed in the middle of an upload: the run fails
/// clearly and publishes nothing; after a restart the rerun completes
/// without uploading again what made it, and restores identical. Bad
/// bucket, missing credentials and a wrong endpoint each fail in one line.
#[tokio::test(flavor = "multi_thread")]
async fn killed_object_store_then_rerun_completes() {
    let env = CliEnv::new().await;
    let mut weed = SeaweedServer::start().await.expect("seaweedfs");
    weed.create_bucket("snap").await.expect("bucket");
    let k = with_s3(&env.kmsfs, &weed.endpoint());
    let target = "s3://snap";
    let (cipher, plain) = env.create("k").await;
    let _g = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &[]).await.ok();
    let mut rng = Rng::new(77);
    for i in 0..6 {
        fs::write(plain.join(format!("f{i}")), rng.bytes(8 * MIB)).unwrap();
    }
    let state = at_rest(&env, &cipher, &plain).await;

    let child = Command::new(kmsfs_bin())
        .arg("--config")
        .arg(&env.kmsfs.config)
        .args(["snapshot", "create", s(&cipher), target])
        .env("AWS_ACCESS_KEY_ID", "kmsfs-test")
        .env("AWS_SECRET_ACCESS_KEY", "kmsfs-test-secret")
        .env("AWS_ENDPOINT_URL", weed.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while weed
        .list_keys("snap", "chunks/")
        .await
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no chunk was ever uploaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    weed.kill();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the snapshot outran the kill:\n{err}"
    );
    assert!(err.contains("nothing was published"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    weed.restart().await.expect("restart");
    let r = k.run_async(&["snapshot", "list", target]).await.ok();
    assert!(r.stdout.contains("no snapshots"), "{}", r.stdout);
    let again = k
        .run_async(&["snapshot", "create", s(&cipher), target, "--json"])
        .await
        .ok()
        .json();
    // Six files of 8 MiB + a 32-byte file header: 9 chunks each; the root
    // directory IV: 1.
    assert_eq!(again["chunks"], 6 * 9 + 1, "{again}");
    assert!(again["objects_reused"].as_u64().unwrap() >= 1, "{again}");
    let id = again["id"].as_str().unwrap();
    assert_eq!(
        restore_and_describe(&k, target, id, env.dir.path(), "again").await,
        state
    );

    // One clear line for each kind of bad target.
    let r = k
        .run_async(&["snapshot", "list", "s3://no-such-bucket"])
        .await
        .failed();
    assert!(
        one_line(&r).contains("bucket does not exist"),
        "{}",
        r.stderr
    );
    let r = env
        .kmsfs
        .run_async(&["snapshot", "list", target])
        .await
        .failed();
    assert!(one_line(&r).contains("no S3 credentials"), "{}", r.stderr);
    let dead = dead_address().unwrap();
    let r = k
        .run_async(&["snapshot", "list", target, "--s3-endpoint", &dead])
        .await
        .failed();
    assert!(
        one_line(&r).contains("cannot reach the object store"),
        "{}",
        r.stderr
    );
    let r = k
        .run_async(&["snapshot", "list", "relative/dir"])
        .await
        .failed();
    assert!(one_line(&r).contains("s3://BUCKET"), "{}", r.stderr);
}

/// `snapshot rewrap` against a directory target on a full tmpfs: the new
/// manifest cannot be written, the command fails clearly and the old
/// manifest (the only copy of the old wrapping) is there byte for byte,
/// with no temporary file left. With space again the rewrap completes;
/// after `min_decryption_version` is raised the snapshot restores as it
/// was.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_rewrap_on_a_full_store_keeps_the_old_manifest() {
    let env = CliEnv::new().await;
    let k = &env.kmsfs;
    let (cipher, plain) = env.create("full").await;
    let _g = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &[]).await.ok();
    fill(&plain, MIB);
    let state = at_rest(&env, &cipher, &plain).await;
    let usb = env.path("usb");
    fs::create_dir_all(&usb).unwrap();
    let _tmpfs = Tmpfs::mount(&usb, "16m");
    let target = usb.to_str().unwrap();
    let id = k
        .run_async(&["snapshot", "create", s(&cipher), target])
        .await
        .ok()
        .stdout
        .trim()
        .to_string();
    let mpath = usb.join(format!("snapshots/{id}.manifest"));
    let before = fs::read(&mpath).unwrap();

    let bao = env.server.as_ref().expect("server");
    bao.rotate_key("kmsfs").await.expect("rotate");
    // Fill the store to the last byte.
    let filler = usb.join("filler");
    {
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0x5au8; 64 * 1024];
        loop {
            if std::io::Write::write_all(&mut f, &block).is_err() {
                break;
            }
        }
        let one = [0x5au8; 1];
        while std::io::Write::write_all(&mut f, &one).is_ok() {}
    }
    let r = k
        .run_async(&["snapshot", "rewrap", target, &id])
        .await
        .failed();
    assert!(
        r.stdout.contains("FAILED") && r.stdout.contains("keeps its old one"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(
        fs::read(&mpath).unwrap(),
        before,
        "the old manifest changed"
    );
    let names: Vec<_> = fs::read_dir(usb.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![format!("{id}.manifest")]);

    fs::remove_file(&filler).unwrap();
    let r = k.run_async(&["snapshot", "rewrap", target, &id]).await.ok();
    assert_eq!(
        r.stdout.trim(),
        format!("{target} {id}: slot 0 'primary': kmsfs v1 -> kmsfs v2")
    );
    assert_ne!(fs::read(&mpath).unwrap(), before);
    bao.set_min_decryption_version("kmsfs", 2)
        .await
        .expect("min version");
    assert_eq!(
        restore_and_describe(k, target, &id, env.dir.path(), "back").await,
        state
    );
}

/// The unchanged-file shortcut: a second snapshot to the same target reads
/// only the files changed since the first — including a same-size rewrite
/// whose old mtime was put back (its ctime changed) — and restores exactly;
/// `--full` reads everything again.
#[tokio::test(flavor = "multi_thread")]
async fn an_incremental_snapshot_reads_only_the_changed_files() {
    let env = CliEnv::new().await;
    let k = &env.kmsfs;
    let (cipher, plain) = env.create("inc").await;
    let _g = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &[]).await.ok();
    let mut rng = Rng::new(5);
    fs::create_dir_all(plain.join("d")).unwrap();
    for i in 0..20 {
        fs::write(plain.join(format!("d/f{i:02}")), rng.bytes(256 * 1024)).unwrap();
    }
    let state_a = at_rest(&env, &cipher, &plain).await;
    let target = format!("file://{}", env.path("store").display());
    let first = k
        .run_async(&["snapshot", "create", s(&cipher), &target, "--json"])
        .await
        .ok()
        .json();
    assert_eq!(first["files_unchanged"], 0, "{first}");
    let total = first["bytes"].as_u64().unwrap();
    assert_eq!(first["bytes_read"].as_u64().unwrap(), total, "{first}");

    // Two files change: one appended to, one rewritten in place with the
    // same size and its old mtime put back.
    env.mount(&cipher, &plain, &[]).await.ok();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(plain.join("d/f03"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"appended").unwrap();
    drop(f);
    let p = plain.join("d/f11");
    let mtime = fs::metadata(&p).unwrap().modified().unwrap();
    fs::write(&p, rng.bytes(256 * 1024)).unwrap();
    fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let state_b = at_rest(&env, &cipher, &plain).await;
    assert_ne!(state_a, state_b);
    let second = k
        .run_async(&["snapshot", "create", s(&cipher), &target, "--json"])
        .await
        .ok()
        .json();
    // 18 of the 20 files are taken from the cache, and read is about the
    // two changed files (each 256 KiB plus a 32-byte file header).
    assert!(
        second["files_unchanged"].as_u64().unwrap() >= 18,
        "{second}"
    );
    let read = second["bytes_read"].as_u64().unwrap();
    assert!(
        (2 * 256 * 1024..=2 * 256 * 1024 + 64 * 1024).contains(&read),
        "{second}"
    );
    assert_eq!(
        second["bytes_unchanged"].as_u64().unwrap() + read,
        second["bytes"].as_u64().unwrap(),
        "{second}"
    );
    let id_b = second["id"].as_str().unwrap();
    assert_eq!(
        restore_and_describe(k, &target, id_b, env.dir.path(), "b").await,
        state_b
    );
    let full = k
        .run_async(&[
            "snapshot",
            "create",
            s(&cipher),
            &target,
            "--json",
            "--full",
        ])
        .await
        .ok()
        .json();
    assert_eq!(full["files_unchanged"], 0, "{full}");
    assert_eq!(full["bytes_read"], full["bytes"], "{full}");

    // Progress: without a terminal, plain lines on stderr; on a terminal
    // (`script` gives the command a pty), a bar instead of those lines.
    let r = k
        .run_async(&["snapshot", "create", s(&cipher), &target])
        .await
        .ok();
    assert!(
        r.stderr
            .lines()
            .any(|l| l == "kmsfs: snapshot: reading and uploading")
            && r.stderr
                .lines()
                .any(|l| l.starts_with("kmsfs: snapshot: publishing the manifest: done, ")),
        "{}",
        r.stderr
    );
    let cmd = format!(
        "{} --config {} snapshot create {} {target}",
        kmsfs_bin().display(),
        k.config.display(),
        cipher.display()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(
        tty.contains("reading and uploading") && !tty.contains("kmsfs: snapshot: "),
        "{tty}"
    );
}

/// A restore fetches ahead across files: a tree of many small files, runs
/// of empty files longer than the files it keeps open, read-only files,
/// hard links between small files and a file of several chunks among them
/// comes back with every backing file byte for byte in its place, with its
/// mode and mtime, and mounts as the tree that was snapshotted.
#[tokio::test(flavor = "multi_thread")]
async fn a_tree_of_many_small_files_restores_byte_for_byte() {
    let env = CliEnv::new().await;
    let k = &env.kmsfs;
    let (cipher, plain) = env.create("small").await;
    let _g = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &[]).await.ok();
    let mut rng = Rng::new(17);
    for d in 0..3 {
        let dir = plain.join(format!("d{d}"));
        fs::create_dir_all(&dir).unwrap();
        // 150 empty files in a row: more than a restore keeps open.
        for i in 0..150 {
            fs::write(dir.join(format!("e{i:03}")), b"").unwrap();
        }
        for i in 0..60 {
            let len = 1 + (i * 1_237) % 70_000;
            let p = dir.join(format!("s{i:03}"));
            fs::write(&p, rng.bytes(len)).unwrap();
            if i % 7 == 0 {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o444)).unwrap();
            }
            if i % 11 == 0 {
                fs::hard_link(&p, dir.join(format!("h{i:03}"))).unwrap();
            }
        }
        fs::write(dir.join("m-big"), rng.bytes(3 * MIB + 5)).unwrap();
    }
    let state = at_rest(&env, &cipher, &plain).await;
    let backing = describe(&cipher);
    let target = format!("file://{}", env.path("store").display());
    let id = k
        .run_async(&["snapshot", "create", s(&cipher), &target, "--json"])
        .await
        .ok()
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let restored = env.dir.path().join("r-cipher");
    let stats = k
        .run_async(&["snapshot", "restore", &target, &id, s(&restored), "--json"])
        .await
        .ok()
        .json();
    // The header is written anew (last, durably): same bytes, a new mtime.
    let strip = |mut t: BTreeMap<String, String>| {
        if let Some(h) = t.get_mut("kmsfs.header") {
            *h = h
                .split(' ')
                .filter(|w| !w.starts_with("mtime="))
                .collect::<Vec<_>>()
                .join(" ");
        }
        t
    };
    let (backing, got) = (strip(backing), strip(describe(&restored)));
    let diff: Vec<String> = backing
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {v} -> {:?}", got.get(k)))
        .chain(
            got.keys()
                .filter(|k| !backing.contains_key(*k))
                .map(|k| format!("{k}: only in the restore")),
        )
        .collect();
    assert!(diff.is_empty(), "{stats}\n{}", diff.join("\n"));
    assert_eq!(
        restore_and_describe(k, &target, &id, env.dir.path(), "again").await,
        state
    );
}
