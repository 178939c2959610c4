//! Mounting `/dev/fuse` ourselves, so the kernel records the filesystem as
//! type `fuse.kmsfs` with the cipher directory as its source.
//!
//! fuser's own mount writes type `fuse` (its pure-Rust mount drops the
//! subtype), which `findmnt -t fuse.kmsfs`, `umount -a -t fuse.kmsfs`,
//! systemd's mount units and `mount -a` (deciding whether an fstab line is
//! already mounted) cannot tell apart from any other FUSE filesystem. With
//! `CAP_SYS_ADMIN` (root) kmsfs calls mount(2) itself, as libfuse's
//! `fuse_kern_mount` does; without it the caller falls back to the setuid
//! `fusermount3` ([`crate::user_mount`]), which records the same type.

use fuser::MountOption;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The filesystem type recorded in `/proc/mounts`.
pub const FS_TYPE: &str = "fuse.kmsfs";

/// The mount(2) flags and FUSE data options for `options`.
fn flags_and_data(options: &[MountOption], allow_other: bool) -> (libc::c_ulong, Vec<String>) {
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    for o in options {
        match o {
            MountOption::RO => flags |= libc::MS_RDONLY,
            MountOption::RW => flags &= !libc::MS_RDONLY,
            MountOption::NoSuid => flags |= libc::MS_NOSUID,
            MountOption::Suid => flags &= !libc::MS_NOSUID,
            MountOption::NoDev => flags |= libc::MS_NODEV,
            MountOption::Dev => flags &= !libc::MS_NODEV,
            MountOption::NoExec => flags |= libc::MS_NOEXEC,
            MountOption::Exec => flags &= !libc::MS_NOEXEC,
            MountOption::NoAtime => flags |= libc::MS_NOATIME,
            MountOption::Atime => flags &= !libc::MS_NOATIME,
            MountOption::Sync => flags |= libc::MS_SYNCHRONOUS,
            MountOption::Async => flags &= !libc::MS_SYNCHRONOUS,
            MountOption::DirSync => flags |= libc::MS_DIRSYNC,
            MountOption::DefaultPermissions => data.push("default_permissions".to_string()),
            MountOption::CUSTOM(s) => data.push(s.clone()),
            // The source and type are set from the cipher directory and
            // FS_TYPE; auto_unmount needs fusermount.
            MountOption::FSName(_) | MountOption::Subtype(_) | MountOption::AutoUnmount => {}
        }
    }
    if allow_other {
        data.push("allow_other".to_string());
    }
    (flags, data)
}

/// Opens `/dev/fuse` and mounts it on `mountpoint` as [`FS_TYPE`] with
/// `source` (the cipher directory) as its source. Returns the connection's
/// descriptor, or `EPERM` when this process may not mount (not root).
pub fn mount(
    source: &Path,
    mountpoint: &Path,
    options: &[MountOption],
    allow_other: bool,
) -> io::Result<OwnedFd> {
    let md = std::fs::metadata(mountpoint)?;
    let dev = CString::new("/dev/fuse").map_err(io::Error::other)?;
    // SAFETY: a valid C string; the result is checked below.
    let raw = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (flags, extra) = flags_and_data(options, allow_other);
    let mut data = vec![
        format!("fd={}", fd.as_raw_fd()),
        format!("rootmode={:o}", md.mode() & libc::S_IFMT),
        // SAFETY: getuid/getgid cannot fail.
        format!("user_id={}", unsafe { libc::getuid() }),
        // SAFETY: as above.
        format!("group_id={}", unsafe { libc::getgid() }),
    ];
    data.extend(extra);
    let c = |b: &[u8]| CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let src = c(source.as_os_str().as_bytes())?;
    let target = c(mountpoint.as_os_str().as_bytes())?;
    let fstype = c(FS_TYPE.as_bytes())?;
    let data = c(data.join(",").as_bytes())?;
    // SAFETY: valid C strings; `data` is the NUL-terminated option string
    // the FUSE filesystem type parses.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Changes the generic flags of the kmsfs mount at `mountpoint` (`ro`/`rw`,
/// `nosuid`, `noexec`, `noatime`, ...) in place, as `mount -o remount`
/// does: the daemon and the FUSE connection stay as they are. The flags are
/// the whole new set (mount(8) passes the current ones with the changes),
/// and options FUSE fixes at mount time are not touched.
pub fn remount(mountpoint: &Path, options: &[MountOption]) -> io::Result<()> {
    let (flags, _) = flags_and_data(options, false);
    let target = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid C string; MS_REMOUNT takes no source, type or data.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            flags | libc::MS_REMOUNT,
            std::ptr::null(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_flags_and_fuse_data() {
        let (flags, data) = flags_and_data(
            &[
                MountOption::RO,
                MountOption::NoSuid,
                MountOption::NoDev,
                MountOption::DefaultPermissions,
                MountOption::NoExec,
                MountOption::Exec,
            ],
            true,
        );
        assert_eq!(flags, libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV);
        assert_eq!(data, ["default_permissions", "allow_other"]);
        let (flags, data) = flags_and_data(&[MountOption::RW, MountOption::Suid], false);
        assert_eq!(flags, 0);
        assert!(data.is_empty());
    }
}
