//! The `fuser::Filesystem` impl: one line per operation, from the kernel's
//! request to a `KmsFs` method and back through one reply helper per kind.

use crate::entries::{AttrChange, Caller};
use crate::errors::Result;
use crate::fs::KmsFs;
use crate::open_files::FH_APPEND;
use fuser::{
    Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use kmsfs_core::names::MAX_NAME_LEN;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tracing::{debug, warn};

/// `flush` requests received by this process (all mounts), for the test
/// that shows the kernel stops sending them after the first.
static FLUSH_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// How many `flush` requests this process has received.
pub fn flush_requests() -> u64 {
    FLUSH_REQUESTS.load(Ordering::Relaxed)
}

/// How long the kernel may cache attributes and entries. Every change goes
/// through this daemon, which tells the kernel; the backing directory must
/// not be changed underneath a live mount (docs/compat.md). A
/// `shared_storage` mount uses [`SHARED_TTL`] instead.
pub(crate) const TTL: Duration = Duration::from_secs(30);

/// The attribute and entry lifetime of a `shared_storage` mount: none, so
/// that every lookup and `stat` asks the backing store, which other hosts
/// change behind this daemon's back (gocryptfs `-sharedstorage` does the
/// same).
pub(crate) const SHARED_TTL: Duration = Duration::ZERO;

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn reply_entry(reply: ReplyEntry, ttl: &Duration, r: Result<FileAttr>) {
    match r {
        Ok(attr) => reply.entry(ttl, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_attr(reply: ReplyAttr, ttl: &Duration, r: Result<FileAttr>) {
    match r {
        Ok(attr) => reply.attr(ttl, &attr),
        Err(e) => reply.error(e),
    }
}

fn reply_data(reply: ReplyData, r: Result<Vec<u8>>) {
    match r {
        Ok(d) => reply.data(&d),
        Err(e) => reply.error(e),
    }
}

fn reply_open(reply: ReplyOpen, r: Result<u64>) {
    match r {
        Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
        Err(e) => reply.error(e),
    }
}

/// A size probe (`size` 0) gets the length; a buffer too small, `ERANGE`.
fn reply_xattr(reply: ReplyXattr, size: u32, r: Result<Vec<u8>>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(e),
    }
}

fn append_flag(flags: i32) -> u64 {
    if flags & libc::O_APPEND != 0 {
        FH_APPEND
    } else {
        0
    }
}

impl Filesystem for KmsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_PARALLEL_DIROPS
                | fuser::InitFlags::FUSE_DO_READDIRPLUS
                | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        // The kernel gathers small writes in its page cache and sends
        // whole pages: 512-byte writes stop costing a unit rewrite each.
        self.writeback = !self.read_only
            && self.writeback
            && config
                .add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE)
                .is_ok();
        if self.writeback {
            self.space.enable();
        }
        self.negotiate_xattrs(config);
        // The kernel offers io_uring only where the administrator turned it
        // on (`fuse.enable_uring=1`); otherwise requests stay on /dev/fuse.
        let uring = self.want_uring
            && config
                .add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
        if self.want_uring && !uring {
            warn!(
                "-o uring: the kernel does not offer FUSE over io_uring (it does once root \
                 writes 1 to /sys/module/fuse/parameters/enable_uring, before mounting); \
                 serving over /dev/fuse"
            );
        }
        debug!(
            "FUSE init: capabilities {:?}, writeback cache {}, file handles {}, io_uring {uring}",
            config.capabilities(),
            self.writeback,
            self.inodes.uses_handles()
        );
        Ok(())
    }

    fn destroy(&mut self) {
        debug!("filesystem unmounted; keys are dropped with it");
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, &self.ttl, self.lookup(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
        self.space.forget(ino.0);
    }

    // BATCH_FORGET: fuser's default calls `forget` for each node.

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(e) = self.space.take(ino.0, fh.is_some()) {
            return reply.error(e);
        }
        reply_attr(
            reply,
            &self.ttl,
            self.node(ino.0).and_then(|n| self.attr_of(ino.0, &n)),
        );
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        let _pass = self.gate.pass();
        let r = self.setattr_as(caller(req), ino.0, change);
        if size.is_some() {
            self.changed(ino.0);
        }
        reply_attr(reply, &self.ttl, r);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        reply_data(reply, self.readlink(ino.0));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _pass = self.gate.pass();
        let r = self.create_inheriting(parent.0, mode, umask, false, |mode| {
            self.mknod(caller(req), parent.0, name, mode, rdev)
        });
        if let Ok(attr) = &r {
            self.changed(attr.ino.0);
        }
        reply_entry(reply, &self.ttl, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _pass = self.gate.pass();
        let r = self.create_inheriting(parent.0, mode, umask, true, |mode| {
            self.mkdir(caller(req), parent.0, name, mode)
        });
        // Its new `kmsfs.diriv` may reuse a freed inode number.
        if let Ok(attr) = &r {
            self.changed(attr.ino.0);
        }
        reply_entry(reply, &self.ttl, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.gate.pass();
        reply_empty(reply, self.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.gate.pass();
        reply_empty(reply, self.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = target.as_os_str().as_bytes();
        let _pass = self.gate.pass();
        reply_entry(
            reply,
            &self.ttl,
            self.symlink(caller(req), parent.0, link_name, target),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _pass = self.gate.pass();
        let r = self.rename(parent.0, name, newparent.0, newname, flags.bits());
        reply_empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _pass = self.gate.pass();
        reply_entry(reply, &self.ttl, self.link(ino.0, newparent.0, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let truncate = flags.0 & libc::O_TRUNC != 0 && flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        // Only a truncating open changes the store: other opens, like
        // reads, go on during a snapshot's freeze.
        let _pass = truncate.then(|| self.gate.pass());
        let r = self.node(ino.0).and_then(|node| {
            self.open_file(ino.0, &node)?;
            if truncate {
                if let Err(e) = self.truncate_file(ino.0, &node, 0) {
                    self.release_file(&node);
                    return Err(e);
                }
            }
            Ok(append_flag(flags.0))
        });
        if truncate {
            self.changed(ino.0);
        }
        reply_open(reply, r);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.read_file(ino.0, offset, size, |r| match r {
            Ok(d) => reply.data(d),
            Err(e) => reply.error(e),
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _pass = self.gate.pass();
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Err(e) = self.kill_privileges(ino.0) {
                return reply.error(e);
            }
        }
        let r = self.write_file(ino.0, fh.0, offset, data);
        // Recorded even on failure: a failed write may have changed bytes.
        self.changed(ino.0);
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // A FLUSH carries nothing here: every WRITE reaches the backing file
        // before its reply, and POSIX and BSD locks are the kernel's (this
        // daemon implements neither). ENOSYS makes the kernel stop sending
        // it (`no_flush`), which saves one synchronous round trip per
        // close(2). The kernel still writes its cache back first on close
        // and returns that write's error from close(2).
        FLUSH_REQUESTS.fetch_add(1, Ordering::Relaxed);
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Ok(node) = self.node(ino.0) {
            self.release_file(&node);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.sync_file(ino.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self
            .node(ino.0)
            .and_then(|dir| self.list(ino.0, &dir))
            .map(|entries| self.listings.insert(entries));
        reply_open(reply, r);
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.listings.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), (i + 1) as u64, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = self.listings.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let dir = match self.node(ino.0) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let next = (i + 1) as u64;
            if e.backing.is_empty() {
                // `.` and `..` take no lookup reference; the kernel ignores
                // their attributes.
                let Ok(mut attr) = self.attr_of(ino.0, &dir) else {
                    continue;
                };
                attr.ino = INodeNo(e.ino);
                if reply.add(
                    INodeNo(e.ino),
                    next,
                    &e.name,
                    &self.ttl,
                    &attr,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            // Each entry returned counts as a lookup, as in `lookup`.
            let Ok((_, attr)) = self.lookup_backing(ino.0, &dir, &e.backing) else {
                continue; // removed since the listing was taken
            };
            if reply.add(attr.ino, next, &e.name, &self.ttl, &attr, Generation(0)) {
                self.inodes.forget(attr.ino.0, 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.listings.remove(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.sync_dir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.statfs() {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                MAX_NAME_LEN as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        // Held during a snapshot freeze like every change; nothing is
        // recorded for the capture, which reads every entry's attributes
        // while frozen.
        let _pass = self.gate.pass();
        reply_empty(reply, self.setxattr(ino.0, name, value, flags));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.getxattr(ino.0, name));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.listxattr(ino.0));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.gate.pass();
        reply_empty(reply, self.removexattr(ino.0, name));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's: `FUSE_POSIX_ACL` (and
        // `allow_other`) turn on default_permissions, and without
        // `allow_other` only the mounting user (and root) can reach the
        // mount at all.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _pass = self.gate.pass();
        let r = self.create_inheriting(parent.0, mode, umask, false, |mode| {
            self.create(caller(req), parent.0, name, mode & 0o7777)
        });
        if let Ok(attr) = &r {
            self.changed(attr.ino.0);
        }
        match r {
            Ok(attr) => reply.created(
                &self.ttl,
                &attr,
                Generation(0),
                FileHandle(append_flag(flags)),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _pass = self.gate.pass();
        let r = self.allocate_file(ino.0, offset, length, mode);
        self.changed(ino.0);
        reply_empty(reply, r);
    }
}
