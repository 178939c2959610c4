//! Restoring a snapshot into a new, empty backing directory.
//!
//! Every object is checked against its SHA-256 in the (authenticated)
//! manifest before a byte of it is written. Entries are created in manifest
//! order (parents first); directories get their recorded mode, owner and
//! times last, children before parents, so a read-only directory can still
//! be filled. Regular files' chunks are fetched ahead across files, up to
//! `concurrency` at a time, and written in manifest order; a file gets its
//! length, its `user.kmsfs.*` extended attributes (encrypted attributes
//! and ACLs), then its mode and times once its last chunk is written, a
//! directory its extended attributes as soon as it is made. `kmsfs.header` is written after
//! everything else is on disk: an interrupted restore leaves a directory
//! that is not a filesystem, never one that mounts with files missing.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt as _;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::SnapshotError;
use crate::manifest::{Entry, Kind, Manifest, Verified};
use crate::objects::{chunk_rel, manifest_rel, parse_chunk, valid_id};
use crate::target::Store;
use crate::Progress;

/// What a restore wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreStats {
    /// The snapshot restored.
    pub id: String,
    /// Entries created (the root included).
    pub entries: u64,
    /// Regular files.
    pub files: u64,
    /// Bytes in regular files.
    pub bytes: u64,
    /// Chunk objects fetched and verified.
    pub objects_fetched: u64,
}

/// Downloads the manifest of snapshot `id` to a local temporary file and
/// parses it (not yet authenticated: see [`Manifest::verify`]).
pub async fn fetch_manifest(store: &Store, id: &str) -> Result<Manifest, SnapshotError> {
    let no_such = || SnapshotError::NoSuchSnapshot {
        target: store.display.clone(),
        id: id.to_string(),
    };
    if !valid_id(id) {
        return Err(no_such());
    }
    let rel = manifest_rel(id);
    let got = match store.os.get(&store.path(&rel)).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Err(no_such()),
        Err(e) => return Err(store.error(&format!("reading {rel}"), e)),
    };
    let mut file = tempfile::tempfile().map_err(|e| SnapshotError::io(std::env::temp_dir(), e))?;
    let mut s = got.into_stream();
    while let Some(b) = s
        .try_next()
        .await
        .map_err(|e| store.error(&format!("reading {rel}"), e))?
    {
        std::io::Write::write_all(&mut file, &b)
            .map_err(|e| SnapshotError::io(std::env::temp_dir(), e))?;
    }
    Manifest::parse(file).map_err(|detail| SnapshotError::Manifest {
        target: store.display.clone(),
        id: id.to_string(),
        detail,
    })
}

/// Refuses anything but a missing or empty directory as a restore
/// destination; creates a missing one (mode 0700 until the recorded mode
/// is applied at the end).
pub fn prepare_destination(newdir: &Path) -> Result<(), SnapshotError> {
    let dest = |detail: String| SnapshotError::Destination {
        path: newdir.to_path_buf(),
        detail,
    };
    match std::fs::symlink_metadata(newdir) {
        Ok(m) if m.is_dir() => {
            let mut it = std::fs::read_dir(newdir).map_err(|e| SnapshotError::io(newdir, e))?;
            if it.next().is_some() {
                return Err(dest(
                    "is not empty: restore into a new or empty directory".into(),
                ));
            }
            Ok(())
        }
        Ok(_) => Err(dest("exists and is not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(newdir)
            .map_err(|e| SnapshotError::io(newdir, e)),
        Err(e) => Err(SnapshotError::io(newdir, e)),
    }
}

use std::os::unix::fs::DirBuilderExt as _;

/// A relative backing path from the manifest, checked to stay inside the
/// destination (the manifest is authenticated, but a restore never trusts
/// a path to be well-formed).
fn checked_rel(p: &str) -> Option<PathBuf> {
    if p.is_empty() || p.contains('\0') {
        return None;
    }
    let path = Path::new(p);
    path.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| path.to_path_buf())
}

/// Restores the verified snapshot `m` into `newdir` (missing or empty).
pub async fn restore(
    store: Arc<Store>,
    m: Verified<'_>,
    newdir: &Path,
    concurrency: usize,
    progress: Arc<dyn Progress>,
) -> Result<RestoreStats, SnapshotError> {
    use base64::Engine as _;
    let manifest = m.manifest();
    let id = manifest.head.id.clone();
    let bad = |detail: String| SnapshotError::Manifest {
        target: store.display.clone(),
        id: id.clone(),
        detail,
    };
    let header = base64::engine::general_purpose::STANDARD
        .decode(&manifest.head.header)
        .map_err(|e| bad(format!("the header is not base64: {e}")))?;
    let chunk_size = manifest.head.chunk_size;
    if chunk_size == 0 || chunk_size > 64 * 1024 * 1024 {
        return Err(bad(format!("chunk size {chunk_size} is out of range")));
    }
    prepare_destination(newdir)?;
    let is_root = {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() == 0 }
    };
    progress.phase("restoring", Some(manifest.summary.bytes));
    let mut stats = RestoreStats {
        id: id.clone(),
        ..Default::default()
    };
    // Directories' attributes are applied at the end, deepest first.
    let mut dirs: Vec<(PathBuf, Entry)> = Vec::new();
    let mut pending = WriteQueue::new(concurrency, is_root);
    let mut first = true;
    for entry in manifest.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        stats.entries += 1;
        let xattrs = checked_xattrs(&entry).map_err(bad)?;
        if first {
            first = false;
            if !(entry.path.is_empty() && entry.kind == Kind::Dir) {
                return Err(bad("the first entry is not the backing root".into()));
            }
            set_xattrs(newdir, &xattrs)?;
            dirs.push((newdir.to_path_buf(), entry));
            continue;
        }
        let rel = checked_rel(&entry.path).ok_or_else(|| {
            bad(format!(
                "entry path {:?} is not a relative path",
                entry.path
            ))
        })?;
        let path = newdir.join(&rel);
        let io = |e: std::io::Error| SnapshotError::io(&path, e);
        match entry.kind {
            Kind::Dir => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(io)?;
                set_xattrs(&path, &xattrs)?;
                dirs.push((path, entry));
            }
            Kind::File => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(io)?;
                let jobs = chunk_jobs(&store, &entry, chunk_size)?;
                stats.files += 1;
                stats.bytes += entry.size;
                stats.objects_fetched += jobs.len() as u64;
                pending
                    .push(
                        Pending {
                            path,
                            entry,
                            xattrs,
                            file: f,
                        },
                        jobs,
                        &*progress,
                    )
                    .await?;
            }
            Kind::Hardlink => {
                let to = entry.link.as_deref().and_then(checked_rel).ok_or_else(|| {
                    bad(format!("hard link {:?} has no valid target", entry.path))
                })?;
                std::fs::hard_link(newdir.join(to), &path).map_err(io)?;
            }
            Kind::Symlink => {
                let target = entry
                    .target
                    .as_deref()
                    .ok_or_else(|| bad(format!("symlink {:?} has no target", entry.path)))?;
                std::os::unix::fs::symlink(target, &path).map_err(io)?;
                apply_attrs(&path, &entry, is_root)?;
            }
            Kind::Fifo | Kind::Socket | Kind::Char | Kind::Block => {
                let ty = match entry.kind {
                    Kind::Fifo => libc::S_IFIFO,
                    Kind::Socket => libc::S_IFSOCK,
                    Kind::Char => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                let c = cpath(&path)?;
                let rdev = entry.rdev.unwrap_or(0);
                // SAFETY: `c` is a valid NUL-terminated path.
                if unsafe { libc::mknod(c.as_ptr(), ty | 0o600, rdev as libc::dev_t) } != 0 {
                    return Err(io(std::io::Error::last_os_error()));
                }
                apply_attrs(&path, &entry, is_root)?;
            }
        }
    }
    if first {
        return Err(bad("the manifest has no entries".into()));
    }
    pending.finish(&*progress).await?;
    // Everything else is on disk before the header makes it a filesystem.
    sync_fs(newdir)?;
    write_durable(
        &newdir.join(kmsfs_core::header::HEADER_FILE_NAME),
        &header,
        0o600,
    )?;
    for (path, entry) in dirs.iter().rev() {
        apply_attrs(path, entry, is_root)?;
    }
    sync_fs(newdir)?;
    progress.done();
    Ok(stats)
}

/// The entry's extended attributes, checked: only `user.kmsfs.*` names,
/// values up to 64 KiB, each name once, and only on a directory or a
/// regular file's first name (the only entries that can hold them).
fn checked_xattrs(entry: &Entry) -> Result<Vec<crate::xattrs::Xattr>, String> {
    if entry.xattrs.is_empty() {
        return Ok(Vec::new());
    }
    if !matches!(entry.kind, Kind::Dir | Kind::File) {
        return Err(format!(
            "entry {:?}: a {:?} entry cannot carry extended attributes",
            entry.path, entry.kind
        ));
    }
    let mut out: Vec<crate::xattrs::Xattr> = Vec::with_capacity(entry.xattrs.len());
    for (name, value) in &entry.xattrs {
        let x = crate::xattrs::decode(name, value)
            .map_err(|e| format!("entry {:?}: {e}", entry.path))?;
        if out.iter().any(|(n, _)| *n == x.0) {
            return Err(format!(
                "entry {:?}: extended attribute {name:?} is listed twice",
                entry.path
            ));
        }
        out.push(x);
    }
    Ok(out)
}

/// Sets the restored entry's extended attributes; a destination without
/// them is refused, naming the entry.
fn set_xattrs(path: &Path, xattrs: &[crate::xattrs::Xattr]) -> Result<(), SnapshotError> {
    match crate::xattrs::write(path, xattrs) {
        Ok(()) => Ok(()),
        Err(crate::xattrs::WriteError::Unsupported) => Err(SnapshotError::Destination {
            path: path.to_path_buf(),
            detail: "cannot set the extended attributes this entry carries (its encrypted \
                     attributes and ACLs): the destination filesystem has no user extended \
                     attributes; restore onto one that has them (ext4, xfs, tmpfs)"
                .into(),
        }),
        Err(crate::xattrs::WriteError::NoRoom) => Err(SnapshotError::Destination {
            path: path.to_path_buf(),
            detail: format!(
                "no room for the extended attributes this entry carries ({} bytes): the \
                 destination is full, or keeps too little per file (ext4 holds one 4 KiB block \
                 of attributes per inode); restore onto a filesystem that holds them (tmpfs does)",
                xattrs.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
            ),
        }),
        Err(crate::xattrs::WriteError::Io(e)) => Err(SnapshotError::io(path, e)),
    }
}

/// A regular file whose chunks are on their way.
struct Pending {
    path: PathBuf,
    entry: Entry,
    xattrs: Vec<crate::xattrs::Xattr>,
    file: File,
}

/// A chunk's offset in its file and its verified bytes.
type Chunk = (u64, bytes::Bytes);

/// The fetch of one chunk.
type ChunkFetch =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Chunk, SnapshotError>> + Send>>;

/// One step of the restore's write queue: a chunk of the oldest pending
/// file (its offset and verified bytes), or that file's end.
enum Step {
    Chunk(tokio::task::JoinHandle<Result<Chunk, SnapshotError>>),
    End,
}

/// Regular files being restored: their chunks are fetched ahead, across
/// files (small files would otherwise have one GET in flight at a time),
/// and written in manifest order.
struct WriteQueue {
    steps: VecDeque<Step>,
    files: VecDeque<Pending>,
    /// Chunk fetches queued (spawned, not yet written).
    in_flight: usize,
    concurrency: usize,
    is_root: bool,
}

/// How many files a restore keeps open while their chunks arrive (a run
/// of empty files queues no fetch, only its end).
const MAX_OPEN_FILES: usize = 64;

impl WriteQueue {
    fn new(concurrency: usize, is_root: bool) -> Self {
        WriteQueue {
            steps: VecDeque::new(),
            files: VecDeque::new(),
            in_flight: 0,
            concurrency: concurrency.max(1),
            is_root,
        }
    }

    /// Queues file `p` and the fetches of its chunks, first writing out
    /// what is needed to keep at most `concurrency` fetches and
    /// [`MAX_OPEN_FILES`] files in hand.
    async fn push(
        &mut self,
        p: Pending,
        jobs: Vec<ChunkFetch>,
        progress: &dyn Progress,
    ) -> Result<(), SnapshotError> {
        while self.files.len() >= MAX_OPEN_FILES {
            self.write_next(progress).await?;
        }
        self.files.push_back(p);
        for job in jobs {
            while self.in_flight >= self.concurrency {
                self.write_next(progress).await?;
            }
            // Spawned, so a fetch progresses while entries are created.
            self.steps.push_back(Step::Chunk(tokio::spawn(job)));
            self.in_flight += 1;
        }
        self.steps.push_back(Step::End);
        Ok(())
    }

    /// Writes out everything queued.
    async fn finish(&mut self, progress: &dyn Progress) -> Result<(), SnapshotError> {
        while !self.steps.is_empty() {
            self.write_next(progress).await?;
        }
        Ok(())
    }

    /// Takes the oldest step off the queue and carries it out: writes a
    /// chunk into the oldest pending file, or finishes that file (length,
    /// extended attributes, then owner, mode and times).
    async fn write_next(&mut self, progress: &dyn Progress) -> Result<(), SnapshotError> {
        let (Some(step), Some(p)) = (self.steps.pop_front(), self.files.front()) else {
            return Ok(());
        };
        match step {
            Step::Chunk(job) => {
                self.in_flight -= 1;
                let (offset, bytes) = job.await.map_err(|e| SnapshotError::Backing {
                    path: p.path.clone(),
                    detail: format!("fetching a chunk failed: {e}"),
                })??;
                write_sparse(&p.file, &bytes, offset).map_err(|e| SnapshotError::io(&p.path, e))?;
                progress.inc(bytes.len() as u64);
            }
            Step::End => {
                let Some(p) = self.files.pop_front() else {
                    return Ok(());
                };
                p.file
                    .set_len(p.entry.size)
                    .map_err(|e| SnapshotError::io(&p.path, e))?;
                drop(p.file);
                // Before the mode: a read-only file takes no attribute
                // from a restore that is not root.
                set_xattrs(&p.path, &p.xattrs)?;
                apply_attrs(&p.path, &p.entry, self.is_root)?;
            }
        }
        Ok(())
    }
}

impl Drop for WriteQueue {
    /// A restore that fails stops the fetches still queued.
    fn drop(&mut self) {
        for s in &self.steps {
            if let Step::Chunk(job) = s {
                job.abort();
            }
        }
    }
}

/// The fetches of one file's stored chunks (holes have none), each
/// checked against its SHA-256 and length before it is handed back with
/// its offset.
fn chunk_jobs(
    store: &Arc<Store>,
    entry: &Entry,
    chunk_size: u64,
) -> Result<Vec<ChunkFetch>, SnapshotError> {
    let n_chunks = entry.size.div_ceil(chunk_size);
    if entry.chunks.len() as u64 != n_chunks {
        return Err(SnapshotError::Manifest {
            target: store.display.clone(),
            id: String::new(),
            detail: format!(
                "{}: {} chunks for {} bytes",
                entry.path,
                entry.chunks.len(),
                entry.size
            ),
        });
    }
    Ok(entry
        .chunks
        .iter()
        .enumerate()
        .filter(|(_, h)| !h.is_empty())
        .map(|(i, h)| {
            let store = store.clone();
            let h = h.clone();
            let file = entry.path.clone();
            let offset = i as u64 * chunk_size;
            let want = chunk_size.min(entry.size - offset);
            Box::pin(async move {
                let tampered = |object: String| SnapshotError::TamperedObject {
                    target: store.display.clone(),
                    object,
                    file: file.clone(),
                };
                let Some(id) = parse_chunk(&h) else {
                    return Err(tampered(format!("chunks/{h}")));
                };
                let rel = chunk_rel(&id);
                let bytes = match store.os.get(&store.path(&rel)).await {
                    Ok(g) => g.bytes().await,
                    Err(e) => Err(e),
                };
                let bytes = match bytes {
                    Ok(b) => b,
                    Err(object_store::Error::NotFound { .. }) => {
                        return Err(SnapshotError::MissingObject {
                            target: store.display.clone(),
                            object: rel,
                            file,
                        })
                    }
                    Err(e) => return Err(store.error(&format!("reading {rel}"), e)),
                };
                let got: [u8; 32] = Sha256::digest(&bytes).into();
                if got != id || bytes.len() as u64 != want {
                    return Err(tampered(rel));
                }
                Ok((offset, bytes))
            }) as ChunkFetch
        })
        .collect())
}

/// Writes the non-zero 4 KiB pages of `bytes` at `offset`: all-zero pages
/// stay holes (kmsfs reads an all-zero unit as zeros), so a sparse backing
/// file restores sparse. The caller sets the final length.
fn write_sparse(f: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    const PAGE: usize = 4096;
    let mut i = 0;
    while i < bytes.len() {
        let page_end = |p: usize| (p + PAGE).min(bytes.len());
        if bytes[i..page_end(i)].iter().all(|b| *b == 0) {
            i = page_end(i);
            continue;
        }
        let start = i;
        while i < bytes.len() && !bytes[i..page_end(i)].iter().all(|b| *b == 0) {
            i = page_end(i);
        }
        f.write_all_at(&bytes[start..i], offset + start as u64)?;
    }
    Ok(())
}

fn cpath(p: &Path) -> Result<CString, SnapshotError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| SnapshotError::Backing {
        path: p.to_path_buf(),
        detail: "path contains a NUL byte".into(),
    })
}

/// Owner (when root), mode (not for symlinks) and times, without following
/// a symlink.
fn apply_attrs(path: &Path, e: &Entry, is_root: bool) -> Result<(), SnapshotError> {
    let io = |err: std::io::Error| SnapshotError::io(path, err);
    if is_root {
        std::os::unix::fs::lchown(path, Some(e.uid), Some(e.gid)).map_err(io)?;
    }
    if e.kind != Kind::Symlink {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(e.mode & 0o7777))
            .map_err(io)?;
    }
    let c = cpath(path)?;
    let ts = [
        libc::timespec {
            tv_sec: e.atime.0 as libc::time_t,
            tv_nsec: e.atime.1 as libc::c_long,
        },
        libc::timespec {
            tv_sec: e.mtime.0 as libc::time_t,
            tv_nsec: e.mtime.1 as libc::c_long,
        },
    ];
    // SAFETY: `c` is a valid NUL-terminated path and `ts` two timespecs.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `syncfs` of the filesystem holding `dir`.
fn sync_fs(dir: &Path) -> Result<(), SnapshotError> {
    use std::os::fd::AsRawFd as _;
    let d = File::open(dir).map_err(|e| SnapshotError::io(dir, e))?;
    // SAFETY: `d` is open for the duration of the call.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(SnapshotError::io(dir, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically and durably: a temporary file,
/// fsync, rename, fsync of the directory.
fn write_durable(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SnapshotError> {
    let io = |e: std::io::Error| SnapshotError::io(path, e);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("restore-tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io)?;
        std::io::Write::write_all(&mut f, bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SnapshotError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside() {
        assert!(checked_rel("a/b").is_some());
        assert!(checked_rel("../a").is_none());
        assert!(checked_rel("a/../../b").is_none());
        assert!(checked_rel("/etc").is_none());
        assert!(checked_rel("").is_none());
        assert!(checked_rel("./a").is_none());
    }

    #[test]
    fn attributes_are_checked_strictly() {
        let mut e = Entry {
            path: "d/f".into(),
            kind: Kind::File,
            mode: 0o600,
            uid: 0,
            gid: 0,
            atime: (0, 0),
            mtime: (0, 0),
            size: 0,
            chunks: Vec::new(),
            target: None,
            rdev: None,
            link: None,
            xattrs: vec![
                ("user.kmsfs.id".into(), "AAE=".into()),
                ("user.kmsfs.x.a".into(), "".into()),
            ],
        };
        assert_eq!(checked_xattrs(&e).unwrap().len(), 2);
        e.xattrs.push(("user.other".into(), "AA==".into()));
        let err = checked_xattrs(&e).unwrap_err();
        assert!(
            err.contains("\"d/f\"") && err.contains("user.other"),
            "{err}"
        );
        e.xattrs.pop();
        e.xattrs.push(("user.kmsfs.id".into(), "AA==".into()));
        assert!(checked_xattrs(&e).unwrap_err().contains("twice"));
        e.xattrs.pop();
        e.kind = Kind::Symlink;
        assert!(checked_xattrs(&e).unwrap_err().contains("cannot carry"));
        e.kind = Kind::Hardlink;
        assert!(checked_xattrs(&e).is_err());
        e.kind = Kind::Dir;
        assert!(checked_xattrs(&e).is_ok());
    }

    #[test]
    fn destination_must_be_empty() {
        let d = tempfile::tempdir().unwrap();
        let new = d.path().join("new");
        prepare_destination(&new).unwrap();
        prepare_destination(&new).unwrap();
        std::fs::write(new.join("x"), b"x").unwrap();
        let e = prepare_destination(&new).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
    }
}
