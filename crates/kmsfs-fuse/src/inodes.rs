//! The inode table: one [`Node`] per backing inode the kernel knows about,
//! and how to get a descriptor for it.
//!
//! A node does not pin a descriptor. Where the backing filesystem and our
//! privileges allow file handles (`name_to_handle_at`; ext4, xfs, btrfs and
//! tmpfs do, and root has `CAP_DAC_READ_SEARCH`), a node keeps its handle
//! (8–40 bytes) and the `O_PATH` descriptors live in a bounded LRU cache
//! that reopens by handle on a miss. That is virtiofsd's answer to the same
//! wall: a tree of a million files needs a million inodes in the kernel's
//! cache, but only as many descriptors as are in use at once. Where handles
//! do not work, each node holds an `O_PATH` descriptor for its life, as
//! before; that mode is limited by `RLIMIT_NOFILE` (docs/performance.md).

use crate::open_files::OpenFile;
use crate::sys::{self, Handle};
use kmsfs_core::names::DIR_IV_LEN;
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// The FUSE root inode number.
pub const ROOT_INO: u64 = 1;

/// Node tables smaller than this are never shrunk (a few hundred KiB).
const SHRINK_ABOVE: usize = 16 * 1024;

/// First FUSE number of the synthetic range (see [`Inodes`]); backing
/// filesystems do not hand out inode numbers this high.
const SYNTHETIC_BASE: u64 = 1 << 62;

/// Kind of a node, fixed for its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// FIFO, socket or device: passed through, no contents to encrypt.
    Special,
}

impl Kind {
    /// The kind of a `st_mode`.
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Special,
        }
    }
}

/// How a node reaches its backing inode.
enum Anchor {
    /// A file handle; descriptors come from the cache.
    Handle(Handle),
    /// An `O_PATH` descriptor held for the node's life.
    Fd(Arc<OwnedFd>),
}

/// The entry a symlink node was found under: the associated data of its
/// target (see `kmsfs_core::names::SymlinkBinding`).
pub struct LinkEntry {
    /// IV of the directory holding the symlink.
    pub dir_iv: [u8; DIR_IV_LEN],
    /// The symlink's backing entry name.
    pub backing_name: Box<[u8]>,
}

/// One backing inode.
pub struct Node {
    anchor: Anchor,
    /// What the node is.
    pub kind: Kind,
    /// The backing inode number the node stands for.
    backing_ino: u64,
    /// Set when the node's FUSE number is not derived from `backing_ino`
    /// (see [`Inodes::moved`]): `backing_ino` is then in the alias map.
    aliased: bool,
    /// A symlink's entry, for decrypting its target.
    pub link: Option<Box<LinkEntry>>,
    /// The kernel's lookup count.
    lookups: AtomicU64,
    /// Open-file state of a regular file; the lock serialises writers of
    /// one file so no two ever rewrite the same data unit at once. Boxed:
    /// most nodes are never open, and the cipher state is large.
    pub open: RwLock<Option<Box<OpenFile>>>,
    /// Directory IV of a directory, read once.
    pub dir_iv: OnceLock<[u8; DIR_IV_LEN]>,
    _counted: Counted,
}

/// Nodes alive in this process (every mount it serves).
static LIVE_NODES: AtomicU64 = AtomicU64::new(0);

/// How many nodes this process holds, for tests that show the kernel's
/// `FORGET`s free them.
pub fn live_nodes() -> u64 {
    LIVE_NODES.load(Ordering::Relaxed)
}

/// Counts a node in [`LIVE_NODES`] for as long as it lives.
struct Counted;

impl Counted {
    fn new() -> Counted {
        LIVE_NODES.fetch_add(1, Ordering::Relaxed);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        LIVE_NODES.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Node {
    /// The backing inode number the node stands for.
    pub fn backing_ino(&self) -> u64 {
        self.backing_ino
    }
}

/// Maps FUSE inode numbers to nodes. FUSE inode numbers are the backing
/// inode numbers, except that the backing root is 1 (and a backing inode
/// numbered 1, if any, takes the root's number), so they stay stable
/// across remounts and hard links share one.
///
/// One exception: renaming a symlink re-creates it (its target is bound to
/// its name), so it gets a new backing inode while the kernel keeps the old
/// number for it. Until the kernel forgets that number, the alias map sends
/// the new backing inode to it, so the symlink keeps its inode number as
/// rename(2) promises; a backing inode that reuses the freed old number
/// meanwhile gets a FUSE number of its own from the synthetic range.
///
/// The same holds for any backing inode number the backing store gives to
/// a new file while the kernel still knows a deleted file by it (ext4 and
/// xfs reuse numbers at once): a lookup that finds a node of that number
/// compares file handles, and a different file is a new node with a
/// synthetic number.
pub struct Inodes {
    map: Mutex<HashMap<u64, Arc<Node>>>,
    /// Backing inode number → FUSE number, for the exceptions above.
    aliases: Mutex<HashMap<u64, u64>>,
    /// `aliases.len()`, read without the lock on every lookup.
    alias_count: AtomicUsize,
    /// The next FUSE number of the synthetic range.
    next_synthetic: AtomicU64,
    fds: Mutex<LruCache<u64, Arc<OwnedFd>>>,
    /// A real (not `O_PATH`) descriptor of the backing root:
    /// `open_by_handle_at` refuses `O_PATH` ones.
    mount_fd: OwnedFd,
    root_backing_ino: u64,
    root_dev: u64,
    handles: bool,
}

/// The descriptor cache's size for a descriptor limit: a quarter of the
/// limit, so open files, directory listings and `/dev/fuse` clones keep
/// the rest, between 16 and 4096.
pub fn fd_cache_size(limit: u64) -> usize {
    (limit / 4).clamp(16, 4096) as usize
}

impl Inodes {
    /// A table holding only the root, whose `O_PATH` descriptor is
    /// `root_fd`; `mount_fd` is an ordinary descriptor of the same
    /// directory. File handles are used when they work on this backing store.
    pub fn new(
        root_fd: OwnedFd,
        mount_fd: OwnedFd,
        root_st: &libc::stat,
        use_handles: bool,
    ) -> Self {
        let handles = use_handles && handles_work(&root_fd, &mount_fd);
        let root_fd = Arc::new(root_fd);
        let root = Node {
            anchor: Anchor::Fd(root_fd.clone()),
            kind: Kind::Dir,
            backing_ino: root_st.st_ino,
            aliased: false,
            link: None,
            lookups: AtomicU64::new(1),
            open: RwLock::new(None),
            dir_iv: OnceLock::new(),
            _counted: Counted::new(),
        };
        let mut map = HashMap::new();
        map.insert(ROOT_INO, Arc::new(root));
        let size = NonZeroUsize::new(fd_cache_size(sys::fd_limit())).unwrap_or(NonZeroUsize::MIN);
        Inodes {
            map: Mutex::new(map),
            aliases: Mutex::new(HashMap::new()),
            alias_count: AtomicUsize::new(0),
            next_synthetic: AtomicU64::new(SYNTHETIC_BASE),
            fds: Mutex::new(LruCache::new(size)),
            mount_fd,
            root_backing_ino: root_st.st_ino,
            root_dev: root_st.st_dev,
            handles,
        }
    }

    /// Whether nodes are anchored by file handles (else by descriptors).
    pub fn uses_handles(&self) -> bool {
        self.handles
    }

    /// The FUSE inode number of the backing entry `st`. Entries on another
    /// device (a filesystem mounted inside the backing directory) are
    /// refused: their inode numbers would alias ours.
    pub fn fuse_ino(&self, st: &libc::stat) -> io::Result<u64> {
        if st.st_dev != self.root_dev {
            return Err(io::Error::new(
                io::ErrorKind::CrossesDevices,
                "entry is on another filesystem mounted inside the backing directory",
            ));
        }
        Ok(self.listing_ino(st.st_ino))
    }

    /// The FUSE inode number of backing inode number `backing_ino`, aliases
    /// included (for listings, where only `d_ino` is known).
    pub fn listing_ino(&self, backing_ino: u64) -> u64 {
        if self.alias_count.load(Ordering::Acquire) > 0 {
            if let Some(&ino) = self.aliases.lock().get(&backing_ino) {
                return ino;
            }
        }
        self.map_ino(backing_ino)
    }

    /// The FUSE inode number of backing inode number `backing_ino` (for
    /// listings, where only `d_ino` is known).
    pub fn map_ino(&self, backing_ino: u64) -> u64 {
        if backing_ino == self.root_backing_ino {
            ROOT_INO
        } else if backing_ino == ROOT_INO {
            self.root_backing_ino
        } else {
            backing_ino
        }
    }

    /// The node with FUSE inode number `ino`.
    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.map.lock().get(&ino).cloned()
    }

    /// Records one more kernel lookup of `ino`, the backing entry `name` in
    /// the directory `dir_fd` (backing inode `backing_ino`), creating its
    /// node if it is new. Returns the FUSE number to give the kernel: `ino`,
    /// or a synthetic one when a renamed symlink's node still holds `ino`.
    pub fn remember(
        &self,
        ino: u64,
        kind: Kind,
        dir_fd: &OwnedFd,
        name: &std::ffi::OsStr,
        backing_ino: u64,
        link: impl FnOnce() -> Option<Box<LinkEntry>>,
    ) -> io::Result<(u64, Arc<Node>)> {
        let mut ino = ino;
        let mut aliased = false;
        let known = self.map.lock().get(&ino).cloned();
        let reused = match known {
            Some(n) if n.backing_ino == backing_ino => {
                // The backing filesystem may have given a deleted file's
                // inode number to a new file (ext4 and xfs do at once)
                // before the kernel forgot the old one. Only a node of the
                // same file may be handed out again; checked without the
                // table lock, as it costs a syscall.
                if self.same_file(&n, dir_fd, name)? {
                    // Counts change only under the table lock (see `forget`).
                    let map = self.map.lock();
                    if let Some(m) = map.get(&ino).filter(|m| Arc::ptr_eq(m, &n)) {
                        m.lookups.fetch_add(1, Ordering::Relaxed);
                        return Ok((ino, n));
                    }
                    // Forgotten (or replaced) meanwhile: look again.
                    drop(map);
                    return self.remember(ino, kind, dir_fd, name, backing_ino, link);
                } else {
                    true
                }
            }
            // A renamed symlink's node keeps this number, but the backing
            // inode that had it is gone and the number was reused.
            Some(_) => true,
            None => false,
        };
        if reused {
            ino = self.synthetic_ino();
            aliased = true;
        }
        let anchor = self.anchor(ino, kind, dir_fd, name)?;
        let made = Arc::new(Node {
            anchor,
            kind,
            backing_ino,
            aliased,
            link: if kind == Kind::Symlink { link() } else { None },
            lookups: AtomicU64::new(0),
            open: RwLock::new(None),
            dir_iv: OnceLock::new(),
            _counted: Counted::new(),
        });
        let mut map = self.map.lock();
        // Another thread may have added the same inode meanwhile: keep one.
        let node = map.entry(ino).or_insert(made).clone();
        node.lookups.fetch_add(1, Ordering::Relaxed);
        if aliased {
            self.set_alias(backing_ino, Some(ino));
        }
        Ok((ino, node))
    }

    /// The symlink known to the kernel as `ino` was re-created as the
    /// backing entry `name` in `dir_fd` (backing inode `backing_ino`, bound
    /// to `link`): its node now reaches the new inode, under the same FUSE
    /// number. Nothing happens if the kernel holds no node for `ino`.
    pub fn moved(
        &self,
        ino: u64,
        dir_fd: &OwnedFd,
        name: &std::ffi::OsStr,
        backing_ino: u64,
        link: Box<LinkEntry>,
    ) -> io::Result<()> {
        if self.map.lock().get(&ino).is_none() {
            return Ok(());
        }
        self.fds.lock().pop(&ino);
        let anchor = self.anchor(ino, Kind::Symlink, dir_fd, name)?;
        let mut map = self.map.lock();
        let Some(old) = map.get(&ino).cloned() else {
            return Ok(());
        };
        if old.aliased {
            self.drop_alias(old.backing_ino, ino);
        }
        let node = Node {
            anchor,
            kind: Kind::Symlink,
            backing_ino,
            aliased: true,
            link: Some(link),
            lookups: AtomicU64::new(old.lookups.load(Ordering::Relaxed)),
            open: RwLock::new(None),
            dir_iv: OnceLock::new(),
            _counted: Counted::new(),
        };
        map.insert(ino, Arc::new(node));
        self.set_alias(backing_ino, Some(ino));
        Ok(())
    }

    /// An anchor for the entry `name` (of `kind`) in `dir_fd`, known as `ino`.
    fn anchor(
        &self,
        ino: u64,
        kind: Kind,
        dir_fd: &OwnedFd,
        name: &std::ffi::OsStr,
    ) -> io::Result<Anchor> {
        // Made without holding the table lock, so lookups on other threads
        // are not serialised behind a syscall.
        if !self.handles {
            return Ok(Anchor::Fd(Arc::new(sys::open_path(
                dir_fd.as_raw_fd(),
                name,
            )?)));
        }
        if kind != Kind::Dir {
            // Most files looked up are never opened by path again (`ls -l`
            // has the attributes from the lookup; `open` reopens by
            // handle): name the entry without opening it.
            return Ok(Anchor::Handle(sys::handle_at(dir_fd.as_raw_fd(), name)?));
        }
        let fd = sys::open_path(dir_fd.as_raw_fd(), name)?;
        let h = sys::handle_of(fd.as_raw_fd())?;
        // The descriptor is at hand, and the next operation on a new
        // directory is usually inside it.
        self.fds.lock().put(ino, Arc::new(fd));
        Ok(Anchor::Handle(h))
    }

    /// Whether `node` stands for the entry `name` in `dir_fd`, which has
    /// the node's backing inode number: the same file handle (its
    /// generation tells a new file from a deleted one that had the number),
    /// or, without handles, a node whose file still has a name.
    fn same_file(&self, node: &Node, dir_fd: &OwnedFd, name: &std::ffi::OsStr) -> io::Result<bool> {
        match &node.anchor {
            Anchor::Handle(h) => Ok(sys::handle_at(dir_fd.as_raw_fd(), name)? == *h),
            Anchor::Fd(fd) => Ok(sys::fstat(fd.as_raw_fd())?.st_nlink > 0),
        }
    }

    /// A FUSE number from the synthetic range that no node holds.
    fn synthetic_ino(&self) -> u64 {
        loop {
            let ino = self.next_synthetic.fetch_add(1, Ordering::Relaxed);
            if !self.map.lock().contains_key(&ino) {
                return ino;
            }
        }
    }

    fn set_alias(&self, backing_ino: u64, ino: Option<u64>) {
        let mut aliases = self.aliases.lock();
        match ino {
            Some(ino) => aliases.insert(backing_ino, ino),
            None => aliases.remove(&backing_ino),
        };
        self.alias_count.store(aliases.len(), Ordering::Release);
    }

    /// Drops the alias of `backing_ino` if it still names `ino`.
    fn drop_alias(&self, backing_ino: u64, ino: u64) {
        if self.aliases.lock().get(&backing_ino) == Some(&ino) {
            self.set_alias(backing_ino, None);
        }
    }

    /// The kernel forgets `n` lookups of `ino`; the node goes at zero.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut map = self.map.lock();
        // Counts change only under the table lock, so load-then-store is exact.
        let gone = match map.get(&ino) {
            Some(node) => {
                let left = node.lookups.load(Ordering::Relaxed).saturating_sub(n);
                node.lookups.store(left, Ordering::Relaxed);
                left == 0
            }
            None => false,
        };
        if gone {
            if let Some(node) = map.remove(&ino) {
                if node.aliased {
                    self.drop_alias(node.backing_ino, ino);
                }
            }
            // After the kernel forgets most of a large tree (memory
            // pressure, drop_caches), give the memory back: the table
            // keeps its capacity otherwise, and the allocator its freed
            // pages. Shrinking to twice the size leaves the next shrink a
            // quarter of the way down, so the cost stays amortised.
            let shrink = map.capacity() > SHRINK_ABOVE && map.len() < map.capacity() / 8;
            if shrink {
                let keep = map.len() * 2;
                map.shrink_to(keep);
            }
            drop(map);
            self.fds.lock().pop(&ino);
            if shrink {
                sys::release_free_memory();
            }
        }
    }

    /// An `O_PATH` descriptor of the node `ino`.
    pub fn path_fd(&self, ino: u64, node: &Node) -> io::Result<Arc<OwnedFd>> {
        match &node.anchor {
            Anchor::Fd(fd) => Ok(fd.clone()),
            Anchor::Handle(h) => {
                if let Some(fd) = self.fds.lock().get(&ino) {
                    return Ok(fd.clone());
                }
                let fd = Arc::new(sys::open_handle(
                    self.mount_fd.as_raw_fd(),
                    h,
                    libc::O_PATH | libc::O_NOFOLLOW,
                )?);
                self.fds.lock().put(ino, fd.clone());
                Ok(fd)
            }
        }
    }

    /// Opens the node `ino` for I/O with `flags` (a new descriptor, not cached).
    pub fn open(&self, node: &Node, flags: i32) -> io::Result<OwnedFd> {
        match &node.anchor {
            Anchor::Handle(h) => sys::open_handle(self.mount_fd.as_raw_fd(), h, flags),
            Anchor::Fd(fd) => sys::reopen(fd, flags),
        }
    }
}

/// Whether this process can name and reopen inodes by handle on the
/// backing filesystem of `root`.
fn handles_work(root: &OwnedFd, mount_fd: &OwnedFd) -> bool {
    let probe = sys::handle_of(root.as_raw_fd())
        .and_then(|h| sys::open_handle(mount_fd.as_raw_fd(), &h, libc::O_PATH | libc::O_DIRECTORY));
    match probe {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(
                "file handles do not work on this backing store ({e}): every inode the kernel \
                 caches holds a descriptor, so large trees are limited by the open-file limit"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table over a fresh temporary directory holding `names` (files).
    fn table(handles: bool, names: &[&str]) -> (std::path::PathBuf, Inodes, OwnedFd) {
        let dir = std::env::temp_dir().join(format!(
            "kmsfs-inodes-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).unwrap();
        for n in names {
            std::fs::write(dir.join(n), n.as_bytes()).unwrap();
        }
        let c = |flags| {
            sys::openat(
                libc::AT_FDCWD,
                dir.as_os_str(),
                flags | libc::O_DIRECTORY,
                0,
            )
            .unwrap()
        };
        let root = c(libc::O_PATH);
        let st = sys::fstat(root.as_raw_fd()).unwrap();
        let table = Inodes::new(root, c(libc::O_RDONLY), &st, handles);
        let dfd = c(libc::O_PATH);
        (dir, table, dfd)
    }

    static NEXT: AtomicU64 = AtomicU64::new(0);

    fn look(t: &Inodes, dir: &OwnedFd, name: &str) -> (u64, Arc<Node>) {
        let st = sys::statat(dir.as_raw_fd(), std::ffi::OsStr::new(name)).unwrap();
        let ino = t.fuse_ino(&st).unwrap();
        t.remember(
            ino,
            Kind::File,
            dir,
            std::ffi::OsStr::new(name),
            st.st_ino,
            || None,
        )
        .unwrap()
    }

    fn backing_ino(t: &Inodes, ino: u64, node: &Node) -> u64 {
        sys::fstat(t.path_fd(ino, node).unwrap().as_raw_fd())
            .unwrap()
            .st_ino
    }

    #[test]
    fn both_anchors_reach_the_inode_and_forget_frees_the_node() {
        for handles in [true, false] {
            let (dir, t, dfd) = table(handles, &["a", "b"]);
            let (ia, na) = look(&t, &dfd, "a");
            let (ia2, na2) = look(&t, &dfd, "a");
            assert_eq!(ia, ia2);
            assert!(
                Arc::ptr_eq(&na, &na2),
                "a second lookup makes a second node"
            );
            let (ib, nb) = look(&t, &dfd, "b");
            assert_ne!(ia, ib);
            assert_eq!(backing_ino(&t, ia, &na), ia);
            assert_eq!(backing_ino(&t, ib, &nb), ib);
            // Reopening for I/O reads the right file.
            let f = std::fs::File::from(t.open(&nb, libc::O_RDONLY).unwrap());
            assert_eq!(std::io::read_to_string(f).unwrap(), "b");
            t.forget(ia, 1);
            assert!(t.get(ia).is_some(), "one lookup is still held");
            t.forget(ia, 1);
            assert!(t.get(ia).is_none());
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_moved_symlink_keeps_its_number_and_a_reused_number_gets_another() {
        let (dir, t, dfd) = table(true, &["old", "new"]);
        let (ino, _) = look(&t, &dfd, "old");
        let new_st = sys::statat(dfd.as_raw_fd(), std::ffi::OsStr::new("new")).unwrap();
        let link = Box::new(LinkEntry {
            dir_iv: [0; DIR_IV_LEN],
            backing_name: b"new".as_slice().into(),
        });
        t.moved(ino, &dfd, std::ffi::OsStr::new("new"), new_st.st_ino, link)
            .unwrap();
        // The node now reaches the new inode, under the old number, and a
        // lookup of the new entry finds that node.
        let node = t.get(ino).unwrap();
        assert_eq!(backing_ino(&t, ino, &node), new_st.st_ino);
        assert_eq!(t.fuse_ino(&new_st).unwrap(), ino);
        assert_eq!(t.listing_ino(new_st.st_ino), ino);
        let (again, n2) = look(&t, &dfd, "new");
        assert_eq!(again, ino);
        assert!(Arc::ptr_eq(&node, &n2));
        // The old entry's inode number, were it reused, gets a number of
        // its own: here the old file itself stands in for the newcomer.
        let (other, n3) = look(&t, &dfd, "old");
        assert_ne!(other, ino);
        assert!(other >= SYNTHETIC_BASE);
        assert_eq!(backing_ino(&t, other, &n3), ino);
        // Forgetting drops the aliases with the nodes.
        t.forget(ino, 2);
        assert_eq!(t.fuse_ino(&new_st).unwrap(), new_st.st_ino);
        t.forget(other, 1);
        assert_eq!(t.alias_count.load(Ordering::Relaxed), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn cache_size_follows_the_limit_within_bounds() {
        assert_eq!(fd_cache_size(256), 64);
        assert_eq!(fd_cache_size(1024), 256);
        assert_eq!(fd_cache_size(20), 16);
        assert_eq!(fd_cache_size(1 << 20), 4096);
    }
}
