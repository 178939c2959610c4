//! When the kernel forgets its inodes (`echo 2 > drop_caches`), the
//! daemon frees the nodes it kept for them. Its own test binary: the node
//! count is per process.

use kmsfs_e2e::fuse::{MountGuard, TestFs};
use kmsfs_fuse::{live_nodes, MountSettings};
use std::fs;
use std::time::{Duration, Instant};

#[test]
fn drop_caches_frees_every_node() {
    let s = TestFs::fresh();
    let settings = MountSettings {
        threads: 4,
        ..Default::default()
    };
    let m = MountGuard::mount_with(&s.cipher, &s.plain, &s.master, &settings).unwrap();
    let at_mount = live_nodes();
    let (dirs, per_dir) = (20, 1000);
    for d in 0..dirs {
        let dir = s.plain.join(format!("d{d}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..per_dir {
            fs::write(dir.join(format!("f{f}")), b"x").unwrap();
        }
    }
    // Listing and stat-ing everything again (READDIRPLUS, LOOKUP).
    let mut seen = 0;
    for d in 0..dirs {
        for e in fs::read_dir(s.plain.join(format!("d{d}"))).unwrap() {
            let e = e.unwrap();
            assert_eq!(fs::metadata(e.path()).unwrap().len(), 1);
            seen += 1;
        }
    }
    assert_eq!(seen, dirs * per_dir);
    let peak = live_nodes();
    assert!(
        peak >= at_mount + (dirs * per_dir) as u64,
        "{peak} nodes for {} entries",
        dirs * per_dir
    );
    fs::write("/proc/sys/vm/drop_caches", "2\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_nodes() > at_mount + 16 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = live_nodes();
    eprintln!("nodes: {at_mount} at mount, {peak} at the peak, {left} after drop_caches");
    assert!(
        left <= at_mount + 16,
        "after drop_caches {left} nodes are left ({at_mount} at mount, {peak} at the peak)"
    );
    // The tree is still all there, found again.
    assert_eq!(fs::read(s.plain.join("d7/f500")).unwrap(), b"x");
    m.unmount().unwrap();
}
