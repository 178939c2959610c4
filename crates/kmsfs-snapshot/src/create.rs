//! Taking a snapshot: walk the backing directory once, cut regular files
//! into chunks, upload the chunks the store lacks (several at a time), then
//! publish the manifest.
//!
//! Memory is bounded whatever the tree's size: a blocking walker reads one
//! chunk at a time and hands it over a small channel to at most
//! `concurrency` uploads in flight; the manifest is spooled to a local
//! temporary file. What grows with the tree is the set of chunk ids the
//! store holds (32 bytes each; 10 GiB of data is about 10,000 chunks) and
//! the table of hard-linked inodes.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use object_store::PutPayload;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::error::SnapshotError;
use crate::manifest::{Entry, Head, Kind, ManifestWriter, Summary, MANIFEST_VERSION};
use crate::objects::{chunk_rel, manifest_rel, new_id, parse_chunk, ChunkId, CHUNK_SIZE};
use crate::target::Store;
use crate::unchanged::{self, CacheReader, CacheWriter, Seen};
use crate::Progress;

/// Name of the header file, carried in the manifest's head rather than as
/// an entry.
const HEADER_FILE_NAME: &str = kmsfs_core::header::HEADER_FILE_NAME;

/// What `create` needs besides the store.
#[derive(Debug)]
pub struct CreateRequest<'a> {
    /// The backing directory (unmounted, locked by the caller).
    pub cipherdir: &'a Path,
    /// `kmsfs.header` byte for byte, as authenticated by the caller.
    pub header: &'a [u8],
    /// The filesystem UUID.
    pub fs_uuid: &'a str,
    /// The manifest key ([`kmsfs_core::keys::FsKeys::snapshot_manifest_key`]).
    pub manifest_key: &'a [u8],
    /// The operator's label.
    pub label: Option<String>,
    /// Uploads in flight at once.
    pub concurrency: usize,
    /// The unchanged-file cache for this filesystem and target
    /// ([`crate::unchanged`]); `None`: every file is read, no cache kept.
    pub cache: Option<&'a Path>,
    /// Read every file even where the cache says it is unchanged (the
    /// cache is still written for the next snapshot).
    pub full: bool,
}

/// What a snapshot took and uploaded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateStats {
    /// The new snapshot's id.
    pub id: String,
    /// Backing entries recorded (the root included).
    pub entries: u64,
    /// Regular files.
    pub files: u64,
    /// Bytes in regular files.
    pub bytes: u64,
    /// Chunk references (holes excluded).
    pub chunks: u64,
    /// Chunks of zero bytes, stored as holes (no object).
    pub holes: u64,
    /// Chunk objects uploaded by this run.
    pub objects_uploaded: u64,
    /// Bytes of chunk objects uploaded by this run.
    pub bytes_uploaded: u64,
    /// Chunk references already in the store (not uploaded).
    pub objects_reused: u64,
    /// Size of the manifest object.
    pub manifest_bytes: u64,
    /// Regular files taken from the unchanged-file cache: not read, not
    /// hashed.
    pub files_unchanged: u64,
    /// Bytes in those files.
    pub bytes_unchanged: u64,
    /// Bytes of backing files read (and hashed) by this run.
    pub bytes_read: u64,
}

struct Job {
    id: ChunkId,
    data: Bytes,
}

/// Takes a snapshot of `req.cipherdir` into `store`; returns what it did.
/// Nothing is visible in the store as a snapshot until the manifest, the
/// last object, is written; a failed run leaves only chunk objects that the
/// next run reuses.
pub async fn create(
    store: Arc<Store>,
    req: CreateRequest<'_>,
    progress: Arc<dyn Progress>,
) -> Result<CreateStats, SnapshotError> {
    use base64::Engine as _;
    let known = store.chunk_ids().await?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let now = now_ms.div_euclid(1000);
    let id = new_id(now_ms);
    let start_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    let cache_key = unchanged::cache_key(req.manifest_key)
        .map_err(|e| SnapshotError::Internal(e.to_string()))?;
    let chunk_size = CHUNK_SIZE as u64;
    let cache_in = match (req.cache, req.full) {
        (Some(p), false) => CacheReader::open(p, &cache_key, req.fs_uuid, chunk_size),
        _ => None,
    };
    let cache_out = req.cache.and_then(|p| {
        CacheWriter::new(p, &cache_key, &id, req.fs_uuid, chunk_size, start_ns)
            .map_err(|e| {
                tracing::warn!(
                    "{}: cannot write the unchanged-file cache ({e}); the next snapshot reads every file",
                    p.display()
                )
            })
            .ok()
    });
    let head = Head {
        kmsfs_snapshot: MANIFEST_VERSION,
        id: id.clone(),
        label: req.label.clone(),
        created: now,
        fs_uuid: req.fs_uuid.to_string(),
        chunk_size: CHUNK_SIZE as u64,
        header: base64::engine::general_purpose::STANDARD.encode(req.header),
    };
    let spool = tempfile::tempfile().map_err(|e| SnapshotError::io(std::env::temp_dir(), e))?;
    let writer = ManifestWriter::new(spool, req.manifest_key, &head)
        .map_err(|e| SnapshotError::io(std::env::temp_dir(), e))?;

    let concurrency = req.concurrency.max(1);
    let (tx, rx) = mpsc::channel::<Job>(2);
    let uploaded = Arc::new(AtomicU64::new(0));
    let uploaded_bytes = Arc::new(AtomicU64::new(0));
    let uploader = tokio::spawn(upload_all(
        store.clone(),
        rx,
        concurrency,
        uploaded.clone(),
        uploaded_bytes.clone(),
    ));
    let walker = Walker {
        root: req.cipherdir.to_path_buf(),
        writer,
        tx,
        known,
        links: HashMap::new(),
        summary: Summary::default(),
        stats: WalkStats::default(),
        cache_in,
        cache_out,
        progress: progress.clone(),
    };
    progress.phase("reading and uploading", None);
    let walked = tokio::task::spawn_blocking(move || walker.run())
        .await
        .map_err(|e| SnapshotError::Internal(format!("walker: {e}")))?;
    // The walker dropped its sender: the uploader drains what is queued.
    let up = uploader
        .await
        .map_err(|e| SnapshotError::Internal(format!("uploader: {e}")))?;
    // An upload error explains a walker that stopped because the uploads
    // did: report it first.
    up?;
    let Walked {
        writer,
        summary,
        stats: ws,
        cache,
    } = walked?;
    let (file, len) = writer
        .finish(&summary)
        .map_err(|e| SnapshotError::io(std::env::temp_dir(), e))?;
    progress.done();

    // Every chunk is in the store (and durable, for a local target) before
    // the manifest that names them appears.
    store.sync_all()?;
    progress.phase("publishing the manifest", Some(len));
    put_file(&store, &manifest_rel(&id), file, &*progress).await?;
    progress.done();
    // The cache describes a published snapshot only.
    if let Some(c) = cache {
        let done = c.finish().and_then(|p| p.commit());
        if let Err(e) = done {
            tracing::warn!(
                "cannot write the unchanged-file cache ({e}); the next snapshot reads every file"
            );
        }
    }
    Ok(CreateStats {
        id,
        entries: summary.entries,
        files: summary.files,
        bytes: summary.bytes,
        chunks: summary.chunks,
        holes: ws.holes,
        objects_uploaded: uploaded.load(Ordering::Relaxed),
        bytes_uploaded: uploaded_bytes.load(Ordering::Relaxed),
        objects_reused: ws.reused,
        manifest_bytes: len,
        files_unchanged: ws.files_unchanged,
        bytes_unchanged: ws.bytes_unchanged,
        bytes_read: ws.bytes_read,
    })
}

/// Uploads a local file to `rel`: one PUT when small, a multipart upload
/// (8 MiB parts, several in flight) when large, so a manifest of any size
/// streams; the object appears only when the upload completes.
pub(crate) async fn put_file(
    store: &Store,
    rel: &str,
    mut file: File,
    progress: &dyn Progress,
) -> Result<(), SnapshotError> {
    let path = store.path(rel);
    let mut w =
        object_store::buffered::BufWriter::with_capacity(store.os.clone(), path, 8 * 1024 * 1024)
            .with_max_concurrency(4);
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| SnapshotError::io(std::env::temp_dir(), e))?;
        if n == 0 {
            break;
        }
        if let Err(e) = w.write_all(&buf[..n]).await {
            let _ = w.abort().await;
            return Err(store.error(&format!("writing {rel}"), io_to_store(e)));
        }
        progress.inc(n as u64);
    }
    if let Err(e) = w.shutdown().await {
        let _ = w.abort().await;
        return Err(store.error(&format!("writing {rel}"), io_to_store(e)));
    }
    store.sync_local(rel)
}

/// The object store error inside an `io::Error` from its `BufWriter`.
fn io_to_store(e: io::Error) -> object_store::Error {
    match e.downcast::<object_store::Error>() {
        Ok(e) => e,
        Err(e) => object_store::Error::Generic {
            store: "io",
            source: Box::new(e),
        },
    }
}

async fn upload_all(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Job>,
    concurrency: usize,
    count: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
) -> Result<(), SnapshotError> {
    let mut tasks: JoinSet<Result<(), SnapshotError>> = JoinSet::new();
    let join = |r: Result<Result<(), SnapshotError>, tokio::task::JoinError>| match r {
        Ok(r) => r,
        Err(e) => Err(SnapshotError::Internal(format!("upload task: {e}"))),
    };
    while let Some(job) = rx.recv().await {
        while tasks.len() >= concurrency {
            if let Some(r) = tasks.join_next().await {
                join(r)?;
            }
        }
        let store = store.clone();
        let count = count.clone();
        let bytes = bytes.clone();
        tasks.spawn(async move {
            let rel = chunk_rel(&job.id);
            let len = job.data.len() as u64;
            store
                .os
                .put(&store.path(&rel), PutPayload::from(job.data))
                .await
                .map_err(|e| store.error(&format!("uploading {rel}"), e))?;
            count.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(len, Ordering::Relaxed);
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        join(r)?;
    }
    Ok(())
}

/// Counts kept by the walker besides the manifest's summary.
#[derive(Debug, Default)]
struct WalkStats {
    holes: u64,
    reused: u64,
    files_unchanged: u64,
    bytes_unchanged: u64,
    bytes_read: u64,
}

/// What the walker hands back.
struct Walked {
    writer: ManifestWriter,
    summary: Summary,
    stats: WalkStats,
    cache: Option<CacheWriter>,
}

/// The blocking half: reads the backing directory, writes the manifest,
/// queues chunks the store lacks.
struct Walker {
    root: PathBuf,
    writer: ManifestWriter,
    tx: mpsc::Sender<Job>,
    known: HashSet<ChunkId>,
    /// (device, inode) of files with more than one name → first path.
    links: HashMap<(u64, u64), String>,
    summary: Summary,
    stats: WalkStats,
    /// The previous snapshot's unchanged-file cache, read along the walk.
    cache_in: Option<CacheReader>,
    /// This snapshot's cache.
    cache_out: Option<CacheWriter>,
    progress: Arc<dyn Progress>,
}

impl Walker {
    fn run(mut self) -> Result<Walked, SnapshotError> {
        // Depth first, names sorted, each directory before what it holds,
        // so a restore can create entries in manifest order.
        let mut stack: Vec<String> = vec![String::new()];
        while let Some(rel) = stack.pop() {
            let path = self.root.join(&rel);
            let meta = std::fs::symlink_metadata(&path).map_err(|e| SnapshotError::io(&path, e))?;
            let ft = meta.file_type();
            let mut entry = Entry {
                path: rel.clone(),
                kind: Kind::Dir,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                atime: (meta.atime(), meta.atime_nsec()),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                size: 0,
                chunks: Vec::new(),
                target: None,
                rdev: None,
                link: None,
                xattrs: Vec::new(),
            };
            if ft.is_dir() {
                entry.xattrs = carried_xattrs(&path)?;
                let mut names = Vec::new();
                for de in std::fs::read_dir(&path).map_err(|e| SnapshotError::io(&path, e))? {
                    let de = de.map_err(|e| SnapshotError::io(&path, e))?;
                    let name =
                        de.file_name()
                            .into_string()
                            .map_err(|n| SnapshotError::Backing {
                                path: path.join(n),
                                detail: "not a kmsfs backing name (not UTF-8)".into(),
                            })?;
                    if rel.is_empty() && name == HEADER_FILE_NAME {
                        continue;
                    }
                    names.push(name);
                }
                names.sort_unstable_by(|a, b| b.cmp(a));
                for n in names {
                    stack.push(if rel.is_empty() {
                        n
                    } else {
                        format!("{rel}/{n}")
                    });
                }
            } else if ft.is_file() {
                let key = (meta.dev(), meta.ino());
                if meta.nlink() > 1 {
                    if let Some(first) = self.links.get(&key) {
                        entry.kind = Kind::Hardlink;
                        entry.link = Some(first.clone());
                        self.write(&entry)?;
                        continue;
                    }
                    self.links.insert(key, rel.clone());
                }
                entry.kind = Kind::File;
                // Read on every walk, whatever the unchanged-file cache
                // says: it supplies chunk lists only (a setxattr changes
                // ctime, so the cache misses then anyway).
                entry.xattrs = carried_xattrs(&path)?;
                if !self.reuse(&rel, &meta, &mut entry) {
                    self.read_file(&path, &mut entry)?;
                }
                self.remember(&rel, &meta, &entry);
                self.summary.files += 1;
                self.summary.bytes += entry.size;
            } else if ft.is_symlink() {
                entry.kind = Kind::Symlink;
                let t = std::fs::read_link(&path).map_err(|e| SnapshotError::io(&path, e))?;
                entry.target =
                    Some(
                        t.into_os_string()
                            .into_string()
                            .map_err(|_| SnapshotError::Backing {
                                path: path.clone(),
                                detail:
                                    "symlink target is not a kmsfs-encrypted target (not UTF-8)"
                                        .into(),
                            })?,
                    );
            } else if ft.is_fifo() {
                entry.kind = Kind::Fifo;
            } else if ft.is_socket() {
                entry.kind = Kind::Socket;
            } else if ft.is_char_device() || ft.is_block_device() {
                entry.kind = if ft.is_char_device() {
                    Kind::Char
                } else {
                    Kind::Block
                };
                entry.rdev = Some(meta.rdev());
            }
            self.write(&entry)?;
        }
        Ok(Walked {
            writer: self.writer,
            summary: self.summary,
            stats: self.stats,
            cache: self.cache_out,
        })
    }

    /// Fills `entry` from the unchanged-file cache when the file at `rel`
    /// is as the previous snapshot saw it and every chunk it names is in
    /// the store; false when the file must be read.
    fn reuse(&mut self, rel: &str, meta: &std::fs::Metadata, entry: &mut Entry) -> bool {
        let Some(seen) = self.cache_in.as_mut().and_then(|c| c.find(rel)) else {
            return false;
        };
        if !seen.matches(meta)
            || seen.chunks.len() as u64 != meta.size().div_ceil(CHUNK_SIZE as u64)
        {
            return false;
        }
        let mut chunks = 0u64;
        let mut holes = 0u64;
        for h in &seen.chunks {
            if h.is_empty() {
                holes += 1;
                continue;
            }
            match parse_chunk(h) {
                Some(id) if self.known.contains(&id) => chunks += 1,
                _ => return false,
            }
        }
        entry.size = meta.size();
        entry.chunks = seen.chunks;
        self.summary.chunks += chunks;
        self.stats.reused += chunks;
        self.stats.holes += holes;
        self.stats.files_unchanged += 1;
        self.stats.bytes_unchanged += entry.size;
        self.progress.inc(entry.size);
        true
    }

    /// Records the file in this snapshot's cache (a write error drops the
    /// cache: the next snapshot then reads every file).
    fn remember(&mut self, rel: &str, meta: &std::fs::Metadata, entry: &Entry) {
        let Some(c) = self.cache_out.as_mut() else {
            return;
        };
        let seen = Seen {
            p: rel.to_string(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: entry.size,
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            chunks: entry.chunks.clone(),
        };
        if let Err(e) = c.add(&seen) {
            tracing::warn!(
                "cannot write the unchanged-file cache ({e}); the next snapshot reads every file"
            );
            self.cache_out = None;
        }
    }

    fn write(&mut self, e: &Entry) -> Result<(), SnapshotError> {
        self.summary.entries += 1;
        self.writer
            .entry(e)
            .map_err(|err| SnapshotError::io(std::env::temp_dir(), err))
    }

    fn read_file(&mut self, path: &Path, entry: &mut Entry) -> Result<(), SnapshotError> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| SnapshotError::io(path, e))?;
        loop {
            let mut buf = vec![0u8; CHUNK_SIZE];
            let n = read_full(&mut f, &mut buf).map_err(|e| SnapshotError::io(path, e))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            entry.size += n as u64;
            self.stats.bytes_read += n as u64;
            self.progress.inc(n as u64);
            if buf.iter().all(|b| *b == 0) {
                // A hole (kmsfs reads all-zero units as zeros): no object.
                entry.chunks.push(String::new());
                self.stats.holes += 1;
            } else {
                let id: ChunkId = Sha256::digest(&buf).into();
                entry.chunks.push(hex::encode(id));
                self.summary.chunks += 1;
                if self.known.insert(id) {
                    self.tx
                        .blocking_send(Job {
                            id,
                            data: Bytes::from(buf),
                        })
                        .map_err(|_| SnapshotError::Internal("the uploads stopped".into()))?;
                } else {
                    self.stats.reused += 1;
                }
            }
            if n < CHUNK_SIZE {
                break;
            }
        }
        Ok(())
    }
}

/// The backing entry's `user.kmsfs.*` attributes in manifest form.
fn carried_xattrs(path: &Path) -> Result<Vec<(String, String)>, SnapshotError> {
    crate::xattrs::read(path)
        .map(crate::xattrs::encode)
        .map_err(|e| SnapshotError::io(path, e))
}

/// Reads until `buf` is full or the end of the file.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
