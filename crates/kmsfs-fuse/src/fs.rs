//! The filesystem state and the lookups every operation shares: nodes,
//! directory IVs, name encryption and attributes.
//!
//! The FUSE operations themselves are in `adapter` (the thin
//! `fuser::Filesystem` impl), `entries` (creating and removing names),
//! `open_files` (contents) and `listing` (directories).

use crate::attrs::file_attr;
use crate::errors::{backing_errno, errno, Result};
use crate::freeze::WriteGate;
use crate::inodes::{Inodes, Kind, LinkEntry, Node};
use crate::listing::Listings;
use crate::space::SpaceErrors;
use crate::sys;
use fuser::{Errno, FileAttr};
use kmsfs_core::contents::plaintext_size;
use kmsfs_core::keys::FsKeys;
use kmsfs_core::layout;
use kmsfs_core::names::{encrypt_name, symlink_target_len, EncryptedName, DIR_IV_LEN};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

/// How long a new mount waits for the previous daemon of the same backing
/// directory to let go of it: `umount` returns before that daemon has
/// finished exiting, and an immediate remount must not fail for that.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes the lock on the backing directory, waiting up to [`LOCK_WAIT`]
/// for a daemon that is on its way out: exclusive for an ordinary mount,
/// shared for a `shared_storage` one, so that shared mounts admit each
/// other and nothing else.
fn lock_backing(dir: &File, shared: bool) -> io::Result<()> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sys::try_lock(dir.as_raw_fd(), shared) {
            Err(e)
                if e.raw_os_error() == Some(libc::EWOULDBLOCK)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// The decrypted view of one backing directory, ready to mount.
pub struct KmsFs {
    pub(crate) keys: Arc<FsKeys>,
    pub(crate) inodes: Inodes,
    pub(crate) listings: Listings,
    pub(crate) space: Arc<SpaceErrors>,
    /// Holds modifying requests while a snapshot captures (`freeze`).
    pub(crate) gate: Arc<WriteGate>,
    pub(crate) read_only: bool,
    pub(crate) writeback: bool,
    /// How long the kernel may cache attributes and entries.
    pub(crate) ttl: std::time::Duration,
    /// What the kernel agreed to for extended attributes and ACLs.
    pub(crate) xattr_caps: crate::xattrs::XattrCaps,
    /// Whether to ask the kernel for `FUSE_POSIX_ACL` at `init`.
    pub(crate) want_posix_acl: bool,
    /// Whether to take FUSE over io_uring at `init` when the kernel offers it.
    pub(crate) want_uring: bool,
    euid: u32,
    egid: u32,
    /// An open descriptor of the backing root holding an exclusive `flock`
    /// (shared for `shared_storage`) for as long as this filesystem lives:
    /// a second daemon over the same backing directory is refused (two
    /// writeback caches would overwrite each other's data) unless both are
    /// `shared_storage` mounts.
    _lock: File,
}

impl KmsFs {
    /// Serves `cipherdir` with the subkeys `keys` (derived from the unwrapped
    /// master key); `writeback` asks the kernel for its writeback cache;
    /// `shared` makes it a `shared_storage` mount (no writeback cache, no
    /// attribute or entry caching, a shared lock on the backing directory).
    pub fn new(
        cipherdir: &Path,
        keys: FsKeys,
        read_only: bool,
        writeback: bool,
        shared: bool,
    ) -> io::Result<Self> {
        let lock = File::open(cipherdir)?;
        lock_backing(&lock, shared).map_err(|e| {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let hint = if shared {
                    "it is mounted without -o shared_storage, which must be unmounted first"
                } else {
                    "unmount it first (two mounts of one backing directory overwrite each \
                     other's data), or mount every one of them with -o shared_storage"
                };
                io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "{} is already mounted by another kmsfs daemon; {hint}",
                        cipherdir.display()
                    ),
                )
            } else {
                e
            }
        })?;
        let fd = sys::openat(
            libc::AT_FDCWD,
            cipherdir.as_os_str(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let st = sys::fstat(fd.as_raw_fd())?;
        // Fail at mount, not at first access, if the root IV is unreadable.
        layout::read_dir_iv(fd.as_fd()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: {e}", cipherdir.join(layout::DIR_IV_NAME).display()),
            )
        })?;
        Ok(KmsFs {
            keys: Arc::new(keys),
            inodes: Inodes::new(fd, OwnedFd::from(lock.try_clone()?), &st, true),
            listings: Listings::default(),
            space: Arc::new(SpaceErrors::default()),
            gate: Arc::new(WriteGate::default()),
            read_only,
            writeback: writeback && !shared,
            ttl: if shared {
                crate::adapter::SHARED_TTL
            } else {
                crate::adapter::TTL
            },
            xattr_caps: crate::xattrs::XattrCaps::default(),
            want_posix_acl: false,
            want_uring: false,
            // SAFETY: geteuid/getegid cannot fail.
            euid: unsafe { libc::geteuid() },
            // SAFETY: as above.
            egid: unsafe { libc::getegid() },
            _lock: lock,
        })
    }

    /// Takes FUSE over io_uring at `init` if the kernel offers it
    /// (docs/performance.md, step 10).
    pub fn with_uring(mut self, on: bool) -> Self {
        self.want_uring = on;
        self
    }

    /// The full-store error state, shared with the session for notifications.
    pub fn space_errors(&self) -> Arc<SpaceErrors> {
        self.space.clone()
    }

    pub(crate) fn node(&self, ino: u64) -> Result<Arc<Node>> {
        self.inodes.get(ino).ok_or(Errno::ENOENT)
    }

    /// The `O_PATH` descriptor of node `ino`.
    pub(crate) fn fd(&self, ino: u64, node: &Node) -> Result<Arc<OwnedFd>> {
        self.inodes
            .path_fd(ino, node)
            .map_err(|e| backing_errno(ino, "reopening by handle", e))
    }

    /// The IV of directory `ino`, read once.
    pub(crate) fn dir_iv<'a>(&self, ino: u64, dir: &'a Node) -> Result<&'a [u8; DIR_IV_LEN]> {
        if dir.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        if let Some(iv) = dir.dir_iv.get() {
            return Ok(iv);
        }
        let fd = self.fd(ino, dir)?;
        let iv = layout::read_dir_iv(fd.as_fd())
            .map_err(|e| backing_errno(ino, layout::DIR_IV_NAME, e))?;
        Ok(dir.dir_iv.get_or_init(|| iv))
    }

    /// The backing name of `name` in directory `ino`.
    pub(crate) fn encrypt(&self, ino: u64, dir: &Node, name: &OsStr) -> Result<EncryptedName> {
        let iv = self.dir_iv(ino, dir)?;
        encrypt_name(&self.keys, iv, name.as_bytes()).map_err(|e| Errno::from_i32(e.errno()))
    }

    /// Looks up the backing entry `bname` of directory `dir_ino` and
    /// registers one kernel reference to it.
    pub(crate) fn lookup_backing(
        &self,
        dir_ino: u64,
        dir: &Node,
        bname: &OsStr,
    ) -> Result<(Arc<Node>, FileAttr)> {
        let dfd = self.fd(dir_ino, dir)?;
        let st = sys::statat(dfd.as_raw_fd(), bname).map_err(errno)?;
        let ino = self
            .inodes
            .fuse_ino(&st)
            .map_err(|e| backing_errno(dir_ino, &bname.to_string_lossy(), e))?;
        let kind = Kind::from_mode(st.st_mode);
        let link = match kind {
            Kind::Symlink => Some(self.dir_iv(dir_ino, dir)?),
            _ => None,
        };
        let (ino, node) = self
            .inodes
            .remember(ino, kind, &dfd, bname, st.st_ino, || {
                link.map(|iv| {
                    Box::new(LinkEntry {
                        dir_iv: *iv,
                        backing_name: bname.as_bytes().into(),
                    })
                })
            })
            .map_err(|e| backing_errno(dir_ino, &bname.to_string_lossy(), e))?;
        let attr = self.attr(ino, &node, &st)?;
        Ok((node, attr))
    }

    /// The attributes of node `ino`, fresh from the backing store.
    pub(crate) fn attr_of(&self, ino: u64, node: &Node) -> Result<FileAttr> {
        let fd = self.fd(ino, node)?;
        let st = sys::fstat(fd.as_raw_fd()).map_err(errno)?;
        self.attr(ino, node, &st)
    }

    pub(crate) fn attr(&self, ino: u64, node: &Node, st: &libc::stat) -> Result<FileAttr> {
        let size = match node.kind {
            Kind::File => match &*node.open.read() {
                Some(open) => open.contents.size(),
                None => plaintext_size(st.st_size as u64),
            },
            // Known from the stored length: no readlink, no decryption.
            Kind::Symlink => symlink_target_len(st.st_size as u64).unwrap_or(st.st_size as u64),
            _ => st.st_size as u64,
        };
        Ok(file_attr(ino, st, size))
    }

    /// Gives a new entry the caller's ownership (the daemon runs as root, so
    /// the backing entry starts out as the daemon's).
    pub(crate) fn own(&self, uid: u32, gid: u32, dir_fd: &OwnedFd, bname: &OsStr) -> Result<()> {
        if uid == self.euid && gid == self.egid {
            // Already right, including set-group-ID inheritance, which the
            // backing directory (same mode bits) applied itself.
            return Ok(());
        }
        let dir_st = sys::fstat(dir_fd.as_raw_fd()).map_err(errno)?;
        // Under a set-group-ID directory the group is inherited: keep it.
        let gid = (dir_st.st_mode & libc::S_ISGID == 0).then_some(gid);
        sys::chown_at(dir_fd.as_raw_fd(), bname, Some(uid), gid).map_err(errno)
    }
}
