//! Open regular files: one shared contents state per inode, whatever the
//! number of handles, and the read/write/truncate paths through it.

use crate::errors::{contents_errno, errno, Result};
use crate::fs::KmsFs;
use crate::inodes::{Kind, Node};
use fuser::Errno;
use kmsfs_core::contents::{FileContents, FILE_HEADER_LEN};
use kmsfs_core::keys::FsKeys;
use std::fs::File;
use std::os::fd::OwnedFd;
use tracing::warn;

thread_local! {
    /// Each worker thread's read buffer, kept between requests: a fresh
    /// zeroed buffer per `READ` cost about a tenth of the daemon's time in
    /// a sequential read (docs/performance.md). `read_at` overwrites every
    /// byte it returns, and the buffer never grows past the largest request
    /// (`max_pages`, 1 MiB). Like the freed buffers it replaces, it holds
    /// plaintext the kernel already has in its page cache; the daemon's
    /// memory is locked and kept out of core dumps.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A file handle flag: the file was opened with `O_APPEND`.
pub const FH_APPEND: u64 = 1;

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

impl KmsFs {
    /// Opens the contents of a regular file for one more handle, sharing
    /// state between handles.
    pub(crate) fn open_file(&self, ino: u64, node: &Node) -> Result<()> {
        if node.kind != Kind::File {
            return Err(Errno::EINVAL);
        }
        let mut open = node.open.write();
        if let Some(o) = open.as_mut() {
            o.opens += 1;
            return Ok(());
        }
        *open = Some(Box::new(self.load_file(ino, node)?));
        Ok(())
    }

    /// Adopts `created`, the descriptor of a file just made by `create`,
    /// as the open state of `node` (no reopen needed).
    pub(crate) fn adopt_created(&self, ino: u64, node: &Node, created: OwnedFd) -> Result<()> {
        let mut open = node.open.write();
        if let Some(o) = open.as_mut() {
            o.opens += 1;
            return Ok(());
        }
        let file = File::from(created);
        let contents =
            FileContents::open(&self.keys, &file, 0).map_err(|e| contents_errno(ino, &e))?;
        *open = Some(Box::new(OpenFile {
            file,
            contents,
            opens: 1,
        }));
        Ok(())
    }

    /// Drops one handle; the state goes with the last.
    pub(crate) fn release_file(&self, node: &Node) {
        let mut open = node.open.write();
        if let Some(o) = open.as_mut() {
            o.opens = o.opens.saturating_sub(1);
            if o.opens == 0 {
                *open = None;
            }
        }
    }

    fn load_file(&self, ino: u64, node: &Node) -> Result<OpenFile> {
        let fd = if self.read_only {
            self.inodes.open(node, libc::O_RDONLY)
        } else {
            self.inodes.open(node, libc::O_RDWR).or_else(|e| {
                if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS)) {
                    self.inodes.open(node, libc::O_RDONLY)
                } else {
                    Err(e)
                }
            })
        }
        .map_err(|e| {
            warn!("inode {ino}: cannot open the backing file: {e}");
            errno(e)
        })?;
        let file = File::from(fd);
        let len = file.metadata().map_err(errno)?.len();
        let contents =
            FileContents::open(&self.keys, &file, len).map_err(|e| contents_errno(ino, &e))?;
        Ok(OpenFile {
            file,
            contents,
            opens: 1,
        })
    }

    /// Runs `f` on the file's open state, opening it just for the call if
    /// no handle is open (truncate(2) by path, fallocate).
    pub(crate) fn with_open_file<T>(
        &self,
        ino: u64,
        node: &Node,
        f: impl FnOnce(&mut OpenFile, &FsKeys) -> Result<T>,
    ) -> Result<T> {
        if node.kind != Kind::File {
            return Err(if node.kind == Kind::Dir {
                Errno::EISDIR
            } else {
                Errno::EINVAL
            });
        }
        let mut open = node.open.write();
        match open.as_mut() {
            Some(o) => f(o, &self.keys),
            None => {
                let mut o = self.load_file(ino, node)?;
                f(&mut o, &self.keys)
            }
        }
    }

    /// Reads up to `size` plaintext bytes at `offset` into this thread's
    /// read buffer and hands them (or the error) to `reply`.
    pub(crate) fn read_file<R>(
        &self,
        ino: u64,
        offset: u64,
        size: u32,
        reply: impl FnOnce(Result<&[u8]>) -> R,
    ) -> R {
        READ_BUFFER.with_borrow_mut(|buf| match self.read_into(ino, offset, size, buf) {
            Ok(n) => reply(Ok(&buf[..n])),
            Err(e) => reply(Err(e)),
        })
    }

    fn read_into(&self, ino: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> Result<usize> {
        let node = self.node(ino)?;
        let open = node.open.read();
        let o = open.as_ref().ok_or(Errno::EBADF)?;
        let size = size as usize;
        if buf.len() < size {
            buf.resize(size, 0);
        }
        o.contents
            .read_at(&o.file, offset, &mut buf[..size])
            .map_err(|e| contents_errno(ino, &e))
    }

    /// Writes `data` at `offset` (at the end for an `O_APPEND` handle
    /// without the writeback cache); returns the count written.
    pub(crate) fn write_file(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let node = self.node(ino)?;
        let mut open = node.open.write();
        let o = open.as_mut().ok_or(Errno::EBADF)?;
        // Under the writeback cache the kernel resolves O_APPEND itself
        // and writes pages at their true offsets.
        let off = if fh & FH_APPEND != 0 && !self.writeback {
            o.contents.size()
        } else {
            offset
        };
        let r = o.contents.write_at(&self.keys, &o.file, off, data);
        drop(open);
        match r {
            Ok(()) => Ok(data.len() as u32),
            Err(e) => {
                let code = contents_errno(ino, &e);
                self.space.write_failed(ino, code);
                Err(code)
            }
        }
    }

    /// Changes the plaintext size to `size`.
    pub(crate) fn truncate_file(&self, ino: u64, node: &Node, size: u64) -> Result<()> {
        self.with_open_file(ino, node, |o, keys| {
            o.contents
                .set_len(keys, &o.file, size)
                .map_err(|e| contents_errno(ino, &e))
        })
    }

    /// `fallocate`: reserves `[offset, offset + length)` and, without
    /// `FALLOC_FL_KEEP_SIZE`, grows the file to cover it.
    pub(crate) fn allocate_file(
        &self,
        ino: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<()> {
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let node = self.node(ino)?;
        self.with_open_file(ino, &node, |o, keys| {
            let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
            // Reserve the blocks first so a full disk fails here, then
            // grow the plaintext (which re-encrypts the old last unit).
            kmsfs_core::contents::Backing::allocate(&o.file, FILE_HEADER_LEN + offset, length)
                .map_err(errno)?;
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > o.contents.size() {
                o.contents
                    .set_len(keys, &o.file, end)
                    .map_err(|e| contents_errno(ino, &e))?;
            }
            Ok(())
        })
    }

    /// `fsync`/`fdatasync` of the backing file.
    pub(crate) fn sync_file(&self, ino: u64, datasync: bool) -> Result<()> {
        let node = self.node(ino)?;
        let open = node.open.read();
        let o = open.as_ref().ok_or(Errno::EBADF)?;
        if datasync {
            o.file.sync_data().map_err(errno)
        } else {
            o.file.sync_all().map_err(errno)
        }
    }
}
