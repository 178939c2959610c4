//! Creating, changing and removing directory entries.
//!
//! Every entry is created in the order that keeps the backing store
//! readable at each step: a long name's sidecar before its entry, a
//! directory's IV before anyone can see the directory, and on failure the
//! sidecar goes again.

use crate::attrs::utime;
use crate::errors::{backing_errno, errno, Result};
use crate::fs::KmsFs;
use crate::inodes::{Kind, LinkEntry, Node};
use crate::sys;
use fuser::{Errno, FileAttr, TimeOrNow};
use kmsfs_core::layout;
use kmsfs_core::names::{decrypt_symlink, encrypt_symlink, EncryptedName, SymlinkBinding};
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use tracing::warn;

/// A symlink rename: each side's directory (FUSE number, node, backing
/// descriptor, encrypted name), the symlink's backing `stat`, and the flags.
struct SymlinkMove<'a> {
    dir: (u64, &'a Node, &'a OwnedFd, &'a EncryptedName),
    newdir: (u64, &'a Node, &'a OwnedFd, &'a EncryptedName),
    st: &'a libc::stat,
    flags: u32,
}

/// The caller of an operation that creates an entry.
#[derive(Clone, Copy)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// The changes one `setattr` asks for.
pub struct AttrChange {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New plaintext size.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeOrNow>,
    /// New modification time.
    pub mtime: Option<TimeOrNow>,
}

impl KmsFs {
    /// Applies `change` to inode `ino`; returns the new attributes.
    pub(crate) fn setattr(&self, ino: u64, change: AttrChange) -> Result<FileAttr> {
        let node = self.node(ino)?;
        if let Some(size) = change.size {
            self.truncate_file(ino, &node, size)?;
        }
        let fd = self.fd(ino, &node)?;
        if let Some(mode) = change.mode {
            if node.kind != Kind::Symlink {
                sys::chmod(fd.as_raw_fd(), mode & 0o7777).map_err(errno)?;
            }
        }
        if change.uid.is_some() || change.gid.is_some() {
            sys::chown(fd.as_raw_fd(), change.uid, change.gid).map_err(errno)?;
        }
        if change.atime.is_some() || change.mtime.is_some() {
            sys::utimens(
                fd.as_raw_fd(),
                node.kind == Kind::Symlink,
                utime(change.atime),
                utime(change.mtime),
            )
            .map_err(errno)?;
        }
        self.attr_of(ino, &node)
    }

    /// Looks up `name` in directory `parent`.
    pub(crate) fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr> {
        let dir = self.node(parent)?;
        let enc = self.encrypt(parent, &dir, name)?;
        self.lookup_backing(parent, &dir, OsStr::new(enc.backing_name()))
            .map(|(_, attr)| attr)
    }

    /// Creates an entry via `make(dir_fd, backing_name)`, gives it to the
    /// caller, then looks it up.
    fn make_entry(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(&OwnedFd, &OsStr) -> Result<()>,
    ) -> Result<(Arc<Node>, FileAttr)> {
        let dir = self.node(parent)?;
        let enc = self.encrypt(parent, &dir, name)?;
        let dfd = self.fd(parent, &dir)?;
        let bname = OsStr::new(enc.backing_name());
        // A long name's sidecar must not be written (or, on failure,
        // removed) for an entry that already exists; short names rely on
        // the creating call's own EEXIST.
        if matches!(enc, EncryptedName::Long { .. }) && sys::statat(dfd.as_raw_fd(), bname).is_ok()
        {
            return Err(Errno::EEXIST);
        }
        layout::write_sidecar(dfd.as_fd(), &enc).map_err(errno)?;
        if let Err(e) = make(&dfd, bname) {
            self.drop_sidecar(parent, &dfd, &enc);
            return Err(e);
        }
        self.own(caller.uid, caller.gid, &dfd, bname)?;
        self.lookup_backing(parent, &dir, bname)
    }

    fn drop_sidecar(&self, parent: u64, dfd: &OwnedFd, enc: &EncryptedName) {
        if let Err(e) = layout::remove_sidecar(dfd.as_fd(), enc) {
            warn!(
                "directory inode {parent}: could not remove the sidecar of {}: {e}",
                enc.backing_name()
            );
        }
    }

    /// `create`: a new regular file, open; returns its attributes.
    pub(crate) fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> Result<FileAttr> {
        let mut created = None;
        let (node, attr) = self.make_entry(caller, parent, name, |dfd, bname| {
            let fd = sys::openat(
                dfd.as_raw_fd(),
                bname,
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                mode,
            )
            .map_err(errno)?;
            created = Some(fd);
            Ok(())
        })?;
        match created {
            // Serve the handle from the descriptor just created rather
            // than reopening the file.
            Some(fd) => self.adopt_created(attr.ino.0, &node, fd)?,
            None => self.open_file(attr.ino.0, &node)?,
        }
        Ok(attr)
    }

    /// `mknod`: a regular file (empty, no header until the first write),
    /// FIFO, socket or device.
    pub(crate) fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Result<FileAttr> {
        self.make_entry(caller, parent, name, |dfd, bname| {
            if mode & libc::S_IFMT == libc::S_IFREG {
                sys::openat(
                    dfd.as_raw_fd(),
                    bname,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    mode & 0o7777,
                )
                .map(drop)
                .map_err(errno)
            } else {
                sys::mknodat(dfd.as_raw_fd(), bname, mode, u64::from(rdev)).map_err(errno)
            }
        })
        .map(|(_, attr)| attr)
    }

    /// `mkdir`: the directory is made private, given its IV, then opened
    /// up, so nobody ever sees a directory without its IV.
    pub(crate) fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> Result<FileAttr> {
        self.make_entry(caller, parent, name, |dfd, bname| {
            sys::mkdirat(dfd.as_raw_fd(), bname, 0o700).map_err(errno)?;
            let made = (|| {
                let fd = sys::open_path(dfd.as_raw_fd(), bname)?;
                layout::create_dir_iv(fd.as_fd())?;
                sys::chmod(fd.as_raw_fd(), mode & 0o7777)?;
                Ok::<_, std::io::Error>(fd)
            })();
            match made {
                Ok(_) => Ok(()),
                Err(e) => {
                    if let Ok(fd) = sys::open_path(dfd.as_raw_fd(), bname) {
                        let _ =
                            sys::unlinkat(fd.as_raw_fd(), OsStr::new(layout::DIR_IV_NAME), false);
                    }
                    let _ = sys::unlinkat(dfd.as_raw_fd(), bname, true);
                    Err(errno(e))
                }
            }
        })
        .map(|(_, attr)| attr)
    }

    /// `symlink`: the target is stored encrypted.
    pub(crate) fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        target: &[u8],
    ) -> Result<FileAttr> {
        let dir = self.node(parent)?;
        let iv = *self.dir_iv(parent, &dir)?;
        self.make_entry(caller, parent, name, |dfd, bname| {
            let binding = SymlinkBinding {
                dir_iv: &iv,
                backing_name: bname.as_bytes(),
            };
            let stored = encrypt_symlink(&self.keys, target, binding)
                .map_err(|e| Errno::from_i32(e.errno()))?;
            sys::symlinkat(stored.as_bytes(), dfd.as_raw_fd(), bname).map_err(errno)
        })
        .map(|(_, attr)| attr)
    }

    /// `readlink`: the decrypted target.
    pub(crate) fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let node = self.node(ino)?;
        let fd = self.fd(ino, &node)?;
        let stored = sys::readlink(fd.as_raw_fd()).map_err(errno)?;
        let Some(link) = &node.link else {
            warn!("inode {ino}: a symlink node without its entry");
            return Err(Errno::EIO);
        };
        let binding = SymlinkBinding {
            dir_iv: &link.dir_iv,
            backing_name: &link.backing_name,
        };
        decrypt_symlink(&self.keys, &stored, binding).map_err(|e| {
            warn!(
                "inode {ino}: symlink target of backing entry {:?} does not decrypt \
                 (damaged, or moved there from another entry): {e}",
                OsStr::from_bytes(&link.backing_name)
            );
            Errno::EIO
        })
    }

    /// `link`: a new name for inode `ino` in `newparent`. A symlink's
    /// target is bound to its one name, so symlinks get no second name
    /// (`EPERM`, as from a filesystem without hard links to them).
    pub(crate) fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<FileAttr> {
        let node = self.node(ino)?;
        let fd = self.fd(ino, &node)?;
        let dir = self.node(newparent)?;
        let enc = self.encrypt(newparent, &dir, newname)?;
        let dfd = self.fd(newparent, &dir)?;
        let bname = OsStr::new(enc.backing_name());
        if node.kind == Kind::Symlink {
            return Err(match sys::statat(dfd.as_raw_fd(), bname) {
                Ok(_) => Errno::EEXIST,
                Err(_) => Errno::EPERM,
            });
        }
        layout::write_sidecar(dfd.as_fd(), &enc).map_err(errno)?;
        if let Err(e) = sys::link_fd(fd.as_raw_fd(), dfd.as_raw_fd(), bname) {
            if e.raw_os_error() != Some(libc::EEXIST) {
                self.drop_sidecar(newparent, &dfd, &enc);
            }
            return Err(errno(e));
        }
        self.lookup_backing(newparent, &dir, bname)
            .map(|(_, attr)| attr)
    }

    /// `unlink`.
    pub(crate) fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        let dir = self.node(parent)?;
        let enc = self.encrypt(parent, &dir, name)?;
        let dfd = self.fd(parent, &dir)?;
        sys::unlinkat(dfd.as_raw_fd(), OsStr::new(enc.backing_name()), false).map_err(errno)?;
        self.drop_sidecar(parent, &dfd, &enc);
        Ok(())
    }

    /// `rmdir`: the IV is removed last but one and put back if the
    /// directory itself cannot go.
    pub(crate) fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        let dir = self.node(parent)?;
        let enc = self.encrypt(parent, &dir, name)?;
        let dfd = self.fd(parent, &dir)?;
        let bname = OsStr::new(enc.backing_name());
        let fd = sys::open_path(dfd.as_raw_fd(), bname).map_err(errno)?;
        let st = sys::fstat(fd.as_raw_fd()).map_err(errno)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(Errno::ENOTDIR);
        }
        if !self.is_empty_dir(parent, fd.as_raw_fd())? {
            return Err(Errno::ENOTEMPTY);
        }
        // Keep the IV until the directory is really gone, so a failed
        // rmdir leaves it readable.
        let iv = layout::read_dir_iv(fd.as_fd());
        sys::unlinkat(fd.as_raw_fd(), OsStr::new(layout::DIR_IV_NAME), false).map_err(errno)?;
        if let Err(e) = sys::unlinkat(dfd.as_raw_fd(), bname, true) {
            if let Ok(iv) = iv {
                if let Err(re) = layout::restore_dir_iv(fd.as_fd(), &iv) {
                    warn!("directory inode {parent}: could not restore the IV of {bname:?} after a failed rmdir: {re}");
                }
            }
            return Err(errno(e));
        }
        self.drop_sidecar(parent, &dfd, &enc);
        Ok(())
    }

    /// `rename` with `flags` (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    pub(crate) fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let dir = self.node(parent)?;
        let newdir = self.node(newparent)?;
        let old = self.encrypt(parent, &dir, name)?;
        let new = self.encrypt(newparent, &newdir, newname)?;
        let dfd = self.fd(parent, &dir)?;
        let ndfd = self.fd(newparent, &newdir)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let old_st = sys::statat(dfd.as_raw_fd(), OsStr::new(old.backing_name())).map_err(errno)?;
        let is_link = |st: &libc::stat| st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if exchange {
            if is_link(&old_st)
                || sys::statat(ndfd.as_raw_fd(), OsStr::new(new.backing_name()))
                    .is_ok_and(|st| is_link(&st))
            {
                // Two symlinks re-created at once cannot be one atomic step.
                return Err(Errno::EINVAL);
            }
        } else if is_link(&old_st) {
            if parent == newparent && old == new {
                return Ok(());
            }
            let moved = SymlinkMove {
                dir: (parent, &dir, &dfd, &old),
                newdir: (newparent, &newdir, &ndfd, &new),
                st: &old_st,
                flags,
            };
            return self.rename_symlink(moved);
        }
        // A sidecar written here for a name that did not exist must go
        // again if the rename fails.
        let new_is_fresh = layout::write_sidecar(ndfd.as_fd(), &new).map_err(errno)?;
        if exchange {
            // Both names stay in use: both sidecars must exist and stay.
            layout::write_sidecar(dfd.as_fd(), &old).map_err(errno)?;
        }
        if let Err(e) = sys::renameat2(
            dfd.as_raw_fd(),
            OsStr::new(old.backing_name()),
            ndfd.as_raw_fd(),
            OsStr::new(new.backing_name()),
            flags,
        ) {
            if new_is_fresh {
                self.drop_sidecar(newparent, &ndfd, &new);
            }
            return Err(errno(e));
        }
        if !exchange && old.backing_name() != new.backing_name() {
            self.drop_sidecar(parent, &dfd, &old);
        }
        Ok(())
    }

    /// Renames a symlink by re-creating it under its new name, since its
    /// target is bound to its entry: the target is re-encrypted for the new
    /// entry and written as a temporary entry of the new directory, given
    /// the old one's owner and times, renamed over the new name (atomic,
    /// honouring `RENAME_NOREPLACE`), and only then is the old name removed.
    /// A crash before that last step leaves both names (and at most an
    /// unnamed temporary, which fsck removes); it never leaves neither.
    fn rename_symlink(&self, m: SymlinkMove<'_>) -> Result<()> {
        let (parent, dir, dfd, old) = m.dir;
        let (newparent, newdir, ndfd, new) = m.newdir;
        let old_iv = *self.dir_iv(parent, dir)?;
        let new_iv = *self.dir_iv(newparent, newdir)?;
        let stored =
            sys::readlinkat(dfd.as_raw_fd(), OsStr::new(old.backing_name())).map_err(errno)?;
        let old_binding = SymlinkBinding {
            dir_iv: &old_iv,
            backing_name: old.backing_name().as_bytes(),
        };
        let target = decrypt_symlink(&self.keys, &stored, old_binding).map_err(|e| {
            warn!(
                "directory inode {parent}: symlink target of {:?} does not decrypt, not renamed: {e}",
                old.backing_name()
            );
            Errno::EIO
        })?;
        let new_binding = SymlinkBinding {
            dir_iv: &new_iv,
            backing_name: new.backing_name().as_bytes(),
        };
        let restored = encrypt_symlink(&self.keys, &target, new_binding)
            .map_err(|e| Errno::from_i32(e.errno()))?;
        let tmp = layout::temp_name().map_err(errno)?;
        let tmp = OsStr::new(&tmp);
        sys::symlinkat(restored.as_bytes(), ndfd.as_raw_fd(), tmp).map_err(errno)?;
        let placed = (|| {
            sys::chown_at(ndfd.as_raw_fd(), tmp, Some(m.st.st_uid), Some(m.st.st_gid))?;
            let times = [
                libc::timespec {
                    tv_sec: m.st.st_atime,
                    tv_nsec: m.st.st_atime_nsec,
                },
                libc::timespec {
                    tv_sec: m.st.st_mtime,
                    tv_nsec: m.st.st_mtime_nsec,
                },
            ];
            sys::utimens_at(ndfd.as_raw_fd(), tmp, &times)?;
            let fresh = layout::write_sidecar(ndfd.as_fd(), new)?;
            if let Err(e) = sys::renameat2(
                ndfd.as_raw_fd(),
                tmp,
                ndfd.as_raw_fd(),
                OsStr::new(new.backing_name()),
                m.flags & libc::RENAME_NOREPLACE,
            ) {
                if fresh {
                    self.drop_sidecar(newparent, ndfd, new);
                }
                return Err(e);
            }
            Ok(())
        })();
        if let Err(e) = placed {
            let _ = sys::unlinkat(ndfd.as_raw_fd(), tmp, false);
            return Err(errno(e));
        }
        sys::unlinkat(dfd.as_raw_fd(), OsStr::new(old.backing_name()), false).map_err(|e| {
            warn!(
                "directory inode {parent}: symlink {:?} was re-created as {:?} in directory inode \
                 {newparent} but the old entry could not be removed: {e}",
                old.backing_name(),
                new.backing_name()
            );
            errno(e)
        })?;
        if old.backing_name() != new.backing_name() || parent != newparent {
            self.drop_sidecar(parent, dfd, old);
        }
        // The kernel keeps the symlink's inode number across the rename:
        // point its node at the new backing inode.
        let bname = OsStr::new(new.backing_name());
        let new_st = sys::statat(ndfd.as_raw_fd(), bname).map_err(errno)?;
        let ino = self
            .inodes
            .fuse_ino(m.st)
            .map_err(|e| backing_errno(parent, old.backing_name(), e))?;
        let link = Box::new(LinkEntry {
            dir_iv: new_iv,
            backing_name: bname.as_bytes().into(),
        });
        self.inodes
            .moved(ino, ndfd, bname, new_st.st_ino, link)
            .map_err(|e| backing_errno(newparent, new.backing_name(), e))
    }

    /// `fsyncdir`.
    pub(crate) fn sync_dir(&self, ino: u64) -> Result<()> {
        let node = self.node(ino)?;
        let fd = self
            .inodes
            .open(&node, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| backing_errno(ino, "directory", e))?;
        std::fs::File::from(fd).sync_all().map_err(errno)
    }

    /// `statfs` of the backing filesystem.
    pub(crate) fn statfs(&self) -> Result<libc::statvfs> {
        let root = self.node(crate::inodes::ROOT_INO)?;
        let fd = self.fd(crate::inodes::ROOT_INO, &root)?;
        sys::statvfs(fd.as_raw_fd()).map_err(errno)
    }
}
