//! Fault injection under the contents layer: a backing file that fails on
//! the N-th call, for every N an operation makes. A failing write may first
//! have written a page-aligned prefix, as a real one does (the kernel copies
//! page by page and stops at an error or a fatal signal).
//!
//! Two models: a transient fault (only call N fails, later calls work, so
//! the layer can undo what it did) and a crash (call N and every later call
//! fail: the disk keeps what the first N−1 calls and the prefix did).

mod common;

use common::MemFile;
use kmsfs_core::contents::{Backing, FileContents, FILE_HEADER_LEN, UNIT_SIZE};
use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_core::units::{last_unit_start, unit_bounds, TINY_LIMIT};
use proptest::prelude::*;
use std::cell::{Cell, RefCell};
use std::io;

fn keys() -> FsKeys {
    FsKeys::derive(&MasterKey::generate().unwrap(), &[4; 16])
}

/// A backing file that fails the `fail_at`-th call (counting from 1), and
/// every later one too when `crash` is set.
struct Faulty {
    file: MemFile,
    calls: Cell<u64>,
    fail_at: Cell<u64>,
    crash: bool,
    /// Which page boundary inside a failing write ends its written prefix
    /// (taken modulo the number of boundaries + 1; 0 writes nothing).
    prefix_pick: usize,
    errno: i32,
}

impl Faulty {
    fn new(bytes: Vec<u8>, fail_at: u64, crash: bool, prefix_pick: usize, errno: i32) -> Self {
        Faulty {
            file: MemFile(RefCell::new(bytes)),
            calls: Cell::new(0),
            fail_at: Cell::new(fail_at),
            crash,
            prefix_pick,
            errno,
        }
    }

    /// Counts a call; true if it must fail.
    fn fails(&self) -> bool {
        let n = self.calls.get() + 1;
        self.calls.set(n);
        let at = self.fail_at.get();
        at > 0 && (n == at || (self.crash && n > at))
    }

    fn err(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

impl Backing for Faulty {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if self.fails() {
            return Err(self.err());
        }
        self.file.read_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if !self.fails() {
            return self.file.write_all_at(buf, off);
        }
        if self.calls.get() == self.fail_at.get() {
            let end = off + buf.len() as u64;
            let bounds: Vec<u64> = (off / UNIT_SIZE + 1..)
                .map(|p| p * UNIT_SIZE)
                .take_while(|&b| b < end)
                .collect();
            let pick = self.prefix_pick % (bounds.len() + 1);
            if pick > 0 {
                let cut = bounds[pick - 1];
                self.file.write_all_at(&buf[..(cut - off) as usize], off)?;
            }
        }
        Err(self.err())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.fails() {
            return Err(self.err());
        }
        self.file.set_len(len)
    }
    fn file_len(&self) -> io::Result<u64> {
        if self.fails() {
            return Err(self.err());
        }
        self.file.file_len()
    }
    fn allocate(&self, _off: u64, _len: u64) -> io::Result<()> {
        if self.fails() {
            return Err(self.err());
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Truncate(u64),
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1)
        .collect()
}

/// The plaintext after `op` on `model`.
fn apply_model(model: &[u8], op: &Op) -> Vec<u8> {
    let mut m = model.to_vec();
    match *op {
        Op::Write { off, len, seed } => {
            if len > 0 {
                let end = off as usize + len;
                if m.len() < end {
                    m.resize(end, 0);
                }
                m[off as usize..end].copy_from_slice(&pattern(len, seed));
            }
        }
        Op::Truncate(n) => m.resize(n as usize, 0),
    }
    m
}

fn run<B: Backing>(fc: &mut FileContents, keys: &FsKeys, b: &B, op: &Op) -> Result<(), String> {
    match *op {
        Op::Write { off, len, seed } => fc.write_at(keys, b, off, &pattern(len, seed)),
        Op::Truncate(n) => fc.set_len(keys, b, n),
    }
    .map_err(|e| e.to_string())
}

fn read_all<B: Backing>(fc: &FileContents, b: &B) -> Vec<u8> {
    let mut out = vec![0u8; fc.size() as usize];
    let n = fc.read_at(b, 0, &mut out).unwrap();
    assert_eq!(n as u64, fc.size());
    out
}

/// Opens the backing bytes afresh and reads the whole file.
fn reopen(keys: &FsKeys, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let f = MemFile(RefCell::new(bytes.to_vec()));
    let fc = FileContents::open(keys, &f, bytes.len() as u64).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; fc.size() as usize];
    let n = fc.read_at(&f, 0, &mut out).map_err(|e| e.to_string())?;
    out.truncate(n);
    Ok(out)
}

/// Every byte reads as before or as written; returns a description of the
/// first byte that does not.
fn bad_byte(got: &[u8], old: &[u8], new: &[u8]) -> Option<String> {
    got.iter().enumerate().find_map(|(i, &g)| {
        let ok = old.get(i) == Some(&g) || new.get(i) == Some(&g);
        (!ok).then(|| {
            format!(
                "byte {i} is {g:#04x}, before {:?}, written {:?}",
                old.get(i),
                new.get(i)
            )
        })
    })
}

/// True when the last unit of a file of `size` bytes spans two backing
/// pages (a merged final unit).
fn last_unit_straddles(size: u64) -> bool {
    size >= TINY_LIMIT
        && (FILE_HEADER_LEN + last_unit_start(size)) / UNIT_SIZE
            != (FILE_HEADER_LEN + size - 1) / UNIT_SIZE
}

/// The cases docs/format.md names as not crash-atomic: a merged final
/// unit, and a shrink whose new last unit must be re-encrypted.
fn crash_exception(old: u64, new: u64) -> bool {
    let shrink_reencrypts = new < old && new >= TINY_LIMIT && old >= TINY_LIMIT && {
        let a = last_unit_start(new);
        (unit_bounds(old, a).0, unit_bounds(old, a).1) != (a, new)
    };
    last_unit_straddles(old) || last_unit_straddles(new) || shrink_reencrypts
}

fn check_op(keys: &FsKeys, setup: &[Op], op: &Op, prefix_pick: usize, crash: bool) {
    // Build the starting state with a backing that never fails.
    let base = MemFile::default();
    let mut fc = FileContents::open(keys, &base, 0).unwrap();
    let mut old = Vec::new();
    for s in setup {
        run(&mut fc, keys, &base, s).unwrap();
        old = apply_model(&old, s);
    }
    assert_eq!(read_all(&fc, &base), old);
    let start = base.0.borrow().clone();
    let new = apply_model(&old, op);

    // Count the calls the operation makes when nothing fails.
    let dry = Faulty::new(start.clone(), 0, false, 0, libc::EIO);
    let mut dfc = FileContents::open(keys, &dry, start.len() as u64).unwrap();
    dry.calls.set(0);
    run(&mut dfc, keys, &dry, op).unwrap();
    assert_eq!(read_all(&dfc, &dry.file), new);
    let calls = dry.calls.get();

    for n in 1..=calls {
        for errno in [libc::ENOSPC, libc::EFBIG] {
            let f = Faulty::new(start.clone(), 0, crash, prefix_pick, errno);
            let mut fc = FileContents::open(keys, &f, start.len() as u64).unwrap();
            f.calls.set(0);
            f.fail_at.set(n);
            let r = run(&mut fc, keys, &f, op);
            assert!(
                r.is_err(),
                "call {n} of {calls} failed but {op:?} succeeded"
            );
            let disk = f.file.0.borrow().clone();
            let ctx = format!("{op:?} after {setup:?}, call {n}/{calls} fails, crash {crash}");
            if crash {
                if crash_exception(old.len() as u64, new.len() as u64) {
                    continue;
                }
                let got = reopen(keys, &disk).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let (lo, hi) = (old.len().min(new.len()), old.len().max(new.len()));
                assert!((lo..=hi).contains(&got.len()), "{ctx}: size {}", got.len());
                if let Some(b) = bad_byte(&got, &old, &new) {
                    panic!("{ctx}: {b}");
                }
                continue;
            }
            let got = reopen(keys, &disk).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert!(
                got.len() == old.len() || got.len() == new.len(),
                "{ctx}: size {} is neither {} nor {}",
                got.len(),
                old.len(),
                new.len()
            );
            if let Some(b) = bad_byte(&got, &old, &new) {
                panic!("{ctx}: {b}");
            }
            // Memory agrees with the disk, and the file keeps working.
            assert_eq!(fc.size(), got.len() as u64, "{ctx}: in-memory size");
            assert_eq!(read_all(&fc, &f.file), got, "{ctx}: in-memory view");
            fc.write_at(keys, &f, 3, b"after").unwrap();
            let mut want = got.clone();
            if want.len() < 8 {
                want.resize(8, 0);
            }
            want[3..8].copy_from_slice(b"after");
            assert_eq!(read_all(&fc, &f.file), want, "{ctx}: write after the error");
            assert_eq!(reopen(keys, &f.file.0.borrow()).unwrap(), want, "{ctx}");
        }
    }
}

/// Sizes on and around every boundary: tiny, unit 0's end (4064), page
/// ends, merged remainders.
fn edge_size() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![
        0u64, 1, 5, 15, 16, 17, 40, 4063, 4064, 4065, 4078, 4079, 4080, 5000, 8159, 8160, 8161,
        8175, 8176, 9000, 12256, 12270,
    ])
}

fn op() -> impl Strategy<Value = Op> {
    let max = 3 * UNIT_SIZE + 40;
    prop_oneof![
        3 => (0..max, 0usize..(2 * UNIT_SIZE as usize + 20), any::<u8>())
            .prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        // Whole 16-byte blocks and kernel pages: overwrites in place.
        2 => (0..max / 16, 1usize..(2 * UNIT_SIZE as usize / 16), any::<u8>())
            .prop_map(|(b, n, seed)| Op::Write { off: b * 16, len: n * 16, seed }),
        1 => (0..3u64, any::<u8>())
            .prop_map(|(p, seed)| Op::Write { off: p * UNIT_SIZE, len: UNIT_SIZE as usize, seed }),
        1 => (edge_size(), 1usize..20, any::<u8>())
            .prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        // Sparse writes far past the end.
        1 => (5 * UNIT_SIZE..9 * UNIT_SIZE, 1usize..5000, any::<u8>())
            .prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        1 => (0..max).prop_map(Op::Truncate),
        2 => edge_size().prop_map(Op::Truncate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn a_failed_operation_never_garbles_old_data(
        setup in prop::collection::vec(op(), 0..4),
        last in op(),
        prefix_pick in 0usize..4,
    ) {
        check_op(&keys(), &setup, &last, prefix_pick, false);
    }

    #[test]
    fn a_crash_part_way_leaves_old_or_new_bytes(
        setup in prop::collection::vec(op(), 0..4),
        last in op(),
        prefix_pick in 0usize..4,
    ) {
        check_op(&keys(), &setup, &last, prefix_pick, true);
    }
}

/// Every transition named in the brief, each from every edge size, with
/// every call failing in turn (deterministic, beyond proptest's sampling).
#[test]
fn every_transition_from_every_edge_size() {
    let keys = keys();
    let sizes = [0u64, 5, 15, 16, 40, 4064, 4070, 5000, 8160, 8170, 9000];
    for &from in &sizes {
        let setup = [Op::Write {
            off: 0,
            len: from as usize,
            seed: 7,
        }];
        let mut ops: Vec<Op> = sizes.iter().map(|&to| Op::Truncate(to)).collect();
        ops.push(Op::Truncate(40 * UNIT_SIZE + 9));
        ops.push(Op::Write {
            off: 2,
            len: 3,
            seed: 1,
        });
        ops.push(Op::Write {
            off: 4000,
            len: 200,
            seed: 2,
        });
        ops.push(Op::Write {
            off: from,
            len: 10,
            seed: 3,
        });
        ops.push(Op::Write {
            off: 20 * UNIT_SIZE,
            len: 5000,
            seed: 4,
        });
        for op in &ops {
            for pick in 0..3 {
                check_op(&keys, &setup, op, pick, false);
                check_op(&keys, &setup, op, pick, true);
            }
        }
    }
}
