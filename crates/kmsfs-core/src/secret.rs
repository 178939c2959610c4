//! Secret byte buffers: zeroized on drop, redacted in `Debug`, locked in RAM.
//!
//! Every key kmsfs holds in memory (the filesystem master key, the subkeys
//! derived from it, KMS tokens) lives in one of these. The bytes sit in a
//! slot of the process-wide locked arena (see `locked_arena`): pages mapped
//! for secrets only, `mlock`ed once and never unlocked, excluded from core
//! dumps and wiped in forked children. A secret is never reallocated, so
//! its bytes are never copied behind our back.

use std::fmt;

use zeroize::Zeroize;

use crate::locked_arena::{self, Slot};

/// A fixed-size secret held in locked memory and zeroized on drop.
pub struct SecretBytes {
    /// The arena slot; `None` for an empty secret.
    slot: Option<Slot>,
    len: usize,
}

// SAFETY: a `SecretBytes` owns its slot exclusively (like a `Box<[u8]>`);
// shared access only hands out `&[u8]`, and the arena itself is behind a mutex.
unsafe impl Send for SecretBytes {}
// SAFETY: as above; `&SecretBytes` allows reads only.
unsafe impl Sync for SecretBytes {}

impl SecretBytes {
    /// Takes `bytes` into locked memory and zeroizes the caller's vector
    /// (its whole capacity).
    pub fn new(bytes: Vec<u8>) -> Self {
        let mut bytes = bytes;
        let s = Self::from_slice(&bytes);
        bytes.zeroize();
        s
    }

    /// A zero-filled secret of `len` bytes, to be filled in place.
    pub fn zeroed(len: usize) -> Self {
        // Arena slots are zero when handed out.
        let slot = (len > 0).then(|| locked_arena::alloc(len));
        SecretBytes { slot, len }
    }

    /// Fresh random bytes from the operating system's CSPRNG.
    pub fn random(len: usize) -> Result<Self, getrandom::Error> {
        let mut s = Self::zeroed(len);
        getrandom::fill(s.expose_mut())?;
        Ok(s)
    }

    /// Copies a secret out of a borrowed slice.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut s = Self::zeroed(bytes.len());
        s.expose_mut().copy_from_slice(bytes);
        s
    }

    /// The secret bytes. Keep the borrow short and never log it.
    pub fn expose(&self) -> &[u8] {
        match self.slot {
            // SAFETY: the slot is ours, at least `len` bytes long, and lives
            // until `drop`; the borrow is tied to `&self`.
            Some(slot) => unsafe { std::slice::from_raw_parts(slot.ptr.as_ptr(), self.len) },
            None => &[],
        }
    }

    /// Mutable access, for filling a secret in place.
    pub fn expose_mut(&mut self) -> &mut [u8] {
        match self.slot {
            // SAFETY: as in `expose`, and `&mut self` makes the borrow unique.
            Some(slot) => unsafe { std::slice::from_raw_parts_mut(slot.ptr.as_ptr(), self.len) },
            None => &mut [],
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the secret holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        Self::from_slice(self.expose())
    }
}

impl PartialEq for SecretBytes {
    /// Constant-time comparison, so equality checks do not leak a prefix.
    fn eq(&self, other: &Self) -> bool {
        if self.len != other.len {
            return false;
        }
        let diff = self
            .expose()
            .iter()
            .zip(other.expose().iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }
}

impl Eq for SecretBytes {}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            // SAFETY: the slot came from `locked_arena::alloc`, is freed only
            // here, and no borrow of it can outlive `self`.
            unsafe { locked_arena::free(slot) };
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {}])", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = SecretBytes::from_slice(b"hunter2-secret");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("REDACTED"));
    }

    /// The smaps entry (`VmFlags:` words) of the mapping containing `addr`.
    fn vm_flags_at(addr: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= addr && addr < b;
                    continue;
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().map(String::from).collect();
                }
            }
        }
        panic!("no mapping contains {addr:#x}");
    }

    fn vm_lck_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmLck:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn addr(s: &SecretBytes) -> usize {
        s.expose().as_ptr() as usize
    }

    #[test]
    fn neighbours_stay_locked_through_many_cycles() {
        // Tests run as root (CAP_IPC_LOCK), so mlock cannot fail here.
        let survivors: Vec<SecretBytes> = (0..200)
            .map(|i| SecretBytes::from_slice(&[i as u8 | 1; 32]))
            .collect();
        let big = SecretBytes::from_slice(&vec![0xA5; 10_000]);
        let lck_before = vm_lck_kib();
        assert!(lck_before >= 8, "VmLck {lck_before} kB with secrets alive");
        for round in 0..2_000usize {
            // Same size classes as the survivors, so freed slots share
            // their pages; plus one multi-page secret per round.
            let a = SecretBytes::random(32).unwrap();
            let b = SecretBytes::from_slice(&[7; 20]);
            let c = SecretBytes::zeroed(5000 + round % 3000);
            assert!(c.expose().iter().all(|&x| x == 0), "fresh slot not zero");
            drop((a, b, c));
            assert!(vm_lck_kib() >= lck_before, "VmLck dropped in round {round}");
        }
        for (i, s) in survivors.iter().enumerate() {
            assert_eq!(s.expose(), &[i as u8 | 1; 32][..], "survivor {i} changed");
            let flags = vm_flags_at(addr(s));
            assert!(
                flags.iter().any(|f| f == "lo"),
                "survivor {i} unlocked: {flags:?}"
            );
            assert!(
                flags.iter().any(|f| f == "dd"),
                "survivor {i} dumpable: {flags:?}"
            );
            assert!(
                flags.iter().any(|f| f == "wf"),
                "survivor {i} not wipe-on-fork: {flags:?}"
            );
        }
        assert!(vm_flags_at(addr(&big)).iter().any(|f| f == "lo"));
        assert!(big.expose().iter().all(|&x| x == 0xA5));
    }

    /// Set in the child process of `works_unlocked_when_mlock_fails`.
    const CHILD_ENV: &str = "KMSFS_ARENA_MLOCK_CHILD";

    #[test]
    fn works_unlocked_when_mlock_fails() {
        if std::env::var_os(CHILD_ENV).is_some() {
            return mlock_fails_child();
        }
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return; // the child needs root to drop to another uid
        }
        // A fresh process: this one's arena is already locked.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "secret::tests::works_unlocked_when_mlock_fails",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "{text}");
    }

    /// RLIMIT_MEMLOCK 0 and no CAP_IPC_LOCK: every mlock fails.
    fn mlock_fails_child() {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain system calls with valid arguments; dropping to uid
        // 65534 removes CAP_IPC_LOCK in every thread.
        unsafe {
            assert_eq!(libc::setrlimit(libc::RLIMIT_MEMLOCK, &zero), 0);
            assert_eq!(libc::setgid(65534), 0);
            assert_eq!(libc::setuid(65534), 0);
        }
        let small = SecretBytes::from_slice(b"still a usable secret");
        let large = SecretBytes::from_slice(&vec![3u8; 20_000]);
        let more: Vec<_> = (0..300).map(|_| SecretBytes::random(64).unwrap()).collect();
        assert_eq!(small.expose(), b"still a usable secret");
        assert!(large.expose().iter().all(|&b| b == 3));
        assert!(more.iter().all(|s| s.len() == 64));
        for s in [&small, &large, &more[299]] {
            let flags = vm_flags_at(addr(s));
            assert!(
                !flags.iter().any(|f| f == "lo"),
                "mlock succeeded? {flags:?}"
            );
            assert!(flags.iter().any(|f| f == "dd"), "{flags:?}");
        }
        assert!(
            locked_arena::lock_failure_reported(),
            "the failed mlock was not reported"
        );
    }

    #[test]
    fn contents_are_zeroed_on_free() {
        for len in [1usize, 32, 33, 100, 4096, 9000] {
            // Another test thread may grab the slot right after the drop;
            // retry until we observe it free.
            let mut seen = None;
            for _ in 0..100 {
                let mut s = SecretBytes::zeroed(len);
                s.expose_mut().fill(0xEE);
                let slot = s.slot.unwrap();
                drop(s);
                let contents =
                    locked_arena::free_slot_contents(slot.ptr.as_ptr() as usize, slot.cap);
                if contents.is_some() {
                    seen = contents;
                    break;
                }
            }
            let contents = seen.expect("slot never observed free");
            assert!(contents.len() >= len);
            assert!(contents.iter().all(|&b| b == 0), "len {len}: not zeroed");
        }
    }

    #[test]
    fn api_round_trips() {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(b"master-key-material");
        let s = SecretBytes::new(v);
        assert_eq!(s.expose(), b"master-key-material");
        assert_eq!(s.len(), 19);
        let empty = SecretBytes::new(Vec::new());
        assert!(empty.is_empty() && empty.expose().is_empty());
        assert_eq!(empty, empty.clone());
        assert_ne!(s, SecretBytes::from_slice(b"master-key-materiaL"));
        assert_ne!(s, SecretBytes::from_slice(b"master"));
    }

    #[test]
    fn random_is_not_constant() {
        let a = SecretBytes::random(32).unwrap();
        let b = SecretBytes::random(32).unwrap();
        assert_ne!(a, b);
        assert_eq!(a, a.clone());
    }
}
