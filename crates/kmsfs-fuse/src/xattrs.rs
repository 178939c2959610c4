//! Extended attributes and POSIX ACLs: `getxattr`, `setxattr`,
//! `listxattr`, `removexattr`, stored encrypted in the backing node's own
//! extended attributes (`kmsfs_core::xattr_crypto`, docs/format.md
//! section 8); ACL inheritance on create and the ACL's mode kept in step;
//! and the clearing of set-user-ID/set-group-ID bits and file capabilities
//! that `FUSE_HANDLE_KILLPRIV_V2` hands to the daemon.
//!
//! `security.selinux` is refused with `ENOTSUP`: SELinux labels FUSE
//! mounts by policy and answers for that name in the kernel, so only
//! probes reach the daemon, and `ls -l` asks for it on every entry unless
//! the filesystem says it has no such thing (then it stops asking).
//!
//! Symlinks carry no attributes (as in gocryptfs): listing them is empty,
//! reading gives `ENODATA`, setting gives `EPERM`. A backing store without
//! extended attributes reads as one with none (so the kernel's ACL checks
//! keep working) and refuses to store any with `ENOTSUP`.

use crate::acl::{self, Acl};
use crate::backing_xattr as bx;
use crate::entries::{AttrChange, Caller};
use crate::errors::{errno, Result};
use crate::fs::KmsFs;
use crate::inodes::{Kind, Node};
use crate::sys;
use fuser::{Errno, FileAttr};
use kmsfs_core::xattr_crypto::{
    self as xc, BackingXattr, XattrId, BACKING_PART_MAX, MAX_PARTS, XATTR_ID_LEN, XATTR_ID_NAME,
};
use parking_lot::Mutex;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tracing::warn;

/// `setxattr` flag: fail if the attribute exists.
const XATTR_CREATE: i32 = 1;
/// `setxattr` flag: fail if the attribute does not exist.
const XATTR_REPLACE: i32 = 2;
/// The attribute that holds file capabilities.
const CAPABILITY: &[u8] = b"security.capability";

/// Serialises changes to attributes: a value over one backing attribute
/// is several backing calls, and `XATTR_CREATE`/`XATTR_REPLACE` are a check
/// then a write.
static CHANGES: Mutex<()> = Mutex::new(());

/// `getxattr` requests served by this process (all mounts), for tests
/// that show the kernel no longer asks on every write.
static GET_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// How many `getxattr` requests this process has served.
pub fn getxattr_requests() -> u64 {
    GET_REQUESTS.load(Ordering::Relaxed)
}

/// What the kernel agreed to at `init`.
#[derive(Debug, Default, Clone, Copy)]
pub struct XattrCaps {
    /// `FUSE_POSIX_ACL`: the kernel enforces ACLs; the daemon stores them,
    /// keeps the mode in step and inherits default ACLs.
    pub posix_acl: bool,
    /// `FUSE_DONT_MASK`: the daemon applies the umask (not when a default
    /// ACL applies).
    pub dont_mask: bool,
}

/// The mode and ACLs a new entry gets from its directory.
pub(crate) struct Inherited {
    /// Mode to create with (file type bits kept).
    pub mode: u32,
    /// Whether a default ACL decided the mode (it is then set exactly,
    /// past the daemon's own umask).
    from_acl: bool,
    access: Option<Vec<u8>>,
    default: Option<Vec<u8>>,
}

/// The SELinux label, which kmsfs does not store (see the module comment).
const SELINUX: &[u8] = b"security.selinux";

/// Attribute names kmsfs stores: the `user`, `trusted` and `security`
/// namespaces (but `security.selinux`) and the two POSIX ACLs (when the
/// kernel enforces them).
fn supported(name: &[u8], caps: XattrCaps) -> bool {
    name.starts_with(b"user.")
        || name.starts_with(b"trusted.")
        || (name.starts_with(b"security.") && name != SELINUX)
        || (caps.posix_acl && (name == acl::ACCESS || name == acl::DEFAULT))
}

fn not_supported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

impl KmsFs {
    /// The node and its descriptor, for an attribute operation.
    fn xattr_node(&self, ino: u64) -> Result<(Arc<Node>, Arc<OwnedFd>)> {
        let node = self.node(ino)?;
        let fd = self.fd(ino, &node)?;
        Ok((node, fd))
    }

    /// The node's attribute id, if it has one.
    fn xattr_id(&self, ino: u64, fd: &OwnedFd) -> io::Result<Option<XattrId>> {
        match bx::get(fd.as_raw_fd(), XATTR_ID_NAME)? {
            None => Ok(None),
            Some(v) => match <XattrId>::try_from(v.as_slice()) {
                Ok(id) => Ok(Some(id)),
                Err(_) => {
                    warn!(
                        "inode {ino}: backing attribute {XATTR_ID_NAME} is {} bytes, not \
                         {XATTR_ID_LEN}: damaged; its attributes cannot be read",
                        v.len()
                    );
                    Err(io::Error::other("damaged attribute id"))
                }
            },
        }
    }

    /// The node's attribute id, made on first use.
    fn ensure_xattr_id(&self, ino: u64, fd: &OwnedFd) -> io::Result<XattrId> {
        if let Some(id) = self.xattr_id(ino, fd)? {
            return Ok(id);
        }
        let id = xc::new_id().map_err(|e| io::Error::other(e.to_string()))?;
        match bx::set(fd.as_raw_fd(), XATTR_ID_NAME, &id, XATTR_CREATE) {
            Ok(()) => Ok(id),
            // Another daemon thread cannot race us (CHANGES is held), but
            // a hard link's other name may have been given one meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self
                .xattr_id(ino, fd)?
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO)),
            Err(e) => Err(e),
        }
    }

    /// The stored record under `base`, continuation parts included.
    fn read_record(fd: &OwnedFd, base: &str) -> io::Result<Option<Vec<u8>>> {
        let Some(mut rec) = bx::get(fd.as_raw_fd(), base)? else {
            return Ok(None);
        };
        let mut last = rec.len();
        for k in 1..MAX_PARTS {
            if last < BACKING_PART_MAX {
                break;
            }
            match bx::get(fd.as_raw_fd(), &xc::part_name(base, k))? {
                Some(part) => {
                    last = part.len();
                    rec.extend_from_slice(&part);
                }
                None => break,
            }
        }
        Ok(Some(rec))
    }

    /// Decrypts the attribute `name` of a node; `None` if it has none.
    fn read_xattr(&self, ino: u64, fd: &OwnedFd, name: &[u8]) -> Result<Option<Vec<u8>>> {
        let id = match self.xattr_id(ino, fd) {
            Ok(Some(id)) => id,
            Ok(None) => return Ok(None),
            Err(e) if not_supported(&e) => return Ok(None),
            Err(e) => return Err(errno(e)),
        };
        let base =
            xc::backing_name(&self.keys, &id, name).map_err(|e| Errno::from_i32(e.errno()))?;
        let record = match Self::read_record(fd, &base) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e) => return Err(errno(e)),
        };
        match xc::open(&self.keys, &id, &base, &record) {
            Ok((_, value)) => Ok(Some(value)),
            Err(e) => {
                warn!(
                    "inode {ino}: backing attribute {base} does not decrypt (damaged, planted, \
                     or moved from another attribute or file): {e}"
                );
                Err(Errno::EIO)
            }
        }
    }

    /// Stores `name` = `value` (with `flags`); the caller holds `CHANGES`.
    fn write_xattr(
        &self,
        ino: u64,
        fd: &OwnedFd,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        let id = self.ensure_xattr_id(ino, fd).map_err(errno)?;
        let (base, record) =
            xc::seal(&self.keys, &id, name, value).map_err(|e| Errno::from_i32(e.errno()))?;
        let old = bx::get(fd.as_raw_fd(), &base).map_err(errno)?;
        match (&old, flags & (XATTR_CREATE | XATTR_REPLACE)) {
            (Some(_), XATTR_CREATE) => return Err(Errno::EEXIST),
            (None, XATTR_REPLACE) => return Err(Errno::ENODATA),
            _ => {}
        }
        let parts: Vec<&[u8]> = xc::parts(&record).collect();
        // Continuation parts first, part 0 last: until part 0 is written a
        // reader sees the old part 0, whose tag then fails (EIO), never a
        // mixed value.
        for (k, part) in parts.iter().enumerate().skip(1) {
            bx::set(fd.as_raw_fd(), &xc::part_name(&base, k), part, 0).map_err(errno)?;
        }
        bx::set(fd.as_raw_fd(), &base, parts[0], 0).map_err(errno)?;
        if old.is_some_and(|o| o.len() >= BACKING_PART_MAX) {
            for k in parts.len()..MAX_PARTS {
                let _ = bx::remove(fd.as_raw_fd(), &xc::part_name(&base, k));
            }
        }
        Ok(())
    }

    /// Removes `name`; `Ok(false)` if there was none. The caller holds `CHANGES`.
    fn delete_xattr(&self, ino: u64, fd: &OwnedFd, name: &[u8]) -> Result<bool> {
        let id = match self.xattr_id(ino, fd) {
            Ok(Some(id)) => id,
            Ok(None) => return Ok(false),
            Err(e) => return Err(errno(e)),
        };
        let base =
            xc::backing_name(&self.keys, &id, name).map_err(|e| Errno::from_i32(e.errno()))?;
        let found = bx::remove(fd.as_raw_fd(), &base).map_err(errno)?;
        for k in 1..MAX_PARTS {
            let _ = bx::remove(fd.as_raw_fd(), &xc::part_name(&base, k));
        }
        Ok(found)
    }

    /// `getxattr`.
    pub(crate) fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>> {
        GET_REQUESTS.fetch_add(1, Ordering::Relaxed);
        let name = name.as_bytes();
        if !supported(name, self.xattr_caps) {
            return Err(Errno::EOPNOTSUPP);
        }
        let (node, fd) = self.xattr_node(ino)?;
        if node.kind == Kind::Symlink {
            return Err(Errno::ENODATA);
        }
        self.read_xattr(ino, &fd, name)?.ok_or(Errno::ENODATA)
    }

    /// `listxattr`: the names, each followed by a NUL. An attribute that
    /// does not decrypt is left out (and logged); reading it gives `EIO`.
    pub(crate) fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let (node, fd) = self.xattr_node(ino)?;
        if node.kind == Kind::Symlink {
            return Ok(Vec::new());
        }
        let id = match self.xattr_id(ino, &fd) {
            Ok(Some(id)) => id,
            Ok(None) => return Ok(Vec::new()),
            Err(e) if not_supported(&e) => return Ok(Vec::new()),
            Err(e) => return Err(errno(e)),
        };
        let mut out = Vec::new();
        for backing in bx::list(fd.as_raw_fd()).map_err(errno)? {
            let BackingXattr::Entry(base) = xc::classify(&backing) else {
                continue;
            };
            let record = match Self::read_record(&fd, base) {
                Ok(Some(r)) => r,
                Ok(None) => continue, // removed meanwhile
                Err(e) => return Err(errno(e)),
            };
            match xc::open(&self.keys, &id, base, &record) {
                Ok((name, _)) if supported(&name, self.xattr_caps) => {
                    out.extend_from_slice(&name);
                    out.push(0);
                }
                Ok(_) => {}
                Err(e) => warn!(
                    "inode {ino}: backing attribute {base} does not decrypt, not listed \
                     (damaged, planted, or moved from another file): {e}"
                ),
            }
        }
        Ok(out)
    }

    /// `setxattr` with `XATTR_CREATE`/`XATTR_REPLACE` in `flags`.
    pub(crate) fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let name = name.as_bytes();
        if !supported(name, self.xattr_caps) {
            return Err(Errno::EOPNOTSUPP);
        }
        if self.read_only {
            return Err(Errno::EROFS);
        }
        let (node, fd) = self.xattr_node(ino)?;
        if node.kind == Kind::Symlink {
            return Err(Errno::EPERM);
        }
        let _held = CHANGES.lock();
        if name == acl::ACCESS {
            return self.set_access_acl(ino, &fd, value, flags);
        }
        if name == acl::DEFAULT && node.kind != Kind::Dir {
            return Err(Errno::EACCES);
        }
        self.write_xattr(ino, &fd, name, value, flags)
    }

    /// An access ACL: the mode takes its bits, and an ACL that says no
    /// more than the mode is not stored (as on ext4).
    fn set_access_acl(&self, ino: u64, fd: &OwnedFd, value: &[u8], flags: i32) -> Result<()> {
        let acl = Acl::parse(value).ok_or(Errno::EINVAL)?;
        if acl.is_minimal() {
            let existed = self.delete_xattr(ino, fd, acl::ACCESS)?;
            if flags & XATTR_REPLACE != 0 && !existed {
                return Err(Errno::ENODATA);
            }
        } else {
            self.write_xattr(ino, fd, acl::ACCESS, value, flags)?;
        }
        let st = sys::fstat(fd.as_raw_fd()).map_err(errno)?;
        let mode = (st.st_mode & 0o7000) | acl.mode_bits();
        sys::chmod(fd.as_raw_fd(), mode).map_err(errno)
    }

    /// `removexattr`.
    pub(crate) fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        let name = name.as_bytes();
        if !supported(name, self.xattr_caps) {
            return Err(Errno::EOPNOTSUPP);
        }
        if self.read_only {
            return Err(Errno::EROFS);
        }
        let (node, fd) = self.xattr_node(ino)?;
        if node.kind == Kind::Symlink {
            return Err(Errno::EPERM);
        }
        let _held = CHANGES.lock();
        if self.delete_xattr(ino, &fd, name)? {
            Ok(())
        } else {
            Err(Errno::ENODATA)
        }
    }

    /// After a `chmod` of a node with an access ACL: the ACL's owner, group
    /// class and other entries take the new bits (`posix_acl_chmod`).
    pub(crate) fn acl_chmod(&self, ino: u64, mode: u32) -> Result<()> {
        if !self.xattr_caps.posix_acl {
            return Ok(());
        }
        let (node, fd) = self.xattr_node(ino)?;
        if node.kind == Kind::Symlink {
            return Ok(());
        }
        let _held = CHANGES.lock();
        let Some(stored) = self.read_xattr(ino, &fd, acl::ACCESS)? else {
            return Ok(());
        };
        let mut acl = Acl::parse(&stored).ok_or_else(|| {
            warn!("inode {ino}: stored access ACL is not a valid ACL");
            Errno::EIO
        })?;
        acl.chmod(mode);
        self.write_xattr(ino, &fd, acl::ACCESS, &acl.to_bytes(), 0)
    }

    /// The mode (and ACLs) a new entry in directory `parent` gets: with a
    /// default ACL there, its inheritance and not the umask; otherwise the
    /// umask.
    pub(crate) fn inherit(
        &self,
        parent: u64,
        mode: u32,
        umask: u32,
        is_dir: bool,
    ) -> Result<Inherited> {
        let plain = Inherited {
            mode: mode & !umask,
            from_acl: false,
            access: None,
            default: None,
        };
        if !self.xattr_caps.posix_acl {
            return Ok(plain);
        }
        let (_, fd) = self.xattr_node(parent)?;
        let Some(stored) = self.read_xattr(parent, &fd, acl::DEFAULT)? else {
            return Ok(plain);
        };
        let Some(def) = Acl::parse(&stored) else {
            warn!("directory inode {parent}: stored default ACL is not a valid ACL");
            return Err(Errno::EIO);
        };
        let (access, mode) = def.inherit(mode);
        Ok(Inherited {
            mode,
            from_acl: true,
            access: (!access.is_minimal()).then(|| access.to_bytes()),
            default: is_dir.then_some(stored),
        })
    }

    /// Gives the new entry `ino` what [`KmsFs::inherit`] decided.
    pub(crate) fn apply_inherited(&self, ino: u64, inh: &Inherited) -> Result<()> {
        if !inh.from_acl {
            return Ok(());
        }
        let (node, fd) = self.xattr_node(ino)?;
        if !matches!(node.kind, Kind::File | Kind::Dir) {
            // Special files cannot hold the backing store's user.*
            // attributes; they keep the masked mode only.
            return Ok(());
        }
        // The daemon's own umask may have cleared bits the ACL grants.
        sys::chmod(fd.as_raw_fd(), inh.mode & 0o7777).map_err(errno)?;
        let _held = CHANGES.lock();
        if let Some(a) = &inh.access {
            self.write_xattr(ino, &fd, acl::ACCESS, a, 0)?;
        }
        if let Some(d) = &inh.default {
            self.write_xattr(ino, &fd, acl::DEFAULT, d, 0)?;
        }
        Ok(())
    }

    /// What `FUSE_HANDLE_KILLPRIV_V2` asks of a write by a caller without
    /// `CAP_FSETID` (and of a truncation or a change of owner): clear
    /// set-user-ID, set-group-ID when group-executable, and the file's
    /// capabilities.
    pub(crate) fn kill_privileges(&self, ino: u64) -> Result<()> {
        let (node, fd) = self.xattr_node(ino)?;
        if node.kind != Kind::File {
            return Ok(());
        }
        let st = sys::fstat(fd.as_raw_fd()).map_err(errno)?;
        let mode = st.st_mode & 0o7777;
        let mut kill = libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            kill |= libc::S_ISGID;
        }
        if mode & kill != 0 {
            sys::chmod(fd.as_raw_fd(), mode & !kill).map_err(errno)?;
        }
        self.drop_capability(ino, &fd)
    }

    /// Removes the file's `security.capability`, if any.
    pub(crate) fn drop_capability(&self, ino: u64, fd: &OwnedFd) -> Result<()> {
        let _held = CHANGES.lock();
        match self.delete_xattr(ino, fd, CAPABILITY) {
            Ok(_) => Ok(()),
            Err(e) if e == Errno::EOPNOTSUPP => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl KmsFs {
    /// `setattr` with what `FUSE_HANDLE_KILLPRIV_V2` leaves to the daemon
    /// and the access ACL kept in step with a new mode.
    ///
    /// The kernel marks a truncation by a caller without `CAP_FSETID` with
    /// `FATTR_KILL_SUIDGID`, which fuser 0.18 does not pass on; a caller
    /// other than root stands for it here. A change of owner is done by
    /// the backing `chown`, which clears the bits itself; the capability,
    /// stored encrypted, is dropped here.
    pub(crate) fn setattr_as(
        &self,
        caller: Caller,
        ino: u64,
        change: AttrChange,
    ) -> Result<FileAttr> {
        let mode = change.mode;
        let chown = change.uid.is_some() || change.gid.is_some();
        if change.size.is_some() && caller.uid != 0 && !self.read_only {
            self.kill_privileges(ino)?;
        }
        let attr = self.setattr(ino, change)?;
        if chown && attr.kind == fuser::FileType::RegularFile {
            let (_, fd) = self.xattr_node(ino)?;
            self.drop_capability(ino, &fd)?;
        }
        if let Some(mode) = mode {
            self.acl_chmod(ino, mode)?;
        }
        Ok(attr)
    }

    /// Creates an entry in `parent` through `make(mode)` with the mode and
    /// ACLs inherited from the directory. An inherited ACL that cannot be
    /// stored is logged: the entry keeps the mode the ACL's mask allowed,
    /// never more.
    pub(crate) fn create_inheriting(
        &self,
        parent: u64,
        mode: u32,
        umask: u32,
        is_dir: bool,
        make: impl FnOnce(u32) -> Result<FileAttr>,
    ) -> Result<FileAttr> {
        let inh = self.inherit(parent, mode, umask, is_dir)?;
        let attr = make(inh.mode)?;
        if let Err(e) = self.apply_inherited(attr.ino.0, &inh) {
            warn!(
                "inode {}: the ACL inherited from directory inode {parent} could not be stored: {e:?}",
                attr.ino.0
            );
        }
        Ok(attr)
    }
}

impl KmsFs {
    /// Whether to store and enforce POSIX ACLs (asked of the kernel at
    /// `init`; see [`crate::MountSettings::posix_acl`]).
    pub fn with_posix_acl(mut self, on: bool) -> Self {
        self.want_posix_acl = on;
        self
    }

    /// Asks the kernel, at `init`, to leave clearing privileges on write to
    /// the daemon (`FUSE_HANDLE_KILLPRIV_V2`): without it, every write
    /// would first ask `getxattr("security.capability")`. With ACLs on,
    /// also to enforce POSIX ACLs (which turns on `default_permissions`)
    /// and to leave the umask to the daemon (so a default ACL can override
    /// it).
    pub(crate) fn negotiate_xattrs(&mut self, config: &mut fuser::KernelConfig) {
        use fuser::InitFlags;
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        if self.want_posix_acl
            && config
                .add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK)
                .is_ok()
        {
            self.xattr_caps.posix_acl = true;
            self.xattr_caps.dont_mask = true;
        }
    }
}
