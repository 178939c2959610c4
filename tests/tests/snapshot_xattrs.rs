//! Snapshots carry extended attributes and POSIX ACLs: kmsfs keeps them
//! encrypted in the backing entries' own `user.kmsfs.*` attributes, and a
//! snapshot (of an unmounted or a mounted filesystem) must carry those, so
//! a restore has every attribute and ACL back. Real OpenBao, real SeaweedFS
//! S3 and directory targets, the real binary and real FUSE mounts (`-o
//! acl`); every mount is undone by a guard even when an assertion fails.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmsfs_e2e::cli::{CliEnv, Kmsfs, Run};
use kmsfs_e2e::fuse::{CliMountGuard, Rng, Tmpfs};
use kmsfs_e2e::s3::SeaweedServer;

/// The largest attribute value Linux allows: its record spans two backing
/// attributes (docs/format.md section 8).
const BIG: usize = 65536;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

fn sh(script: &str, dir: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("sh -c {script}: {e}"));
    assert!(
        out.status.success(),
        "sh -c {script} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `setxattr(path, name, value)` (a 64 KiB value is too long for a
/// `setfattr` argument).
fn setx(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a value valid for its length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr {name}: {}", std::io::Error::last_os_error());
}

/// Every attribute (`getfattr -d -m -`) and ACL (`getfacl`, with owner,
/// group and mode) of every entry under `dir` but symlinks, in name order.
fn dump(dir: &Path) -> String {
    sh(
        "L() { find . ! -type l | LC_ALL=C sort; } && \
         L | xargs -d '\\n' getfattr -h -d -m - && L | xargs -d '\\n' getfacl -p",
        dir,
    )
}

/// Every backing attribute of every backing entry, hex, in name order.
fn backing_dump(cipher: &Path) -> String {
    sh(
        "find . ! -type l ! -name kmsfs.header | LC_ALL=C sort \
         | xargs -d '\\n' getfattr -h -d -m - -e hex",
        cipher,
    )
}

/// A tree with attributes in the `user.`, `trusted.` and `security.`
/// namespaces (one of 64 KiB), an access ACL on a file, a default ACL on a
/// directory (inherited by what is made in it), a hard link to a file
/// with attributes, a symlink, a 1 MiB file, and attributes on `tree` and
/// on the root.
fn fill(plain: &Path) -> PathBuf {
    let tree = plain.join("tree");
    fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    fs::write(tree.join("a"), b"a").unwrap();
    fs::write(tree.join("sub/b"), b"b").unwrap();
    fs::write(tree.join("data"), Rng::new(3).bytes(1024 * 1024)).unwrap();
    std::os::unix::fs::symlink("a", tree.join("link")).unwrap();
    let big: Vec<u8> = (0..BIG).map(|i| (i * 7 % 251) as u8).collect();
    setx(&tree.join("sub/b"), "user.big", &big);
    sh(
        "setfattr -n user.colour -v blue a && setfattr -n user.gone -v soon a \
         && setfattr -n user.top -v t . && setfattr -n user.root -v r .. \
         && setfattr -n trusted.t -v root-only sub && setfattr -n security.s -v sec sub/deeper \
         && setfacl -m u:nobody:rw,g:daemon:r a && setfacl -d -m u:nobody:rx sub \
         && touch sub/inherits && mkdir sub/inherits-dir && ln a a-hardlink",
        &tree,
    );
    tree
}

/// A runner of `k`'s configuration with S3 credentials for `weed`.
fn with_s3(k: &Kmsfs, endpoint: &str) -> Kmsfs {
    k.clone()
        .with_env("AWS_ACCESS_KEY_ID", "kmsfs-test")
        .with_env("AWS_SECRET_ACCESS_KEY", "kmsfs-test-secret")
        .with_env("AWS_REGION", "us-east-1")
        .with_env("AWS_ENDPOINT_URL", endpoint)
}

/// The error of a failed run, checked to be one line (progress lines
/// aside).
fn one_line(r: &Run) -> &str {
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| !l.starts_with("kmsfs: snapshot: "))
        .collect();
    assert_eq!(lines.len(), 1, "not one line:\n{}", r.stderr);
    lines[0]
}

/// A tmpfs for backing directories: it holds attribute values up to 64
/// KiB (ext4 keeps an inode's attributes in one 4 KiB block).
fn backing_tmpfs(env: &CliEnv) -> Tmpfs {
    let dir = env.path("t");
    fs::create_dir_all(&dir).unwrap();
    Tmpfs::mount(&dir, "256m")
}

/// `kmsfs create` in `t/NAME-cipher` (on the tmpfs), with an empty
/// mountpoint `NAME-plain`.
async fn create(env: &CliEnv, name: &str) -> (PathBuf, PathBuf) {
    let cipher = env.path(&format!("t/{name}-cipher"));
    let plain = env.path(&format!("{name}-plain"));
    fs::create_dir_all(&plain).unwrap();
    env.kmsfs.run_async(&["create", s(&cipher)]).await.ok();
    (cipher, plain)
}

/// `kmsfs fsck DIR --json` finds nothing.
async fn fsck_clean(k: &Kmsfs, cipher: &Path) {
    let v = k
        .run_async(&["fsck", s(cipher), "--json"])
        .await
        .ok()
        .json();
    assert_eq!(v["counts"]["problems"], 0, "{v:#}");
}

/// Restores `id` into `t/NAME-cipher` (on the tmpfs), checks it with fsck, mounts it with
/// ACLs on and returns `f` of the mount.
async fn restored<T>(
    env: &CliEnv,
    k: &Kmsfs,
    target: &str,
    id: &str,
    name: &str,
    f: impl FnOnce(&Path, &Path) -> T,
) -> T {
    let cipher = env.path(&format!("t/{name}-cipher"));
    let plain = env.path(&format!("{name}-plain"));
    fs::create_dir_all(&plain).unwrap();
    k.run_async(&["snapshot", "restore", target, id, s(&cipher)])
        .await
        .ok();
    fsck_clean(k, &cipher).await;
    let _g = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &["-o", "acl"]).await.ok();
    let out = f(&cipher, &plain);
    k.run_async(&["umount", s(&plain)]).await.ok();
    out
}

/// A filesystem mounted here, unmounted when dropped.
struct Mounted(PathBuf);

impl Mounted {
    /// `mount ARGS... DIR`.
    fn mount(args: &[&str], dir: &Path) -> Mounted {
        fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(args)
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "cannot mount {args:?} at {}", dir.display());
        Mounted(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Snapshot to a directory, restore elsewhere: every attribute and ACL is
/// back (the backing attributes byte for byte), fsck is clean; an
/// incremental snapshot after only an attribute change carries the new
/// value; a manifest with an attribute name changed is refused; a
/// destination without extended attributes (ramfs), or without room for a
/// 64 KiB value (ext4), is refused by name, unless the snapshot carries
/// none.
#[tokio::test(flavor = "multi_thread")]
async fn attributes_and_acls_survive_snapshot_and_restore() {
    let env = CliEnv::new().await;
    let k = &env.kmsfs;
    let _t = backing_tmpfs(&env);
    let (cipher, plain) = create(&env, "x").await;
    let _g = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &["-o", "acl"]).await.ok();
    let tree = fill(&plain);
    let original = dump(&tree);
    for want in [
        "user.colour=\"blue\"",
        "user.big=0s",
        "trusted.t=\"root-only\"",
        "security.s=\"sec\"",
        "user:nobody:rw-",
        "default:user:nobody:r-x",
    ] {
        assert!(original.contains(want), "{want} not in {original}");
    }
    // The default ACL was inherited.
    let inherited = sh("getfacl -p sub/inherits sub/inherits-dir", &tree);
    assert!(inherited.contains("user:nobody:r-x"), "{inherited}");
    k.run_async(&["umount", s(&plain)]).await.ok();
    let backing = backing_dump(&cipher);
    // The 64 KiB value's record spans parts.
    assert!(backing.contains("user.kmsfs.id="), "{backing}");
    assert!(
        backing.lines().any(|l| l.starts_with("user.kmsfs.x.")
            && l.split('=').next().unwrap().ends_with(".1")),
        "no record in two parts:\n{backing}"
    );

    let store = env.path("store");
    let target = format!("file://{}", store.display());
    let snap = |k: &Kmsfs, cipher: &Path| {
        let r = k.run(["snapshot", "create", s(cipher), &target, "--json"]);
        r.ok().json()
    };
    let first = snap(k, &cipher);
    let id1 = first["id"].as_str().unwrap().to_string();
    let (back, restored_dump) = restored(&env, k, &target, &id1, "r1", |c, p| {
        (backing_dump(c), dump(&p.join("tree")))
    })
    .await;
    assert_eq!(back, backing, "backing attributes differ after restore");
    assert_eq!(restored_dump, original);

    // Only attributes change: the new values travel, though the contents
    // come from the unchanged-file cache.
    env.mount(&cipher, &plain, &["-o", "acl"]).await.ok();
    sh(
        "setfattr -n user.colour -v red a && setfattr -x user.gone a \
         && setfacl -m u:daemon:r sub/b",
        &tree,
    );
    let changed = dump(&tree);
    assert_ne!(changed, original);
    k.run_async(&["umount", s(&plain)]).await.ok();
    let second = snap(k, &cipher);
    assert!(
        second["files_unchanged"].as_u64().unwrap() >= 1,
        "the cache was not used: {second}"
    );
    let id2 = second["id"].as_str().unwrap().to_string();
    let got = restored(&env, k, &target, &id2, "r2", |_, p| dump(&p.join("tree"))).await;
    assert_eq!(got, changed);
    assert!(got.contains("user.colour=\"red\"") && !got.contains("user.gone"));

    // A manifest whose attribute name was changed does not authenticate.
    let mpath = store.join(format!("snapshots/{id2}.manifest"));
    let good = fs::read_to_string(&mpath).unwrap();
    let bad = good.replacen("[\"user.kmsfs.id\"", "[\"user.other.id\"", 1);
    assert_ne!(bad, good);
    fs::write(&mpath, bad).unwrap();
    let dest = env.path("r-tampered");
    let r = k
        .run_async(&["snapshot", "restore", &target, &id2, s(&dest)])
        .await
        .failed();
    assert!(
        one_line(&r).contains("does not authenticate"),
        "{}",
        r.stderr
    );
    assert!(!dest.join("kmsfs.header").exists());
    fs::write(&mpath, &good).unwrap();

    // A destination without extended attributes: refused, naming the
    // entry and the fix; nothing mountable is left.
    let ram = Mounted::mount(&["-t", "ramfs", "ramfs"], &env.path("ram"));
    let dest = ram.0.join("x");
    let r = k
        .run_async(&["snapshot", "restore", &target, &id2, s(&dest)])
        .await
        .failed();
    let line = one_line(&r);
    assert!(
        line.contains(s(&dest)) && line.contains("no user extended attributes"),
        "{line}"
    );
    assert!(line.contains("ext4, xfs, tmpfs"), "{line}");
    assert!(!dest.join("kmsfs.header").exists());
    // ext4 keeps an inode's attributes in one 4 KiB block: the 64 KiB
    // value does not fit, and the restore says so, naming the entry.
    let img = env.path("ext4.img");
    fs::File::create(&img)
        .unwrap()
        .set_len(32 * 1024 * 1024)
        .unwrap();
    sh(
        &format!("mkfs.ext4 -q -F -b 4096 {}", s(&img)),
        env.dir.path(),
    );
    let ext4 = Mounted::mount(&["-o", "loop", s(&img)], &env.path("ext4"));
    let dest = ext4.0.join("x");
    let r = k
        .run_async(&["snapshot", "restore", &target, &id2, s(&dest)])
        .await
        .failed();
    let line = one_line(&r);
    assert!(
        line.contains(&format!("{}/", s(&dest))) && line.contains("no room"),
        "{line}"
    );
    assert!(line.contains("4 KiB"), "{line}");
    assert!(!dest.join("kmsfs.header").exists());
    // A snapshot without attributes restores on the ramfs.
    let (bare, bare_plain) = create(&env, "bare").await;
    let _bg = CliMountGuard(bare_plain.clone());
    env.mount(&bare, &bare_plain, &[]).await.ok();
    fs::write(bare_plain.join("f"), b"no attributes").unwrap();
    k.run_async(&["umount", s(&bare_plain)]).await.ok();
    assert!(!backing_dump(&bare).contains("user.kmsfs"));
    let id3 = snap(k, &bare)["id"].as_str().unwrap().to_string();
    k.run_async(&["snapshot", "restore", &target, &id3, s(&ram.0.join("bare"))])
        .await
        .ok();
}

/// A snapshot of a mounted filesystem (to S3) while an attribute keeps
/// changing: the restored tree has every attribute and ACL, and the
/// changing one is from the same instant as the file written after each
/// change.
#[tokio::test(flavor = "multi_thread")]
async fn a_mounted_filesystems_attributes_are_captured_at_one_instant() {
    let env = CliEnv::new().await;
    let weed = SeaweedServer::start().await.expect("seaweedfs");
    weed.create_bucket("xattrs").await.expect("bucket");
    let k = with_s3(&env.kmsfs, &weed.endpoint());
    let target = "s3://xattrs/live";
    let _t = backing_tmpfs(&env);
    let (cipher, plain) = create(&env, "live").await;
    let _g = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &["-o", "acl"]).await.ok();
    let tree = fill(&plain);
    let original = dump(&tree);

    // The writer: user.v = N on `v`, then `last` = N (through a rename).
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    fs::write(plain.join("v"), b"v").unwrap();
    let writer = {
        let (stop, count, plain) = (stop.clone(), count.clone(), plain.clone());
        std::thread::spawn(move || {
            let mut n = 1u64;
            while !stop.load(Ordering::SeqCst) {
                setx(&plain.join("v"), "user.v", n.to_string().as_bytes());
                fs::write(plain.join("last.tmp"), n.to_string()).unwrap();
                fs::rename(plain.join("last.tmp"), plain.join("last")).unwrap();
                count.store(n, Ordering::SeqCst);
                n += 1;
            }
        })
    };
    let progress = |steps: u64| {
        let start = count.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while count.load(Ordering::SeqCst) < start + steps {
            assert!(!writer.is_finished(), "the writer stopped");
            assert!(Instant::now() < deadline, "the writer made no progress");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    progress(3);
    let r = k
        .run_async(&["snapshot", "create", s(&cipher), target, "--json"])
        .await
        .ok()
        .json();
    assert_eq!(r["mounted"], true, "{r}");
    eprintln!(
        "write pause {} ms for {} entries",
        r["write_pause_ms"], r["capture"]["entries"]
    );
    progress(2);
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("the writer saw an error");
    let id = r["id"].as_str().unwrap();

    let (got, v, last) = restored(&env, &k, target, id, "r", |_, p| {
        let v = Command::new("getfattr")
            .args(["--only-values", "-n", "user.v", "v"])
            .current_dir(p)
            .output()
            .unwrap();
        let last = fs::read_to_string(p.join("last")).unwrap();
        (dump(&p.join("tree")), v, last)
    })
    .await;
    assert_eq!(got, original);
    assert!(
        v.status.success(),
        "user.v is not on the restored v: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    let v = String::from_utf8(v.stdout).unwrap();
    let (v, last): (u64, u64) = (v.trim().parse().unwrap(), last.trim().parse().unwrap());
    assert!(
        last <= v && v <= last + 1,
        "user.v = {v} and last = {last} are not from one instant"
    );
}
