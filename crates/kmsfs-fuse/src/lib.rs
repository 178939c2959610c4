//! kmsfs FUSE driver: serves the decrypted view of a backing directory.
//!
//! The driver is handed already-derived keys; it never talks to a KMS, so a
//! KMS outage cannot disturb a live mount.

mod acl;
mod adapter;
mod attrs;
mod backing_xattr;
mod entries;
mod errors;
mod freeze;
mod fs;
mod inodes;
pub mod kernel_mount;
mod listing;
mod open_files;
mod space;
mod sys;
pub mod user_mount;
mod xattrs;

pub use adapter::flush_requests;
pub use freeze::{DrainTimeout, Frozen, WriteGate};
pub use fs::KmsFs;
/// Requests this process answered over FUSE io_uring (all mounts).
pub use fuser::uring_requests;
pub use fuser::MountOption;
pub use inodes::live_nodes;
pub use xattrs::getxattr_requests;

use kmsfs_core::keys::FsKeys;
use std::io;
use std::path::{Path, PathBuf};

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
    /// `shared_storage`: other mounts (on this or other hosts) change the
    /// backing directory too. No writeback cache, no attribute or entry
    /// caching, and a shared lock that admits other `shared_storage`
    /// mounts only.
    pub shared_storage: bool,
    /// Store and enforce POSIX ACLs (`FUSE_POSIX_ACL`, which turns on the
    /// kernel's permission checks). Off, `system.posix_acl_*` is refused
    /// with `ENOTSUP`, as on a filesystem without ACLs, and listings and
    /// unlinks cost no extra requests (docs/compat.md).
    pub posix_acl: bool,
    /// Serve requests over FUSE io_uring (per-CPU queues) where the kernel
    /// offers it (`uring`; the kernel offers it only with the fuse module
    /// parameter `enable_uring=1`). Off, everything travels over /dev/fuse.
    pub uring: bool,
}

/// A live mount served on background threads.
///
/// Dropping it unmounts (lazily if the mount is busy) and waits for the
/// daemon threads; [`Mounted::join`] instead waits for someone else
/// (`umount`, a signal handler) to unmount it.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    gate: std::sync::Arc<WriteGate>,
    mountpoint: PathBuf,
    fs_type: &'static str,
    /// Mounted through `fusermount3` (no right to mount): unmounted
    /// through it too, and no root-only tuning.
    user_mount: bool,
}

impl Mounted {
    /// The type the kernel records for the mount (`fuse.kmsfs`).
    pub fn fs_type(&self) -> &'static str {
        self.fs_type
    }

    /// Whether the mount went through the setuid `fusermount3` because this
    /// process may not mount (a regular user's mount).
    pub fn is_user_mount(&self) -> bool {
        self.user_mount
    }

    /// Sets the kernel's readahead window for this mount to `kb` KiB (the
    /// mount's `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`). The kernel caps
    /// a FUSE mount's window at 128 KiB, whatever `max_readahead` the
    /// daemon offers, so a sequential read arrives as 128 KiB requests one
    /// after another; a larger window lets it send `max_pages` (1 MiB)
    /// requests and keep more than one in flight (docs/performance.md).
    /// Needs root, as every write under /sys does; call it once the mount
    /// answers (it stats the mount point).
    pub fn set_readahead(&self, kb: u32) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(&self.mountpoint)?.dev();
        let path = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        );
        std::fs::write(&path, format!("{kb}\n"))
            .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
    }

    /// The gate that holds modifying requests during a snapshot.
    pub fn write_gate(&self) -> std::sync::Arc<WriteGate> {
        self.gate.clone()
    }

    /// Waits until the filesystem is unmounted and the daemon threads end.
    pub fn join(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
        }
    }

    /// Unmounts now and waits for the daemon threads to finish.
    pub fn umount_and_join(self) -> io::Result<()> {
        unmount(&self.mountpoint, 0)?;
        self.join()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if unmount(&self.mountpoint, 0).is_err() {
                let _ = unmount(&self.mountpoint, libc::MNT_DETACH);
            }
            let _ = s.join();
        }
    }
}

/// Unmounts `mountpoint` (lazily with `MNT_DETACH` in `flags`): umount2(2),
/// or, for a caller without the right to unmount (`EPERM`: a regular user's
/// mount), `fusermount3 -u [-z]`, which lets the user who mounted unmount.
/// A mountpoint that is no longer mounted counts as done.
pub fn unmount(mountpoint: &Path, flags: i32) -> io::Result<()> {
    match umount2(mountpoint, flags) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            match fusermount_unmount(mountpoint, flags & libc::MNT_DETACH != 0) {
                Err(fe) if fe.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        }
        r => r,
    }
}

/// `fusermount3 -u [-z] MOUNTPOINT`, with its complaint as the error
/// (`NotFound` for a mount point that is not mounted, `ResourceBusy`,
/// `PermissionDenied` for another user's mount).
pub fn fusermount_unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg("--")
        .arg(mountpoint)
        .stdin(std::process::Stdio::null())
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
    // fusermount3 says "not found in /etc/mtab" (or "entry for ... not
    // found") for a mount point that is no longer mounted.
    let kind = if msg.contains("not found") {
        io::ErrorKind::NotFound
    } else if msg.contains("Device or resource busy") {
        io::ErrorKind::ResourceBusy
    } else if msg.contains("Permission denied") || msg.contains("not permitted") {
        io::ErrorKind::PermissionDenied
    } else {
        io::ErrorKind::Other
    };
    Err(io::Error::new(kind, msg))
}

/// `umount2(mountpoint, flags)`; a mountpoint that is no longer mounted
/// (`EINVAL`) counts as done.
fn umount2(mountpoint: &Path, flags: i32) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINVAL) {
        return Ok(());
    }
    Err(e)
}

/// The readahead window kmsfs asks for its mounts, in KiB
/// ([`Mounted::set_readahead`]): one `max_pages` request (1 MiB) in flight
/// while the next is decrypted. Measured in docs/performance.md.
pub const READAHEAD_KB: u32 = 1024;

/// Mounts `cipherdir` at `mountpoint` as type `fuse.kmsfs` and serves it on
/// background threads. Returns once the mount is live.
pub fn spawn_mount(
    cipherdir: &Path,
    mountpoint: &Path,
    keys: FsKeys,
    settings: &MountSettings,
) -> io::Result<Mounted> {
    let fs = KmsFs::new(
        cipherdir,
        keys,
        settings.read_only,
        !settings.no_writeback,
        settings.shared_storage,
    )?
    .with_posix_acl(settings.posix_acl)
    .with_uring(settings.uring);
    let mut opts = Vec::new();
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
    config.acl = if settings.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(settings.threads.max(1));
    config.clone_fd = true;
    let space = fs.space_errors();
    let gate = fs.write_gate();
    let (fd, user_mount) =
        match kernel_mount::mount(cipherdir, mountpoint, &opts, settings.allow_other) {
            Ok(fd) => (fd, false),
            // Not allowed to mount (not root: mount(2) says EPERM), or not
            // even to open /dev/fuse (EACCES where it is mode 0600): the
            // setuid fusermount3 mounts for the user who owns the mount
            // point, and only that user may unmount.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => (
                user_mount::mount(cipherdir, mountpoint, &opts, settings.allow_other)?,
                true,
            ),
            Err(e) => return Err(e),
        };
    // The kernel has queued INIT on the new connection; from here on a
    // failure must unmount again.
    let session = match fuser::Session::from_fd(fs, fd, config.acl, config.clone()) {
        Ok(s) => s.spawn(),
        Err(e) => Err(e),
    };
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            let _ = unmount(mountpoint, libc::MNT_DETACH);
            return Err(e);
        }
    };
    space.set_notifier(session.notifier());
    Ok(Mounted {
        session: Some(session),
        gate,
        mountpoint: mountpoint.to_path_buf(),
        fs_type: kernel_mount::FS_TYPE,
        user_mount,
    })
}
