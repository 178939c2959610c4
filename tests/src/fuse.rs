//! Real FUSE mounts for tests, unmounted by a guard even when a test panics.

use anyhow::{Context, Result};
use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_fuse::{MountSettings, Mounted};
use std::path::{Path, PathBuf};

/// A live mount of the kmsfs driver; unmounts on drop.
pub struct MountGuard {
    session: Option<Mounted>,
    /// Where the plaintext view is.
    pub mountpoint: PathBuf,
}

impl MountGuard {
    /// Mounts `cipherdir` at `mountpoint` with keys derived from `master`.
    pub fn mount(cipherdir: &Path, mountpoint: &Path, master: &MasterKey) -> Result<Self> {
        let settings = MountSettings {
            threads: 4,
            ..Default::default()
        };
        Self::mount_with(cipherdir, mountpoint, master, &settings)
    }

    /// Mounts with explicit settings (`allow_other` for suites run as other users).
    pub fn mount_with(
        cipherdir: &Path,
        mountpoint: &Path,
        master: &MasterKey,
        settings: &MountSettings,
    ) -> Result<Self> {
        let keys = FsKeys::derive(master, &TEST_UUID);
        let session = kmsfs_fuse::spawn_mount(cipherdir, mountpoint, keys, settings)
            .with_context(|| format!("mounting {}", mountpoint.display()))?;
        Ok(MountGuard {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// Unmounts now and waits for the daemon threads to finish. A mount
    /// that is busy for a moment (a process scanning the temporary
    /// directory, a close still in flight on a loaded machine) is retried
    /// for up to 30 s before that counts as an error.
    pub fn unmount(mut self) -> Result<()> {
        if let Some(s) = self.session.take() {
            unmount_retrying_busy(&self.mountpoint)?;
            s.join().context("joining the daemon threads")?;
        }
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        // `Mounted` unmounts (lazily if busy) and joins when dropped.
        drop(self.session.take());
    }
}

/// `umount2(mountpoint)`, retried while it answers `EBUSY`.
fn unmount_retrying_busy(mountpoint: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        // SAFETY: a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) || std::time::Instant::now() >= deadline {
            return Err(
                anyhow::Error::new(e).context(format!("unmounting {}", mountpoint.display()))
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The UUID the driver-level tests derive keys with.
pub const TEST_UUID: [u8; 16] = *b"kmsfs-e2e-uuid!!";

/// Prepares an empty backing directory the way `kmsfs create` does for
/// the data side (the root directory IV), without a KMS header.
pub fn fresh_cipherdir(dir: &Path) -> Result<()> {
    let handle = std::fs::File::open(dir)?;
    kmsfs_core::layout::create_dir_iv(std::os::fd::AsFd::as_fd(&handle))?;
    Ok(())
}

/// A small deterministic PRNG (xorshift64*), so failures replay from the seed.
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator (a zero seed is replaced).
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// True when `path` is a mountpoint listed in /proc/mounts.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        // A dead FUSE mount (daemon killed) fails to stat: ask /proc by name.
        return mounts_contain(path);
    };
    mounts_contain(&canon)
}

fn mounts_contain(path: &Path) -> bool {
    let want = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
}

/// Lazily unmounts `path` if it is mounted (also after the daemon died).
pub fn force_unmount(path: &Path) {
    if mounts_contain(path) || is_mounted(path) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(path)
            .status();
    }
}

/// Unmounts a mount made through the `kmsfs` binary when dropped, so a
/// failing test leaves nothing mounted.
pub struct CliMountGuard(pub PathBuf);

impl Drop for CliMountGuard {
    fn drop(&mut self) {
        force_unmount(&self.0);
    }
}

/// PIDs of `kmsfs` mount daemons serving `mountpoint`.
pub fn daemon_pids(mountpoint: &Path) -> Vec<i32> {
    let want = mountpoint.as_os_str().as_encoded_bytes().to_vec();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.iter().any(|a| *a == b"--ready-fd") && args.contains(&want.as_slice()) {
            pids.push(pid);
        }
    }
    pids
}

/// A TCP relay from a local port to a target address, started on demand:
/// stands in for a KMS that comes up late.
pub struct TcpProxy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// `127.0.0.1:PORT` the proxy listens on.
    pub listen: String,
}

impl TcpProxy {
    /// Starts relaying `listen` → `target` (both `host:port`).
    pub fn start(listen: &str, target: &str) -> Result<Self> {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let target = target.to_string();
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(&target) else {
                            continue;
                        };
                        for (mut a, mut b) in [
                            (client.try_clone(), server.try_clone()),
                            (server.try_clone(), client.try_clone()),
                        ]
                        .into_iter()
                        .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                        {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut a, &mut b);
                                let _ = b.shutdown(std::net::Shutdown::Write);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        });
        Ok(TcpProxy {
            stop,
            listen: listen.to_string(),
        })
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A fresh backing directory (root IV only) and an empty mountpoint in a
/// temporary directory, with a new master key: the starting point of the
/// driver-level tests.
pub struct TestFs {
    /// Holds both directories; removed on drop.
    pub tmp: tempfile::TempDir,
    /// The backing directory.
    pub cipher: PathBuf,
    /// The mountpoint.
    pub plain: PathBuf,
    /// The key the mounts derive their subkeys from.
    pub master: MasterKey,
}

impl TestFs {
    /// Makes the directories and the key (panics on failure: test setup).
    pub fn fresh() -> TestFs {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cipher = tmp.path().join("cipher");
        let plain = tmp.path().join("plain");
        std::fs::create_dir(&cipher).expect("cipher dir");
        std::fs::create_dir(&plain).expect("mountpoint");
        fresh_cipherdir(&cipher).expect("root iv");
        TestFs {
            tmp,
            cipher,
            plain,
            master: MasterKey::generate().expect("key"),
        }
    }

    /// Mounts, runs `f` on the plaintext root, unmounts.
    pub fn with_mount<T>(&self, f: impl FnOnce(&Path) -> T) -> T {
        let m = MountGuard::mount(&self.cipher, &self.plain, &self.master).expect("mount");
        let out = f(&self.plain);
        m.unmount().expect("unmount");
        out
    }
}

/// A size-limited tmpfs mounted at a directory (a store that fills up),
/// unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`16m`, ...) at `dir` (panics on failure).
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "cannot mount a tmpfs at {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
