//! Extended attributes and POSIX ACLs on a real mount: the attr and acl
//! tools, cp/tar/rsync, enforcement for another user, what the backing
//! store holds, and tampering with it.

use kmsfs_e2e::fuse::{fresh_cipherdir, MountGuard, TestFs, Tmpfs};
use kmsfs_fuse::MountSettings;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sh(script: &str, dir: &Path) -> String {
    let out = run(Command::new("sh").arg("-c").arg(script).current_dir(dir));
    String::from_utf8(out.stdout).unwrap()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// `getxattr(path, name)` with a buffer of `size`: the length or the errno.
fn getx(path: &Path, name: &str, size: usize) -> Result<Vec<u8>, i32> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    // SAFETY: valid C strings and a buffer of `size` bytes (null when 0).
    let r = unsafe {
        libc::getxattr(
            c(path).as_ptr(),
            n.as_ptr(),
            if size == 0 {
                std::ptr::null_mut()
            } else {
                buf.as_mut_ptr().cast()
            },
            size,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(if size == 0 { 0 } else { r as usize });
    if size == 0 {
        buf = vec![0; r as usize];
    }
    Ok(buf)
}

fn setx(path: &Path, name: &[u8], value: &[u8], flags: i32) -> Result<(), i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a value valid for its length.
    let r = unsafe {
        libc::setxattr(
            c(path).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    Ok(())
}

fn lsetx(path: &Path, name: &str, value: &[u8]) -> Result<(), i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: as in `setx`.
    let r = unsafe {
        libc::lsetxattr(
            c(path).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    Ok(())
}

/// Every backing attribute (name, value) of one backing path.
fn backing_attrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: a valid C string and a buffer of its length.
    let n = unsafe { libc::llistxattr(c(path).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    buf.truncate(n as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let name = String::from_utf8(s.to_vec()).unwrap();
            let value = getx(path, &name, 1 << 17).unwrap();
            (name, value)
        })
        .collect()
}

/// Every backing path under `dir` (recursively).
fn backing_paths(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            backing_paths(&e.path(), out);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for ch in data.chunks(3) {
        let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= ch.len() {
                s.push(T[(v >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A 255-byte name and a 64 KiB value through setfattr/getfattr, on a
/// tmpfs backing store (ext4 keeps all of a file's attributes in one 4 KiB
/// block); flags, size probes and limits; kept across a remount; nothing
/// of the name or value in the backing store.
#[test]
fn largest_name_and_value_round_trip_and_backing_holds_no_plaintext() {
    let s = TestFs::fresh();
    let _store = Tmpfs::mount(&s.cipher, "64m");
    fresh_cipherdir(&s.cipher).unwrap();
    let name = format!("user.{}", "N".repeat(250));
    assert_eq!(name.len(), 255);
    let value: Vec<u8> = (0..65536u32)
        .map(|i| b"SECRETVALUE"[i as usize % 11] ^ (i >> 11) as u8)
        .collect();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    let f = s.plain.join("file");
    let d = s.plain.join("dir");
    fs::write(&f, b"contents").unwrap();
    fs::create_dir(&d).unwrap();
    let dump = s.tmp.path().join("restore");
    fs::write(
        &dump,
        format!(
            "# file: file\n{name}=0s{}\n\n# file: dir\nuser.dirattr=\"on a directory\"\n\n",
            base64(&value)
        ),
    )
    .unwrap();
    run(Command::new("setfattr")
        .arg(format!("--restore={}", dump.display()))
        .current_dir(&s.plain));
    run(Command::new("setfattr")
        .args(["-n", "user.small", "-v", "SECRETSMALL"])
        .arg(&f));
    let got = run(Command::new("getfattr")
        .args(["--only-values", "-n", &name])
        .arg(&f))
    .stdout;
    assert!(got == value, "64 KiB value changed on the way back");

    // Size probe, ERANGE, flags, limits (the kernel checks the last two).
    assert_eq!(getx(&f, &name, 0).map(|v| v.len()), Ok(65536));
    assert_eq!(getx(&f, "user.small", 4), Err(libc::ERANGE));
    assert_eq!(getx(&f, "user.none", 64), Err(libc::ENODATA));
    assert_eq!(
        setx(&f, b"user.small", b"x", libc::XATTR_CREATE),
        Err(libc::EEXIST)
    );
    assert_eq!(
        setx(&f, b"user.none", b"x", libc::XATTR_REPLACE),
        Err(libc::ENODATA)
    );
    setx(&f, b"user.small", b"SECRETREPLACED", libc::XATTR_REPLACE).unwrap();
    assert_eq!(setx(&f, b"user.big", &vec![0; 65537], 0), Err(libc::E2BIG));
    assert_eq!(
        setx(&f, format!("user.{}", "x".repeat(251)).as_bytes(), b"v", 0),
        Err(libc::ERANGE)
    );
    assert_eq!(setx(&f, b"system.other", b"v", 0), Err(libc::EOPNOTSUPP));
    // A big value replaced by a small one, then removed: no part left over.
    setx(&f, b"user.shrinks", &value, 0).unwrap();
    setx(&f, b"user.shrinks", b"small now", 0).unwrap();
    assert_eq!(getx(&f, "user.shrinks", 64).unwrap(), b"small now");
    run(Command::new("setfattr")
        .args(["-x", "user.shrinks"])
        .arg(&f));
    assert_eq!(getx(&f, "user.shrinks", 64), Err(libc::ENODATA));
    m.unmount().unwrap();

    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    let listed = sh("getfattr -d -m - --absolute-names file dir", &s.plain);
    assert!(listed.contains("user.small=\"SECRETREPLACED\""), "{listed}");
    assert!(
        listed.contains("user.dirattr=\"on a directory\""),
        "{listed}"
    );
    assert!(listed.contains(&name), "{listed}");
    assert!(!listed.contains("user.shrinks"), "{listed}");
    assert_eq!(getx(&f, &name, 1 << 17).unwrap(), value);
    m.unmount().unwrap();

    let mut paths = vec![s.cipher.clone()];
    backing_paths(&s.cipher, &mut paths);
    let mut total = 0;
    for p in &paths {
        for (n, v) in backing_attrs(p) {
            total += 1;
            assert!(n.starts_with("user.kmsfs."), "{n}");
            for secret in [&b"NNNNNNNN"[..], b"small", b"dirattr", b"shrinks"] {
                assert!(!contains(n.as_bytes(), secret), "{n}");
            }
            for secret in [&b"SECRET"[..], b"on a directory", &value[..64]] {
                assert!(!contains(&v, secret), "plaintext in backing attribute {n}");
            }
        }
    }
    // file: id, two attributes, the big one in two parts; dir: id, one.
    assert_eq!(total, 6);
}

/// `cp -a`, `tar --xattrs --acls` and `rsync -aXA` of a tree with
/// attributes and ACLs give identical `getfattr -d -m -` and `getfacl -R`.
#[test]
fn copies_keep_attributes_and_acls() {
    let s = TestFs::fresh();
    let m = acl_mount(&s);
    let tree = s.plain.join("tree");
    fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    fs::write(tree.join("a"), b"a").unwrap();
    fs::write(tree.join("sub/b"), b"b").unwrap();
    std::os::unix::fs::symlink("a", tree.join("link")).unwrap();
    sh(
        "setfattr -n user.colour -v blue a && setfattr -n user.size -v 0x00ff00 sub/b \
         && setfattr -n trusted.t -v root-only sub && setfattr -n security.s -v sec sub/deeper \
         && setfacl -m u:nobody:rw,g:daemon:r a && setfacl -d -m u:nobody:rx sub \
         && touch sub/inherits && mkdir sub/inherits-dir",
        &tree,
    );
    let dump = |dir: &str| {
        sh(
            "L() { find . ! -type l | LC_ALL=C sort; } && \
             L | xargs -d '\\n' getfattr -h -d -m - && L | xargs -d '\\n' getfacl -p",
            &s.plain.join(dir),
        )
    };
    let original = dump("tree");
    assert!(original.contains("user.colour=\"blue\""), "{original}");
    assert!(original.contains("trusted.t=\"root-only\""), "{original}");
    assert!(original.contains("user:nobody:rw-"), "{original}");
    assert!(original.contains("default:user:nobody:r-x"), "{original}");
    // The default ACL was inherited by the file and directory made in sub.
    let inherited = sh("getfacl -p sub/inherits sub/inherits-dir", &tree);
    assert!(inherited.contains("user:nobody:r-x"), "{inherited}");
    assert!(inherited.contains("default:user:nobody:r-x"), "{inherited}");

    sh("cp -a tree cp-copy", &s.plain);
    assert_eq!(dump("cp-copy"), original);
    sh(
        "mkdir tar-copy && tar --xattrs --xattrs-include='*' --acls -C tree -cf - . \
         | tar --xattrs --xattrs-include='*' --acls -C tar-copy -xf -",
        &s.plain,
    );
    assert_eq!(dump("tar-copy"), original);
    if have("rsync") {
        sh("rsync -aXA tree/ rsync-copy/", &s.plain);
        assert_eq!(dump("rsync-copy"), original);
    }
    m.unmount().unwrap();
}

fn allow_other_mount(s: &TestFs) -> MountGuard {
    fs::set_permissions(s.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let settings = MountSettings {
        allow_other: true,
        posix_acl: true,
        threads: 4,
        ..Default::default()
    };
    MountGuard::mount_with(&s.cipher, &s.plain, &s.master, &settings).unwrap()
}

/// A mount with ACLs (`-o acl`) for the mounting user only.
fn acl_mount(s: &TestFs) -> MountGuard {
    let settings = MountSettings {
        posix_acl: true,
        threads: 4,
        ..Default::default()
    };
    MountGuard::mount_with(&s.cipher, &s.plain, &s.master, &settings).unwrap()
}

/// Runs `script` as nobody; whether it succeeded.
fn as_nobody(script: &str, dir: &Path) -> bool {
    Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .current_dir(dir)
        .output()
        .expect("setpriv")
        .status
        .success()
}

/// The kernel enforces ACLs for another user (`allow_other`), a chmod
/// moves the ACL mask, default ACLs are inherited past the umask.
#[test]
fn acls_are_enforced_for_another_user() {
    let s = TestFs::fresh();
    let m = allow_other_mount(&s);
    let p = &s.plain;
    sh(
        "echo granted > granted && echo denied > denied && chmod 600 granted denied \
         && setfacl -m u:nobody:r granted",
        p,
    );
    assert!(as_nobody("cat granted", p));
    assert!(!as_nobody("cat denied", p));
    assert!(!as_nobody("echo x >> granted", p), "read-only grant");
    // chmod g-r moves the mask: the named entry loses its read right.
    sh("chmod 600 granted", p);
    let acl = sh("getfacl -p granted", p);
    assert!(acl.contains("mask::---"), "{acl}");
    assert!(!as_nobody("cat granted", p), "the mask now denies");
    sh("chmod 640 granted", p);
    assert!(as_nobody("cat granted", p));
    // Removing the ACL takes the grant away.
    sh("setfacl -b granted && chmod 640 granted", p);
    assert!(!as_nobody("cat granted", p));
    // Default ACL: inherited by what root makes under umask 077.
    sh(
        "mkdir shared && chmod 700 shared && setfacl -m u:nobody:rwx shared \
        && setfacl -d -m u:nobody:rwx shared \
        && (umask 077 && echo new > shared/made && mkdir shared/subdir)",
        p,
    );
    let acl = sh("getfacl -p shared/made shared/subdir", p);
    assert!(acl.contains("user:nobody:rwx"), "{acl}");
    assert!(as_nobody(
        "cat shared/made && echo more >> shared/made && touch shared/subdir/x",
        p
    ));
    // Without a default ACL the umask applies.
    sh("(umask 077 && echo y > masked)", p);
    assert_eq!(
        fs::metadata(p.join("masked")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    m.unmount().unwrap();
}

/// `FUSE_HANDLE_KILLPRIV_V2`: a write by another user clears
/// set-user-ID (and set-group-ID with group execute) and the file
/// capability; root's write keeps them.
#[test]
fn writes_by_another_user_clear_setuid_and_capabilities() {
    let s = TestFs::fresh();
    let m = allow_other_mount(&s);
    let p = &s.plain;
    // A version-2 capability set: cap_net_raw permitted.
    let cap = "0x0000000200200000000000000000000000000000";
    sh(
        &format!(
            "echo x > suid && chmod 4777 suid && echo x > sgid && chmod 2777 sgid \
             && echo x > rootw && chmod 6777 rootw && echo x > caps && chmod 777 caps \
             && setfattr -n security.capability -v {cap} caps && echo more >> rootw"
        ),
        p,
    );
    let mode = |n: &str| fs::metadata(p.join(n)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("rootw"), 0o6777, "root (CAP_FSETID) keeps the bits");
    assert!(as_nobody(
        "echo y >> suid && echo y >> sgid && echo y >> caps",
        p
    ));
    assert_eq!(mode("suid"), 0o777);
    assert_eq!(mode("sgid"), 0o777);
    assert_eq!(
        getx(&p.join("caps"), "security.capability", 64),
        Err(libc::ENODATA)
    );
    // Truncation by another user clears them too.
    sh("chmod 4777 suid", p);
    assert!(as_nobody("truncate -s 1 suid", p));
    assert_eq!(mode("suid"), 0o777);
    m.unmount().unwrap();
}

/// Symlinks carry no attributes; a backing store without extended
/// attributes (ramfs) reads as having none and refuses to store with
/// `ENOTSUP`.
#[test]
fn symlinks_and_stores_without_xattrs() {
    let s = TestFs::fresh();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    std::os::unix::fs::symlink("target", s.plain.join("link")).unwrap();
    assert_eq!(
        lsetx(&s.plain.join("link"), "trusted.x", b"v"),
        Err(libc::EPERM)
    );
    let listed = sh("getfattr -h -d -m - link", &s.plain);
    assert!(listed.trim().is_empty(), "{listed}");
    m.unmount().unwrap();

    let r = TestFs::fresh();
    let st = Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&r.cipher)
        .status()
        .unwrap();
    assert!(st.success());
    let _umount = Unmount(r.cipher.clone());
    fresh_cipherdir(&r.cipher).unwrap();
    let m = MountGuard::mount(&r.cipher, &r.plain, &r.master).unwrap();
    let f = r.plain.join("f");
    fs::write(&f, b"x").unwrap();
    assert_eq!(setx(&f, b"user.a", b"v", 0), Err(libc::EOPNOTSUPP));
    assert_eq!(getx(&f, "user.a", 64), Err(libc::ENODATA));
    assert!(sh("getfattr -d -m - f", &r.plain).trim().is_empty());
    // Files stay usable, ACL permission checks included.
    assert_eq!(fs::read(&f).unwrap(), b"x");
    m.unmount().unwrap();
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The backing entry of the only file in the backing root.
fn only_backing_file(cipher: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(cipher)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().contains('.'))
        .collect();
    v.sort();
    v
}

fn entry_attrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    backing_attrs(p)
        .into_iter()
        .filter(|(n, _)| n.starts_with("user.kmsfs.x."))
        .collect()
}

/// A backing attribute that is damaged, moved to another name or another
/// file, or planted, is detected: reading it gives EIO, listings leave it
/// out, the others still work.
#[test]
fn tampered_moved_and_planted_backing_attributes_are_detected() {
    let s = TestFs::fresh();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    fs::write(s.plain.join("f"), b"f").unwrap();
    setx(&s.plain.join("f"), b"user.a", b"value a", 0).unwrap();
    setx(&s.plain.join("f"), b"user.b", b"value b", 0).unwrap();
    m.unmount().unwrap();
    let files = only_backing_file(&s.cipher);
    assert_eq!(files.len(), 1);
    let f = &files[0];
    let attrs = entry_attrs(f);
    assert_eq!(attrs.len(), 2);

    let read = |name: &str| {
        let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
        let got = getx(&s.plain.join("f"), name, 64);
        let listed = sh("getfattr -d -m - f", &s.plain);
        m.unmount().unwrap();
        (got, listed)
    };
    // Swap the two values: each now sits under the other's name.
    setx(f, attrs[0].0.as_bytes(), &attrs[1].1, 0).unwrap();
    setx(f, attrs[1].0.as_bytes(), &attrs[0].1, 0).unwrap();
    let (a, listed) = read("user.a");
    assert_eq!(a, Err(libc::EIO));
    assert!(
        !listed.contains("user.a") && !listed.contains("user.b"),
        "{listed}"
    );
    // Put them back, then flip one byte of one.
    setx(f, attrs[0].0.as_bytes(), &attrs[0].1, 0).unwrap();
    setx(f, attrs[1].0.as_bytes(), &attrs[1].1, 0).unwrap();
    assert_eq!(read("user.a").0.as_deref(), Ok(&b"value a"[..]));
    let mut bad = attrs[0].1.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    setx(f, attrs[0].0.as_bytes(), &bad, 0).unwrap();
    let (a, b) = (read("user.a").0, read("user.b").0);
    assert!(
        (a == Err(libc::EIO)) != (b == Err(libc::EIO)) && (a.is_ok() || b.is_ok()),
        "exactly the damaged one fails: {a:?} {b:?}"
    );
    setx(f, attrs[0].0.as_bytes(), &attrs[0].1, 0).unwrap();

    // Moved to another file, with its name kept: the other file's id
    // differs, so even its own name for user.a does not open it.
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    fs::write(s.plain.join("g"), b"g").unwrap();
    setx(&s.plain.join("g"), b"user.a", b"g's own", 0).unwrap();
    m.unmount().unwrap();
    let g = only_backing_file(&s.cipher)
        .into_iter()
        .find(|p| p != f)
        .unwrap();
    let g_attrs = entry_attrs(&g);
    assert_eq!(g_attrs.len(), 1);
    setx(&g, g_attrs[0].0.as_bytes(), &attrs[0].1, 0).unwrap();
    setx(&g, attrs[1].0.as_bytes(), &attrs[1].1, 0).unwrap();
    // A planted attribute in kmsfs's namespace, and one outside it.
    setx(&g, b"user.kmsfs.x.planted", b"junk", 0).unwrap();
    setx(&g, b"user.plain", b"visible?", 0).unwrap();
    let m = MountGuard::mount(&s.cipher, &s.plain, &s.master).unwrap();
    assert_eq!(getx(&s.plain.join("g"), "user.a", 64), Err(libc::EIO));
    assert_eq!(
        getx(&s.plain.join("g"), "user.plain", 64),
        Err(libc::ENODATA)
    );
    let listed = sh("getfattr -d -m - g", &s.plain);
    assert!(listed.trim().is_empty(), "{listed}");
    // The damage stays in its attribute: it can be replaced.
    setx(&s.plain.join("g"), b"user.a", b"fresh", 0).unwrap();
    assert_eq!(getx(&s.plain.join("g"), "user.a", 64).unwrap(), b"fresh");
    m.unmount().unwrap();
}
