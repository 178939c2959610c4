//! The backing store's own extended attributes, reached through a node's
//! `O_PATH` descriptor (`/proc/self/fd/N`, as `sys::chmod` does: the `f*`
//! calls refuse `O_PATH` descriptors).

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

fn proc_path(fd: RawFd) -> io::Result<CString> {
    CString::new(format!("/proc/self/fd/{fd}"))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cname(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// The value of `name`, or `None` if the node has no such attribute.
/// `ENOTSUP` (a store without extended attributes) is an error.
pub fn get(fd: RawFd, name: &str) -> io::Result<Option<Vec<u8>>> {
    let (p, n) = (proc_path(fd)?, cname(name)?);
    loop {
        // SAFETY: valid C strings; a null buffer of size 0 asks for the size.
        let size =
            match check(unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) })
            {
                Ok(s) => s,
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => return Ok(None),
                Err(e) => return Err(e),
            };
        let mut buf = vec![0u8; size];
        // SAFETY: valid C strings; the buffer is valid for `size` bytes.
        match check(unsafe {
            libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size)
        }) {
            Ok(got) => {
                buf.truncate(got);
                return Ok(Some(buf));
            }
            // Grew between the two calls: ask again.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Sets `name` to `value` with `flags` (`XATTR_CREATE`, `XATTR_REPLACE`).
pub fn set(fd: RawFd, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (p, n) = (proc_path(fd)?, cname(name)?);
    // SAFETY: valid C strings; the value is valid for its length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    check(r as isize).map(drop)
}

/// Removes `name`; `Ok(false)` if there was none.
pub fn remove(fd: RawFd, name: &str) -> io::Result<bool> {
    let (p, n) = (proc_path(fd)?, cname(name)?);
    // SAFETY: valid C strings.
    match check(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) } as isize) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The names of every attribute of the node (all namespaces the caller
/// may see; the caller filters).
pub fn list(fd: RawFd) -> io::Result<Vec<String>> {
    let p = proc_path(fd)?;
    let buf = loop {
        // SAFETY: a valid C string; a null buffer of size 0 asks for the size.
        let size = check(unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) })?;
        let mut buf = vec![0u8; size];
        // SAFETY: the buffer is valid for `size` bytes.
        match check(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), size) }) {
            Ok(got) => {
                buf.truncate(got);
                break buf;
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    };
    Ok(buf
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .filter_map(|n| std::str::from_utf8(n).ok())
        .map(str::to_owned)
        .collect())
}
