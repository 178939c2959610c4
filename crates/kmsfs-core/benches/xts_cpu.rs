//! AES-256-XTS per core, measured in CPU time like `openssl speed`, so the
//! two figures compare on a busy machine too: `scripts/bench --xts` runs
//! this and `openssl speed -evp aes-256-xts -bytes 4096` side by side.
//!
//! Prints one line per path: `PATH encrypt|decrypt GB/s` (10^9 bytes per
//! CPU second of this thread), 4096-byte units, 32 units per crypter as the
//! FUSE driver uses it for a 128 KiB request.

use kmsfs_core::xts::Xts256;
use std::hint::black_box;

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Runs `f` over 128 KiB until it has used `secs` of CPU; returns GB/s.
fn rate(secs: f64, buf: &mut [u8], mut f: impl FnMut(&mut [u8])) -> f64 {
    f(buf); // warm up
    let t0 = thread_cpu_seconds();
    let mut bytes = 0u64;
    while thread_cpu_seconds() - t0 < secs {
        for _ in 0..64 {
            f(buf);
            bytes += buf.len() as u64;
        }
    }
    bytes as f64 / (thread_cpu_seconds() - t0) / 1e9
}

fn main() {
    let secs: f64 = std::env::var("XTS_CPU_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let mut key = [0u8; 64];
    for (i, b) in key.iter_mut().enumerate() {
        *b = i as u8;
    }
    let xts = Xts256::new(&key).expect("distinct halves");
    let mut buf = vec![0x5au8; 128 * 1024];
    for encrypt in [true, false] {
        let dir = if encrypt { "encrypt" } else { "decrypt" };
        let batched = rate(secs, &mut buf, |b| {
            for (i, unit) in b.chunks_mut(4096).enumerate() {
                let r = if encrypt {
                    xts.encrypt_unit(unit, i as u128)
                } else {
                    xts.decrypt_unit(unit, i as u128)
                };
                r.expect("full unit");
            }
            black_box(&b);
        });
        println!("aes-crate {dir} {batched:.2}");
        let libcrypto = rate(secs, &mut buf, |b| {
            let mut c = xts.crypter(encrypt);
            for (i, unit) in b.chunks_mut(4096).enumerate() {
                c.unit(unit, i as u128).expect("full unit");
            }
            black_box(&b);
        });
        println!("libcrypto {dir} {libcrypto:.2}");
        // A random 4 KiB page as the driver serves it: a crypter of its
        // own, the page's unit from block 2 (4064 bytes) and the next
        // unit's first two blocks (format.md: the unit grid is 32 bytes
        // behind the plaintext pages).
        let page = rate(secs, &mut buf, |b| {
            for (i, page) in b.chunks_mut(4096).enumerate() {
                let mut c = xts.crypter(encrypt);
                let (head, tail) = page.split_at_mut(4064);
                c.blocks(head, i as u128, 2).expect("blocks");
                c.blocks(tail, i as u128 + 1, 0).expect("blocks");
            }
            black_box(&b);
        });
        println!("page {dir} {page:.2}");
    }
}
