//! Thin wrappers over the `*at` system calls the driver needs.
//!
//! Every node is held as an `O_PATH` descriptor, so operations work
//! relative to descriptors rather than paths: renames elsewhere in the tree
//! never invalidate a node, and inode numbers stay those of the backing
//! filesystem (stable across remounts).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The `/proc/self/fd/N` path of a descriptor, to reopen an `O_PATH` fd.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no interior NUL")
}

/// `openat(dir, name, flags, mode)`.
pub fn openat(dir: RawFd, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: valid C string; the returned fd is owned by the caller.
    let fd = check(unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `O_PATH` handle on `name` inside `dir`, not following symlinks.
pub fn open_path(dir: RawFd, name: &OsStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Reopens an `O_PATH` descriptor with real access `flags`.
pub fn reopen(fd: &OwnedFd, flags: i32) -> io::Result<OwnedFd> {
    let p = proc_path(fd.as_raw_fd());
    // SAFETY: valid C string; the returned fd is owned by the caller.
    let nfd = check(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: freshly returned descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(nfd) })
}

/// `fstatat(fd, "", AT_EMPTY_PATH)`: the attributes of the node itself.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: `st` is fully written by a successful call.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        ))?;
        Ok(st)
    }
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn statat(dir: RawFd, name: &OsStr) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    // SAFETY: as in `fstat`.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::fstatat(
            dir,
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ))?;
        Ok(st)
    }
}

/// `mkdirat`.
pub fn mkdirat(dir: RawFd, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string.
    check(unsafe { libc::mkdirat(dir, c.as_ptr(), mode) }).map(drop)
}

/// `unlinkat`, with `AT_REMOVEDIR` when `dir_entry`.
pub fn unlinkat(dir: RawFd, name: &OsStr, dir_entry: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if dir_entry { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid C string.
    check(unsafe { libc::unlinkat(dir, c.as_ptr(), flags) }).map(drop)
}

/// `renameat2`.
pub fn renameat2(
    olddir: RawFd,
    old: &OsStr,
    newdir: RawFd,
    new: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let (o, n) = (cstr(old)?, cstr(new)?);
    // SAFETY: valid C strings.
    check(unsafe { libc::renameat2(olddir, o.as_ptr(), newdir, n.as_ptr(), flags) }).map(drop)
}

/// `symlinkat(target, dir, name)`.
pub fn symlinkat(target: &[u8], dir: RawFd, name: &OsStr) -> io::Result<()> {
    let t = CString::new(target).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let c = cstr(name)?;
    // SAFETY: valid C strings.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir, c.as_ptr()) }).map(drop)
}

/// `readlinkat(fd, "")` on an `O_PATH` symlink descriptor.
pub fn readlink(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4097];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `linkat` from an `O_PATH` descriptor to `dir/name`.
pub fn link_fd(fd: RawFd, dir: RawFd, name: &OsStr) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid C strings; AT_EMPTY_PATH links the descriptor's inode.
    check(unsafe { libc::linkat(fd, c"".as_ptr(), dir, c.as_ptr(), libc::AT_EMPTY_PATH) }).map(drop)
}

/// `mknodat`.
pub fn mknodat(dir: RawFd, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string.
    check(unsafe { libc::mknodat(dir, c.as_ptr(), mode, rdev) }).map(drop)
}

/// `fchownat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` leaves an id unchanged.
pub fn chown_at(dir: RawFd, name: &OsStr, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let c = cstr(name)?;
    let u = uid.unwrap_or(u32::MAX);
    let g = gid.unwrap_or(u32::MAX);
    // SAFETY: valid C string.
    check(unsafe { libc::fchownat(dir, c.as_ptr(), u, g, libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

/// `chmod` of the node behind an `O_PATH` descriptor.
pub fn chmod(fd: RawFd, mode: u32) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: valid C string.
    check(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

/// `fchownat(fd, "", AT_EMPTY_PATH)`; `u32::MAX` leaves an id unchanged.
pub fn chown(fd: RawFd, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let u = uid.unwrap_or(u32::MAX);
    let g = gid.unwrap_or(u32::MAX);
    // SAFETY: empty path with AT_EMPTY_PATH targets the descriptor itself.
    check(unsafe {
        libc::fchownat(
            fd,
            c"".as_ptr(),
            u,
            g,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// A timestamp for `utimens`: leave, set to now, or set to a value.
#[derive(Clone, Copy)]
pub enum Time {
    /// Leave unchanged.
    Omit,
    /// The current time.
    Now,
    /// Seconds and nanoseconds since the epoch.
    At(i64, i64),
}

fn timespec(t: Time) -> libc::timespec {
    match t {
        Time::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Time::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Time::At(s, ns) => libc::timespec {
            tv_sec: s,
            tv_nsec: ns,
        },
    }
}

/// Sets access and modification times of the node behind `fd`.
pub fn utimens(fd: RawFd, is_symlink: bool, atime: Time, mtime: Time) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    if is_symlink {
        // /proc magic links would follow to the symlink's target; change
        // the link itself through its descriptor instead.
        // SAFETY: empty path with AT_EMPTY_PATH targets the descriptor.
        return check(unsafe {
            libc::utimensat(fd, c"".as_ptr(), ts.as_ptr(), libc::AT_EMPTY_PATH)
        })
        .map(drop);
    }
    let p = proc_path(fd);
    // SAFETY: valid C string and two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) }).map(drop)
}

/// `fstatvfs`.
pub fn statvfs(fd: RawFd) -> io::Result<libc::statvfs> {
    // SAFETY: `st` is fully written by a successful call.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        check(libc::fstatvfs(fd, &mut st))?;
        Ok(st)
    }
}

/// `fallocate`.
pub fn fallocate(fd: RawFd, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an owned descriptor.
    check(unsafe { libc::fallocate(fd, mode, off as i64, len as i64) }).map(drop)
}

/// Lists a directory given an `O_PATH` descriptor: `(name, d_ino, d_type)`
/// triples, without `.` and `..`.
pub fn list_dir(fd: &OwnedFd) -> io::Result<Vec<(Vec<u8>, u64, u8)>> {
    let dfd = openat(
        fd.as_raw_fd(),
        OsStr::new("."),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )?;
    // SAFETY: fdopendir takes ownership of the descriptor on success.
    let dir = unsafe { libc::fdopendir(dfd.as_raw_fd()) };
    if dir.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dfd);
    let mut out = Vec::new();
    loop {
        // SAFETY: `dir` is a valid DIR*; readdir returns null at the end.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let (name, ino, kind) = unsafe {
            let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes();
            (name.to_vec(), (*ent).d_ino, (*ent).d_type)
        };
        if name != b"." && name != b".." {
            out.push((name, ino, kind));
        }
    }
    // SAFETY: closes the DIR* and its descriptor exactly once.
    unsafe { libc::closedir(dir) };
    Ok(out)
}
