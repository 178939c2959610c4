//! `kmsfs mount`, `kmsfs umount` and the `mount.kmsfs` helper (owned by the FUSE work).

use std::path::{Path, PathBuf};

/// Arguments of `kmsfs mount`.
#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The backing (encrypted) directory.
    pub cipherdir: PathBuf,
    /// Where to mount the decrypted view.
    pub mountpoint: PathBuf,
    /// Mount options, comma-separated (ro, allow_other, nosuid, kms_timeout=N, ...).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Stay in the foreground, logging to stderr.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Seconds to keep retrying an unreachable or sealed KMS.
    #[arg(long, value_name = "SECONDS")]
    pub kms_timeout: Option<u64>,
}

/// Arguments of `kmsfs umount`.
#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    /// The mountpoint to unmount.
    pub mountpoint: PathBuf,
}

/// Runs `kmsfs mount` with the KMS configuration at `config_path`.
pub fn run_mount(config_path: &Path, args: MountArgs) -> anyhow::Result<()> {
    let _ = (config_path, args);
    anyhow::bail!("mount is not implemented yet")
}

/// Runs `kmsfs umount`.
pub fn run_umount(args: UmountArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("umount is not implemented yet")
}

/// Runs as `mount.kmsfs CIPHERDIR MOUNTPOINT [-o OPTIONS]` (argv[0] dispatch).
pub fn run_mount_helper(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("mount.kmsfs is not implemented yet")
}
