//! The FUSE driver on a real mount (no KMS: keys are made in the test).

use kmsfs_core::keys::MasterKey;
use kmsfs_e2e::fuse::{fresh_cipherdir, MountGuard, Rng, TestFs, Tmpfs};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

fn setup() -> TestFs {
    TestFs::fresh()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    Rng::new(seed + 1).bytes(len)
}

/// Every backing file name and file body, to look for leaked plaintext.
fn backing_dump(dir: &Path, names: &mut Vec<String>, bodies: &mut Vec<Vec<u8>>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        names.push(e.file_name().to_string_lossy().into_owned());
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            backing_dump(&e.path(), names, bodies);
        } else if ft.is_file() {
            bodies.push(fs::read(e.path()).unwrap());
        } else if ft.is_symlink() {
            bodies.push(
                fs::read_link(e.path())
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes(),
            );
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn sizes_survive_remount_and_backing_holds_only_ciphertext() {
    let s = setup();
    let sizes = [0usize, 1, 15, 16, 17, 4095, 4096, 4097, (1 << 20) + 3];
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        let mut data = pattern(n, i as u64);
        if n >= 32 {
            data[..32].copy_from_slice(b"PLAINTEXT-MARKER-0123456789abcde");
        }
        fs::write(s.plain.join(format!("secret-file-{n}")), &data).unwrap();
    }
    m.unmount().unwrap();

    let mut names = Vec::new();
    let mut bodies = Vec::new();
    backing_dump(&s.cipher, &mut names, &mut bodies);
    assert!(names.iter().all(|n| !n.contains("secret")), "{names:?}");
    assert!(bodies.iter().all(|b| !contains(b, b"PLAINTEXT-MARKER")));

    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        let mut want = pattern(n, i as u64);
        if n >= 32 {
            want[..32].copy_from_slice(b"PLAINTEXT-MARKER-0123456789abcde");
        }
        let p = s.plain.join(format!("secret-file-{n}"));
        assert_eq!(fs::metadata(&p).unwrap().len(), n as u64);
        assert_eq!(fs::read(&p).unwrap(), want, "size {n}");
    }
    m.unmount().unwrap();
}

#[test]
fn a_different_key_does_not_read_the_data() {
    let s = setup();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    fs::write(s.plain.join("f"), b"hello world, this is a test").unwrap();
    m.unmount().unwrap();
    let other = MasterKey::generate().unwrap();
    let m = MountGuard::mount(&s.cipher, &s.plain, &other).unwrap();
    // Names fail authentication under the wrong key: the entry is not visible.
    assert!(fs::read(s.plain.join("f")).is_err());
    assert_eq!(fs::read_dir(&s.plain).unwrap().count(), 0);
    m.unmount().unwrap();
}

#[test]
fn random_overwrites_and_truncates_match_a_model() {
    let s = setup();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    let path = s.plain.join("model");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let mut model: Vec<u8> = Vec::new();
    let mut rng = Rng::new(0x5eed_0001);
    for step in 0..3000 {
        match rng.below(10) {
            0 => {
                let n = rng.below(70_000);
                f.set_len(n).unwrap();
                model.resize(n as usize, 0);
            }
            1..=6 => {
                let off = rng.below(66_000);
                let len = rng.below(9000) as usize;
                let data = rng.bytes(len);
                f.write_all_at(&data, off).unwrap();
                if len > 0 {
                    let end = off as usize + len;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].copy_from_slice(&data);
                }
            }
            _ => {
                let off = rng.below(70_000);
                let len = rng.below(10_000) as usize;
                let mut buf = vec![0u8; len];
                let n = f.read_at(&mut buf, off).unwrap();
                let want = model.get(off as usize..).unwrap_or(&[]);
                let want = &want[..want.len().min(len)];
                assert_eq!(&buf[..n], want, "step {step}: read {off}+{len}");
            }
        }
    }
    drop(f);
    assert_eq!(fs::read(&path).unwrap(), model);
    m.unmount().unwrap();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    assert_eq!(fs::read(&path).unwrap(), model);
    m.unmount().unwrap();
}

#[test]
fn names_links_renames_and_directories() {
    let s = setup();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    let p = &s.plain;
    let long = "L".repeat(255);
    let uni = "naïve-日本-🦀";
    fs::create_dir_all(p.join("a/b/c")).unwrap();
    fs::create_dir(p.join("d")).unwrap();
    fs::write(p.join("a/b/c").join(&long), b"long name").unwrap();
    fs::write(p.join(uni), b"unicode").unwrap();
    // 255-byte names in both directions of a rename, across directories.
    fs::rename(p.join("a/b/c").join(&long), p.join("d").join(&long)).unwrap();
    assert_eq!(fs::read(p.join("d").join(&long)).unwrap(), b"long name");
    assert!(!p.join("a/b/c").join(&long).exists());
    fs::rename(p.join("d").join(&long), p.join("d/short")).unwrap();
    fs::rename(p.join("d/short"), p.join("a").join(&long)).unwrap();
    // Replace semantics.
    fs::write(p.join("d/x"), b"old").unwrap();
    fs::write(p.join("d/y"), b"new").unwrap();
    fs::rename(p.join("d/y"), p.join("d/x")).unwrap();
    assert_eq!(fs::read(p.join("d/x")).unwrap(), b"new");
    // Hard links share contents and link counts.
    fs::hard_link(p.join("d/x"), p.join("a/b/hard")).unwrap();
    assert_eq!(fs::metadata(p.join("d/x")).unwrap().nlink(), 2);
    OpenOptions::new()
        .append(true)
        .open(p.join("a/b/hard"))
        .unwrap()
        .write_all(b"+appended")
        .unwrap();
    assert_eq!(fs::read(p.join("d/x")).unwrap(), b"new+appended");
    assert_eq!(
        fs::metadata(p.join("d/x")).unwrap().ino(),
        fs::metadata(p.join("a/b/hard")).unwrap().ino()
    );
    // Symlinks, relative and absolute-looking, plus a 255-byte link name.
    std::os::unix::fs::symlink("../d/x", p.join("a/rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target/path", p.join(&long)).unwrap();
    assert_eq!(
        fs::read_link(p.join("a/rel")).unwrap().to_str(),
        Some("../d/x")
    );
    assert_eq!(fs::read(p.join("a/rel")).unwrap(), b"new+appended");
    assert_eq!(fs::symlink_metadata(p.join("a/rel")).unwrap().len(), 6);
    assert_eq!(
        fs::read_link(p.join(&long)).unwrap().to_str(),
        Some("/nonexistent/target/path")
    );
    // Directory listing shows exactly the plaintext names.
    let mut listed: Vec<String> = fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    let mut want = vec![
        "a".to_string(),
        "d".to_string(),
        uni.to_string(),
        long.clone(),
    ];
    want.sort();
    assert_eq!(listed, want);
    // rmdir: refuses non-empty, removes empty.
    assert!(fs::remove_dir(p.join("a/b")).is_err());
    fs::remove_dir(p.join("a/b/c")).unwrap();
    assert!(!p.join("a/b/c").exists());
    // Inode numbers are stable across a remount.
    let ino = fs::metadata(p.join("d/x")).unwrap().ino();
    m.unmount().unwrap();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    assert_eq!(fs::metadata(p.join("d/x")).unwrap().ino(), ino);
    assert_eq!(fs::read(p.join("a").join(&long)).unwrap(), b"long name");
    m.unmount().unwrap();
    let mut names = Vec::new();
    backing_dump(&s.cipher, &mut names, &mut Vec::new());
    assert!(names
        .iter()
        .all(|n| !n.contains("hard") && !n.contains("LLLL")));
}

#[test]
fn ten_thousand_entries() {
    let s = setup();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    let d = s.plain.join("many");
    fs::create_dir(&d).unwrap();
    for i in 0..10_000 {
        File::create(d.join(format!("entry-{i:05}"))).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 10_000);
    assert_eq!(names[0], "entry-00000");
    assert_eq!(names[9999], "entry-09999");
    m.unmount().unwrap();
}

#[test]
fn truncate_extend_and_sparse_files() {
    let s = setup();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    let p = s.plain.join("sparse");
    let mut f = File::create(&p).unwrap();
    f.write_all(b"0123456789abcdefXYZ").unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(b"end").unwrap();
    drop(f);
    let mut got = Vec::new();
    File::open(&p).unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), (1 << 20) + 3);
    assert_eq!(&got[..19], b"0123456789abcdefXYZ");
    assert!(got[19..1 << 20].iter().all(|&b| b == 0));
    assert_eq!(&got[1 << 20..], b"end");
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(10).unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"0123456789");
    // O_TRUNC
    fs::write(&p, b"x").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"x");
    m.unmount().unwrap();
}

#[test]
fn a_full_disk_returns_enospc_and_damages_nothing() {
    full_disk(false);
}

#[test]
fn without_writeback_the_write_itself_reports_enospc() {
    full_disk(true);
}

fn full_disk(no_writeback: bool) {
    let settings = kmsfs_fuse::MountSettings {
        threads: 4,
        no_writeback,
        ..Default::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("small");
    fs::create_dir(&backing).unwrap();
    let _tmpfs = Tmpfs::mount(&backing, "4m");
    let cipher = backing.join("cipher");
    let plain = tmp.path().join("plain");
    fs::create_dir(&cipher).unwrap();
    fs::create_dir(&plain).unwrap();
    fresh_cipherdir(&cipher).unwrap();
    let master = MasterKey::generate().unwrap();
    let m = MountGuard::mount_with(&cipher, &plain, &master, &settings).unwrap();

    // A file whose last unit is partial: growing it re-encrypts that unit.
    let keep = pattern(1_000_100, 42);
    fs::write(plain.join("keep"), &keep).unwrap();
    // Fill the disk through another file until it refuses even one byte.
    // With the writeback cache the error may surface at fsync rather than
    // at write, as on other page-cached filesystems: check both.
    let mut filler = File::create(plain.join("filler")).unwrap();
    for size in [256 * 1024, 4096, 512, 16, 1] {
        let chunk = vec![0x5au8; size];
        let mut refused = None;
        for _ in 0..200 {
            let written = if no_writeback {
                // Every write reaches the daemon: the write itself fails.
                filler.write_all(&chunk)
            } else {
                filler.write_all(&chunk).and_then(|_| filler.sync_all())
            };
            if let Err(e) = written {
                refused = Some(e);
                break;
            }
        }
        let err = refused.expect("a 4 MiB disk never filled up");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    }
    drop(filler);
    // Appending to the partial-unit file fails cleanly too.
    let mut f = OpenOptions::new()
        .append(true)
        .open(plain.join("keep"))
        .unwrap();
    let err = f
        .write_all(&vec![1u8; 1 << 20])
        .and_then(|_| f.sync_all())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(f);
    // Read from the daemon, not the kernel's page cache.
    fs::write("/proc/sys/vm/drop_caches", "3\n").unwrap();
    let check = |got: Vec<u8>| {
        // A short write before ENOSPC is allowed; damage to what was there is not.
        assert!(got.len() >= keep.len());
        assert!(got[..keep.len()] == keep[..], "existing data was damaged");
        // Pages the kernel could write back before the disk filled are
        // there; pages it could not are not. Nothing else is.
        assert!(got[keep.len()..].iter().all(|&b| b == 1), "foreign data");
    };
    check(fs::read(plain.join("keep")).unwrap());
    m.unmount().unwrap();
    // After a remount too.
    let m = MountGuard::mount_with(&cipher, &plain, &master, &settings).unwrap();
    check(fs::read(plain.join("keep")).unwrap());
    m.unmount().unwrap();
}

#[test]
fn rename_exchange_and_noreplace() {
    let s = setup();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    let a = s.plain.join("a");
    let b = s.plain.join("b".repeat(200));
    fs::write(&a, b"AAA").unwrap();
    fs::write(&b, b"BBB").unwrap();
    let ca = std::ffi::CString::new(a.as_os_str().as_encoded_bytes()).unwrap();
    let cb = std::ffi::CString::new(b.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(fs::read(&a).unwrap(), b"BBB");
    assert_eq!(fs::read(&b).unwrap(), b"AAA");
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    m.unmount().unwrap();
    // The long name survives the exchange (its sidecar stayed).
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    assert_eq!(fs::read(&b).unwrap(), b"AAA");
    m.unmount().unwrap();
}
