//! What an attacker who can write the backing directory achieves against
//! file contents, entries and symlinks, as `docs/threat-model.md` states
//! it. Most changes to file contents and whole entries are NOT detected
//! (symlink targets are: they are bound to their entry): the tests pin down exactly
//! what a reader then sees, so the document cannot claim more (and must
//! change when detection is added).
//!
//! Real FUSE mounts of the driver (no KMS: keys are made in the test).

use kmsfs_core::keys::FsKeys;
use kmsfs_core::layout::read_dir_iv;
use kmsfs_core::names::encrypt_name;
use kmsfs_e2e::fuse::{Rng, TestFs, TEST_UUID};
use std::fs::{self, File};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Bytes before the first data unit in a backing file.
const FILE_HEADER: usize = 32;
/// Units sit on backing pages: unit 0 is plaintext [0, 4064), unit i ≥ 1
/// is backing page i, plaintext [4096·i − 32, 4096·i + 4064).
const UNIT: usize = 4096;
/// Plaintext end of unit 0.
const UNIT0_END: usize = UNIT - FILE_HEADER;

fn setup() -> TestFs {
    TestFs::fresh()
}

/// The backing path of `name` in the backing directory `dir`.
fn backing(s: &TestFs, dir: &Path, name: &str) -> PathBuf {
    let keys = FsKeys::derive(&s.master, &TEST_UUID);
    let iv = read_dir_iv(File::open(dir).expect("open dir").as_fd()).expect("iv");
    let enc = encrypt_name(&keys, &iv, name.as_bytes()).expect("encrypt name");
    dir.join(enc.backing_name())
}

fn edit(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = fs::read(path).expect("read backing file");
    f(&mut b);
    fs::write(path, b).expect("write backing file");
}

#[test]
fn a_zeroed_unit_reads_as_zeros_and_a_changed_unit_as_other_bytes() {
    let s = setup();
    let data = Rng::new(5).bytes(3 * UNIT);
    s.with_mount(|p| fs::write(p.join("f"), &data).expect("write"));
    let f = backing(&s, &s.cipher, "f");

    // Zeroed ciphertext is a hole: unit 1 reads as zeros, without an error.
    edit(&f, |b| b[UNIT..2 * UNIT].fill(0));
    let back = s.with_mount(|p| fs::read(p.join("f")).expect("read"));
    assert_eq!(&back[UNIT0_END..UNIT0_END + UNIT], &[0u8; UNIT][..]);
    assert_eq!(&back[..UNIT0_END], &data[..UNIT0_END]);
    assert_eq!(&back[UNIT0_END + UNIT..], &data[UNIT0_END + UNIT..]);

    // One flipped ciphertext bit: the 16-byte XTS block holding it (bytes
    // 96..112 of unit 0) reads as other bytes, the rest as before; no error.
    edit(&f, |b| b[FILE_HEADER + 100] ^= 0x01);
    let back = s.with_mount(|p| fs::read(p.join("f")).expect("read"));
    assert_ne!(&back[96..112], &data[96..112]);
    assert_eq!(&back[..96], &data[..96]);
    assert_eq!(&back[112..UNIT0_END], &data[112..UNIT0_END]);
    assert_eq!(&back[UNIT0_END + UNIT..], &data[UNIT0_END + UNIT..]);
}

#[test]
fn a_bit_flip_in_a_tiny_file_flips_the_same_plaintext_bit() {
    let s = setup();
    s.with_mount(|p| fs::write(p.join("pin"), b"secret").expect("write"));
    edit(&backing(&s, &s.cipher, "pin"), |b| b[FILE_HEADER] ^= 0x01);
    let back = s.with_mount(|p| fs::read(p.join("pin")).expect("read"));
    assert_eq!(back, b"recret", "1..15-byte files are a keystream XOR");
}

#[test]
fn whole_files_can_be_swapped_rolled_back_or_truncated() {
    let s = setup();
    let big = Rng::new(9).bytes(3 * UNIT);
    s.with_mount(|p| {
        fs::write(p.join("a"), b"contents of file a").expect("a");
        fs::write(p.join("b"), b"contents of file b, longer").expect("b");
        fs::write(p.join("big"), &big).expect("big");
    });
    let (a, b, bigp) = (
        backing(&s, &s.cipher, "a"),
        backing(&s, &s.cipher, "b"),
        backing(&s, &s.cipher, "big"),
    );
    let old_a = fs::read(&a).expect("old a");
    s.with_mount(|p| fs::write(p.join("a"), b"new contents of file a").expect("a"));

    // Swap a's and b's backing bytes; put back an old version of a; cut
    // big at a unit boundary.
    let (now_a, now_b) = (fs::read(&a).expect("a"), fs::read(&b).expect("b"));
    fs::write(&a, &now_b).expect("swap");
    fs::write(&b, &now_a).expect("swap");
    let (a_read, b_read) = s.with_mount(|p| {
        (
            fs::read(p.join("a")).expect("a"),
            fs::read(p.join("b")).expect("b"),
        )
    });
    assert_eq!(a_read, b"contents of file b, longer");
    assert_eq!(b_read, b"new contents of file a");

    fs::write(&a, &old_a).expect("roll back");
    fs::OpenOptions::new()
        .write(true)
        .open(&bigp)
        .expect("open")
        .set_len(UNIT as u64)
        .expect("truncate");
    let (a_read, big_read) = s.with_mount(|p| {
        (
            fs::read(p.join("a")).expect("a"),
            fs::read(p.join("big")).expect("big"),
        )
    });
    assert_eq!(a_read, b"contents of file a");
    assert_eq!(big_read, &big[..UNIT0_END]);
}

#[test]
fn entries_swapped_in_a_directory_are_not_detected_moved_ones_vanish() {
    let s = setup();
    s.with_mount(|p| {
        fs::write(p.join("x"), b"x's data").expect("x");
        fs::write(p.join("y"), b"y's data").expect("y");
        fs::create_dir(p.join("d")).expect("d");
    });
    let (x, y) = (backing(&s, &s.cipher, "x"), backing(&s, &s.cipher, "y"));
    let tmp = s.cipher.join("swap.tmp");
    fs::rename(&x, &tmp).expect("rename");
    fs::rename(&y, &x).expect("rename");
    fs::rename(&tmp, &y).expect("rename");
    let (xr, yr) = s.with_mount(|p| {
        (
            fs::read(p.join("x")).expect("x"),
            fs::read(p.join("y")).expect("y"),
        )
    });
    assert_eq!(
        (xr.as_slice(), yr.as_slice()),
        (&b"y's data"[..], &b"x's data"[..])
    );

    // Moved into another directory, its name no longer decrypts (the
    // directory IV is associated data): it is not shown there.
    let d = backing(&s, &s.cipher, "d");
    fs::rename(&x, d.join(x.file_name().expect("name"))).expect("move");
    let (listed, root_has_x) = s.with_mount(|p| {
        (
            fs::read_dir(p.join("d")).expect("list d").count(),
            p.join("x").exists(),
        )
    });
    assert_eq!(listed, 0);
    assert!(!root_has_x);
}

#[test]
fn a_symlink_target_swapped_or_moved_to_another_entry_reads_as_an_error() {
    let s = setup();
    s.with_mount(|p| {
        std::os::unix::fs::symlink("/target/one", p.join("l1")).expect("l1");
        std::os::unix::fs::symlink("/target/two", p.join("l2")).expect("l2");
        fs::create_dir(p.join("d")).expect("mkdir");
        std::os::unix::fs::symlink("/target/three", p.join("d/l1")).expect("d/l1");
    });
    let (l1, l2) = (backing(&s, &s.cipher, "l1"), backing(&s, &s.cipher, "l2"));
    let d = backing(&s, &s.cipher, "d");
    let dl1 = backing(&s, &d, "l1");
    let (t1, t2) = (
        fs::read_link(&l1).expect("t1"),
        fs::read_link(&l2).expect("t2"),
    );
    // Swap the two targets in one directory, and give d/l1 the root l1's
    // target (same plaintext name, other directory).
    for (link, target) in [(&l1, &t2), (&l2, &t1), (&dl1, &t1)] {
        fs::remove_file(link).expect("rm");
        std::os::unix::fs::symlink(target, link).expect("plant");
    }
    s.with_mount(|p| {
        for name in ["l1", "l2", "d/l1"] {
            let e = fs::read_link(p.join(name)).expect_err(name);
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
        }
    });
    // Put back, they read as before: the error came from the binding.
    for (link, target) in [(&l1, &t1), (&l2, &t2)] {
        fs::remove_file(link).expect("rm");
        std::os::unix::fs::symlink(target, link).expect("restore");
    }
    let (r1, r2) = s.with_mount(|p| {
        (
            fs::read_link(p.join("l1")).expect("l1"),
            fs::read_link(p.join("l2")).expect("l2"),
        )
    });
    assert_eq!(r1, Path::new("/target/one"));
    assert_eq!(r2, Path::new("/target/two"));
}
