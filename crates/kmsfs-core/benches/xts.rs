//! AES-256-XTS throughput: 4 KiB data units and 128 KiB buffers (32 units),
//! the two sizes the FUSE driver sees most, through the batched `aes` code
//! (`encrypt`/`decrypt`) and through libcrypto as the driver calls it
//! (`libcrypto-*`: one crypter per buffer, so its set-up cost is counted). Compare with
//! `openssl speed -evp aes-256-xts -bytes 4096` (scripts/bench-xts runs both).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kmsfs_core::xts::Xts256;
use std::hint::black_box;

fn bench_xts(c: &mut Criterion) {
    let mut key = [0u8; 64];
    for (i, b) in key.iter_mut().enumerate() {
        *b = i as u8;
    }
    let xts = Xts256::new(&key).expect("distinct halves");
    let mut group = c.benchmark_group("aes256-xts");
    for size in [4096usize, 128 * 1024] {
        let mut buf = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encrypt", size), &size, |b, _| {
            b.iter(|| {
                for (i, unit) in buf.chunks_mut(4096).enumerate() {
                    xts.encrypt_unit(unit, i as u128).expect("full unit");
                }
                black_box(&buf);
            })
        });
        group.bench_with_input(BenchmarkId::new("decrypt", size), &size, |b, _| {
            b.iter(|| {
                for (i, unit) in buf.chunks_mut(4096).enumerate() {
                    xts.decrypt_unit(unit, i as u128).expect("full unit");
                }
                black_box(&buf);
            })
        });
        for (name, encrypt) in [("libcrypto-encrypt", true), ("libcrypto-decrypt", false)] {
            group.bench_with_input(BenchmarkId::new(name, size), &size, |b, _| {
                b.iter(|| {
                    let mut c = xts.crypter(encrypt);
                    for (i, unit) in buf.chunks_mut(4096).enumerate() {
                        c.unit(unit, i as u128).expect("full unit");
                    }
                    black_box(&buf);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_xts);
criterion_main!(benches);
