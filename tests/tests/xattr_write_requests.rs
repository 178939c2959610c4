//! With extended attributes served, the kernel would ask
//! `getxattr("security.capability")` before every write unless the daemon
//! takes `FUSE_HANDLE_KILLPRIV_V2`: count the requests a 512-byte write
//! loop causes. Its own test binary, so no other test's requests are
//! counted.

use kmsfs_e2e::fuse::{MountGuard, TestFs};
use kmsfs_fuse::{getxattr_requests, MountSettings};
use std::fs::{self, OpenOptions};
use std::io::Write;

fn loop_requests(no_writeback: bool) -> u64 {
    let s = TestFs::fresh();
    let settings = MountSettings {
        threads: 4,
        no_writeback,
        ..Default::default()
    };
    let m = MountGuard::mount_with(&s.cipher, &s.plain, &s.master, &settings).unwrap();
    let path = s.plain.join("log");
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    // The first write may look once (the kernel then marks the inode as
    // having nothing to clear).
    f.write_all(&[b'w'; 512]).unwrap();
    f.sync_all().unwrap();
    let before = getxattr_requests();
    for _ in 0..2000 {
        f.write_all(&[b'x'; 512]).unwrap();
    }
    f.sync_all().unwrap();
    let during = getxattr_requests() - before;
    drop(f);
    assert_eq!(fs::metadata(&path).unwrap().len(), 2001 * 512);
    // The counter does count: an explicit lookup is one request.
    let before = getxattr_requests();
    assert!(xattr_get(&path).is_err());
    assert!(getxattr_requests() > before);
    m.unmount().unwrap();
    during
}

fn xattr_get(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings; size 0 only asks for the length.
    let r = unsafe { libc::getxattr(p.as_ptr(), c"user.none".as_ptr(), std::ptr::null_mut(), 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn a_512_byte_write_loop_asks_for_no_attributes() {
    assert_eq!(loop_requests(false), 0, "writeback cache");
    assert_eq!(loop_requests(true), 0, "no_writeback");
}
