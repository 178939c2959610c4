//! Quick throughput check of `FileContents` (not a test, not a benchmark
//! suite): sequential page-aligned reads and writes of 128 KiB and 1 MiB
//! through a backing file in a temporary directory (use tmpfs to leave the
//! disk out: `TMPDIR=/dev/shm cargo run --release -p kmsfs-core --example
//! contents_speed`).

use kmsfs_core::contents::FileContents;
use kmsfs_core::keys::{FsKeys, MasterKey};
use std::time::Instant;

const FILE_SIZE: u64 = 256 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keys = FsKeys::derive(&MasterKey::generate()?, &[7; 16]);
    let dir = tempfile::tempdir()?;
    for chunk in [128usize << 10, 1 << 20] {
        let path = dir.path().join(format!("f{chunk}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let mut fc = FileContents::open(&keys, &file, 0)?;
        let data: Vec<u8> = (0..chunk).map(|i| (i % 251) as u8 | 1).collect();
        // First pass allocates; the measured passes overwrite and read.
        for pass in 0..3 {
            let t = Instant::now();
            let mut off = 0;
            while off < FILE_SIZE {
                fc.write_at(&keys, &file, off, &data)?;
                off += chunk as u64;
            }
            let w = t.elapsed();
            let mut buf = vec![0u8; chunk];
            let t = Instant::now();
            let mut off = 0;
            while off < FILE_SIZE {
                fc.read_at(&file, off, &mut buf)?;
                off += chunk as u64;
            }
            let r = t.elapsed();
            assert_eq!(buf, data);
            let mib = (FILE_SIZE >> 20) as f64;
            println!(
                "chunk {:>7} pass {pass}: write {:>7.0} MiB/s  read {:>7.0} MiB/s",
                chunk,
                mib / w.as_secs_f64(),
                mib / r.as_secs_f64()
            );
        }
    }
    Ok(())
}
