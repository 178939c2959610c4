//! kmsfs FUSE driver: serves the decrypted view of a backing directory.
//!
//! The driver is handed already-derived keys; it never talks to a KMS, so a
//! KMS outage cannot disturb a live mount.

mod adapter;
mod attrs;
mod entries;
mod errors;
mod fs;
mod inodes;
mod listing;
mod open_files;
mod space;
mod sys;

pub use fs::KmsFs;
pub use fuser::{BackgroundSession, MountOption};

use kmsfs_core::keys::FsKeys;
use std::io;
use std::path::Path;

/// How to mount.
#[derive(Debug, Clone, Default)]
pub struct MountSettings {
    /// Refuse writes.
    pub read_only: bool,
    /// Let users other than the mounting user in (`allow_other`).
    pub allow_other: bool,
    /// Extra kernel mount options (`nosuid`, `nodev`, `noexec`, ...).
    pub extra: Vec<MountOption>,
    /// Number of FUSE worker threads.
    pub threads: usize,
    /// Turn off the kernel's writeback cache (on by default): every write
    /// then reaches the daemon at once, and `ENOSPC` is reported by the
    /// write itself rather than by `fsync`/`close`.
    pub no_writeback: bool,
}

/// Mounts `cipherdir` at `mountpoint` and serves it on background threads.
/// Returns once the mount is live; dropping the session unmounts it.
pub fn spawn_mount(
    cipherdir: &Path,
    mountpoint: &Path,
    keys: FsKeys,
    settings: &MountSettings,
) -> io::Result<BackgroundSession> {
    let fs = KmsFs::new(cipherdir, keys, settings.read_only, !settings.no_writeback)?;
    let mut opts = vec![
        MountOption::FSName(cipherdir.display().to_string()),
        MountOption::Subtype("kmsfs".into()),
    ];
    if settings.allow_other {
        // The daemon runs as root and checks nothing itself: when other
        // users may enter, the kernel must check their permissions.
        opts.push(MountOption::DefaultPermissions);
    }
    opts.push(if settings.read_only {
        MountOption::RO
    } else {
        MountOption::RW
    });
    opts.extend(settings.extra.iter().cloned());
    let mut config = fuser::Config::default();
    config.mount_options = opts;
    config.acl = if settings.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(settings.threads.max(1));
    config.clone_fd = true;
    let space = fs.space_errors();
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    space.set_notifier(session.notifier());
    Ok(session)
}
