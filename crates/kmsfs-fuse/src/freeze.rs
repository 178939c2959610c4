//! The write gate: lets a snapshot hold every modifying request for a
//! moment (a *freeze*) while reads go on, and records which backing inodes
//! had their contents changed since a snapshot started copying.
//!
//! Every request that changes the backing store (write, create, mkdir,
//! unlink, rename, setattr, fallocate, ...) holds a [`Pass`] while it runs.
//! A pass is a shared lock; [`WriteGate::freeze`] takes it exclusively, so
//! it waits for the requests in flight to finish and new ones wait (they
//! are held, never failed) until [`Frozen`] is dropped. The lock is
//! writer-preferring (`parking_lot`): a waiting freeze stops new passes.
//!
//! A held request keeps its FUSE worker thread, so reads are served while
//! fewer modifying requests wait than there are workers; past that, reads
//! wait for the thaw too. Keeping the freeze short (milliseconds, see the
//! snapshot client) is what keeps this harmless.

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::fs::KmsFs;

/// Holds modifying requests during a snapshot and records changed inodes.
#[derive(Default)]
pub struct WriteGate {
    lock: RwLock<()>,
    /// Whether changed inodes are being recorded (between `track(true)`
    /// and `track(false)`): a relaxed check on the hot path.
    tracking: AtomicBool,
    /// Backing inode numbers whose contents changed (or that were created)
    /// since tracking started.
    changed: Mutex<HashSet<u64>>,
}

/// One modifying request in flight; the freeze waits for it.
pub struct Pass<'a> {
    _guard: RwLockReadGuard<'a, ()>,
}

/// The gate is closed for as long as this lives.
pub struct Frozen<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
    since: Instant,
}

impl Frozen<'_> {
    /// When the gate closed to new requests.
    pub fn since(&self) -> Instant {
        self.since
    }
}

/// The requests in flight did not finish in time.
#[derive(Debug, thiserror::Error)]
#[error("modifying requests in flight did not finish within {0:?}")]
pub struct DrainTimeout(pub Duration);

impl WriteGate {
    /// Admits one modifying request (waits while frozen).
    pub fn pass(&self) -> Pass<'_> {
        Pass {
            _guard: self.lock.read(),
        }
    }

    /// Closes the gate: new modifying requests wait, and this returns once
    /// those in flight have finished, or fails after `drain` (the gate is
    /// then open again). `since` is taken as soon as the lock is asked for:
    /// from then on new requests already wait.
    pub fn freeze(&self, drain: Duration) -> Result<Frozen<'_>, DrainTimeout> {
        let since = Instant::now();
        match self.lock.try_write_for(drain) {
            Some(g) => Ok(Frozen { _guard: g, since }),
            None => Err(DrainTimeout(drain)),
        }
    }

    /// Starts (clearing the record) or stops recording changed inodes.
    pub fn track(&self, on: bool) {
        self.changed.lock().clear();
        self.tracking.store(on, Ordering::SeqCst);
    }

    /// The backing inodes recorded as changed since `track(true)`.
    pub fn changed(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.changed.lock().iter().copied().collect();
        v.sort_unstable();
        v
    }

    fn tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    fn record(&self, backing_ino: u64) {
        self.changed.lock().insert(backing_ino);
    }
}

impl KmsFs {
    /// The gate, shared with the control socket.
    pub fn write_gate(&self) -> std::sync::Arc<WriteGate> {
        self.gate.clone()
    }

    /// Records that the contents of FUSE inode `ino` changed (or that it is
    /// new), if a snapshot is tracking changes. Called while the request's
    /// [`Pass`] is still held, so a freeze sees every record of the
    /// requests it waited for.
    pub(crate) fn changed(&self, ino: u64) {
        if !self.gate.tracking() {
            return;
        }
        if let Some(node) = self.inodes.get(ino) {
            self.gate.record(node.backing_ino());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    #[test]
    fn a_freeze_waits_for_passes_in_flight_and_holds_new_ones() {
        let gate = Arc::new(WriteGate::default());
        let done = Arc::new(AtomicU32::new(0));
        let p = gate.pass();
        // A pass in flight: the freeze cannot close the gate.
        assert!(gate.freeze(Duration::from_millis(50)).is_err());
        drop(p);
        let frozen = gate.freeze(Duration::from_secs(5)).unwrap();
        let (g, d) = (gate.clone(), done.clone());
        let t = std::thread::spawn(move || {
            let _p = g.pass();
            d.fetch_add(1, Ordering::SeqCst);
        });
        // The new request is held, not failed, while frozen ...
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(done.load(Ordering::SeqCst), 0);
        drop(frozen);
        // ... and runs after the thaw.
        t.join().unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn changes_are_recorded_only_while_tracking() {
        let gate = WriteGate::default();
        gate.record(1);
        gate.track(true);
        assert!(gate.changed().is_empty());
        assert!(gate.tracking());
        gate.record(7);
        gate.record(3);
        assert_eq!(gate.changed(), vec![3, 7]);
        gate.track(false);
        assert!(!gate.tracking());
        assert!(gate.changed().is_empty());
    }
}
