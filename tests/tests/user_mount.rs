//! A regular user's mount and `-o shared_storage`, end to end: a real
//! OpenBao dev server, the real binary, real FUSE mounts (through the
//! setuid `fusermount3` for the user). Every mount is undone by a guard
//! even when an assertion fails.

use kmsfs_e2e::cli::{kmsfs_bin, CliEnv};
use kmsfs_e2e::fuse::{daemon_pids, is_mounted, CliMountGuard};
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The test's regular user: fusermount3 needs an account name for the uid.
const USER: &str = "nobody";
const GROUP: &str = "nogroup";
/// Another regular user, who may not unmount the first one's mount.
const OTHER: &str = "daemon";

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn chown_tree(p: &Path) {
    let st = Command::new("chown")
        .arg("-R")
        .arg(format!("{USER}:{GROUP}"))
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success(), "chown -R {}", p.display());
}

fn wait_for_no_daemon(plain: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon_pids(plain).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon_pids(plain).is_empty(), "daemon still running");
}

/// Runs `script` (sh) in a private mount namespace in which `/dev/fuse` is
/// mode 0666, as Debian's udev makes it (this machine's is 0600, and
/// fusermount3 opens it as the calling user). Nothing mounted there is
/// seen outside; an `EXIT` trap in the script unmounts what is left.
fn in_private_namespace(dir: &Path, script: &str) -> Output {
    let node = dir.join("fuse-device");
    let st = Command::new("mknod")
        .args(["-m", "0666"])
        .arg(&node)
        .args(["c", "10", "229"])
        .status()
        .unwrap();
    assert!(st.success(), "mknod");
    let full = format!(
        "set -eu\nmount --bind '{}' /dev/fuse\n{script}",
        node.display()
    );
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &full])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .output()
        .expect("unshare (util-linux) runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_regular_user_mounts_uses_and_unmounts() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("user").await;
    // The user owns everything: configuration, token, backing directory,
    // mount point (as with a gocryptfs directory in a home directory).
    chown_tree(env.dir.path());
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let bin = kmsfs_bin();
    let cfg = &env.kmsfs.config;
    let u =
        format!("setpriv --reuid={USER} --regid={GROUP} --clear-groups env -i PATH=/usr/bin:/bin");
    let o =
        format!("setpriv --reuid={OTHER} --regid={OTHER} --clear-groups env -i PATH=/usr/bin:/bin");
    let (k, c, p) = (bin.display(), cipher.display(), plain.display());
    let script = format!(
        r#"trap 'fusermount3 -u -z "{p}" 2>/dev/null || true' EXIT
{u} {k} --config {cfg} mount {c} {p}
echo "type: $(awk '$2 == "{p}" {{print $3, $1}}' /proc/self/mounts)"
echo "daemons of the user: $(pgrep -u {USER} -x kmsfs | wc -l)"
{u} sh -c 'cd {p}; echo TOP-SECRET-PLAINTEXT > diary; mkdir photos; mv diary photos/diary;   cat photos/diary; head -c 300000 /dev/zero > big; stat -c "size %s owner %U" big'
ls {p} >/dev/null 2>&1 && echo "root got in" || echo "root kept out"
grep -rl TOP-SECRET {c} && echo "plaintext in backing" || echo "backing is ciphertext"
{o} {k} umount {p} && echo "other user unmounted it" || echo "other user refused"
{u} {k} umount {p}
awk '$2 == "{p}"' /proc/self/mounts | grep -q . && echo "still mounted" || echo "unmounted"
{u} {k} umount {p} 2>&1 || true
"#,
        cfg = cfg.display(),
        u = u,
        o = o
    );
    let out = in_private_namespace(env.dir.path(), &script);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want in [
        format!("type: fuse.kmsfs {c}"),
        "TOP-SECRET-PLAINTEXT".to_string(),
        format!("size 300000 owner {USER}"),
        "root kept out".into(),
        "backing is ciphertext".into(),
        "other user refused".into(),
        "unmounted".into(),
        format!("{p} is not mounted"),
    ] {
        assert!(stdout.contains(&want), "missing {want:?} in\n{all}");
    }
    assert!(
        stdout.contains("daemons of the user: 1\n"),
        "the daemon runs as the user: {all}"
    );
    assert!(!stdout.contains("still mounted"), "{all}");
    // The namespace is gone with its last process: nothing is left.
    wait_for_no_daemon(&plain);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_config_owned_by_another_user_is_refused() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("other").await;
    chown_tree(env.dir.path());
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // The token file belongs to someone else (not root, not the user).
    let out = Command::new("chown")
        .arg(OTHER)
        .arg(&env.token_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    // Readable, so that ownership is what is refused.
    fs::set_permissions(&env.token_file, fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={USER}"),
            &format!("--regid={GROUP}"),
            "--clear-groups",
        ])
        .arg(kmsfs_bin())
        .arg("--config")
        .arg(&env.kmsfs.config)
        .arg("mount")
        .arg(&cipher)
        .arg(&plain)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(env.token_file.to_str().unwrap()) && err.contains("chown 65534"),
        "{}",
        text(&out)
    );
    assert!(!is_mounted(&plain));
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_storage_mounts_see_each_others_changes() {
    let env = CliEnv::new().await;
    let (cipher, a) = env.create("shared").await;
    let b = env.path("shared-plain-b");
    let solo = env.path("shared-plain-solo");
    fs::create_dir(&b).unwrap();
    fs::create_dir(&solo).unwrap();
    let _ga = CliMountGuard(a.clone());
    let _gb = CliMountGuard(b.clone());
    let _gs = CliMountGuard(solo.clone());
    env.mount(&cipher, &a, &["-o", "shared_storage"]).await.ok();
    env.mount(&cipher, &b, &["-o", "shared_storage"]).await.ok();
    assert!(is_mounted(&a) && is_mounted(&b));

    // Contents written through one are read through the other, and an
    // overwrite is not hidden by the other's page cache.
    fs::write(a.join("note"), b"first version").unwrap();
    assert_eq!(fs::read(b.join("note")).unwrap(), b"first version");
    fs::write(a.join("note"), b"second VERSION").unwrap();
    assert_eq!(fs::read(b.join("note")).unwrap(), b"second VERSION");
    fs::write(b.join("note"), vec![9u8; 70_000]).unwrap();
    assert_eq!(fs::read(a.join("note")).unwrap(), vec![9u8; 70_000]);
    assert_eq!(fs::metadata(a.join("note")).unwrap().len(), 70_000);

    // Names: create, rename and unlink on one are seen on the other at once
    // (no cached entries or attributes).
    fs::create_dir(b.join("dir")).unwrap();
    assert!(fs::metadata(a.join("dir")).unwrap().is_dir());
    fs::rename(a.join("note"), a.join("dir/moved")).unwrap();
    assert_eq!(
        fs::metadata(b.join("note")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(fs::read(b.join("dir/moved")).unwrap(), vec![9u8; 70_000]);
    let names: Vec<_> = fs::read_dir(b.join("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["moved"]);
    fs::remove_file(b.join("dir/moved")).unwrap();
    assert_eq!(
        fs::metadata(a.join("dir/moved")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    fs::write(b.join("dir/again"), b"new file").unwrap();
    assert_eq!(fs::read(a.join("dir/again")).unwrap(), b"new file");

    // A mount without the opt-in is refused while shared mounts live.
    let run = env.mount(&cipher, &solo, &[]).await.failed();
    assert!(
        run.stderr.contains("already mounted") && run.stderr.contains("shared_storage"),
        "{}",
        run.stderr
    );
    assert!(!is_mounted(&solo));

    for m in [&a, &b] {
        env.kmsfs
            .run_async(&["umount", m.to_str().unwrap()])
            .await
            .ok();
        wait_for_no_daemon(m);
    }
    // And the other way round: an ordinary mount admits no shared one.
    env.mount(&cipher, &solo, &[]).await.ok();
    let run = env
        .mount(&cipher, &a, &["-o", "shared_storage"])
        .await
        .failed();
    assert!(run.stderr.contains("already mounted"), "{}", run.stderr);
    assert_eq!(fs::read(solo.join("dir/again")).unwrap(), b"new file");
}
