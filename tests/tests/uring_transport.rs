//! FUSE over io_uring: with the kernel's `fuse.enable_uring` on, a mount
//! serves its requests over per-CPU rings, and everything reads back as
//! written (large writes and reads fill the payload buffers, listings and
//! names travel in them too); without `uring` a mount stays on /dev/fuse. Its
//! own test binary with one test: the module parameter is global, so no
//! other test may mount while it is flipped.

use kmsfs_e2e::fuse::{MountGuard, TestFs};
use kmsfs_fuse::{uring_requests, MountSettings};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Sets the module parameter and puts the old value back on drop, also
/// when an assertion fails.
struct UringParam(String);

impl UringParam {
    fn set(on: bool) -> Option<UringParam> {
        let old = fs::read_to_string(PARAM).ok()?;
        fs::write(PARAM, if on { "1" } else { "0" }).unwrap();
        Some(UringParam(old.trim().to_string()))
    }
}

impl Drop for UringParam {
    fn drop(&mut self) {
        let old = if self.0 == "Y" { "1" } else { "0" };
        let _ = fs::write(PARAM, old);
    }
}

/// Log lines written while mounting (the kernel's INIT is answered on the
/// mounting thread).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Mounts, returning the guard and what the mount logged.
fn mount_logged(s: &TestFs, settings: &MountSettings) -> (MountGuard, String) {
    let cap = Captured::default();
    let writer = cap.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let m = tracing::subscriber::with_default(subscriber, || {
        MountGuard::mount_with(&s.cipher, &s.plain, &s.master, settings).unwrap()
    });
    let log = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
    (m, log)
}

const NOT_OFFERED: &str = "the kernel does not offer FUSE over io_uring";

/// A mixed workload; panics on any wrong byte or listing.
fn workload(root: &Path) {
    // Writes and reads of several MiB: 1 MiB requests fill the payload.
    let big: Vec<u8> = (0..5u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(root.join("big"), &big).unwrap();
    assert_eq!(fs::read(root.join("big")).unwrap(), big);
    // An unaligned overwrite through one descriptor.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("big"))
        .unwrap();
    f.seek(SeekFrom::Start(4093)).unwrap();
    f.write_all(&[0xAB; 9000]).unwrap();
    f.sync_all().unwrap();
    let mut back = vec![0; 9000];
    f.seek(SeekFrom::Start(4093)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert_eq!(back, vec![0xAB; 9000]);
    drop(f);
    // Names and listings (READDIRPLUS replies travel in the payload).
    fs::create_dir(root.join("d")).unwrap();
    for i in 0..300 {
        fs::write(
            root.join("d")
                .join(format!("file-{i:04}-{}", "n".repeat(i % 200))),
            i.to_string(),
        )
        .unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(root.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 300);
    for (i, name) in names.iter().enumerate() {
        assert_eq!(name, &format!("file-{i:04}-{}", "n".repeat(i % 200)));
        assert_eq!(
            fs::read_to_string(root.join("d").join(name)).unwrap(),
            i.to_string()
        );
    }
    fs::rename(root.join("d").join(&names[7]), root.join("moved")).unwrap();
    std::os::unix::fs::symlink("moved", root.join("link")).unwrap();
    assert_eq!(fs::read_to_string(root.join("link")).unwrap(), "7");
    // Errors travel back too.
    assert_eq!(
        fs::read(root.join("missing")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    fs::remove_dir_all(root.join("d")).unwrap();
    assert!(!root.join("d").exists());
}

#[test]
fn requests_travel_over_io_uring_when_the_kernel_offers_it() {
    let Some(param) = UringParam::set(true) else {
        eprintln!("{PARAM} is missing: this kernel has no FUSE over io_uring; nothing to test");
        return;
    };
    let s = TestFs::fresh();
    let settings = MountSettings {
        threads: 4,
        uring: true,
        ..Default::default()
    };

    let (m, log) = mount_logged(&s, &settings);
    assert!(!log.contains(NOT_OFFERED), "{log}");
    let before = uring_requests();
    workload(&s.plain);
    let over_ring = uring_requests() - before;
    m.unmount().unwrap();
    eprintln!("io_uring: {over_ring} requests over the rings");
    // 300 creates, 300 reads, 6 MiB of data and more: far over 1,000.
    assert!(over_ring > 1000, "only {over_ring} requests over io_uring");

    // What was written over the rings reads back over /dev/fuse.
    let no_ring = MountSettings {
        uring: false,
        ..settings.clone()
    };
    let m = MountGuard::mount_with(&s.cipher, &s.plain, &s.master, &no_ring).unwrap();
    let before = uring_requests();
    assert_eq!(fs::read_to_string(s.plain.join("moved")).unwrap(), "7");
    let big = fs::read(s.plain.join("big")).unwrap();
    assert_eq!(big.len(), 5 << 20);
    assert_eq!(&big[4093..4093 + 9000], &[0xAB; 9000][..]);
    fs::remove_file(s.plain.join("big")).unwrap();
    fs::remove_file(s.plain.join("moved")).unwrap();
    fs::remove_file(s.plain.join("link")).unwrap();
    workload(&s.plain);
    assert_eq!(
        uring_requests(),
        before,
        "a mount without uring used the rings"
    );
    m.unmount().unwrap();

    // With the parameter off the kernel does not offer it: /dev/fuse, and
    // the mount says why.
    drop(param);
    let _off = UringParam::set(false);
    let (m, log) = mount_logged(&s, &settings);
    assert!(log.contains(NOT_OFFERED), "no warning in: {log}");
    let before = uring_requests();
    assert_eq!(fs::read_to_string(s.plain.join("moved")).unwrap(), "7");
    assert_eq!(uring_requests(), before, "rings used with enable_uring off");
    m.unmount().unwrap();
}
