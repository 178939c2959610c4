//! The inode table: one `Node` per backing inode the kernel knows about.

use kmsfs_core::contents::FileContents;
use kmsfs_core::names::DIR_IV_LEN;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};

/// The FUSE root inode number.
pub const ROOT_INO: u64 = 1;

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

/// An open regular file: the read-write backing descriptor and the
/// contents state, shared by every open handle of the inode.
pub struct OpenFile {
    /// The backing file, opened read-write (or read-only on a read-only backing store).
    pub file: File,
    /// Cipher and plaintext size.
    pub contents: FileContents,
    /// Number of open handles.
    pub opens: u32,
}

/// One backing inode.
pub struct Node {
    /// `O_PATH` descriptor of the backing inode.
    pub fd: OwnedFd,
    /// What the node is.
    pub kind: Kind,
    /// The kernel's lookup count.
    pub lookups: Mutex<u64>,
    /// Open-file state of a regular file; the lock serialises writers of
    /// one file so no two ever rewrite the same data unit at once.
    pub open: RwLock<Option<OpenFile>>,
    /// Directory IV of a directory, read once.
    pub dir_iv: OnceLock<[u8; DIR_IV_LEN]>,
}

impl Node {
    /// The raw `O_PATH` descriptor.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Maps FUSE inode numbers to nodes. FUSE inode numbers are the backing
/// inode numbers, except that the backing root is 1 (and a backing inode
/// numbered 1, if any, takes the root's number), so they stay stable
/// across remounts.
pub struct Inodes {
    map: Mutex<HashMap<u64, Arc<Node>>>,
    root_backing_ino: u64,
}

impl Inodes {
    /// A table holding only the root.
    pub fn new(root: Node, root_backing_ino: u64) -> Self {
        *root.lookups.lock() = 1;
        let mut map = HashMap::new();
        map.insert(ROOT_INO, Arc::new(root));
        Inodes {
            map: Mutex::new(map),
            root_backing_ino,
        }
    }

    /// The FUSE inode number of a backing inode number.
    pub fn fuse_ino(&self, backing_ino: u64) -> u64 {
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

    /// Records one more kernel lookup of `ino`, creating the node with
    /// `make` if it is not known yet.
    pub fn remember(
        &self,
        ino: u64,
        make: impl FnOnce() -> std::io::Result<Node>,
    ) -> std::io::Result<Arc<Node>> {
        if let Some(n) = self.map.lock().get(&ino) {
            *n.lookups.lock() += 1;
            return Ok(n.clone());
        }
        // Open the descriptor without holding the table lock, so lookups on
        // other threads are not serialised behind a syscall.
        let made = Arc::new(make()?);
        let mut map = self.map.lock();
        // Another thread may have added the same inode meanwhile: keep one.
        let node = map.entry(ino).or_insert(made).clone();
        *node.lookups.lock() += 1;
        Ok(node)
    }

    /// The kernel forgets `n` lookups of `ino`; the node goes at zero.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut map = self.map.lock();
        let gone = match map.get(&ino) {
            Some(node) => {
                let mut l = node.lookups.lock();
                *l = l.saturating_sub(n);
                *l == 0
            }
            None => false,
        };
        if gone {
            map.remove(&ino);
        }
    }
}
