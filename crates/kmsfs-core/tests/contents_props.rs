//! Property tests of the contents layer against a plain in-memory model.

mod common;

use common::MemFile;
use kmsfs_core::contents::{Backing, FileContents, FILE_HEADER_LEN, UNIT_SIZE};
use kmsfs_core::keys::{FsKeys, MasterKey};
use proptest::prelude::*;
use std::cell::RefCell;
use std::io;

fn keys() -> FsKeys {
    FsKeys::derive(&MasterKey::generate().unwrap(), &[9; 16])
}

fn read_all(fc: &FileContents, f: &MemFile) -> Vec<u8> {
    let mut out = vec![0u8; fc.size() as usize + 7];
    let n = fc.read_at(f, 0, &mut out).unwrap();
    out.truncate(n);
    out
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Checks every invariant: contents, size, backing length, and a fresh reopen.
fn check(keys: &FsKeys, fc: &FileContents, f: &MemFile, model: &[u8]) {
    assert_eq!(fc.size(), model.len() as u64);
    assert_eq!(read_all(fc, f), model);
    let blen = f.0.borrow().len() as u64;
    if model.is_empty() {
        assert!(blen == 0 || blen == FILE_HEADER_LEN, "backing len {blen}");
    } else {
        assert_eq!(blen, FILE_HEADER_LEN + model.len() as u64);
    }
    let reopened = FileContents::open(keys, f, blen).unwrap();
    assert_eq!(read_all(&reopened, f), model);
}

#[test]
fn every_size_round_trips() {
    let keys = keys();
    let max = 3 * UNIT_SIZE as usize + 1;
    for size in 0..=max {
        let f = MemFile::default();
        let mut fc = FileContents::open(&keys, &f, 0).unwrap();
        let data = pattern(size, size as u8);
        fc.write_at(&keys, &f, 0, &data).unwrap();
        if size > 0 {
            // The plaintext must not appear in the backing file.
            let backing = f.0.borrow();
            assert_ne!(&backing[FILE_HEADER_LEN as usize..], &data[..]);
        }
        check(&keys, &fc, &f, &data);
    }
}

#[test]
fn equal_contents_in_two_files_differ_on_disk() {
    let keys = keys();
    let data = vec![0x41u8; 3 * UNIT_SIZE as usize + 5];
    let (a, b) = (MemFile::default(), MemFile::default());
    for f in [&a, &b] {
        let mut fc = FileContents::open(&keys, f, 0).unwrap();
        fc.write_at(&keys, f, 0, &data).unwrap();
    }
    let (a, b) = (a.0.borrow(), b.0.borrow());
    assert_eq!(a.len(), b.len());
    // Compare every 16-byte block of ciphertext: none may coincide.
    for (x, y) in a[32..].chunks(16).zip(b[32..].chunks(16)) {
        assert_ne!(x, y);
    }
}

#[test]
fn tiny_file_rewrites_never_reuse_a_keystream() {
    let keys = keys();
    let f = MemFile::default();
    let mut fc = FileContents::open(&keys, &f, 0).unwrap();
    fc.write_at(&keys, &f, 0, b"secret-A").unwrap();
    let first = f.0.borrow().clone();
    fc.write_at(&keys, &f, 0, b"secret-B").unwrap();
    let second = f.0.borrow().clone();
    // A fresh nonce each time: headers differ, and the XOR of the two
    // ciphertexts is not the XOR of the plaintexts.
    assert_ne!(first[16..32], second[16..32]);
    let xor_ct: Vec<u8> = first[32..]
        .iter()
        .zip(&second[32..])
        .map(|(a, b)| a ^ b)
        .collect();
    let xor_pt: Vec<u8> = b"secret-A"
        .iter()
        .zip(b"secret-B")
        .map(|(a, b)| a ^ b)
        .collect();
    assert_ne!(xor_ct, xor_pt);
    check(&keys, &fc, &f, b"secret-B");
}

#[test]
fn sparse_write_leaves_holes_and_bounded_work() {
    let keys = keys();
    let f = MemFile::default();
    let mut fc = FileContents::open(&keys, &f, 0).unwrap();
    fc.write_at(&keys, &f, 0, b"head of the file!").unwrap();
    let far = 100 * UNIT_SIZE + 123;
    fc.write_at(&keys, &f, far, b"tail").unwrap();
    let mut model = vec![0u8; far as usize + 4];
    model[..17].copy_from_slice(b"head of the file!");
    model[far as usize..].copy_from_slice(b"tail");
    check(&keys, &fc, &f, &model);
    // Units strictly between the two writes were never written: still zero.
    let backing = f.0.borrow();
    let mid = &backing[(32 + 10 * UNIT_SIZE) as usize..(32 + 90 * UNIT_SIZE) as usize];
    assert!(mid.iter().all(|&b| b == 0));
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Truncate(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let max = 3 * UNIT_SIZE + 40;
    prop_oneof![
        4 => (0..max, 0usize..(2 * UNIT_SIZE as usize + 20), any::<u8>())
            .prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        // Whole 16-byte blocks and kernel pages: overwrites in place.
        3 => (0..max / 16, 1usize..(2 * UNIT_SIZE as usize / 16), any::<u8>())
            .prop_map(|(b, n, seed)| Op::Write { off: b * 16, len: n * 16, seed }),
        2 => (0..3u64, 1usize..3, any::<u8>())
            .prop_map(|(p, n, seed)| Op::Write { off: p * UNIT_SIZE, len: n * UNIT_SIZE as usize, seed }),
        1 => (0..max).prop_map(Op::Truncate),
        // Sizes right around the tiny and merged-unit boundaries.
        1 => prop::sample::select(vec![0u64, 1, 15, 16, 17, 4095, 4096, 4097, 4111, 4112, 8192, 8200])
            .prop_map(Op::Truncate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_writes_and_truncates_match_a_model(ops in prop::collection::vec(op(), 1..24)) {
        let keys = keys();
        let f = MemFile::default();
        let mut fc = FileContents::open(&keys, &f, 0).unwrap();
        let mut model: Vec<u8> = Vec::new();
        for op in ops {
            match op {
                Op::Write { off, len, seed } => {
                    let data = pattern(len, seed);
                    fc.write_at(&keys, &f, off, &data).unwrap();
                    if len > 0 {
                        let end = off as usize + len;
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[off as usize..end].copy_from_slice(&data);
                    }
                }
                Op::Truncate(n) => {
                    fc.set_len(&keys, &f, n).unwrap();
                    model.resize(n as usize, 0);
                }
            }
            check(&keys, &fc, &f, &model);
        }
        // Random partial reads agree with the model too.
        for (i, chunk) in [(0usize, 1usize), (4090, 20), (4095, 4097), (1, 15)].iter().enumerate() {
            let mut buf = vec![0u8; chunk.1];
            let n = fc.read_at(&f, chunk.0 as u64, &mut buf).unwrap();
            let want = model.get(chunk.0..).map(|s| &s[..s.len().min(chunk.1)]).unwrap_or(&[]);
            prop_assert_eq!(&buf[..n], want, "read {}", i);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Reads at any offset and length, and the kernel's page-aligned reads
    /// (whose edges cut units on the page-aligned grid), over data and holes.
    #[test]
    fn reads_anywhere_match_the_model(
        ops in prop::collection::vec(op(), 1..8),
        reads in prop::collection::vec((0u64..4 * UNIT_SIZE, 0usize..3 * UNIT_SIZE as usize), 1..16),
        pages in prop::collection::vec((0u64..4, 1usize..4), 1..6),
    ) {
        let keys = keys();
        let f = MemFile::default();
        let mut fc = FileContents::open(&keys, &f, 0).unwrap();
        let mut model: Vec<u8> = Vec::new();
        for op in ops {
            match op {
                Op::Write { off, len, seed } => {
                    let data = pattern(len, seed);
                    fc.write_at(&keys, &f, off, &data).unwrap();
                    let end = off as usize + len;
                    if len > 0 && model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                }
                Op::Truncate(n) => {
                    fc.set_len(&keys, &f, n).unwrap();
                    model.resize(n as usize, 0);
                }
            }
        }
        let page_reads = pages
            .into_iter()
            .map(|(p, n)| (p * UNIT_SIZE, n * UNIT_SIZE as usize));
        for (off, len) in reads.into_iter().chain(page_reads) {
            let mut buf = vec![0xeeu8; len];
            let n = fc.read_at(&f, off, &mut buf).unwrap();
            let want = model.get(off as usize..).map(|s| &s[..s.len().min(len)]).unwrap_or(&[]);
            prop_assert_eq!(&buf[..n], want, "read {} bytes at {}", len, off);
        }
    }
}

#[test]
fn bad_file_headers_are_errors_not_panics() {
    let keys = keys();
    for len in 1..32 {
        let f = MemFile(RefCell::new(vec![7u8; len]));
        let err = FileContents::open(&keys, &f, len as u64).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
    let f = MemFile(RefCell::new(vec![7u8; 64]));
    let err = FileContents::open(&keys, &f, 64).unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");
    // A backing file shorter than its size claims (changed underneath).
    let f = MemFile::default();
    let mut fc = FileContents::open(&keys, &f, 0).unwrap();
    fc.write_at(&keys, &f, 0, &[1u8; 9000]).unwrap();
    f.0.borrow_mut().truncate(5000);
    let mut buf = vec![0u8; 9000];
    let err = fc.read_at(&f, 0, &mut buf).unwrap_err();
    assert!(err.to_string().contains("short read"), "{err}");
}

/// A backing file on a nearly full disk: writes past `capacity` bytes are
/// cut short and then fail, as a real filesystem does, unless the space
/// was reserved first.
struct FullDisk {
    file: MemFile,
    capacity: u64,
}

impl Backing for FullDisk {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.read_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let fits = self.capacity.saturating_sub(off).min(buf.len() as u64) as usize;
        self.file.write_all_at(&buf[..fits], off)?;
        if fits < buf.len() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn file_len(&self) -> io::Result<u64> {
        self.file.file_len()
    }
    fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        if off + len > self.capacity {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
}

#[test]
fn a_full_disk_fails_the_write_before_touching_old_data() {
    let keys = keys();
    for old_len in [20usize, 676, 4100, 5000, 8191] {
        let disk = FullDisk {
            file: MemFile::default(),
            capacity: FILE_HEADER_LEN + old_len as u64 + 8,
        };
        let mut fc = FileContents::open(&keys, &disk, 0).unwrap();
        let old = pattern(old_len, 3);
        fc.write_at(&keys, &disk, 0, &old).unwrap();
        let before = disk.file.0.borrow().clone();
        // Growing re-encrypts the old (partial) last unit: the write must
        // fail as a whole, leaving every byte as it was.
        let err = fc
            .write_at(&keys, &disk, old_len as u64, &[9u8; 3000])
            .unwrap_err();
        assert_eq!(err.errno(), libc::ENOSPC, "{err}");
        assert_eq!(*disk.file.0.borrow(), before, "old size {old_len}");
        assert_eq!(read_all(&fc, &disk.file), old);
    }
}

/// A backing file that refuses the first truncate (a read-only open).
struct NoTruncateOnce {
    file: MemFile,
    refused: std::cell::Cell<bool>,
}

impl Backing for NoTruncateOnce {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.read_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.refused.replace(true) {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        self.file.set_len(len)
    }
    fn file_len(&self) -> io::Result<u64> {
        self.file.file_len()
    }
}

#[test]
fn a_tiny_header_on_a_longer_file_reads_tiny_and_is_truncated_before_a_change() {
    let keys = keys();
    // Make a 9000-byte file, then shrink it to 7 bytes but stop before the
    // truncate: put the tiny header and ciphertext over the start by hand.
    let f = MemFile::default();
    let mut fc = FileContents::open(&keys, &f, 0).unwrap();
    fc.write_at(&keys, &f, 0, &pattern(9000, 1)).unwrap();
    let tiny = MemFile::default();
    let mut tc = FileContents::open(&keys, &tiny, 0).unwrap();
    tc.write_at(&keys, &tiny, 0, b"seven!!").unwrap();
    let head = tiny.0.borrow().clone();
    f.0.borrow_mut()[..head.len()].copy_from_slice(&head);
    let stale = NoTruncateOnce {
        file: f,
        refused: std::cell::Cell::new(false),
    };
    let mut fc = FileContents::open(&keys, &stale, 32 + 9000).unwrap();
    assert_eq!(fc.size(), 7);
    assert_eq!(
        stale.file.0.borrow().len(),
        32 + 9000,
        "open could not truncate"
    );
    let mut out = [0u8; 16];
    assert_eq!(fc.read_at(&stale, 0, &mut out).unwrap(), 7);
    assert_eq!(&out[..7], b"seven!!");
    // Growing past the tiny limit truncates the stale bytes first: they must
    // not come back as data.
    fc.set_len(&keys, &stale, 5000).unwrap();
    let mut want = b"seven!!".to_vec();
    want.resize(5000, 0);
    assert_eq!(read_all(&fc, &stale.file), want);
    let reopened = FileContents::open(&keys, &stale.file, 32 + 5000).unwrap();
    assert_eq!(read_all(&reopened, &stale.file), want);
}
