//! `kmsfs mount` / `umount` / `mount.kmsfs` end to end: a real OpenBao dev
//! server, the real binary, real FUSE mounts. Every mount is undone by a
//! guard even when an assertion fails.

use kmsfs_e2e::bao::reserve_port_pair;
use kmsfs_e2e::cli::{kmsfs_bin, CliEnv, Kmsfs};
use kmsfs_e2e::fuse::{daemon_pids, force_unmount, is_mounted, CliMountGuard, Rng, TcpProxy};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn all_backing_bytes(dir: &Path, out: &mut Vec<u8>) {
    for e in fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        out.extend_from_slice(e.file_name().as_encoded_bytes());
        if p.is_dir() {
            all_backing_bytes(&p, out);
        } else if let Ok(b) = fs::read(&p) {
            out.extend_from_slice(&b);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_write_read_survives_kms_outage_and_unmounts() {
    let mut env = CliEnv::new().await;
    let (cipher, plain) = env.create("main").await;
    let _guard = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &[]).await.ok();
    assert!(
        is_mounted(&plain),
        "mount returned before the mount was live"
    );
    fs::write(
        plain.join("diary-secret.txt"),
        b"TOP-SECRET-PLAINTEXT payload",
    )
    .unwrap();
    fs::create_dir(plain.join("photos-secret")).unwrap();
    assert_eq!(
        fs::read(plain.join("diary-secret.txt")).unwrap(),
        b"TOP-SECRET-PLAINTEXT payload"
    );
    let mut backing = Vec::new();
    all_backing_bytes(&cipher, &mut backing);
    assert!(
        !contains(&backing, b"TOP-SECRET"),
        "plaintext in backing dir"
    );
    assert!(
        !contains(&backing, b"secret"),
        "plaintext name in backing dir"
    );

    // The KMS goes away: the live mount does not need it.
    drop(env.server.take());
    fs::write(plain.join("after-outage"), vec![7u8; 100_000]).unwrap();
    assert_eq!(
        fs::read(plain.join("after-outage")).unwrap(),
        vec![7u8; 100_000]
    );

    let pids = daemon_pids(&plain);
    assert_eq!(pids.len(), 1, "one daemon serves the mount");
    env.kmsfs
        .run_async(&["umount", plain.to_str().unwrap()])
        .await
        .ok();
    assert!(!is_mounted(&plain));
    // The daemon exits after the unmount (and with it the key).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon_pids(&plain).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon_pids(&plain).is_empty(), "daemon still running");
}

#[tokio::test(flavor = "multi_thread")]
async fn kms_down_at_mount_fails_clearly_after_the_timeout() {
    let mut env = CliEnv::new().await;
    let (cipher, plain) = env.create("down").await;
    let _guard = CliMountGuard(plain.clone());
    drop(env.server.take());
    let start = Instant::now();
    let run = env
        .mount(&cipher, &plain, &["--kms-timeout", "3"])
        .await
        .failed();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "gave up too early: {took:?}"
    );
    assert!(took < Duration::from_secs(30), "took too long: {took:?}");
    assert!(run.stderr.contains("unreachable"), "{}", run.stderr);
    assert!(
        run.stderr.contains(cipher.to_str().unwrap()),
        "{}",
        run.stderr
    );
    assert!(!is_mounted(&plain), "half-mounted after a failure");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kms_that_comes_up_late_is_waited_for() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("late").await;
    let _guard = CliMountGuard(plain.clone());
    // A second configuration whose address is a relay that starts later.
    let port = reserve_port_pair().unwrap();
    let late_cfg = env.path("late/kms.toml");
    let late = Kmsfs::new(&late_cfg);
    late.run_async(&[
        "kms",
        "set",
        "vault",
        &format!("http://127.0.0.1:{port}"),
        "kmsfs",
        "--token-file",
        env.token_file.to_str().unwrap(),
        "--skip-kms-test",
    ])
    .await
    .ok();
    let mut child = Command::new(kmsfs_bin())
        .arg("--config")
        .arg(&late_cfg)
        .args(["mount", "--kms-timeout", "60"])
        .arg(&cipher)
        .arg(&plain)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(child.try_wait().unwrap().is_none(), "mount gave up early");
    let target = env
        .server
        .as_ref()
        .unwrap()
        .addr()
        .trim_start_matches("http://")
        .to_string();
    let _proxy = TcpProxy::start(&format!("127.0.0.1:{port}"), &target).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(is_mounted(&plain));
    fs::write(plain.join("x"), b"late but fine").unwrap();
    assert_eq!(fs::read(plain.join("x")).unwrap(), b"late but fine");
    force_unmount(&plain);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_header_is_refused() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("tamper").await;
    let _guard = CliMountGuard(plain.clone());
    let hdr = cipher.join("kmsfs.header");
    let mut bytes = fs::read(&hdr).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&hdr, &bytes).unwrap();
    let run = env
        .mount(&cipher, &plain, &["--kms-timeout", "2"])
        .await
        .failed();
    assert!(run.stderr.contains("kmsfs.header"), "{}", run.stderr);
    assert!(run.stderr.contains("checksum"), "{}", run.stderr);
    assert!(!is_mounted(&plain));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_filesystems_mounted_at_once() {
    let env = CliEnv::new().await;
    let (c1, p1) = env.create("one").await;
    let (c2, p2) = env.create("two").await;
    let _g1 = CliMountGuard(p1.clone());
    let _g2 = CliMountGuard(p2.clone());
    env.mount(&c1, &p1, &[]).await.ok();
    env.mount(&c2, &p2, &[]).await.ok();
    fs::write(p1.join("same-name"), b"first").unwrap();
    fs::write(p2.join("same-name"), b"second").unwrap();
    assert_eq!(fs::read(p1.join("same-name")).unwrap(), b"first");
    assert_eq!(fs::read(p2.join("same-name")).unwrap(), b"second");
    // Each mount gets its own 1 MiB readahead window (the kernel's default
    // for FUSE is 128 KiB).
    for p in [&p1, &p2] {
        assert_eq!(readahead_kb(p), 1024, "readahead of {}", p.display());
    }
    // Mounting twice on the same place is refused.
    env.mount(&c1, &p1, &[]).await.failed();
    for p in [&p1, &p2] {
        env.kmsfs
            .run_async(&["umount", p.to_str().unwrap()])
            .await
            .ok();
    }
}

/// `kmsfs umount` waits a moment for a mount that is busy only because a
/// process is just letting go of it, and fails clearly, naming the way
/// out, for files that stay open.
#[tokio::test(flavor = "multi_thread")]
async fn umount_waits_briefly_for_files_being_closed_and_refuses_open_ones() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("busy").await;
    let _g = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &[]).await.ok();
    let f = plain.join("f");
    fs::write(&f, b"held").unwrap();
    let hold = |secs: &str| {
        let mut c = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec 3<'{}'; echo held; exec sleep {secs}",
                f.display()
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the file is open.
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(c.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "held");
        c
    };
    // Held for good: refused, with the mount left as it was.
    let mut holder = hold("600");
    let r = env
        .kmsfs
        .run_async(&["umount", plain.to_str().unwrap()])
        .await
        .failed();
    assert!(r.stderr.contains("is busy"), "{}", r.stderr);
    assert!(r.stderr.contains("fuser -vm"), "{}", r.stderr);
    assert!(is_mounted(&plain));
    assert_eq!(fs::read(&f).unwrap(), b"held");
    holder.kill().unwrap();
    holder.wait().unwrap();
    // Let go of within a second: the unmount waits for it.
    let mut holder = hold("1");
    env.kmsfs
        .run_async(&["umount", plain.to_str().unwrap()])
        .await
        .ok();
    assert!(holder.try_wait().unwrap().is_some(), "unmounted while held");
    assert!(!is_mounted(&plain));
}

/// `mount -o remount,...` of a kmsfs mount changes its flags in place
/// through kmsfs's helper: read-only and back, `noexec`, with `nosuid` and
/// `nodev` kept; the daemon and its open files stay.
#[tokio::test(flavor = "multi_thread")]
async fn mount_remount_changes_flags_in_place() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("remount").await;
    let _g = CliMountGuard(plain.clone());
    let _helper = kmsfs_e2e::cli::RemountHelper::install();
    env.mount(&cipher, &plain, &[]).await.ok();
    let pids = daemon_pids(&plain);
    fs::write(plain.join("f"), b"before").unwrap();
    let held = fs::File::open(plain.join("f")).unwrap();
    let remount = |opts: &str| {
        Command::new("mount")
            .args(["-o", opts])
            .arg(&plain)
            .output()
            .unwrap()
    };
    let flags = || {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        let line = mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == plain.to_str())
            .expect("still mounted")
            .to_string();
        line.split(' ').nth(3).unwrap().to_string()
    };
    let out = remount("remount,ro");
    assert!(out.status.success(), "{out:?}");
    let f = flags();
    assert!(
        f.starts_with("ro,") && f.contains("nosuid") && f.contains("nodev"),
        "{f}"
    );
    let e = fs::write(plain.join("g"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_eq!(fs::read(plain.join("f")).unwrap(), b"before");
    let out = remount("remount,rw,noexec");
    assert!(out.status.success(), "{out:?}");
    let f = flags();
    assert!(
        f.starts_with("rw,") && f.contains("noexec") && f.contains("nosuid"),
        "{f}"
    );
    fs::write(plain.join("g"), b"after").unwrap();
    // suid is not granted by a remount, as at mount time: mount(8) passes
    // the flags without `nosuid` (it adds nothing for `suid`), and the
    // helper puts `nosuid` back; asked for by name, it refuses.
    let _ = remount("remount,suid");
    assert!(flags().contains("nosuid"), "{}", flags());
    let out = Command::new(kmsfs_e2e::cli::RemountHelper::PATH)
        .arg(&cipher)
        .arg(&plain)
        .args(["-o", "rw,remount,suid"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("allow_suid_dev"),
        "{out:?}"
    );
    assert!(flags().contains("nosuid"));
    // The same daemon served it all, and an open file stayed open.
    assert_eq!(daemon_pids(&plain), pids);
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut &held, &mut buf).unwrap();
    assert_eq!(buf, b"before");
    drop(held);
    // The helper refuses what is not a kmsfs mount.
    let other = env.path("not-a-mount");
    fs::create_dir_all(&other).unwrap();
    let out = Command::new(kmsfs_e2e::cli::RemountHelper::PATH)
        .arg("src")
        .arg(&other)
        .args(["-o", "remount,ro"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a kmsfs mount"),
        "{out:?}"
    );
    env.kmsfs
        .run_async(&["umount", plain.to_str().unwrap()])
        .await
        .ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_mount_options_are_refused() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("opts").await;
    let _guard = CliMountGuard(plain.clone());
    let run = env
        .mount(&cipher, &plain, &["-o", "rw,bogus_option"])
        .await
        .failed();
    assert!(run.stderr.contains("bogus_option"), "{}", run.stderr);
    assert!(!is_mounted(&plain));
    // Read-only mounts refuse writes.
    env.mount(&cipher, &plain, &["-o", "ro,nosuid,nodev"])
        .await
        .ok();
    assert!(fs::write(plain.join("f"), b"x").is_err());
    force_unmount(&plain);
}

/// Puts `/sbin/mount.kmsfs` in place for mount(8) and removes it after.
struct HelperLink(PathBuf);

impl HelperLink {
    fn install() -> HelperLink {
        let link = PathBuf::from("/sbin/mount.kmsfs");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(kmsfs_bin(), &link).expect("symlink /sbin/mount.kmsfs");
        HelperLink(link)
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fstab_line_mounts_through_mount_helper() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("fstab").await;
    let _guard = CliMountGuard(plain.clone());
    let _link = HelperLink::install();
    let fstab = env.path("fstab");
    fs::write(
        &fstab,
        format!(
            "# test fstab\n{} {} kmsfs _netdev,nofail,kms_timeout=30,kms_config={},x-systemd.automount 0 0\n",
            cipher.display(),
            plain.display(),
            env.kmsfs.config.display()
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking({
        let (fstab, plain) = (fstab.clone(), plain.clone());
        move || {
            Command::new("mount")
                .arg("-T")
                .arg(&fstab)
                .arg(&plain)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "mount -T failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&plain));
    // The kernel records the type and the source, as for any filesystem.
    let entries = || -> Vec<Vec<String>> {
        fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .map(|l| l.split(' ').map(str::to_string).collect::<Vec<_>>())
            .filter(|f| f.get(1).map(String::as_str) == plain.to_str())
            .collect()
    };
    let here = entries();
    assert_eq!(here.len(), 1, "{here:?}");
    assert_eq!(here[0][0], cipher.to_str().unwrap(), "{here:?}");
    assert_eq!(here[0][2], "fuse.kmsfs", "{here:?}");
    let found = Command::new("findmnt")
        .args(["-n", "-t", "fuse.kmsfs", "-o", "SOURCE"])
        .arg(&plain)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&found.stdout).trim(),
        cipher.to_str().unwrap()
    );
    // `mount -a` sees the fstab line as mounted and does not mount it
    // again (a line without `nofail`, so a failed attempt would show).
    let strict = env.path("fstab-strict");
    fs::write(
        &strict,
        format!(
            "{} {} kmsfs kms_config={} 0 0\n",
            cipher.display(),
            plain.display(),
            env.kmsfs.config.display()
        ),
    )
    .unwrap();
    let again = tokio::task::spawn_blocking({
        let strict = strict.clone();
        move || {
            Command::new("mount")
                .arg("-a")
                .arg("-T")
                .arg(&strict)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        again.status.success() && again.stderr.is_empty(),
        "mount -a: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        entries().len(),
        1,
        "mount -a mounted the line a second time"
    );
    fs::write(plain.join("from-fstab"), b"ok").unwrap();
    assert_eq!(fs::read(plain.join("from-fstab")).unwrap(), b"ok");
    let st = Command::new("umount").arg(&plain).status().unwrap();
    assert!(st.success());
    assert!(!is_mounted(&plain));
}

const UNIT: usize = 4096;
const UNITS: u64 = 64;

/// The kernel's readahead window for the filesystem mounted at `mp`.
fn readahead_kb(mp: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(mp).unwrap().dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    fs::read_to_string(&path).unwrap().trim().parse().unwrap()
}

/// A page's contents: its index and a version, repeated.
fn unit_bytes(idx: u64, version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(UNIT);
    while v.len() < UNIT {
        v.extend_from_slice(&idx.to_le_bytes());
        v.extend_from_slice(&version.to_le_bytes());
    }
    v
}

/// Writes random pages of `target` with increasing versions until `stop`
/// or an error; returns the last version issued.
fn page_writer(target: PathBuf, stop: Arc<AtomicBool>) -> u64 {
    let Ok(f) = fs::OpenOptions::new().write(true).open(&target) else {
        return 0;
    };
    let mut rng = Rng::new(7);
    let mut version = 0;
    while !stop.load(Ordering::Relaxed) {
        version += 1;
        let idx = rng.below(UNITS);
        if f.write_all_at(&unit_bytes(idx, version), idx * UNIT as u64)
            .is_err()
        {
            break;
        }
    }
    version
}

/// Checks one plaintext page read back after the kill. Every 16-byte cell
/// must name this page and a version that was written: a unit torn inside
/// the daemon would decrypt to noise, another unit's data would name
/// another page. With `whole`, each part of the page that lies in one data
/// unit (`[0, 4064)` and `[4064, 4096)`) must hold a single version.
fn check_page(i: usize, page: &[u8], last_version: u64, whole: bool) -> Result<bool, String> {
    let mut versions = Vec::new();
    for (c, cell) in page.chunks(16).enumerate() {
        let idx = u64::from_le_bytes(cell[..8].try_into().unwrap());
        let ver = u64::from_le_bytes(cell[8..].try_into().unwrap());
        if idx != i as u64 || ver > last_version {
            return Err(format!(
                "page {i}, cell {c}: ({idx}, {ver}) was never written"
            ));
        }
        versions.push(ver);
    }
    let split = (UNIT - 32) / 16;
    let single = |v: &[u64]| v.iter().all(|&x| x == v[0]);
    if whole && !(single(&versions[..split]) && single(&versions[split..])) {
        return Err(format!(
            "page {i} mixes versions within a unit: {versions:?}"
        ));
    }
    Ok(!single(&versions))
}

/// SIGKILL of the daemon while one thread rewrites whole pages of a file.
///
/// Through the writeback cache (the default), Linux does not hold a page
/// stable while its WRITE is being copied to the daemon (nothing in FUSE
/// asks for stable writes), so a page the application is rewriting at that
/// moment can reach the daemon half old, half new; the kernel sends it
/// again afterwards, but not after a SIGKILL. There the test asks that
/// every byte is one the application wrote, in its own place. With
/// `no_writeback` each WRITE carries the application's buffer, and each
/// unit must hold exactly one of them (see docs/format.md, "Crashes").
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_writes_leaves_every_unit_old_or_new() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("kill").await;
    let _guard = CliMountGuard(plain.clone());
    for (opts, whole) in [(&[][..], false), (&["-o", "no_writeback"][..], true)] {
        env.mount(&cipher, &plain, opts).await.ok();
        let bystander: Vec<u8> = Rng::new(99).bytes(300_000);
        fs::write(plain.join("bystander"), &bystander).unwrap();
        let target = plain.join("target");
        {
            let f = fs::File::create(&target).unwrap();
            for i in 0..UNITS {
                f.write_all_at(&unit_bytes(i, 0), i * UNIT as u64).unwrap();
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writer = std::thread::spawn({
            let (target, stop) = (target.clone(), stop.clone());
            move || page_writer(target, stop)
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        let pids = daemon_pids(&plain);
        assert_eq!(pids.len(), 1);
        // SAFETY: sending a signal to a process we started.
        unsafe { libc::kill(pids[0], libc::SIGKILL) };
        // Writes into cached pages can go on succeeding after the kill.
        stop.store(true, Ordering::Relaxed);
        let last_version = writer.join().unwrap();
        assert!(last_version > 1, "the writer never ran");
        force_unmount(&plain);
        env.mount(&cipher, &plain, &[]).await.ok();
        let data = fs::read(&target).unwrap();
        assert_eq!(data.len(), UNIT * UNITS as usize);
        let mut mixed = 0;
        for (i, page) in data.chunks(UNIT).enumerate() {
            match check_page(i, page, last_version, whole) {
                Ok(m) => mixed += usize::from(m),
                Err(e) => panic!("{opts:?}: {e}"),
            }
        }
        eprintln!("{opts:?}: {last_version} writes, {mixed} pages hold two of them");
        assert_eq!(fs::read(plain.join("bystander")).unwrap(), bystander);
        force_unmount(&plain);
    }
}
