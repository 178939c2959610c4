//! Real FUSE mounts for tests, unmounted by a guard even when a test panics.

use anyhow::{Context, Result};
use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_core::names::DIR_IV_NAME;
use kmsfs_fuse::{BackgroundSession, MountSettings};
use std::path::{Path, PathBuf};

/// A live mount of the kmsfs driver; unmounts on drop.
pub struct MountGuard {
    session: Option<BackgroundSession>,
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

    /// Unmounts now and waits for the daemon threads to finish.
    pub fn unmount(mut self) -> Result<()> {
        if let Some(s) = self.session.take() {
            s.umount_and_join().context("unmounting")?;
        }
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// The UUID the driver-level tests derive keys with.
pub const TEST_UUID: [u8; 16] = *b"kmsfs-e2e-uuid!!";

/// Prepares an empty backing directory the way `kmsfs create` does for
/// the data side (the root directory IV), without a KMS header.
pub fn fresh_cipherdir(dir: &Path) -> Result<()> {
    let mut iv = [0u8; 16];
    getrandom(&mut iv)?;
    std::fs::write(dir.join(DIR_IV_NAME), iv)?;
    Ok(())
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)?;
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
