//! What closing a file costs in requests: the daemon answers the first
//! `flush` with ENOSYS, and the kernel sends no more, with or without the
//! writeback cache. Data still reaches the backing store by close(2). Its
//! own test binary, so no other test's requests are counted (one test only).

use kmsfs_e2e::fuse::{MountGuard, TestFs};
use kmsfs_fuse::{flush_requests, MountSettings};
use std::fs;
use std::io::Write;

/// Writes and closes `files` files on a fresh mount; returns the `flush`
/// requests that caused, after checking every file reads back (on the
/// mount and after a remount).
fn flushes_for(writeback: bool, files: usize) -> u64 {
    let s = TestFs::fresh();
    let settings = MountSettings {
        threads: 4,
        no_writeback: !writeback,
        ..Default::default()
    };
    let m = MountGuard::mount_with(&s.cipher, &s.plain, &s.master, &settings).unwrap();
    let before = flush_requests();
    for i in 0..files {
        let mut f = fs::File::create(s.plain.join(format!("f{i}"))).unwrap();
        f.write_all(format!("file {i} ").repeat(700).as_bytes())
            .unwrap();
        drop(f);
    }
    let flushes = flush_requests() - before;
    m.unmount().unwrap();
    let m = MountGuard::mount_with(&s.cipher, &s.plain, &s.master, &settings).unwrap();
    for i in 0..files {
        let got = fs::read(s.plain.join(format!("f{i}"))).unwrap();
        assert_eq!(got, format!("file {i} ").repeat(700).as_bytes(), "f{i}");
    }
    m.unmount().unwrap();
    flushes
}

/// Without the answer, each close(2) waits for one `flush` round trip
/// (200 here); with it, at most the first is sent.
#[test]
fn closing_files_sends_at_most_one_flush() {
    for writeback in [true, false] {
        let n = flushes_for(writeback, 200);
        eprintln!("writeback {writeback}: {n} flush requests for 200 closes");
        assert!(n <= 1, "writeback {writeback}: {n} flush requests");
    }
}
