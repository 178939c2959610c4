//! Capturing the backing directory of a *mounted* filesystem at one
//! instant, for `kmsfs snapshot create`.
//!
//! The capture goes into a staging directory beside the backing directory
//! (same filesystem, so copies can be reflinks), in three steps:
//!
//! 1. **Pre-copy, writes running.** The daemon starts recording which
//!    backing inodes have their contents changed (`TRACK`); every regular
//!    file is cloned (`FICLONE`) or copied (`copy_file_range`) into a pool.
//! 2. **Freeze.** The daemon flushes the kernel's writeback cache and holds
//!    every modifying request. The client walks the tree (names, types,
//!    owners, modes, times, symlink targets) and re-copies only the files
//!    whose pre-copy may be stale: changed since `TRACK`, new, moved, or in
//!    a directory made since, and reads every directory's and file's
//!    `user.kmsfs.*` attributes (encrypted attributes and ACLs). Then it
//!    thaws. The pause is a metadata walk plus the files written during
//!    the pre-copy, not the tree's size.
//! 3. **After the thaw.** The tree is rebuilt in the staging directory from
//!    what the walk recorded, with hard links to the pool; the ordinary
//!    snapshot walk then uploads it as if it were the backing directory.
//!
//! The staging directory is removed at the end, and a leftover of a
//! killed run (its pid gone) at the start of the next one.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{File, Metadata};
use std::io::ErrorKind;
use std::os::fd::AsRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;

use crate::control::client::Control;

/// The header is carried in the manifest's head, not as an entry.
const HEADER_FILE_NAME: &str = kmsfs_core::header::HEADER_FILE_NAME;
/// The staging directory's name: `.NAME` + this + the client's pid.
const STAGING_INFIX: &str = ".kmsfs-snapshot.";

/// What the capture cost.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureStats {
    /// How long modifying requests were held (from the daemon's clock:
    /// from closing the gate, in-flight requests included, to the thaw).
    pub write_pause_ms: f64,
    /// Part of the pause spent waiting for requests in flight.
    pub drain_ms: f64,
    /// `reflink` when every copy was a clone, else `copy`.
    pub method: &'static str,
    /// Bytes copied before the freeze.
    pub precopy_bytes: u64,
    /// Files copied again while frozen, and their bytes.
    pub recopied_files: u64,
    /// Bytes copied while frozen.
    pub recopied_bytes: u64,
    /// Backing entries captured (the root included).
    pub entries: u64,
}

/// A finished capture: `tree` is the backing directory as it was.
pub struct Capture {
    /// The captured tree (without `kmsfs.header`).
    pub tree: PathBuf,
    /// What it cost.
    pub stats: CaptureStats,
    _staging: Staging,
}

/// The staging directory, removed when dropped.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != ErrorKind::NotFound {
                eprintln!(
                    "kmsfs: warning: cannot remove the staging directory {}: {e}",
                    self.0.display()
                );
            }
        }
    }
}

impl Staging {
    /// `PARENT/.NAME.kmsfs-snapshot.PID`, mode 0700, after removing those
    /// of runs whose process is gone.
    fn new(cipherdir: &Path) -> anyhow::Result<Staging> {
        let (Some(parent), Some(name)) = (cipherdir.parent(), cipherdir.file_name()) else {
            bail!(
                "{}: a mounted filesystem's snapshot stages beside the backing directory, \
                 which needs a parent",
                cipherdir.display()
            );
        };
        let prefix = format!(".{}{STAGING_INFIX}", name.to_string_lossy());
        if let Ok(rd) = std::fs::read_dir(parent) {
            for de in rd.flatten() {
                let n = de.file_name().to_string_lossy().into_owned();
                let Some(pid) = n.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else {
                    continue;
                };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(de.path());
                }
            }
        }
        let dir = parent.join(format!("{prefix}{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create the staging directory {}", dir.display()))?;
        let staging = Staging(dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(staging.0.join("pool"))
            .with_context(|| format!("cannot create {}/pool", staging.0.display()))?;
        Ok(staging)
    }
}

/// A pre-copied file: valid at the freeze if nothing about it changed.
struct Pooled {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    pool: String,
}

/// One backing entry as the frozen walk saw it.
struct Item {
    rel: PathBuf,
    md: Metadata,
    kind: ItemKind,
    /// Its `user.kmsfs.*` attributes (a file's on its first name only).
    xattrs: Vec<kmsfs_snapshot::xattrs::Xattr>,
}

enum ItemKind {
    Dir,
    File { pool: String },
    Symlink(PathBuf),
    Special,
}

/// Copies files into the pool, cloning while the filesystem allows it.
struct Copier {
    pool: PathBuf,
    next: u64,
    clones: bool,
    copied_any: bool,
}

impl Copier {
    /// Copies `src` into a new pool file; returns its name and size.
    fn copy(&mut self, src: &Path) -> std::io::Result<(String, u64)> {
        let name = format!("p{}", self.next);
        self.next += 1;
        let from = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(src)?;
        let to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.pool.join(&name))?;
        let len = from.metadata()?.len();
        if self.clones {
            // SAFETY: both are open descriptors; FICLONE reads only them.
            if unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } == 0 {
                return Ok((name, len));
            }
            // Not a reflink filesystem (tmpfs, ext4): copy from now on.
            self.clones = false;
        }
        self.copied_any = true;
        let n = copy_range(&from, &to)?;
        Ok((name, n))
    }
}

/// `copy_file_range` to the end of `from` (the kernel copies in place,
/// sharing blocks where the filesystem can); plain reads and writes where
/// it is not supported.
fn copy_range(from: &File, to: &File) -> std::io::Result<u64> {
    let mut total = 0u64;
    loop {
        // SAFETY: both are open descriptors; null offsets use and move
        // the files' own positions.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                std::ptr::null_mut(),
                to.as_raw_fd(),
                std::ptr::null_mut(),
                1 << 30,
                0,
            )
        };
        if n == 0 {
            return Ok(total);
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if total == 0
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                )
            {
                let (mut f, mut t) = (from, to);
                return std::io::copy(&mut f, &mut t);
            }
            return Err(e);
        }
        total += n as u64;
    }
}

/// Visits every entry under `root` (the root first, each directory before
/// its contents), skipping the root's `kmsfs.header`. `missing_ok` skips
/// entries that vanish during the walk (the pre-copy runs with writes).
fn walk(
    root: &Path,
    missing_ok: bool,
    mut visit: impl FnMut(&Path, Metadata) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let md = match std::fs::symlink_metadata(&path) {
            Ok(md) => md,
            Err(e) if missing_ok && e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
        };
        if md.is_dir() {
            let rd = match std::fs::read_dir(&path) {
                Ok(rd) => rd,
                Err(e) if missing_ok && e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot list {}", path.display())),
            };
            for de in rd {
                let de = de.with_context(|| format!("cannot list {}", path.display()))?;
                let name = de.file_name();
                if rel.as_os_str().is_empty() && name == HEADER_FILE_NAME {
                    continue;
                }
                stack.push(rel.join(name));
            }
        }
        visit(&rel, md)?;
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Captures `cipherdir`, served by the daemon at the other end of `ctl`,
/// at one instant; `freeze_timeout` bounds the pause (the daemon thaws by
/// itself after it, and the capture then fails).
pub fn capture(
    cipherdir: &Path,
    ctl: &mut Control,
    freeze_timeout: Duration,
) -> anyhow::Result<Capture> {
    let staging = Staging::new(cipherdir)?;
    let mut copier = Copier {
        pool: staging.0.join("pool"),
        next: 0,
        clones: true,
        copied_any: false,
    };

    // 1. Pre-copy, with writes running.
    ctl.track()?;
    let mut pooled: HashMap<PathBuf, Pooled> = HashMap::new();
    let mut precopy_bytes = 0u64;
    let pool_dir = copier.pool.clone();
    walk(cipherdir, true, |rel, md| {
        if !md.is_file() {
            return Ok(());
        }
        let (pool, n) = match copier.copy(&cipherdir.join(rel)) {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot copy {} into the staging directory {} (it needs room for a \
                         copy of the tree where the filesystem has no reflinks)",
                        rel.display(),
                        pool_dir.display()
                    )
                })
            }
        };
        precopy_bytes += n;
        pooled.insert(
            rel.to_path_buf(),
            Pooled {
                ino: md.ino(),
                size: md.size(),
                mtime: (md.mtime(), md.mtime_nsec()),
                ctime: (md.ctime(), md.ctime_nsec()),
                pool,
            },
        );
        Ok(())
    })?;

    // 2. Frozen: walk, re-copy what may be stale, thaw.
    let drain = ctl.freeze(freeze_timeout)?;
    let frozen_at = Instant::now();
    let walked = frozen_walk(cipherdir, ctl, &mut copier, &pooled);
    let thawed = ctl.thaw();
    let (items, recopied_files, recopied_bytes) = walked?;
    let held = thawed.with_context(|| {
        format!(
            "the capture took {:.0} ms, longer than --freeze-timeout allows: nothing was \
             published; rerun with a longer timeout",
            ms(frozen_at.elapsed())
        )
    })?;

    // 3. Rebuild the tree from the walk.
    let tree = staging.0.join("tree");
    build_tree(&tree, &copier.pool, &items)?;
    Ok(Capture {
        tree,
        stats: CaptureStats {
            write_pause_ms: ms(held),
            drain_ms: ms(drain),
            method: if copier.copied_any { "copy" } else { "reflink" },
            precopy_bytes,
            recopied_files,
            recopied_bytes,
            entries: items.len() as u64,
        },
        _staging: staging,
    })
}

type Walked = (Vec<Item>, u64, u64);

fn frozen_walk(
    cipherdir: &Path,
    ctl: &mut Control,
    copier: &mut Copier,
    pooled: &HashMap<PathBuf, Pooled>,
) -> anyhow::Result<Walked> {
    let changed: HashSet<u64> = ctl.changed()?;
    let mut items = Vec::new();
    // Hard links: one pool file per backing inode.
    let mut by_ino: HashMap<u64, String> = HashMap::new();
    let mut dir_ino: HashMap<PathBuf, u64> = HashMap::new();
    let (mut files, mut bytes) = (0u64, 0u64);
    walk(cipherdir, false, |rel, md| {
        let path = cipherdir.join(rel);
        let ft = md.file_type();
        // Attributes are read here, frozen, for every entry: they are not
        // in the pre-copy, and a setxattr is held like any change.
        let mut xattrs = Vec::new();
        let kind = if ft.is_dir() {
            dir_ino.insert(rel.to_path_buf(), md.ino());
            xattrs = read_xattrs(&path)?;
            ItemKind::Dir
        } else if ft.is_file() {
            let pool = match by_ino.get(&md.ino()) {
                Some(p) => p.clone(),
                None => {
                    xattrs = read_xattrs(&path)?;
                    let parent_changed = rel
                        .parent()
                        .and_then(|p| dir_ino.get(p))
                        .is_some_and(|i| changed.contains(i));
                    let fresh = pooled.get(rel).filter(|p| {
                        p.ino == md.ino()
                            && p.size == md.size()
                            && p.mtime == (md.mtime(), md.mtime_nsec())
                            && p.ctime == (md.ctime(), md.ctime_nsec())
                            && !changed.contains(&md.ino())
                            && !parent_changed
                    });
                    let pool = match fresh {
                        Some(p) => p.pool.clone(),
                        None => {
                            let (pool, n) = copier
                                .copy(&path)
                                .with_context(|| format!("cannot copy {}", path.display()))?;
                            files += 1;
                            bytes += n;
                            pool
                        }
                    };
                    by_ino.insert(md.ino(), pool.clone());
                    pool
                }
            };
            ItemKind::File { pool }
        } else if ft.is_symlink() {
            let t = std::fs::read_link(&path)
                .with_context(|| format!("cannot read the link {}", path.display()))?;
            ItemKind::Symlink(t)
        } else {
            ItemKind::Special
        };
        items.push(Item {
            rel: rel.to_path_buf(),
            md,
            kind,
            xattrs,
        });
        Ok(())
    })?;
    Ok((items, files, bytes))
}

fn read_xattrs(path: &Path) -> anyhow::Result<Vec<kmsfs_snapshot::xattrs::Xattr>> {
    kmsfs_snapshot::xattrs::read(path)
        .with_context(|| format!("cannot read the extended attributes of {}", path.display()))
}

fn cpath(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("{}", p.display()))
}

/// Makes `tree` what the frozen walk saw: entries first (directories
/// before their contents) with their extended attributes, then owners,
/// modes and times, children before their directory so a directory's
/// times are set last.
fn build_tree(tree: &Path, pool: &Path, items: &[Item]) -> anyhow::Result<()> {
    for it in items {
        let path = tree.join(&it.rel);
        let made = match &it.kind {
            ItemKind::Dir => std::fs::DirBuilder::new().mode(0o700).create(&path),
            ItemKind::File { pool: p } => std::fs::hard_link(pool.join(p), &path),
            ItemKind::Symlink(t) => std::os::unix::fs::symlink(t, &path),
            ItemKind::Special => {
                let c = cpath(&path)?;
                // SAFETY: a valid C string; mode and device from the stat.
                let r = unsafe { libc::mknod(c.as_ptr(), it.md.mode(), it.md.rdev()) };
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
        };
        made.with_context(|| format!("cannot stage {}", path.display()))?;
        // The staging directory is on the backing filesystem, which held
        // these attributes a moment ago.
        kmsfs_snapshot::xattrs::write(&path, &it.xattrs)
            .with_context(|| format!("cannot set the extended attributes of {}", path.display()))?;
    }
    for it in items.iter().rev() {
        let path = tree.join(&it.rel);
        let symlink = matches!(it.kind, ItemKind::Symlink(_));
        let meta = || -> std::io::Result<()> {
            std::os::unix::fs::lchown(&path, Some(it.md.uid()), Some(it.md.gid()))?;
            if !symlink {
                std::fs::set_permissions(
                    &path,
                    std::fs::Permissions::from_mode(it.md.mode() & 0o7777),
                )?;
            }
            let c = CString::new(path.as_os_str().as_bytes())?;
            let times = [
                libc::timespec {
                    tv_sec: it.md.atime(),
                    tv_nsec: it.md.atime_nsec(),
                },
                libc::timespec {
                    tv_sec: it.md.mtime(),
                    tv_nsec: it.md.mtime_nsec(),
                },
            ];
            // SAFETY: a valid C string and two timespecs.
            let r = unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        meta().with_context(|| format!("cannot set the attributes of {}", path.display()))?;
    }
    Ok(())
}
