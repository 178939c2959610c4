//! The locked arena: one process-wide pool of pages that holds every
//! [`SecretBytes`](crate::secret::SecretBytes).
//!
//! `mlock`/`munlock` act on whole pages. Locking an ordinary heap allocation
//! and unlocking it when the secret is dropped unlocks everything else on
//! those pages too: other keys, and memory `mlockall` had locked. So secrets
//! get pages of their own instead: anonymous private mappings, locked once,
//! excluded from core dumps (`MADV_DONTDUMP`) and wiped in forked children
//! (`MADV_WIPEONFORK`), carved into power-of-two slots. Freeing a slot
//! zeroizes it and returns it to a free list; pages are never unlocked and
//! never unmapped, so a live secret's page can never lose its lock. The
//! arena grows by mapping more pages when a size class runs out.
//!
//! When `mlock` fails (RLIMIT_MEMLOCK without CAP_IPC_LOCK) the pages are
//! still used, and a warning is logged once.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use zeroize::Zeroize;

/// The smallest slot; every slot size is this times a power of two.
const MIN_SLOT: usize = 32;

/// One allocation: `cap` bytes at `ptr`, all zero when handed out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    pub ptr: NonNull<u8>,
    pub cap: usize,
}

struct Arena {
    page: usize,
    /// Free slots per size class: index `i` holds slots of `MIN_SLOT << i`
    /// bytes, up to one page. Addresses only, never contents.
    small: Vec<Vec<usize>>,
    /// Free whole-page regions for larger secrets, as (address, bytes).
    large: Vec<(usize, usize)>,
}

static ARENA: Mutex<Option<Arena>> = Mutex::new(None);
/// Set once a warning about failed `mlock` has been logged.
static LOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// A zero-filled slot of at least `len` (> 0) bytes.
///
/// Aborts the process when no memory can be mapped, as the global
/// allocator does on exhaustion.
pub(crate) fn alloc(len: usize) -> Slot {
    debug_assert!(len > 0);
    let mut guard = ARENA.lock().unwrap_or_else(|p| p.into_inner());
    let arena = guard.get_or_insert_with(|| Arena {
        page: page_size(),
        small: Vec::new(),
        large: Vec::new(),
    });
    let page = arena.page;
    let class_size = len.max(MIN_SLOT).next_power_of_two();
    if class_size <= page {
        let class = (class_size / MIN_SLOT).trailing_zeros() as usize;
        if arena.small.len() <= class {
            arena.small.resize_with(class + 1, Vec::new);
        }
        let free = &mut arena.small[class];
        if free.is_empty() {
            let base = map_locked(page, len) as usize;
            // Reversed, so that slots are handed out in address order.
            free.extend((0..page / class_size).rev().map(|i| base + i * class_size));
        }
        let addr = free.pop().unwrap_or_else(|| alloc_failed(len));
        return Slot {
            ptr: NonNull::new(addr as *mut u8).unwrap_or_else(|| alloc_failed(len)),
            cap: class_size,
        };
    }
    let bytes = len.div_ceil(page) * page;
    // Best fit among freed regions, else a new mapping.
    let best = arena
        .large
        .iter()
        .enumerate()
        .filter(|(_, &(_, size))| size >= bytes)
        .min_by_key(|(_, &(_, size))| size)
        .map(|(i, _)| i);
    let (addr, cap) = match best {
        Some(i) => arena.large.swap_remove(i),
        None => (map_locked(bytes, len) as usize, bytes),
    };
    Slot {
        ptr: NonNull::new(addr as *mut u8).unwrap_or_else(|| alloc_failed(len)),
        cap,
    }
}

/// Zeroizes `slot` and returns it to the arena (never unlocking it).
///
/// # Safety
/// `slot` must come from [`alloc`], not have been freed yet, and no
/// reference into it may outlive this call.
pub(crate) unsafe fn free(slot: Slot) {
    // SAFETY: per this function's contract the slot is ours alone and
    // `cap` bytes long, inside a mapping that is never unmapped.
    let bytes = unsafe { std::slice::from_raw_parts_mut(slot.ptr.as_ptr(), slot.cap) };
    bytes.zeroize();
    let mut guard = ARENA.lock().unwrap_or_else(|p| p.into_inner());
    let Some(arena) = guard.as_mut() else {
        return; // unreachable: the slot came from an existing arena
    };
    let addr = slot.ptr.as_ptr() as usize;
    if slot.cap <= arena.page {
        let class = (slot.cap / MIN_SLOT).trailing_zeros() as usize;
        if let Some(free) = arena.small.get_mut(class) {
            free.push(addr);
        }
    } else {
        arena.large.push((addr, slot.cap));
    }
}

/// Maps `bytes` (a multiple of the page size) of fresh, zeroed memory for
/// secrets, locks it and keeps it out of core dumps and forked children.
fn map_locked(bytes: usize, len: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping at an address the kernel picks
    // aliases nothing; the result is checked before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED || ptr.is_null() {
        alloc_failed(len);
    }
    // SAFETY: `ptr..ptr+bytes` is the page-aligned mapping made above;
    // madvise and mlock change page attributes only, never contents.
    let locked = unsafe {
        // Best effort: kernels before 4.14 lack MADV_WIPEONFORK, and the
        // commands holding keys are non-dumpable anyway.
        libc::madvise(ptr, bytes, libc::MADV_DONTDUMP);
        libc::madvise(ptr, bytes, libc::MADV_WIPEONFORK);
        libc::mlock(ptr, bytes) == 0
    };
    if !locked && !LOCK_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "cannot lock key memory in RAM ({}); keys may be written to swap. \
             Raise RLIMIT_MEMLOCK (e.g. LimitMEMLOCK= in the systemd unit) or run with CAP_IPC_LOCK",
            std::io::Error::last_os_error()
        );
    }
    ptr.cast()
}

fn alloc_failed(len: usize) -> ! {
    std::alloc::handle_alloc_error(
        Layout::from_size_align(len.max(1), 1).unwrap_or(Layout::new::<u8>()),
    )
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

/// Test support: whether a failed `mlock` has been reported.
#[cfg(test)]
pub(crate) fn lock_failure_reported() -> bool {
    LOCK_WARNED.load(Ordering::Relaxed)
}

/// Test support: the bytes of a slot if it is currently free (read under
/// the arena lock, so no other thread can be reusing it), else `None`.
#[cfg(test)]
pub(crate) fn free_slot_contents(addr: usize, cap: usize) -> Option<Vec<u8>> {
    let guard = ARENA.lock().unwrap_or_else(|p| p.into_inner());
    let arena = guard.as_ref()?;
    let is_free = if cap <= arena.page {
        let class = (cap / MIN_SLOT).trailing_zeros() as usize;
        arena.small.get(class)?.contains(&addr)
    } else {
        arena.large.contains(&(addr, cap))
    };
    if !is_free {
        return None;
    }
    // SAFETY: a free slot lies in a mapping that is never unmapped, and
    // holding the arena lock keeps it from being handed out meanwhile.
    Some(unsafe { std::slice::from_raw_parts(addr as *const u8, cap) }.to_vec())
}
