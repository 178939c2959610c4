//! Secret byte buffers: zeroized on drop, redacted in `Debug`, locked in RAM.
//!
//! Every key kmsfs holds in memory (the filesystem master key, the subkeys
//! derived from it, KMS tokens) lives in one of these. The buffer is a heap
//! allocation that is never reallocated, so the bytes are never copied behind
//! our back, and it is `mlock`ed (best effort) so it stays out of swap and is
//! excluded from core dumps with `MADV_DONTDUMP`.

use std::fmt;
use zeroize::Zeroize;

/// A fixed-size, heap-allocated secret that is locked in memory and zeroized on drop.
pub struct SecretBytes {
    bytes: Box<[u8]>,
    locked: bool,
}

impl SecretBytes {
    /// Takes ownership of `bytes`, locking them in memory. The caller's
    /// vector is consumed without copying; its spare capacity is dropped.
    pub fn new(bytes: Vec<u8>) -> Self {
        let mut bytes = bytes;
        // `into_boxed_slice` may reallocate when capacity exceeds length,
        // leaving a stale copy behind: shrink by copying ourselves and wiping.
        let boxed: Box<[u8]> = if bytes.capacity() == bytes.len() {
            bytes.into_boxed_slice()
        } else {
            let copy: Box<[u8]> = bytes.as_slice().into();
            bytes.zeroize();
            copy
        };
        let locked = lock_region(&boxed);
        SecretBytes {
            bytes: boxed,
            locked,
        }
    }

    /// A zero-filled secret of `len` bytes, to be filled in place.
    pub fn zeroed(len: usize) -> Self {
        Self::new(vec![0u8; len])
    }

    /// Fresh random bytes from the operating system's CSPRNG.
    pub fn random(len: usize) -> Result<Self, getrandom::Error> {
        let mut s = Self::zeroed(len);
        getrandom::fill(&mut s.bytes)?;
        Ok(s)
    }

    /// Copies a secret out of a borrowed slice.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut s = Self::zeroed(bytes.len());
        s.bytes.copy_from_slice(bytes);
        s
    }

    /// The secret bytes. Keep the borrow short and never log it.
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    /// Mutable access, for filling a secret in place.
    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when the secret holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        Self::from_slice(&self.bytes)
    }
}

impl PartialEq for SecretBytes {
    /// Constant-time comparison, so equality checks do not leak a prefix.
    fn eq(&self, other: &Self) -> bool {
        if self.bytes.len() != other.bytes.len() {
            return false;
        }
        let diff = self
            .bytes
            .iter()
            .zip(other.bytes.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }
}

impl Eq for SecretBytes {}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.bytes.zeroize();
        if self.locked {
            unlock_region(&self.bytes);
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {}])", self.bytes.len())
    }
}

fn lock_region(bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return false;
    }
    // SAFETY: the pointer and length describe a live allocation we own; mlock
    // and madvise only change page attributes and never touch the contents.
    unsafe {
        let ptr = bytes.as_ptr() as *mut libc::c_void;
        let ok = libc::mlock(ptr, bytes.len()) == 0;
        // MADV_DONTDUMP needs a page-aligned start; on failure the secret is
        // still covered by the process-wide non-dumpable setting of the daemon.
        let page = page_size();
        let start = (ptr as usize) & !(page - 1);
        let end = (ptr as usize + bytes.len()).div_ceil(page) * page;
        let _ = libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTDUMP);
        ok
    }
}

fn unlock_region(bytes: &[u8]) {
    // SAFETY: same allocation that was passed to mlock in `lock_region`.
    unsafe {
        libc::munlock(bytes.as_ptr() as *const libc::c_void, bytes.len());
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
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

    #[test]
    fn random_is_not_constant() {
        let a = SecretBytes::random(32).unwrap();
        let b = SecretBytes::random(32).unwrap();
        assert_ne!(a, b);
        assert_eq!(a, a.clone());
    }
}
