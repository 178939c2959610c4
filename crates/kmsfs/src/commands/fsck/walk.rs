//! Walking the backing tree: directory IVs, names, long-name sidecars,
//! symlink targets and entry types; regular files are opened, their
//! headers read, and handed to the workers (see `files`).

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;

use kmsfs_core::contents::FileContents;
use kmsfs_core::header::HEADER_FILE_NAME;
use kmsfs_core::keys::FsKeys;
use kmsfs_core::layout::{self, DIR_IV_NAME};
use kmsfs_core::names::{
    classify, decrypt_name, decrypt_symlink, BackingEntry, EncryptedName, SymlinkBinding,
    DIR_IV_LEN, LONGNAME_PREFIX, LONGNAME_SUFFIX,
};

use super::files::{spans, Sink, Span};
use super::report::{Counts, Problem, ProblemKind};
use super::sys::{self, Kind};
use crate::fsheader::HEADER_BACKUP_NAME;

/// Deepest directory nesting walked: the store is hostile, and each level
/// holds a descriptor and a stack frame.
pub const MAX_DEPTH: usize = 1000;

/// Walks one backing tree, depth first.
pub struct Walker<'a> {
    keys: &'a FsKeys,
    sink: &'a Sink,
    tx: SyncSender<Span>,
    repair: bool,
    depth: usize,
    /// What was walked (bytes are counted by the workers).
    pub counts: Counts,
}

/// A backing directory being checked: its descriptor, backing path and
/// plaintext path (unknown below a name that does not decrypt).
struct Dir<'d> {
    fd: BorrowedFd<'d>,
    backing: &'d Path,
    plain: Option<&'d str>,
}

impl Dir<'_> {
    fn child_plain(&self, name: &[u8]) -> Option<String> {
        let parent = self.plain?;
        let sep = if parent.ends_with('/') { "" } else { "/" };
        Some(format!("{parent}{sep}{}", sys::display(name)))
    }
}

impl<'a> Walker<'a> {
    /// A walker that sends file spans to `tx` and problems to `sink`.
    pub fn new(keys: &'a FsKeys, sink: &'a Sink, tx: SyncSender<Span>, repair: bool) -> Self {
        Walker {
            keys,
            sink,
            tx,
            repair,
            depth: 0,
            counts: Counts::default(),
        }
    }

    fn problem(&self, kind: ProblemKind, backing: PathBuf, plain: Option<String>, detail: String) {
        self.sink.push(Problem {
            kind,
            backing,
            plain,
            detail,
            repaired: false,
        });
    }

    /// Checks the tree whose root descriptor is `root`, at `backing`.
    pub fn walk_root(&mut self, root: &OwnedFd, backing: &Path) {
        let dir = Dir {
            fd: root.as_fd(),
            backing,
            plain: Some("/"),
        };
        self.xattrs(backing, Some("/"));
        self.walk(&dir, true);
    }

    fn walk(&mut self, dir: &Dir<'_>, is_root: bool) {
        self.counts.directories += 1;
        let names = match sys::list_dir(dir.fd) {
            Ok(n) => n,
            Err(e) => {
                return self.problem(
                    ProblemKind::Io,
                    dir.backing.to_path_buf(),
                    dir.plain.map(str::to_string),
                    format!("cannot list the directory: {e}; nothing below it was checked"),
                );
            }
        };
        let iv = self.dir_iv(dir);
        let present: HashSet<&[u8]> = names.iter().map(Vec::as_slice).collect();
        let mut removed = false;
        for name in &names {
            removed |= self.entry(dir, iv.as_ref(), name, &present, is_root);
        }
        if removed {
            if let Err(e) = sys::sync_dir(dir.fd) {
                self.problem(
                    ProblemKind::Io,
                    dir.backing.to_path_buf(),
                    dir.plain.map(str::to_string),
                    format!("cannot fsync the directory after removing orphan sidecars: {e}"),
                );
            }
        }
    }

    /// Reads the directory's IV through the layout module (strict: a
    /// regular file of 16 bytes, no symlink followed, no FIFO blocked on).
    fn dir_iv(&self, dir: &Dir<'_>) -> Option<[u8; DIR_IV_LEN]> {
        match layout::read_dir_iv(dir.fd) {
            Ok(iv) => Some(iv),
            Err(e) => {
                let what = if e.kind() == io::ErrorKind::NotFound {
                    "missing".to_string()
                } else {
                    e.to_string()
                };
                self.problem(
                    ProblemKind::DirIv,
                    dir.backing.join(DIR_IV_NAME),
                    dir.plain.map(str::to_string),
                    format!(
                        "directory IV unusable ({what}): the names in this directory cannot be \
                         decrypted; restore {DIR_IV_NAME} from a backup of this directory"
                    ),
                );
                None
            }
        }
    }

    /// Checks one entry; returns whether `--repair` removed it.
    fn entry(
        &mut self,
        dir: &Dir<'_>,
        iv: Option<&[u8; DIR_IV_LEN]>,
        name: &[u8],
        present: &HashSet<&[u8]>,
        is_root: bool,
    ) -> bool {
        let backing = dir.backing.join(sys::display(name));
        let Ok(text) = std::str::from_utf8(name) else {
            self.problem(
                ProblemKind::UnexpectedEntry,
                backing,
                None,
                "name is not UTF-8, so kmsfs did not write it; move it out of the backing directory"
                    .into(),
            );
            return false;
        };
        let encoded = match classify(text) {
            BackingEntry::Internal => return self.internal(dir, text, backing, present, is_root),
            BackingEntry::Encoded(s) => Some(s.to_string()),
            BackingEntry::LongName(hashed) => match layout::read_sidecar(dir.fd, hashed) {
                Ok(full) => Some(full),
                Err(e) => {
                    let side = dir.backing.join(layout::sidecar_name(hashed));
                    let (kind, at, detail) = if e.kind() == io::ErrorKind::NotFound {
                        (
                            ProblemKind::MissingSidecar,
                            backing.clone(),
                            format!(
                                "the long name's sidecar {} is missing, so the entry's name is lost; \
                                 restore the sidecar from a backup",
                                side.display()
                            ),
                        )
                    } else {
                        (
                            ProblemKind::BadSidecar,
                            side,
                            format!(
                                "sidecar of {}: {e}; the entry's name is lost; restore the sidecar from a backup",
                                backing.display()
                            ),
                        )
                    };
                    self.problem(kind, at, None, detail);
                    None
                }
            },
        };
        let plain = match (encoded, iv) {
            (Some(full), Some(iv)) => match decrypt_name(self.keys, iv, &full) {
                Ok(p) => dir.child_plain(&p),
                Err(e) => {
                    let within = dir.plain.map(|p| format!(" (in {p})")).unwrap_or_default();
                    self.problem(
                        ProblemKind::Name,
                        backing.clone(),
                        None,
                        format!("name does not decrypt{within}: {e}; the entry's name is lost"),
                    );
                    None
                }
            },
            _ => None,
        };
        self.typed(dir, iv, name, backing, plain);
        false
    }

    /// Checks an entry by its type, whatever its name.
    fn typed(
        &mut self,
        dir: &Dir<'_>,
        iv: Option<&[u8; DIR_IV_LEN]>,
        name: &[u8],
        backing: PathBuf,
        plain: Option<String>,
    ) {
        let kind = match sys::kind_at(dir.fd, name) {
            Ok(k) => k,
            Err(e) => {
                return self.problem(ProblemKind::Io, backing, plain, format!("cannot stat: {e}"))
            }
        };
        match kind {
            Kind::Dir if self.depth >= MAX_DEPTH => self.problem(
                ProblemKind::Io,
                backing,
                plain,
                format!(
                    "directories nested deeper than {MAX_DEPTH} levels; nothing below was checked"
                ),
            ),
            Kind::Dir => match sys::open_dir(dir.fd, name) {
                Ok(fd) => {
                    self.xattrs(&backing, plain.as_deref());
                    let sub = Dir {
                        fd: fd.as_fd(),
                        backing: &backing,
                        plain: plain.as_deref(),
                    };
                    self.depth += 1;
                    self.walk(&sub, false);
                    self.depth -= 1;
                }
                Err(e) => self.problem(
                    ProblemKind::Io,
                    backing,
                    plain,
                    format!("cannot open the directory: {e}; nothing below it was checked"),
                ),
            },
            Kind::File => {
                self.xattrs(&backing, plain.as_deref());
                self.file(dir, name, backing, plain)
            }
            Kind::Symlink => {
                self.counts.symlinks += 1;
                // Without the directory's IV (reported above) the target
                // cannot be checked.
                let Some(iv) = iv else { return };
                let binding = SymlinkBinding {
                    dir_iv: iv,
                    backing_name: name,
                };
                let detail = match sys::read_link(dir.fd, name) {
                    Ok(stored) => match decrypt_symlink(self.keys, &stored, binding) {
                        Ok(_) => return,
                        Err(e) => format!(
                            "symlink target does not decrypt for this entry: {e} (damaged, or \
                             moved here from another entry); restore the symlink from a backup"
                        ),
                    },
                    Err(e) => format!("cannot read the symlink: {e}"),
                };
                self.problem(ProblemKind::Symlink, backing, plain, detail);
            }
            // FIFOs, sockets and devices are legal user entries.
            Kind::Special => self.counts.special += 1,
        }
    }

    /// Checks that the entry's extended attributes decrypt (fsck/xattrs.rs).
    fn xattrs(&self, backing: &Path, plain: Option<&str>) {
        for detail in super::xattrs::check(self.keys, backing) {
            self.problem(
                ProblemKind::Xattr,
                backing.to_path_buf(),
                plain.map(str::to_string),
                detail,
            );
        }
    }

    /// Opens a regular file, reads its header and queues its contents.
    fn file(&mut self, dir: &Dir<'_>, name: &[u8], backing: PathBuf, plain: Option<String>) {
        self.counts.files += 1;
        let (file, len) = match sys::open_file(dir.fd, name) {
            Ok(f) => f,
            Err(e) => {
                return self.problem(ProblemKind::Io, backing, plain, format!("cannot open: {e}"))
            }
        };
        let contents = match FileContents::open(self.keys, &file, len) {
            Ok(c) => c,
            Err(e) => {
                return self.problem(
                    ProblemKind::FileHeader,
                    backing,
                    plain,
                    format!("{e} (backing file is {len} bytes); the file's contents are lost"),
                )
            }
        };
        let shown = backing.clone();
        for span in spans(file, contents, backing, plain.clone()) {
            if self.tx.send(span).is_err() {
                // Only if every worker is gone; say so rather than skip silently.
                return self.problem(
                    ProblemKind::Io,
                    shown,
                    plain,
                    "internal: no worker thread left to read the contents".into(),
                );
            }
        }
    }

    /// kmsfs's own entries: IV, header, sidecars. Returns whether an
    /// orphan sidecar was removed.
    fn internal(
        &mut self,
        dir: &Dir<'_>,
        name: &str,
        backing: PathBuf,
        present: &HashSet<&[u8]>,
        is_root: bool,
    ) -> bool {
        if name == DIR_IV_NAME
            || (is_root && (name == HEADER_FILE_NAME || name == HEADER_BACKUP_NAME))
        {
            return false;
        }
        if name.starts_with(layout::TEMP_PREFIX) {
            return self.leftover_temp(dir, name, backing);
        }
        let hashed = name
            .strip_prefix(LONGNAME_PREFIX)
            .and_then(|rest| rest.strip_suffix(LONGNAME_SUFFIX))
            .map(|_| &name[..name.len() - LONGNAME_SUFFIX.len()]);
        let Some(hashed) = hashed else {
            self.problem(
                ProblemKind::UnexpectedEntry,
                backing,
                None,
                "not a name kmsfs writes (encrypted names contain no '.'); \
                 move it out of the backing directory"
                    .into(),
            );
            return false;
        };
        if present.contains(hashed.as_bytes()) {
            // Checked, with its entry, by `entry`.
            return false;
        }
        let mut p = Problem {
            kind: ProblemKind::OrphanSidecar,
            backing,
            plain: None,
            detail: format!(
                "sidecar of a long name, but {hashed} does not exist; \
                 harmless, `kmsfs fsck --repair` removes it"
            ),
            repaired: false,
        };
        if self.repair {
            let long = EncryptedName::Long {
                hashed: hashed.to_string(),
                full: String::new(),
            };
            match layout::remove_sidecar(dir.fd, &long) {
                Ok(()) => {
                    p.repaired = true;
                    p.detail =
                        format!("sidecar of a long name, but {hashed} does not exist; removed");
                }
                Err(e) => p.detail.push_str(&format!(" (removing it failed: {e})")),
            }
        }
        let removed = p.repaired;
        self.sink.push(p);
        removed
    }

    /// A temporary symlink left by a rename that was interrupted after the
    /// re-encrypted copy was made and before it got its name: the old name
    /// still holds the symlink, so `--repair` may remove it.
    fn leftover_temp(&mut self, dir: &Dir<'_>, name: &str, backing: PathBuf) -> bool {
        if !matches!(sys::kind_at(dir.fd, name.as_bytes()), Ok(Kind::Symlink)) {
            self.problem(
                ProblemKind::UnexpectedEntry,
                backing,
                None,
                "named like a kmsfs temporary entry, but not a symlink: kmsfs did not write it; \
                 move it out of the backing directory"
                    .into(),
            );
            return false;
        }
        let mut p = Problem {
            kind: ProblemKind::LeftoverTemp,
            backing,
            plain: None,
            detail: "temporary copy of a symlink left by an interrupted rename; harmless, \
                     `kmsfs fsck --repair` removes it"
                .into(),
            repaired: false,
        };
        if self.repair {
            match sys::unlink(dir.fd, name.as_bytes()) {
                Ok(()) => {
                    p.repaired = true;
                    p.detail =
                        "temporary copy of a symlink left by an interrupted rename; removed".into();
                }
                Err(e) => p.detail.push_str(&format!(" (removing it failed: {e})")),
            }
        }
        let removed = p.repaired;
        self.sink.push(p);
        removed
    }
}
