//! A large tree through a mount whose daemon has a small open-file limit:
//! inodes must not pin descriptors, and forgetting them must free them.
//!
//! The default is the test-suite size (100,000 files in 100 directories,
//! `ulimit -n 256`); the environment variables `KMSFS_SCALE_DIRS`,
//! `KMSFS_SCALE_FILES_PER_DIR` and `KMSFS_SCALE_NOFILE` scale it up.
//! `scripts/bench --scale` measures the same shape (a million files,
//! `ulimit -n 1024`) with the real tools, beside gocryptfs.

use kmsfs_e2e::cli::CliEnv;
use kmsfs_e2e::fuse::{daemon_pids, CliMountGuard};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A `/proc/PID/status` field in bytes (`VmHWM`, `VmRSS`).
fn status_bytes(pid: i32, field: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn body(d: u64, f: u64) -> Vec<u8> {
    format!("directory {d} file {f}\n").into_bytes()
}

/// Walks the tree as `find`, `ls -lR` and `du -s` do: every entry's
/// metadata; returns (entries, blocks).
fn walk(dir: &Path) -> (u64, u64) {
    let (mut n, mut blocks) = (0, 0);
    for e in fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("entry");
        let m = fs::symlink_metadata(e.path()).expect("lstat");
        n += 1;
        blocks += m.blocks();
        if m.is_dir() {
            let (cn, cb) = walk(&e.path());
            n += cn;
            blocks += cb;
        }
    }
    (n, blocks)
}

fn phase(name: &str, start: Instant, pid: i32) {
    eprintln!(
        "scale: {name}: {:.2} s, daemon descriptors {}, VmRSS {} MiB",
        start.elapsed().as_secs_f64(),
        open_fds(pid),
        status_bytes(pid, "VmRSS") >> 20
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_tree_on_a_small_descriptor_limit() {
    let dirs = env_num("KMSFS_SCALE_DIRS", 100);
    let per_dir = env_num("KMSFS_SCALE_FILES_PER_DIR", 1000);
    let nofile = env_num("KMSFS_SCALE_NOFILE", 256);
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("scale").await;
    let _guard = CliMountGuard(plain.clone());
    let limited = env.kmsfs.clone().with_nofile(nofile);
    limited
        .run_async(&[
            "mount",
            cipher.to_str().expect("utf-8"),
            plain.to_str().expect("utf-8"),
        ])
        .await
        .ok();
    let pids = daemon_pids(&plain);
    assert_eq!(pids.len(), 1, "one daemon serves the mount");
    let pid = pids[0];
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(&format!(" {nofile} "))),
        "the daemon runs with the small limit:\n{limits}"
    );
    let fds_at_mount = open_fds(pid);

    let t = Instant::now();
    for d in 0..dirs {
        let dir = plain.join(format!("d{d:04}"));
        fs::create_dir(&dir).expect("mkdir");
        for f in 0..per_dir {
            fs::write(dir.join(format!("file-{f:06}")), body(d, f)).expect("create");
        }
    }
    phase("create", t, pid);

    let t = Instant::now();
    let (entries, blocks) = walk(&plain);
    phase("walk (find, ls -lR, du)", t, pid);
    assert_eq!(entries, dirs * per_dir + dirs);
    assert!(blocks > 0);

    let t = Instant::now();
    for d in 0..dirs {
        for f in 0..per_dir {
            let p = plain.join(format!("d{d:04}/file-{f:06}"));
            assert_eq!(fs::read(&p).expect("read"), body(d, f), "{}", p.display());
        }
    }
    phase("read each once", t, pid);

    // Every inode the kernel caches is a node in the daemon; memory must
    // stay within a small fixed cost per node.
    let nodes = dirs * per_dir + dirs + 1;
    let hwm = status_bytes(pid, "VmHWM");
    let budget = 256 * nodes + (64 << 20);
    assert!(
        hwm <= budget,
        "daemon peak RSS {hwm} bytes exceeds 256 B x {nodes} nodes + 64 MiB = {budget}"
    );

    // Inode numbers are stable across the kernel forgetting its inodes,
    // and hard links share one.
    let sample: Vec<PathBuf> = (0..dirs)
        .step_by(((dirs / 10) as usize).max(1))
        .map(|d| plain.join(format!("d{d:04}/file-{:06}", per_dir / 2)))
        .collect();
    let inos: Vec<u64> = sample
        .iter()
        .map(|p| fs::metadata(p).expect("stat").ino())
        .collect();
    let link = plain.join("d0000/hard-link");
    fs::hard_link(&sample[0], &link).expect("link");
    assert_eq!(fs::metadata(&link).expect("stat link").ino(), inos[0]);
    fs::remove_file(&link).expect("unlink");

    // When the kernel forgets its inodes, the daemon lets go of their
    // descriptors.
    fs::write("/proc/sys/vm/drop_caches", "2\n").expect("drop caches");
    let mut fds = open_fds(pid);
    for _ in 0..50 {
        if fds <= fds_at_mount + 8 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        fds = open_fds(pid);
    }
    assert!(
        fds <= fds_at_mount + 8,
        "after drop_caches the daemon still holds {fds} descriptors ({fds_at_mount} at mount)"
    );
    phase("after drop_caches", Instant::now(), pid);
    let again: Vec<u64> = sample
        .iter()
        .map(|p| fs::metadata(p).expect("stat").ino())
        .collect();
    assert_eq!(
        again, inos,
        "inode numbers changed after the kernel forgot them"
    );
    let unique: std::collections::HashSet<u64> = inos.iter().copied().collect();
    assert_eq!(
        unique.len(),
        inos.len(),
        "distinct files share an inode number"
    );

    let t = Instant::now();
    for d in 0..dirs {
        fs::remove_dir_all(plain.join(format!("d{d:04}"))).expect("rm -rf");
    }
    phase("rm -rf", t, pid);
    assert_eq!(fs::read_dir(&plain).expect("root").count(), 0);
    eprintln!("scale: daemon peak RSS {} MiB for {nodes} nodes", hwm >> 20);
}
