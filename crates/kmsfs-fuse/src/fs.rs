//! The FUSE filesystem: the decrypted view of a backing directory.

use crate::node::{Inodes, Kind, Node, OpenFile, ROOT_INO};
use crate::sys::{self, Time};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use kmsfs_core::contents::{plaintext_size, FileContents, FILE_HEADER_LEN};
use kmsfs_core::keys::FsKeys;
use kmsfs_core::names::{
    self, classify, decrypt_name, decrypt_symlink, encrypt_name, encrypt_symlink, BackingEntry,
    EncryptedName, DIR_IV_LEN, DIR_IV_MODE, DIR_IV_NAME, LONGNAME_SUFFIX,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug, warn};

/// How long the kernel may cache attributes and entries. Every change goes
/// through this daemon, which tells the kernel; the backing directory must
/// not be changed underneath a live mount (docs/compat.md).
const TTL: Duration = Duration::from_secs(30);
/// A file handle flag: the file was opened with `O_APPEND`.
const FH_APPEND: u64 = 1;

type Result<T> = std::result::Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The decrypted view of one backing directory, ready to mount.
pub struct KmsFs {
    keys: Arc<FsKeys>,
    inodes: Inodes,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_dir_handle: Mutex<u64>,
    read_only: bool,
    writeback: bool,
    euid: u32,
    egid: u32,
}

/// The changes one `setattr` asks for.
struct AttrChange {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
}

struct DirEntry {
    ino: u64,
    kind: FileType,
    name: OsString,
    /// The backing entry name (empty for `.` and `..`).
    backing: OsString,
}

impl KmsFs {
    /// Serves `cipherdir` with the subkeys `keys` (derived from the unwrapped
    /// master key); `writeback` asks the kernel for its writeback cache.
    pub fn new(
        cipherdir: &Path,
        keys: FsKeys,
        read_only: bool,
        writeback: bool,
    ) -> io::Result<Self> {
        let fd = sys::openat(
            libc::AT_FDCWD,
            cipherdir.as_os_str(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let root = Node {
            fd,
            kind: Kind::Dir,
            lookups: Mutex::new(1),
            open: Default::default(),
            dir_iv: Default::default(),
        };
        // Fail at mount, not at first access, if the root IV is unreadable.
        read_dir_iv(&root)?;
        Ok(KmsFs {
            keys: Arc::new(keys),
            inodes: Inodes::new(root, st.st_ino),
            dirs: Mutex::new(HashMap::new()),
            next_dir_handle: Mutex::new(1),
            read_only,
            writeback,
            // SAFETY: geteuid/getegid cannot fail.
            euid: unsafe { libc::geteuid() },
            egid: unsafe { libc::getegid() },
        })
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<Node>> {
        self.inodes.get(ino.0).ok_or(Errno::ENOENT)
    }

    fn dir_iv<'a>(&self, dir: &'a Node) -> Result<&'a [u8; DIR_IV_LEN]> {
        if dir.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        read_dir_iv(dir).map_err(errno)
    }

    /// The backing name of `name` in `dir`.
    fn encrypt(&self, dir: &Node, name: &OsStr) -> Result<EncryptedName> {
        let iv = self.dir_iv(dir)?;
        encrypt_name(&self.keys, iv, name.as_bytes()).map_err(|e| Errno::from_i32(e.errno()))
    }

    /// Writes a long name's sidecar before the entry it names is created.
    fn write_sidecar(&self, dir: &Node, enc: &EncryptedName) -> Result<()> {
        if let EncryptedName::Long { hashed, full } = enc {
            let side = OsString::from(format!("{hashed}{LONGNAME_SUFFIX}"));
            match sys::openat(
                dir.raw(),
                &side,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                0o400,
            ) {
                Ok(fd) => {
                    let mut f = File::from(fd);
                    f.write_all(full.as_bytes()).map_err(errno)?;
                    f.sync_all().map_err(errno)?;
                }
                // Same name, same contents: an existing sidecar is already right.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(errno(e)),
            }
        }
        Ok(())
    }

    fn remove_sidecar(&self, dir: &Node, enc: &EncryptedName) {
        if let EncryptedName::Long { hashed, .. } = enc {
            let side = OsString::from(format!("{hashed}{LONGNAME_SUFFIX}"));
            if let Err(e) = sys::unlinkat(dir.raw(), &side, false) {
                warn!("could not remove long-name sidecar: {e}");
            }
        }
    }

    /// Looks up a backing entry and registers one kernel reference to it.
    fn lookup_backing(&self, dir: &Node, bname: &OsStr) -> Result<(Arc<Node>, FileAttr)> {
        let st = sys::statat(dir.raw(), bname).map_err(errno)?;
        let ino = self.inodes.fuse_ino(st.st_ino);
        let node = self
            .inodes
            .remember(ino, || {
                Ok(Node {
                    fd: sys::open_path(dir.raw(), bname)?,
                    kind: Kind::from_mode(st.st_mode),
                    lookups: Mutex::new(0),
                    open: Default::default(),
                    dir_iv: Default::default(),
                })
            })
            .map_err(errno)?;
        let attr = self.attr(&node, ino, &st)?;
        Ok((node, attr))
    }

    fn attr_of(&self, ino: u64, node: &Node) -> Result<FileAttr> {
        let st = sys::fstat(node.raw()).map_err(errno)?;
        self.attr(node, ino, &st)
    }

    fn attr(&self, node: &Node, ino: u64, st: &libc::stat) -> Result<FileAttr> {
        let kind = file_type(st.st_mode);
        let size = match node.kind {
            Kind::File => match &*node.open.read() {
                Some(open) => open.contents.size(),
                None => plaintext_size(st.st_size as u64),
            },
            Kind::Symlink => {
                let stored = sys::readlink(node.raw()).map_err(errno)?;
                decrypt_symlink(&self.keys, &stored)
                    .map(|t| t.len() as u64)
                    .unwrap_or(stored.len() as u64)
            }
            _ => st.st_size as u64,
        };
        let t = |s: i64, ns: i64| {
            if s >= 0 {
                UNIX_EPOCH + Duration::new(s as u64, ns as u32)
            } else {
                UNIX_EPOCH
            }
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: st.st_blocks as u64,
            atime: t(st.st_atime, st.st_atime_nsec),
            mtime: t(st.st_mtime, st.st_mtime_nsec),
            ctime: t(st.st_ctime, st.st_ctime_nsec),
            crtime: t(st.st_ctime, st.st_ctime_nsec),
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Gives a new entry the caller's ownership (the daemon runs as root, so
    /// the backing entry starts out as the daemon's).
    fn own(&self, req: &Request, dir: &Node, bname: &OsStr) -> Result<()> {
        if req.uid() == self.euid && req.gid() == self.egid {
            // Already right, including set-group-ID inheritance, which the
            // backing directory (same mode bits) applied itself.
            return Ok(());
        }
        let dir_st = sys::fstat(dir.raw()).map_err(errno)?;
        // Under a set-group-ID directory the group is inherited: keep it.
        let gid = (dir_st.st_mode & libc::S_ISGID == 0).then(|| req.gid());
        sys::chown_at(dir.raw(), bname, Some(req.uid()), gid).map_err(errno)
    }

    /// Opens the contents of a regular file, sharing state between handles.
    fn open_file(&self, node: &Node) -> Result<()> {
        let mut open = node.open.write();
        if let Some(o) = open.as_mut() {
            o.opens += 1;
            return Ok(());
        }
        *open = Some(self.load_file(node)?);
        Ok(())
    }

    fn load_file(&self, node: &Node) -> Result<OpenFile> {
        let fd = if self.read_only {
            sys::reopen(&node.fd, libc::O_RDONLY)
        } else {
            sys::reopen(&node.fd, libc::O_RDWR).or_else(|e| {
                if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS)) {
                    sys::reopen(&node.fd, libc::O_RDONLY)
                } else {
                    Err(e)
                }
            })
        }
        .map_err(errno)?;
        let file = File::from(fd);
        let len = file.metadata().map_err(errno)?.len();
        let contents = FileContents::open(&self.keys, &file, len).map_err(|e| {
            warn!("cannot open encrypted file: {e}");
            Errno::from_i32(e.errno())
        })?;
        Ok(OpenFile {
            file,
            contents,
            opens: 1,
        })
    }

    /// Runs `f` on the file's open state, opening it just for the call if
    /// no handle is open (truncate(2) by path, fallocate).
    fn with_open_file<T>(
        &self,
        node: &Node,
        f: impl FnOnce(&mut OpenFile, &FsKeys) -> Result<T>,
    ) -> Result<T> {
        let mut open = node.open.write();
        match open.as_mut() {
            Some(o) => f(o, &self.keys),
            None => {
                let mut o = self.load_file(node)?;
                f(&mut o, &self.keys)
            }
        }
    }

    fn create_dir_iv(&self, dir_fd: &OwnedFd) -> io::Result<()> {
        let iv = names::new_dir_iv().map_err(|e| io::Error::other(e.to_string()))?;
        let fd = sys::openat(
            dir_fd.as_raw_fd(),
            OsStr::new(DIR_IV_NAME),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            DIR_IV_MODE,
        )?;
        let mut f = File::from(fd);
        f.write_all(&iv)?;
        f.sync_all()
    }

    fn list(&self, dir: &Node) -> Result<Vec<DirEntry>> {
        let iv = *self.dir_iv(dir)?;
        let mut out = Vec::new();
        for (bname, ino, dtype) in sys::list_dir(&dir.fd).map_err(errno)? {
            let Ok(bname) = String::from_utf8(bname) else {
                continue;
            };
            let full = match classify(&bname) {
                BackingEntry::Internal => continue,
                BackingEntry::Encoded(s) => s.to_string(),
                BackingEntry::LongName(h) => {
                    match read_small(dir, &format!("{h}{LONGNAME_SUFFIX}")) {
                        Ok(s) => s,
                        Err(e) => {
                            warn!("long name without a readable sidecar: {e}");
                            continue;
                        }
                    }
                }
            };
            let name = match decrypt_name(&self.keys, &iv, &full) {
                Ok(n) => n,
                Err(e) => {
                    warn!("skipping undecryptable directory entry: {e}");
                    continue;
                }
            };
            let kind = match dtype {
                libc::DT_DIR => FileType::Directory,
                libc::DT_REG => FileType::RegularFile,
                libc::DT_LNK => FileType::Symlink,
                libc::DT_FIFO => FileType::NamedPipe,
                libc::DT_SOCK => FileType::Socket,
                libc::DT_CHR => FileType::CharDevice,
                libc::DT_BLK => FileType::BlockDevice,
                // DT_UNKNOWN: the backing filesystem does not say; ask it.
                _ => match sys::statat(dir.raw(), OsStr::new(&bname)) {
                    Ok(st) => file_type(st.st_mode),
                    Err(_) => continue,
                },
            };
            out.push(DirEntry {
                ino: self.inodes.fuse_ino(ino),
                kind,
                name: OsString::from_vec(name),
                backing: OsString::from(bname),
            });
        }
        Ok(out)
    }

    /// The listing taken at `opendir` for the handle `fh`.
    fn listing(&self, fh: FileHandle) -> Option<Arc<Vec<DirEntry>>> {
        self.dirs.lock().get(&fh.0).cloned()
    }

    fn is_empty_dir(&self, fd: &OwnedFd) -> Result<bool> {
        let entries = sys::list_dir(fd).map_err(errno)?;
        Ok(entries
            .iter()
            .all(|(n, _, _)| n.as_slice() == DIR_IV_NAME.as_bytes()))
    }

    fn do_setattr(&self, ino: INodeNo, change: AttrChange) -> Result<FileAttr> {
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = change;
        let node = self.node(ino)?;
        if let Some(size) = size {
            if node.kind != Kind::File {
                return Err(if node.kind == Kind::Dir {
                    Errno::EISDIR
                } else {
                    Errno::EINVAL
                });
            }
            self.with_open_file(&node, |o, keys| {
                o.contents
                    .set_len(keys, &o.file, size)
                    .map_err(|e| Errno::from_i32(e.errno()))
            })?;
        }
        if let Some(mode) = mode {
            if node.kind != Kind::Symlink {
                sys::chmod(node.raw(), mode & 0o7777).map_err(errno)?;
            }
        }
        if uid.is_some() || gid.is_some() {
            sys::chown(node.raw(), uid, gid).map_err(errno)?;
        }
        if atime.is_some() || mtime.is_some() {
            let conv = |t: Option<TimeOrNow>| match t {
                None => Time::Omit,
                Some(TimeOrNow::Now) => Time::Now,
                Some(TimeOrNow::SpecificTime(st)) => match st.duration_since(UNIX_EPOCH) {
                    Ok(d) => Time::At(d.as_secs() as i64, i64::from(d.subsec_nanos())),
                    Err(e) => {
                        let d = e.duration();
                        let (s, ns) = (d.as_secs() as i64, i64::from(d.subsec_nanos()));
                        if ns == 0 {
                            Time::At(-s, 0)
                        } else {
                            Time::At(-s - 1, 1_000_000_000 - ns)
                        }
                    }
                },
            };
            sys::utimens(
                node.raw(),
                node.kind == Kind::Symlink,
                conv(atime),
                conv(mtime),
            )
            .map_err(errno)?;
        }
        self.attr_of(ino.0, &node)
    }

    /// Creates an entry via `make(dir_fd, backing_name)`, then looks it up.
    fn make_entry(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        make: impl FnOnce(&Node, &OsStr) -> Result<()>,
    ) -> Result<(Arc<Node>, FileAttr)> {
        let dir = self.node(parent)?;
        let enc = self.encrypt(&dir, name)?;
        let bname = OsString::from(enc.backing_name());
        // A long name's sidecar must not be written (or, on failure,
        // removed) for an entry that already exists; short names rely on
        // the creating call's own EEXIST.
        if matches!(enc, EncryptedName::Long { .. }) && sys::statat(dir.raw(), &bname).is_ok() {
            return Err(Errno::EEXIST);
        }
        self.write_sidecar(&dir, &enc)?;
        if let Err(e) = make(&dir, &bname) {
            self.remove_sidecar(&dir, &enc);
            return Err(e);
        }
        self.own(req, &dir, &bname)?;
        self.lookup_backing(&dir, &bname)
    }
}

fn answer_empty(reply: ReplyEmpty, r: Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn answer_entry(reply: ReplyEntry, r: Result<(Arc<Node>, FileAttr)>) {
    match r {
        Ok((_, attr)) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFREG => FileType::RegularFile,
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        _ => FileType::BlockDevice,
    }
}

fn read_small(dir: &Node, name: &str) -> io::Result<String> {
    let fd = sys::openat(dir.raw(), OsStr::new(name), libc::O_RDONLY, 0)?;
    let mut s = String::new();
    File::from(fd).take(4096).read_to_string(&mut s)?;
    Ok(s)
}

fn read_dir_iv(dir: &Node) -> io::Result<&[u8; DIR_IV_LEN]> {
    if let Some(iv) = dir.dir_iv.get() {
        return Ok(iv);
    }
    let fd = sys::openat(dir.raw(), OsStr::new(DIR_IV_NAME), libc::O_RDONLY, 0)?;
    let mut iv = [0u8; DIR_IV_LEN];
    File::from(fd).read_exact(&mut iv).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("directory IV file {DIR_IV_NAME} is unreadable: {e}"),
        )
    })?;
    Ok(dir.dir_iv.get_or_init(|| iv))
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
        debug!(
            "FUSE init: capabilities {:?}, writeback cache {}",
            config.capabilities(),
            self.writeback
        );
        Ok(())
    }

    fn destroy(&mut self) {
        debug!("filesystem unmounted; keys are dropped with it");
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = (|| {
            let dir = self.node(parent)?;
            let enc = self.encrypt(&dir, name)?;
            self.lookup_backing(&dir, OsStr::new(enc.backing_name()))
        })();
        answer_entry(reply, r);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| self.attr_of(ino.0, &n)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
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
        match self.do_setattr(ino, change) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = (|| {
            let node = self.node(ino)?;
            let stored = sys::readlink(node.raw()).map_err(errno)?;
            decrypt_symlink(&self.keys, &stored).map_err(|e| {
                warn!("undecryptable symlink: {e}");
                Errno::EIO
            })
        })();
        match r {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
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
        let r = self.make_entry(req, parent, name, |dir, bname| {
            if mode & libc::S_IFMT == libc::S_IFREG {
                // A regular file starts empty: no header until the first write.
                sys::openat(
                    dir.raw(),
                    bname,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    mode & !umask & 0o7777,
                )
                .map(drop)
                .map_err(errno)
            } else {
                sys::mknodat(dir.raw(), bname, mode & !umask, u64::from(rdev)).map_err(errno)
            }
        });
        answer_entry(reply, r);
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
        let r = self.make_entry(req, parent, name, |dir, bname| {
            // Create private, add the IV, then open up: nobody ever sees
            // a directory without its IV.
            sys::mkdirat(dir.raw(), bname, 0o700).map_err(errno)?;
            let made = (|| {
                let fd = sys::open_path(dir.raw(), bname)?;
                self.create_dir_iv(&fd)?;
                sys::chmod(fd.as_raw_fd(), mode & !umask & 0o7777)
            })();
            made.map_err(|e| {
                let _ = sys::unlinkat(
                    dir.raw(),
                    &OsString::from(format!("{}/{DIR_IV_NAME}", bname.to_string_lossy())),
                    false,
                );
                let _ = sys::unlinkat(dir.raw(), bname, true);
                errno(e)
            })
        });
        answer_entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let dir = self.node(parent)?;
            let enc = self.encrypt(&dir, name)?;
            sys::unlinkat(dir.raw(), OsStr::new(enc.backing_name()), false).map_err(errno)?;
            self.remove_sidecar(&dir, &enc);
            Ok(())
        })();
        answer_empty(reply, r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let dir = self.node(parent)?;
            let enc = self.encrypt(&dir, name)?;
            let bname = OsStr::new(enc.backing_name());
            let fd = sys::open_path(dir.raw(), bname).map_err(errno)?;
            let st = sys::fstat(fd.as_raw_fd()).map_err(errno)?;
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                return Err(Errno::ENOTDIR);
            }
            if !self.is_empty_dir(&fd)? {
                return Err(Errno::ENOTEMPTY);
            }
            // Keep the IV until the directory is really gone, so a failed
            // rmdir leaves it readable.
            let iv = read_small_bytes(&fd, DIR_IV_NAME);
            sys::unlinkat(fd.as_raw_fd(), OsStr::new(DIR_IV_NAME), false).map_err(errno)?;
            if let Err(e) = sys::unlinkat(dir.raw(), bname, true) {
                if let Ok(iv) = iv {
                    restore_dir_iv(&fd, &iv);
                }
                return Err(errno(e));
            }
            self.remove_sidecar(&dir, &enc);
            Ok(())
        })();
        answer_empty(reply, r);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let stored = encrypt_symlink(&self.keys, target.as_os_str().as_bytes())
                .map_err(|e| Errno::from_i32(e.errno()))?;
            self.make_entry(req, parent, link_name, |dir, bname| {
                sys::symlinkat(stored.as_bytes(), dir.raw(), bname).map_err(errno)
            })
        })();
        answer_entry(reply, r);
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
        let r = (|| {
            let dir = self.node(parent)?;
            let newdir = self.node(newparent)?;
            let old = self.encrypt(&dir, name)?;
            let new = self.encrypt(&newdir, newname)?;
            // A sidecar written here for a name that did not exist must go
            // again if the rename fails.
            let new_is_fresh = matches!(new, EncryptedName::Long { .. })
                && sys::statat(newdir.raw(), OsStr::new(new.backing_name())).is_err();
            self.write_sidecar(&newdir, &new)?;
            let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
            if exchange {
                // Both names stay in use: both sidecars must exist and stay.
                self.write_sidecar(&dir, &old)?;
            }
            if let Err(e) = sys::renameat2(
                dir.raw(),
                OsStr::new(old.backing_name()),
                newdir.raw(),
                OsStr::new(new.backing_name()),
                flags.bits(),
            ) {
                if new_is_fresh {
                    self.remove_sidecar(&newdir, &new);
                }
                return Err(errno(e));
            }
            if !exchange && old.backing_name() != new.backing_name() {
                self.remove_sidecar(&dir, &old);
            }
            Ok(())
        })();
        answer_empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let node = self.node(ino)?;
            let dir = self.node(newparent)?;
            let enc = self.encrypt(&dir, newname)?;
            let bname = OsString::from(enc.backing_name());
            self.write_sidecar(&dir, &enc)?;
            if let Err(e) = sys::link_fd(node.raw(), dir.raw(), &bname) {
                if e.raw_os_error() != Some(libc::EEXIST) {
                    self.remove_sidecar(&dir, &enc);
                }
                return Err(errno(e));
            }
            self.lookup_backing(&dir, &bname)
        })();
        answer_entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let node = self.node(ino)?;
            if node.kind != Kind::File {
                return Err(Errno::EINVAL);
            }
            self.open_file(&node)?;
            if flags.0 & libc::O_TRUNC != 0 && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                self.with_open_file(&node, |o, keys| {
                    o.contents
                        .set_len(keys, &o.file, 0)
                        .map_err(|e| Errno::from_i32(e.errno()))
                })?;
            }
            Ok(if flags.0 & libc::O_APPEND != 0 {
                FH_APPEND
            } else {
                0
            })
        })();
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
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
        let r = (|| {
            let node = self.node(ino)?;
            let open = node.open.read();
            let o = open.as_ref().ok_or(Errno::EBADF)?;
            let mut buf = vec![0u8; size as usize];
            let n = o.contents.read_at(&o.file, offset, &mut buf).map_err(|e| {
                warn!("read failed: {e}");
                Errno::from_i32(e.errno())
            })?;
            buf.truncate(n);
            Ok(buf)
        })();
        match r {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = (|| {
            let node = self.node(ino)?;
            let mut open = node.open.write();
            let o = open.as_mut().ok_or(Errno::EBADF)?;
            // Under the writeback cache the kernel resolves O_APPEND itself
            // and writes pages at their true offsets.
            let off = if fh.0 & FH_APPEND != 0 && !self.writeback {
                o.contents.size()
            } else {
                offset
            };
            o.contents
                .write_at(&self.keys, &o.file, off, data)
                .map_err(|e| {
                    debug!("write failed: {e}");
                    Errno::from_i32(e.errno())
                })
        })();
        match r {
            Ok(()) => reply.written(data.len() as u32),
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
        // Writes reach the backing file before they are acknowledged.
        reply.ok();
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
        if let Ok(node) = self.node(ino) {
            let mut open = node.open.write();
            if let Some(o) = open.as_mut() {
                o.opens = o.opens.saturating_sub(1);
                if o.opens == 0 {
                    *open = None;
                }
            }
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
        let r = (|| {
            let node = self.node(ino)?;
            let open = node.open.read();
            let o = open.as_ref().ok_or(Errno::EBADF)?;
            if datasync {
                o.file.sync_data().map_err(errno)
            } else {
                o.file.sync_all().map_err(errno)
            }
        })();
        answer_empty(reply, r);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let node = self.node(ino)?;
            let mut entries = vec![
                DirEntry {
                    ino: ino.0,
                    kind: FileType::Directory,
                    name: ".".into(),
                    backing: OsString::new(),
                },
                DirEntry {
                    ino: ROOT_INO,
                    kind: FileType::Directory,
                    name: "..".into(),
                    backing: OsString::new(),
                },
            ];
            entries.extend(self.list(&node)?);
            let mut next = self.next_dir_handle.lock();
            let fh = *next;
            *next += 1;
            self.dirs.lock().insert(fh, Arc::new(entries));
            Ok(fh)
        })();
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.listing(fh) else {
            reply.error(Errno::EBADF);
            return;
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
        let Some(entries) = self.listing(fh) else {
            reply.error(Errno::EBADF);
            return;
        };
        let dir = match self.node(ino) {
            Ok(d) => d,
            Err(e) => {
                reply.error(e);
                return;
            }
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
                if reply.add(INodeNo(e.ino), next, &e.name, &TTL, &attr, Generation(0)) {
                    break;
                }
                continue;
            }
            // Each entry returned counts as a lookup, as in `lookup`.
            let Ok((_, attr)) = self.lookup_backing(&dir, &e.backing) else {
                continue; // removed since the listing was taken
            };
            if reply.add(attr.ino, next, &e.name, &TTL, &attr, Generation(0)) {
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
        self.dirs.lock().remove(&fh.0);
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
        let r = (|| {
            let node = self.node(ino)?;
            let fd = sys::reopen(&node.fd, libc::O_RDONLY | libc::O_DIRECTORY).map_err(errno)?;
            File::from(fd).sync_all().map_err(errno)
        })();
        answer_empty(reply, r);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let r = self
            .node(INodeNo(ROOT_INO))
            .and_then(|root| sys::statvfs(root.raw()).map_err(errno));
        match r {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                names::MAX_NAME_LEN as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    // Extended attributes are not implemented: the backing filesystem would
    // store them in the clear. The trait's default answer, ENOSYS, makes the
    // kernel stop asking (it then answers EOPNOTSUPP itself), which also
    // spares every write a `security.capability` round trip.

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (the mount always uses
        // default_permissions).
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
        let r = (|| {
            let mut created = None;
            let (node, attr) = self.make_entry(req, parent, name, |dir, bname| {
                let fd = sys::openat(
                    dir.raw(),
                    bname,
                    libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                    mode & !umask & 0o7777,
                )
                .map_err(errno)?;
                created = Some(File::from(fd));
                Ok(())
            })?;
            // Serve the handle from the descriptor just created rather than
            // reopening the file through /proc.
            let mut open = node.open.write();
            match (open.as_mut(), created) {
                (Some(o), _) => o.opens += 1,
                (None, Some(file)) => {
                    let contents = FileContents::open(&self.keys, &file, 0)
                        .map_err(|e| Errno::from_i32(e.errno()))?;
                    *open = Some(OpenFile {
                        file,
                        contents,
                        opens: 1,
                    });
                }
                (None, None) => *open = Some(self.load_file(&node)?),
            }
            drop(open);
            let fh = if flags & libc::O_APPEND != 0 {
                FH_APPEND
            } else {
                0
            };
            Ok((attr, fh))
        })();
        match r {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
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
        let r = (|| {
            if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let node = self.node(ino)?;
            self.with_open_file(&node, |o, keys| {
                let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
                // Reserve the blocks first so a full disk fails here, then
                // grow the plaintext (which re-encrypts the old last unit).
                sys::fallocate(
                    o.file.as_raw_fd(),
                    libc::FALLOC_FL_KEEP_SIZE,
                    FILE_HEADER_LEN + offset,
                    length,
                )
                .map_err(errno)?;
                if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > o.contents.size() {
                    o.contents
                        .set_len(keys, &o.file, end)
                        .map_err(|e| Errno::from_i32(e.errno()))?;
                }
                Ok(())
            })
        })();
        answer_empty(reply, r);
    }
}

fn read_small_bytes(dir_fd: &OwnedFd, name: &str) -> io::Result<Vec<u8>> {
    let fd = sys::openat(dir_fd.as_raw_fd(), OsStr::new(name), libc::O_RDONLY, 0)?;
    let mut v = Vec::new();
    File::from(fd).take(4096).read_to_end(&mut v)?;
    Ok(v)
}

fn restore_dir_iv(dir_fd: &OwnedFd, iv: &[u8]) {
    let r = sys::openat(
        dir_fd.as_raw_fd(),
        OsStr::new(DIR_IV_NAME),
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        DIR_IV_MODE,
    )
    .and_then(|fd| File::from(fd).write_all(iv));
    if let Err(e) = r {
        warn!("could not restore a directory IV after a failed rmdir: {e}");
    }
}
