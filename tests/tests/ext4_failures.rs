//! Failed size changes on a real ext4 filesystem through a kmsfs mount: the
//! error comes back and the file is byte-identical after a remount; and
//! ext4's reuse of inode numbers, which tmpfs never shows.
//!
//! Each test makes a small ext4 image, loop-mounts it (unmounted by a guard,
//! after the kmsfs mount above it), and puts the backing directory there.

use kmsfs_core::keys::MasterKey;
use kmsfs_e2e::fuse::{force_unmount, fresh_cipherdir, is_mounted, MountGuard, Rng};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;

/// A loop-mounted ext4 image; unmounted on drop.
struct Ext4 {
    dir: PathBuf,
    _tmp: TempDir,
}

impl Ext4 {
    fn new(size: &str) -> Ext4 {
        let tmp = tempfile::tempdir().expect("tempdir");
        let img = tmp.path().join("img");
        let dir = tmp.path().join("ext4");
        fs::create_dir(&dir).expect("mount dir");
        run("truncate", &["-s", size, img.to_str().expect("utf-8")]);
        run("mkfs.ext4", &["-q", img.to_str().expect("utf-8")]);
        run(
            "mount",
            &[
                "-o",
                "loop",
                img.to_str().expect("utf-8"),
                dir.to_str().expect("utf-8"),
            ],
        );
        Ext4 { dir, _tmp: tmp }
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg(&self.dir).status();
        }
        force_unmount(&self.dir);
    }
}

fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(st.success(), "{cmd} {args:?} failed: {st}");
}

/// A kmsfs backing directory on `ext4` and a mountpoint beside the image.
fn dirs(ext4: &Ext4) -> (PathBuf, PathBuf) {
    let cipher = ext4.dir.join("cipher");
    fs::create_dir(&cipher).expect("cipher dir");
    fresh_cipherdir(&cipher).expect("dir iv");
    let plain = ext4._tmp.path().join("plain");
    fs::create_dir(&plain).expect("mountpoint");
    (cipher, plain)
}

fn remount_and_read(cipher: &Path, plain: &Path, master: &MasterKey, name: &str) -> Vec<u8> {
    let m = MountGuard::mount(cipher, plain, master).expect("remount");
    let data = fs::read(plain.join(name)).expect("read after remount");
    m.unmount().expect("unmount");
    data
}

#[test]
fn truncate_past_the_ext4_size_limit_fails_with_efbig_and_keeps_the_file() {
    let ext4 = Ext4::new("64M");
    let (cipher, plain) = dirs(&ext4);
    let master = MasterKey::generate().expect("key");
    let data = Rng::new(5).bytes(5000);
    let m = MountGuard::mount(&cipher, &plain, &master).expect("mount");
    let path = plain.join("f");
    fs::write(&path, &data).expect("write");
    // ext4 with 4 KiB blocks stops at 16 TiB.
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    let err = f.set_len(17 << 40).expect_err("truncate -s 17T must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    drop(f);
    assert_eq!(fs::metadata(&path).expect("stat").len(), 5000);
    same(&fs::read(&path).expect("read"), &data);
    m.unmount().expect("unmount");
    same(&remount_and_read(&cipher, &plain, &master, "f"), &data);
}

#[test]
fn growing_on_a_full_ext4_fails_with_enospc_and_keeps_the_file() {
    let ext4 = Ext4::new("32M");
    let (cipher, plain) = dirs(&ext4);
    let master = MasterKey::generate().expect("key");
    // A size whose last unit is partial, so growing must re-encrypt it.
    let data = Rng::new(6).bytes(3 * 4096 + 700);
    let m = MountGuard::mount(&cipher, &plain, &master).expect("mount");
    let path = plain.join("f");
    fs::write(&path, &data).expect("write");
    // Fill the disk through the mount.
    let mut filler = fs::File::create(plain.join("filler")).expect("filler");
    let chunk = vec![0x5au8; 1 << 20];
    let mut full = false;
    for _ in 0..64 {
        if filler
            .write_all(&chunk)
            .and_then(|()| filler.sync_all())
            .is_err()
        {
            full = true;
            break;
        }
    }
    assert!(full, "a 32 MiB ext4 never filled up");
    // Growing needs new blocks: truncate up within the same unit, then a
    // sparse write far past the end.
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    let grow_err = f
        .write_all_at_end(&data.len(), &vec![1u8; 64 << 10])
        .expect_err("writing past the end of a full disk must fail");
    assert_eq!(grow_err.raw_os_error(), Some(libc::ENOSPC), "{grow_err}");
    drop(f);
    // (The kernel's writeback cache may still show the unflushed bytes in
    // this mount; what counts is what reached the disk.)
    drop(filler);
    m.unmount().expect("unmount");
    same(&remount_and_read(&cipher, &plain, &master, "f"), &data);
}

/// Asserts byte identity, naming the first differing byte.
fn same(got: &[u8], want: &[u8]) {
    let diff = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        got.len() == want.len() && diff.is_none(),
        "file differs: length {} (want {}), first differing byte {diff:?}",
        got.len(),
        want.len()
    );
}

/// Appends `buf` at `at` and syncs (the writeback cache reports a full disk
/// at the latest when the data is flushed).
trait WriteAt {
    fn write_all_at_end(&self, at: &usize, buf: &[u8]) -> std::io::Result<()>;
}

impl WriteAt for fs::File {
    fn write_all_at_end(&self, at: &usize, buf: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, *at as u64)?;
        self.sync_all()
    }
}

/// The regular files directly in `cipher` (no `kmsfs.*` metadata).
fn backing_files(cipher: &Path) -> Vec<(PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(cipher)
        .expect("read_dir")
        .map(|e| e.expect("entry"))
        .filter(|e| !e.file_name().to_string_lossy().starts_with("kmsfs."))
        .filter(|e| e.file_type().expect("type").is_file())
        .map(|e| (e.path(), e.metadata().expect("stat").ino()))
        .collect()
}

/// ext4 gives a deleted file's inode number to the next new file at once.
/// A number the kernel still holds for the old file (here: deleted behind
/// the mount's back while its dentry is cached) must not be handed out for
/// the new one: the new file reads its own bytes and takes new times, where
/// it got the old file's node and `ESTALE` ("Stale file handle", seen from
/// `tar` untarring into a mount where a tree had just been removed).
#[test]
fn a_reused_backing_inode_number_is_a_new_file() {
    use std::os::unix::fs::MetadataExt;
    let ext4 = Ext4::new("32M");
    let (cipher, plain) = dirs(&ext4);
    let master = MasterKey::generate().expect("key");
    let mut reused = 0;
    for round in 0..5u8 {
        let old = plain.join(format!("old{round}"));
        let m = MountGuard::mount(&cipher, &plain, &master).expect("mount");
        fs::write(&old, vec![b'o'; 5000]).expect("write old");
        m.unmount().expect("unmount");
        // A fresh mount that has only looked the old file up holds no
        // descriptor of it, so deleting it frees its inode number.
        let m = MountGuard::mount(&cipher, &plain, &master).expect("mount");
        let old_ino = fs::metadata(&old).expect("stat old").ino();
        let files = backing_files(&cipher);
        assert_eq!(files.len(), 1, "{files:?}");
        let (backing, backing_ino) = files[0].clone();
        fs::remove_file(&backing).expect("delete behind the mount");
        let new = plain.join(format!("new{round}"));
        let want = vec![b'n' + round; 3000];
        fs::write(&new, &want).expect("write new");
        let files = backing_files(&cipher);
        assert_eq!(files.len(), 1, "{files:?}");
        if files[0].1 == backing_ino {
            reused += 1;
        }
        assert_eq!(fs::read(&new).expect("read new"), want, "round {round}");
        let st = fs::metadata(&new).expect("stat new");
        assert_eq!(st.len(), 3000);
        assert_ne!(
            st.ino(),
            old_ino,
            "round {round}: the new file took the old one's number"
        );
        let f = OpenOptions::new().write(true).open(&new).expect("open new");
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        f.set_modified(t).expect("set the new file's mtime");
        drop(f);
        assert_eq!(
            fs::metadata(&new)
                .expect("stat new")
                .modified()
                .expect("mtime"),
            t
        );
        fs::remove_file(&new).expect("remove new");
        m.unmount().expect("unmount");
    }
    assert!(
        reused > 0,
        "ext4 never reused an inode number: nothing was tested"
    );
}
