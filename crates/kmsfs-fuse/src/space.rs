//! Full backing stores under the writeback cache.
//!
//! With the kernel's writeback cache, `write(2)` only copies into the page
//! cache; the daemon sees the data later, and a write that then fails with
//! `ENOSPC` is reported by `fsync`/`close` at best. A writer that never
//! calls them (`dd` into a full store) would go on for ever. So when a
//! write from the cache fails for lack of space, the daemon marks the inode
//! and tells the kernel its attributes are stale. Before the next `write(2)`
//! on that file the kernel must then refresh them with a `GETATTR` that
//! names the open file, and that one `GETATTR` is answered with the error,
//! which the kernel hands to `write(2)`. A plain `stat` (no file handle) is
//! never failed. docs/performance.md measures what this costs (nothing
//! while space is plentiful: the path runs only after a failure).

use fuser::{Errno, INodeNo, Notifier};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::OnceLock;

/// Errors that mean "no room", reported at the next `write(2)`.
fn is_space_error(e: Errno) -> bool {
    e == Errno::ENOSPC || e == Errno::EDQUOT || e == Errno::EFBIG
}

/// Inodes whose cached writes failed for lack of space, and how to tell the kernel.
#[derive(Default)]
pub struct SpaceErrors {
    pending: Mutex<HashMap<u64, Errno>>,
    notifier: OnceLock<Notifier>,
    /// Only with the writeback cache do write errors need this detour.
    enabled: std::sync::atomic::AtomicBool,
}

impl SpaceErrors {
    /// Turns the detour on (the kernel granted the writeback cache).
    pub fn enable(&self) {
        self.enabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Gives the channel for notifications (set once the session exists).
    pub fn set_notifier(&self, n: Notifier) {
        let _ = self.notifier.set(n);
    }

    /// A write to `ino` failed with `e`.
    pub fn write_failed(&self, ino: u64, e: Errno) {
        if !is_space_error(e) || !self.enabled.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let fresh = self.pending.lock().insert(ino, e).is_none();
        if let (true, Some(n)) = (fresh, self.notifier.get()) {
            // Offset -1: attributes only, no page-cache invalidation, so this
            // cannot wait on the pages being written back. Sent from another
            // thread all the same: the request that failed is still ours.
            let n = n.clone();
            std::thread::spawn(move || {
                if let Err(err) = n.inval_inode(INodeNo(ino), -1, 0) {
                    tracing::debug!("inode {ino}: attribute invalidation failed: {err}");
                }
            });
        }
    }

    /// The error to answer a `GETATTR` of `ino` with, once: only for a
    /// `GETATTR` that names an open file (the kernel's check before a write).
    pub fn take(&self, ino: u64, has_fh: bool) -> Option<Errno> {
        if !has_fh {
            return None;
        }
        self.pending.lock().remove(&ino)
    }

    /// Forgets `ino` (the kernel dropped it).
    pub fn forget(&self, ino: u64) {
        self.pending.lock().remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_space_errors_are_held_and_only_for_a_handle_getattr_once() {
        let s = SpaceErrors::default();
        s.write_failed(3, Errno::ENOSPC);
        assert_eq!(s.take(3, true), None, "off until the writeback cache is on");
        s.enable();
        s.write_failed(3, Errno::EIO);
        assert_eq!(s.take(3, true), None);
        s.write_failed(3, Errno::ENOSPC);
        assert_eq!(s.take(3, false), None);
        assert_eq!(s.take(3, true), Some(Errno::ENOSPC));
        assert_eq!(s.take(3, true), None);
    }
}
