//! Whether listing a tree makes the daemon answer a `getxattr` per entry:
//! not on a mount without ACLs, once per inode with them. Its own test
//! binary, so no other test's requests are counted (one test only).

use kmsfs_e2e::fuse::{MountGuard, TestFs};
use kmsfs_fuse::{getxattr_requests, MountSettings};
use std::fs;

/// `getxattr` requests that `ls -lR` of a fresh tree of `files` files
/// causes, and whether `setfacl` worked, on a mount with or without ACLs.
fn listing_requests(posix_acl: bool, files: usize) -> (u64, bool) {
    let s = TestFs::fresh();
    let settings = MountSettings {
        threads: 4,
        posix_acl,
        ..Default::default()
    };
    let m = MountGuard::mount_with(&s.cipher, &s.plain, &s.master, &settings).unwrap();
    for d in 0..4 {
        let dir = s.plain.join(format!("d{d}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..files / 4 {
            fs::write(dir.join(format!("f{f}")), b"x").unwrap();
        }
    }
    let before = getxattr_requests();
    let out = std::process::Command::new("ls")
        .arg("-lR")
        .arg(&s.plain)
        .output()
        .unwrap();
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-rw"))
        .count();
    assert_eq!(listed, files / 4 * 4);
    let requests = getxattr_requests() - before;
    // Neither mount stores an SELinux label: the kernel answers for it
    // where SELinux runs; `ls` stops asking once told.
    let label = std::process::Command::new("getfattr")
        .args(["-n", "security.selinux"])
        .arg(s.plain.join("d0/f0"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&label.stderr).contains("Operation not supported"),
        "{label:?}"
    );
    let acl = std::process::Command::new("setfacl")
        .args(["-m", "u:nobody:r"])
        .arg(s.plain.join("d0/f0"))
        .output()
        .unwrap();
    if !posix_acl {
        assert!(
            String::from_utf8_lossy(&acl.stderr).contains("Operation not supported"),
            "{acl:?}"
        );
    }
    m.unmount().unwrap();
    (requests, acl.status.success())
}

/// Without ACLs (`kmsfs mount` without `allow_other`), listing a tree asks
/// the daemon for no attribute per entry: `ls` learns once that the
/// filesystem has no SELinux labels and no ACLs. With ACLs, the kernel
/// asks once per inode for its ACL (and caches it).
#[test]
fn listing_a_tree_asks_for_attributes_only_with_acls() {
    let (without, acl_ok) = listing_requests(false, 400);
    assert!(!acl_ok);
    assert!(without <= 4, "{without} getxattr requests for 400 entries");
    let (with, acl_ok) = listing_requests(true, 400);
    eprintln!("getxattr requests for 400 entries: {without} without ACLs, {with} with");
    assert!(acl_ok);
    assert!(with >= 400, "{with} getxattr requests for 400 entries");
}
