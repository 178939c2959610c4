//! The backing store is hostile input: planted FIFOs, symlinks and mount
//! points, a second daemon, and a store that fills up under a writer that
//! never calls fsync. Real mounts, keys made in the test.

use kmsfs_core::keys::MasterKey;
use kmsfs_e2e::fuse::{fresh_cipherdir, MountGuard, TestFs, Tmpfs};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

fn setup() -> TestFs {
    TestFs::fresh()
}

/// The backing directory of the only subdirectory of `cipher`.
fn only_subdir(cipher: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = fs::read_dir(cipher)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1);
    dirs[0].clone()
}

/// Runs `f` on another thread; a hang past a generous bound fails the
/// test instead of blocking it for ever (`unblock` then frees the thread).
fn must_return<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
    unblock: impl FnOnce(),
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(v) => v,
        Err(_) => {
            unblock();
            panic!("{what} hung on a planted file");
        }
    }
}

#[test]
fn a_fifo_planted_as_a_directory_iv_gives_eio_and_never_hangs() {
    let s = setup();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    fs::create_dir(s.plain.join("sub")).unwrap();
    fs::write(s.plain.join("sub/file"), b"data").unwrap();
    m.unmount().unwrap();

    let iv = only_subdir(&s.cipher).join("kmsfs.diriv");
    fs::remove_file(&iv).unwrap();
    let c = std::ffi::CString::new(iv.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid path string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    let sub = s.plain.join("sub");
    let fifo = iv.clone();
    let listed = must_return(
        "listing the directory",
        move || fs::read_dir(&sub).map(|d| d.count()),
        move || {
            // A writer end releases a reader blocked in open(2).
            let _ = OpenOptions::new().read(true).write(true).open(&fifo);
        },
    );
    let err = listed.expect_err("a directory without a readable IV cannot be listed");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let sub_file = s.plain.join("sub/file");
    let looked_up = must_return("looking up a name", move || fs::read(&sub_file), || {});
    assert_eq!(
        looked_up.unwrap_err().raw_os_error(),
        Some(libc::EIO),
        "lookups in that directory fail too"
    );
    // The rest of the tree is unaffected.
    fs::write(s.plain.join("other"), b"fine").unwrap();
    assert_eq!(fs::read(s.plain.join("other")).unwrap(), b"fine");
    m.unmount().unwrap();
}

#[test]
fn a_symlink_planted_as_a_directory_iv_is_not_followed() {
    let s = setup();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    fs::create_dir(s.plain.join("sub")).unwrap();
    fs::write(s.plain.join("sub/file"), b"data").unwrap();
    m.unmount().unwrap();

    // Point the IV at the root's IV: following it would read a real IV,
    // only the wrong one.
    let sub = only_subdir(&s.cipher);
    fs::remove_file(sub.join("kmsfs.diriv")).unwrap();
    std::os::unix::fs::symlink(s.cipher.join("kmsfs.diriv"), sub.join("kmsfs.diriv")).unwrap();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    let err = fs::read_dir(s.plain.join("sub")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    m.unmount().unwrap();
}

#[test]
fn a_second_mount_of_one_backing_directory_is_refused() {
    let s = setup();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    let other = s.tmp.path().join("plain2");
    fs::create_dir(&other).unwrap();
    let err = match MountGuard::mount(&s.cipher, &other, &s.master) {
        Ok(_) => panic!("a second daemon over the same backing directory was allowed"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("already mounted"), "{err}");
    m.unmount().unwrap();
    // Once the first is gone the directory mounts again.
    let m = MountGuard::mount(&s.cipher, &other, &s.master).unwrap();
    m.unmount().unwrap();
}

#[test]
fn a_filesystem_mounted_inside_the_backing_directory_is_not_served() {
    let s = setup();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    fs::create_dir(s.plain.join("sub")).unwrap();
    m.unmount().unwrap();
    // Another device's inode numbers would alias this one's.
    let sub = only_subdir(&s.cipher);
    let _inner = Tmpfs::mount(&sub, "1m");
    fs::write(sub.join("kmsfs.diriv"), [0u8; 16]).unwrap();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    let err = fs::metadata(s.plain.join("sub")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    m.unmount().unwrap();
}

#[test]
fn a_writer_that_never_syncs_gets_enospc_from_write() {
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("small");
    let plain = tmp.path().join("plain");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&plain).unwrap();
    let _tmpfs = Tmpfs::mount(&backing, "16m");
    let cipher = backing.join("cipher");
    fs::create_dir(&cipher).unwrap();
    fresh_cipherdir(&cipher).unwrap();
    let master = MasterKey::generate().unwrap();
    // The default mount: writeback cache on.
    let m = MountGuard::mount(&cipher, &plain, &master).unwrap();
    let keep = vec![0x33u8; 100_000];
    fs::write(plain.join("keep"), &keep).unwrap();

    // `dd if=/dev/urandom of=fill bs=1M`: write until refused, no fsync.
    // Round 1 accepted writes without end (133 GB into a 16 MiB store).
    let mut f = File::create(plain.join("fill")).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    let limit: u64 = 4 << 30;
    let mut written: u64 = 0;
    let err = loop {
        match f.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) => break e,
        }
        assert!(
            written < limit,
            "{written} bytes accepted into a 16 MiB store without an error"
        );
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(f);
    fs::write("/proc/sys/vm/drop_caches", "3\n").unwrap();
    assert_eq!(fs::read(plain.join("keep")).unwrap(), keep);
    m.unmount().unwrap();
    eprintln!("write(2) failed with ENOSPC after {} MiB", written >> 20);
}
