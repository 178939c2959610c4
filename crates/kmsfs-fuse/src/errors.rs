//! The one path from errors to errnos, with the log line that names the
//! inode whenever the cause is the backing store rather than the caller.

use fuser::Errno;
use kmsfs_core::contents::ContentsError;
use std::io;
use tracing::{debug, warn};

/// The driver's result type: an errno for the kernel on failure.
pub type Result<T> = std::result::Result<T, Errno>;

/// The errno of an I/O error (EIO when it carries none, e.g. a backing
/// file that failed a format check).
pub fn errno(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The errno of an I/O error on inode `ino`'s backing entry `what`,
/// logged when it is damage rather than an ordinary failure.
pub fn backing_errno(ino: u64, what: &str, e: io::Error) -> Errno {
    match e.raw_os_error() {
        Some(code) => {
            debug!("inode {ino}: {what}: {e}");
            Errno::from_i32(code)
        }
        None => {
            warn!("inode {ino}: {what}: {e}");
            Errno::EIO
        }
    }
}

/// The errno of a contents error on inode `ino`; damage is logged.
pub fn contents_errno(ino: u64, e: &ContentsError) -> Errno {
    match e {
        ContentsError::Io(io) if io.raw_os_error().is_some() => {
            debug!("inode {ino}: {e}");
        }
        _ => warn!("inode {ino}: {e}"),
    }
    Errno::from_i32(e.errno())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_keep_their_code_and_others_become_eio() {
        assert_eq!(
            errno(io::Error::from_raw_os_error(libc::ENOSPC)),
            Errno::ENOSPC
        );
        assert_eq!(errno(io::Error::other("bad IV file")), Errno::EIO);
        let e = ContentsError::BadHeader("bad magic");
        assert_eq!(contents_errno(5, &e), Errno::EIO);
    }
}
