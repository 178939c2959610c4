//! Symlink targets are bound to their entry (directory IV and backing
//! name), so renaming a symlink re-creates it under the new name. These
//! tests pin down what rename(2) still promises through a real mount: the
//! target, the inode number (while the kernel remembers it), owner and
//! times survive; `RENAME_NOREPLACE` and replacing an existing entry work;
//! nothing temporary is left in the backing directory; the result reads
//! back after a remount. Hard links to symlinks are refused (`EPERM`).

use kmsfs_e2e::fuse::TestFs;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;

/// Every entry of the backing directory tree whose name marks it temporary.
fn temporaries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).expect("read backing dir") {
        let e = e.expect("entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("kmsfs.tmp.") {
            out.push(name.clone());
        }
        if e.file_type().expect("type").is_dir() {
            out.extend(temporaries(&e.path()));
        }
    }
    out
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    let f = CString::new(from.as_os_str().as_bytes()).expect("path");
    let t = CString::new(to.as_os_str().as_bytes()).expect("path");
    // SAFETY: two valid C strings; AT_FDCWD directories.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_times(p: &Path, atime: i64, mtime: i64) {
    let c = CString::new(p.as_os_str().as_bytes()).expect("path");
    let ts = [
        libc::timespec {
            tv_sec: atime,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
    ];
    // SAFETY: a valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat: {}", std::io::Error::last_os_error());
}

#[test]
fn a_renamed_symlink_keeps_target_inode_owner_and_times() {
    let s = TestFs::fresh();
    let long = "L".repeat(200);
    s.with_mount(|p| {
        fs::create_dir(p.join("d")).expect("mkdir");
        symlink("../some/target", p.join("a")).expect("symlink");
        std::os::unix::fs::lchown(p.join("a"), Some(1234), Some(5678)).expect("lchown");
        set_times(&p.join("a"), 1_000_000, 2_000_000);
        let before = fs::symlink_metadata(p.join("a")).expect("lstat");

        // Same directory, then into another directory under a long name.
        fs::rename(p.join("a"), p.join("b")).expect("rename");
        assert!(fs::symlink_metadata(p.join("a")).is_err());
        let after = fs::symlink_metadata(p.join("b")).expect("lstat b");
        assert_eq!(after.ino(), before.ino(), "rename changed the inode number");
        assert_eq!((after.uid(), after.gid()), (1234, 5678));
        assert_eq!((after.atime(), after.mtime()), (1_000_000, 2_000_000));
        assert_eq!(after.len(), before.len());
        assert_eq!(
            fs::read_link(p.join("b")).expect("readlink b"),
            Path::new("../some/target")
        );
        fs::rename(p.join("b"), p.join("d").join(&long)).expect("rename into d");
        let moved = fs::symlink_metadata(p.join("d").join(&long)).expect("lstat");
        assert_eq!(moved.ino(), before.ino());
        assert_eq!(
            fs::read_link(p.join("d").join(&long)).expect("readlink"),
            Path::new("../some/target")
        );
        // A rename onto itself changes nothing.
        fs::rename(p.join("d").join(&long), p.join("d").join(&long)).expect("self");
        assert_eq!(
            fs::read_link(p.join("d").join(&long)).expect("readlink"),
            Path::new("../some/target")
        );
    });
    assert_eq!(temporaries(&s.cipher), Vec::<String>::new());
    // The re-created entry is what is on disk: it reads back after a remount.
    s.with_mount(|p| {
        assert_eq!(
            fs::read_link(p.join("d").join(&long)).expect("readlink after remount"),
            Path::new("../some/target")
        );
        assert!(fs::symlink_metadata(p.join("b")).is_err());
    });
}

#[test]
fn a_symlink_renamed_over_an_entry_replaces_it_and_noreplace_refuses() {
    let s = TestFs::fresh();
    s.with_mount(|p| {
        symlink("first", p.join("l1")).expect("l1");
        symlink("second", p.join("l2")).expect("l2");
        fs::write(p.join("file"), b"data").expect("file");
        fs::create_dir(p.join("dir")).expect("dir");

        // RENAME_NOREPLACE onto an existing name: EEXIST, both unchanged.
        let e =
            renameat2(&p.join("l1"), &p.join("l2"), libc::RENAME_NOREPLACE).expect_err("noreplace");
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(fs::read_link(p.join("l1")).expect("l1"), Path::new("first"));
        assert_eq!(
            fs::read_link(p.join("l2")).expect("l2"),
            Path::new("second")
        );
        // RENAME_EXCHANGE of symlinks would re-create two entries at once.
        let e =
            renameat2(&p.join("l1"), &p.join("l2"), libc::RENAME_EXCHANGE).expect_err("exchange");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        // Over a directory: EISDIR, as anywhere.
        let e = fs::rename(p.join("l1"), p.join("dir")).expect_err("over dir");
        assert_eq!(e.raw_os_error(), Some(libc::EISDIR));

        // Plain rename replaces a symlink and a regular file.
        fs::rename(p.join("l1"), p.join("l2")).expect("over l2");
        assert_eq!(fs::read_link(p.join("l2")).expect("l2"), Path::new("first"));
        fs::rename(p.join("l2"), p.join("file")).expect("over file");
        assert_eq!(
            fs::read_link(p.join("file")).expect("file"),
            Path::new("first")
        );
        let mut names: Vec<_> = fs::read_dir(p)
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["dir", "file"]);

        // A second name for a symlink is refused; for a file it works.
        let e = fs::hard_link(p.join("file"), p.join("again")).expect_err("link");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let e = fs::hard_link(p.join("file"), p.join("dir")).expect_err("link onto dir");
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        fs::write(p.join("regular"), b"x").expect("regular");
        fs::hard_link(p.join("regular"), p.join("regular2")).expect("file link");
    });
    assert_eq!(temporaries(&s.cipher), Vec::<String>::new());
}

#[test]
fn many_symlink_renames_keep_every_target_and_inode_unique() {
    // A renamed symlink keeps its number while its old backing inode
    // number may be reused by a new entry: the two must never share one.
    let s = TestFs::fresh();
    s.with_mount(|p| {
        let mut seen = std::collections::HashMap::new();
        for i in 0..200 {
            let a = p.join(format!("s{i}"));
            symlink(format!("target-{i}"), &a).expect("symlink");
            fs::rename(&a, p.join(format!("r{i}"))).expect("rename");
            // New entries that may take the freed backing inode numbers.
            fs::write(p.join(format!("f{i}")), b"x").expect("file");
        }
        for e in fs::read_dir(p).expect("ls") {
            let e = e.expect("entry");
            let m = fs::symlink_metadata(e.path()).expect("lstat");
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(other) = seen.insert(m.ino(), name.clone()) {
                panic!("{name} and {other} share inode number {}", m.ino());
            }
            if let Some(i) = name.strip_prefix('r') {
                assert_eq!(
                    fs::read_link(e.path()).expect("readlink"),
                    Path::new(&format!("target-{i}"))
                );
            }
        }
        assert_eq!(seen.len(), 400);
    });
}
