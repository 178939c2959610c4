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
fn proc_path(fd: RawFd) -> io::Result<CString> {
    cstr(OsStr::new(&format!("/proc/self/fd/{fd}")))
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
    let p = proc_path(fd.as_raw_fd())?;
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

/// `readlinkat(dir, name)`.
pub fn readlinkat(dir: RawFd, name: &OsStr) -> io::Result<Vec<u8>> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; 4097];
    // SAFETY: a valid C string; the buffer is valid for its length.
    let n = unsafe { libc::readlinkat(dir, c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Sets the access and modification times of `dir/name` itself (not
/// following a symlink).
pub fn utimens_at(dir: RawFd, name: &OsStr, times: &[libc::timespec; 2]) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: a valid C string and two timespecs.
    check(unsafe { libc::utimensat(dir, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
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
    let p = proc_path(fd)?;
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
    let p = proc_path(fd)?;
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

/// One entry of a backing directory listing.
pub struct RawEntry {
    /// The entry name (never `.` or `..`).
    pub name: Vec<u8>,
    /// The backing inode number (`d_ino`).
    pub ino: u64,
    /// The `d_type` (may be `DT_UNKNOWN`).
    pub dtype: u8,
}

/// Lists a directory given any descriptor of it, without `.` and `..`.
/// A failing `readdir` is an error, never a short listing.
pub fn list_dir(fd: RawFd) -> io::Result<Vec<RawEntry>> {
    let dfd = openat(fd, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    // SAFETY: fdopendir takes ownership of the descriptor on success.
    let dir = unsafe { libc::fdopendir(dfd.as_raw_fd()) };
    if dir.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dfd);
    let mut out = Vec::new();
    let result = loop {
        // readdir returns null both at the end and on error; only errno
        // tells them apart, so clear it first.
        // SAFETY: errno is thread-local; writing it is always allowed.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dir` is a valid DIR* until closedir below.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            // SAFETY: reading thread-local errno.
            let err = unsafe { *libc::__errno_location() };
            break if err == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(err))
            };
        }
        // SAFETY: d_name is NUL-terminated within the entry returned by readdir.
        let (name, ino, dtype) = unsafe {
            let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes();
            (name.to_vec(), (*ent).d_ino, (*ent).d_type)
        };
        if name != b"." && name != b".." {
            out.push(RawEntry { name, ino, dtype });
        }
    };
    // SAFETY: closes the DIR* and its descriptor exactly once.
    unsafe { libc::closedir(dir) };
    result.map(|()| out)
}

/// A file handle (`name_to_handle_at`): names a backing inode without
/// holding a descriptor, and survives renames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    kind: i32,
    bytes: Box<[u8]>,
}

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct HandleBuf {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; libc::MAX_HANDLE_SZ as usize],
}

/// The file handle of the inode behind `fd`.
pub fn handle_of(fd: RawFd) -> io::Result<Handle> {
    handle_impl(fd, c"", libc::AT_EMPTY_PATH)
}

/// The file handle of the entry `name` in `dir`, not following a symlink:
/// one syscall, where opening the entry first would take three (open,
/// name the descriptor, close).
pub fn handle_at(dir: RawFd, name: &OsStr) -> io::Result<Handle> {
    let c = cstr(name)?;
    handle_impl(dir, &c, 0)
}

fn handle_impl(dir: RawFd, path: &std::ffi::CStr, flags: i32) -> io::Result<Handle> {
    let mut buf = HandleBuf {
        handle_bytes: libc::MAX_HANDLE_SZ as libc::c_uint,
        handle_type: 0,
        f_handle: [0; libc::MAX_HANDLE_SZ as usize],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` has the layout of `struct file_handle` followed by
    // MAX_HANDLE_SZ bytes, as handle_bytes says; `path` is a valid C string
    // (empty with AT_EMPTY_PATH: the descriptor itself).
    check(unsafe {
        libc::name_to_handle_at(
            dir,
            path.as_ptr(),
            (&raw mut buf).cast::<libc::file_handle>(),
            &mut mount_id,
            flags,
        )
    })?;
    let len = (buf.handle_bytes as usize).min(buf.f_handle.len());
    Ok(Handle {
        kind: buf.handle_type,
        bytes: buf.f_handle[..len].into(),
    })
}

/// Opens the inode named by `handle` on the filesystem of `mount_fd`.
/// Needs `CAP_DAC_READ_SEARCH`.
pub fn open_handle(mount_fd: RawFd, handle: &Handle, flags: i32) -> io::Result<OwnedFd> {
    let mut buf = HandleBuf {
        handle_bytes: handle.bytes.len() as libc::c_uint,
        handle_type: handle.kind,
        f_handle: [0; libc::MAX_HANDLE_SZ as usize],
    };
    buf.f_handle[..handle.bytes.len()].copy_from_slice(&handle.bytes);
    // SAFETY: `buf` is a valid `struct file_handle` of handle_bytes bytes.
    let fd = check(unsafe {
        libc::open_by_handle_at(
            mount_fd,
            (&raw mut buf).cast::<libc::file_handle>(),
            flags | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: freshly returned descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The soft limit on open descriptors (`RLIMIT_NOFILE`).
pub fn fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    r.rlim_cur
}

/// `flock(fd, LOCK_EX | LOCK_NB)` (`LOCK_SH` when `shared`): held until
/// the descriptor closes.
pub fn try_lock(fd: RawFd, shared: bool) -> io::Result<()> {
    let kind = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: plain syscall on a live descriptor.
    check(unsafe { libc::flock(fd, kind | libc::LOCK_NB) }).map(drop)
}

/// Returns the allocator's free pages to the kernel (glibc `malloc_trim`),
/// so that the daemon's RSS falls after the kernel forgets many inodes.
/// Elsewhere the allocator keeps them; nothing depends on it.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it
    // takes no pointers and is thread-safe (it locks each arena).
    unsafe {
        libc::malloc_trim(0);
    }
}
