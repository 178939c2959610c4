//! Directory listings: decrypted once at `opendir`, served by offset to
//! `readdir`/`readdirplus` until `releasedir`.

use crate::attrs::{dtype_file_type, file_type};
use crate::errors::{backing_errno, Result};
use crate::fs::KmsFs;
use crate::inodes::Node;
use crate::sys;
use fuser::FileType;
use kmsfs_core::layout;
use kmsfs_core::names::{classify, decrypt_name, BackingEntry};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;
use tracing::warn;

/// One entry of a listing.
pub struct DirEntry {
    /// FUSE inode number.
    pub ino: u64,
    /// Entry type.
    pub kind: FileType,
    /// Plaintext name.
    pub name: OsString,
    /// The backing entry name (empty for `.` and `..`).
    pub backing: OsString,
}

/// The listings of open directory handles.
#[derive(Default)]
pub struct Listings {
    open: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next: Mutex<u64>,
}

impl Listings {
    /// Keeps `entries` under a new handle number.
    pub fn insert(&self, entries: Vec<DirEntry>) -> u64 {
        let fh = {
            let mut next = self.next.lock();
            *next += 1;
            *next
        };
        self.open.lock().insert(fh, Arc::new(entries));
        fh
    }

    /// The listing of handle `fh`.
    pub fn get(&self, fh: u64) -> Option<Arc<Vec<DirEntry>>> {
        self.open.lock().get(&fh).cloned()
    }

    /// Drops the listing of handle `fh`.
    pub fn remove(&self, fh: u64) {
        self.open.lock().remove(&fh);
    }
}

impl KmsFs {
    /// Lists directory `ino`: `.`, `..` and every entry whose name
    /// decrypts. An entry that does not decrypt is skipped with a log line
    /// naming it; a listing that fails part way is an error, never a
    /// shorter directory.
    pub(crate) fn list(&self, ino: u64, dir: &Node) -> Result<Vec<DirEntry>> {
        let iv = *self.dir_iv(ino, dir)?;
        let fd = self
            .inodes
            .path_fd(ino, dir)
            .map_err(|e| backing_errno(ino, "directory", e))?;
        let parent = sys::statat(fd.as_raw_fd(), OsStr::new(".."))
            .map(|st| self.inodes.map_ino(st.st_ino))
            .map_err(|e| backing_errno(ino, "parent directory", e))?;
        let mut out = vec![
            DirEntry {
                ino,
                kind: FileType::Directory,
                name: ".".into(),
                backing: OsString::new(),
            },
            DirEntry {
                // The root's parent is outside the filesystem: itself.
                ino: if ino == crate::inodes::ROOT_INO {
                    ino
                } else {
                    parent
                },
                kind: FileType::Directory,
                name: "..".into(),
                backing: OsString::new(),
            },
        ];
        let raw = sys::list_dir(fd.as_raw_fd()).map_err(|e| backing_errno(ino, "listing", e))?;
        for e in raw {
            let Ok(bname) = String::from_utf8(e.name) else {
                warn!("directory inode {ino}: skipping a backing entry whose name is not UTF-8");
                continue;
            };
            let full = match classify(&bname) {
                BackingEntry::Internal => continue,
                BackingEntry::Encoded(s) => s.to_string(),
                BackingEntry::LongName(h) => {
                    match layout::read_sidecar(std::os::fd::AsFd::as_fd(&*fd), h) {
                        Ok(s) => s,
                        Err(err) => {
                            warn!("directory inode {ino}: skipping {bname}: {err}");
                            continue;
                        }
                    }
                }
            };
            let name = match decrypt_name(&self.keys, &iv, &full) {
                Ok(n) => n,
                Err(err) => {
                    warn!("directory inode {ino}: skipping {bname}: {err}");
                    continue;
                }
            };
            let kind = match dtype_file_type(e.dtype) {
                Some(k) => k,
                None => match sys::statat(fd.as_raw_fd(), OsStr::new(&bname)) {
                    Ok(st) => file_type(st.st_mode),
                    Err(_) => continue, // removed since the listing was read
                },
            };
            out.push(DirEntry {
                ino: self.inodes.listing_ino(e.ino),
                kind,
                name: OsString::from_vec(name),
                backing: OsString::from(bname),
            });
        }
        Ok(out)
    }

    /// Whether backing directory `fd` holds nothing but its IV.
    pub(crate) fn is_empty_dir(&self, ino: u64, fd: i32) -> Result<bool> {
        let entries = sys::list_dir(fd).map_err(|e| backing_errno(ino, "listing", e))?;
        Ok(entries
            .iter()
            .all(|e| e.name.as_slice() == layout::DIR_IV_NAME.as_bytes()))
    }
}
