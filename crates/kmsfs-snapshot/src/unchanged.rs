//! The unchanged-file shortcut: an incremental snapshot neither reads nor
//! hashes a backing file that is unchanged since the previous snapshot of
//! the same filesystem to the same target.
//!
//! # What "unchanged" means
//!
//! A local cache file (the caller picks its path: one per filesystem and
//! target, under the configuration directory) lists, for each regular
//! backing file the previous snapshot read, its path, device, inode, size,
//! mtime and ctime (both to the nanosecond) and its chunk list. A file is
//! taken from the cache only when all six match, and every chunk the cache
//! names is in the store now (a `snapshot delete` may have removed some).
//!
//! ctime is what makes this safe: the kernel sets it to the current time on
//! every write, truncate, chmod, chown, link or rename of the inode, and no
//! system call sets it to a chosen value (unlike mtime, which `touch -d`
//! sets; a same-size rewrite with the old mtime put back still changes
//! ctime). The inode and device catch a file replaced by another one (a
//! restore into a new directory reads everything again).
//!
//! Timestamps have a granularity: a file changed in the same clock tick as
//! the snapshot that read it could keep identical times. So a file whose
//! ctime or mtime is within [`RACY_FINE`] of the start of the walk (or
//! [`RACY_COARSE`], when both times have zero nanoseconds: a filesystem
//! with 1 or 2 s timestamps) is not put in the cache, and the next snapshot
//! reads it again (git's "racily clean" rule). The comparison uses this
//! host's clock: a backing store whose times come from another clock (NFS
//! with a skewed server) is not covered, and `snapshot create --full`
//! reads every file.
//!
//! # Trust
//!
//! The cache decides what the new manifest says a file holds, so it is
//! authenticated like a manifest: HMAC-SHA256 over every line under a key
//! derived from the manifest key (see [`cache_key`]); a cache that does
//! not authenticate, belongs to another filesystem or chunk size, or
//! cannot be read is ignored (every file is read). It is replaced
//! atomically, and only after the snapshot it describes is published.
//!
//! # Memory
//!
//! Entries are written in walk order (depth first, names sorted) and the
//! next snapshot walks in the same order, so the cache is read as a stream
//! alongside the walk (a merge by path): memory stays bounded whatever the
//! number of files.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The cache format version.
const CACHE_VERSION: u32 = 1;

/// A file whose ctime or mtime is this close to the walk's start (or
/// later) is not cached: kernel timestamps come from a clock that ticks
/// every 1 to 10 ms.
pub const RACY_FINE: Duration = Duration::from_millis(50);

/// The same margin for a filesystem whose timestamps have whole seconds
/// (FAT keeps mtime in 2 s steps).
pub const RACY_COARSE: Duration = Duration::from_secs(3);

/// The key the cache is authenticated with: HMAC-SHA256 of a fixed label
/// under the manifest key (so it never equals the manifest key itself).
pub fn cache_key(manifest_key: &[u8]) -> io::Result<[u8; 32]> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(manifest_key).map_err(io::Error::other)?;
    mac.update(b"kmsfs v1 snapshot unchanged-file cache");
    Ok(mac.finalize().into_bytes().into())
}

/// The cache file name for filesystem `fs_uuid` and a target (as
/// [`crate::Store::display`] shows it): the UUID and a hash of the target,
/// so one directory holds the caches of every pair.
pub fn cache_file_name(fs_uuid: &str, target: &str) -> String {
    use sha2::Digest as _;
    let h = Sha256::digest(target.as_bytes());
    format!(
        "{}-{}.cache",
        fs_uuid.to_ascii_lowercase(),
        hex::encode(&h[..8])
    )
}

#[derive(Serialize, Deserialize)]
struct CacheHead {
    kmsfs_snapshot_cache: u32,
    snapshot: String,
    fs_uuid: String,
    chunk_size: u64,
}

#[derive(Serialize, Deserialize)]
struct MacLine {
    mac: String,
}

/// What a snapshot saw of one regular backing file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Seen {
    /// Path relative to the backing root, as in the manifest.
    pub p: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    /// The manifest's chunk list for the file.
    pub chunks: Vec<String>,
}

impl Seen {
    /// True when `meta` (of the same path) shows the file as this entry saw it.
    pub fn matches(&self, meta: &std::fs::Metadata) -> bool {
        self.dev == meta.dev()
            && self.ino == meta.ino()
            && self.size == meta.size()
            && self.mtime == (meta.mtime(), meta.mtime_nsec())
            && self.ctime == (meta.ctime(), meta.ctime_nsec())
    }
}

/// Orders two backing paths as the walk visits them: depth first, names
/// sorted, a directory before what it holds.
fn walk_cmp(a: &str, b: &str) -> Ordering {
    a.split('/').cmp(b.split('/'))
}

/// The previous snapshot's cache, read alongside the walk.
pub(crate) struct CacheReader {
    r: BufReader<File>,
    /// Offset of the next line, and of the MAC line (the end of entries).
    off: u64,
    end: u64,
    next: Option<Seen>,
}

impl CacheReader {
    /// Opens and authenticates the cache at `path`; `None` (after a log
    /// line) when it is missing, does not authenticate, or is for another
    /// filesystem or chunk size.
    pub fn open(path: &Path, key: &[u8; 32], fs_uuid: &str, chunk_size: u64) -> Option<Self> {
        match Self::try_open(path, key, fs_uuid, chunk_size) {
            Ok(r) => Some(r),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(
                    "{}: ignored ({e}); this snapshot reads every file",
                    path.display()
                );
                None
            }
        }
    }

    fn try_open(path: &Path, key: &[u8; 32], fs_uuid: &str, chunk_size: u64) -> io::Result<Self> {
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
        let file = File::open(path)?;
        let mut r = BufReader::with_capacity(256 * 1024, file);
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key).map_err(|_| bad("bad key"))?;
        // The MAC covers every line but the last; hold one line back.
        let mut pending: Option<Vec<u8>> = None;
        let mut first: Option<Vec<u8>> = None;
        let mut off = 0u64;
        let mut mac_at = 0u64;
        loop {
            let mut line = Vec::new();
            let n = r.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                return Err(bad("truncated"));
            }
            if let Some(p) = pending.take() {
                mac.update(&p);
            }
            if first.is_none() {
                first = Some(line.clone());
            }
            mac_at = off;
            off += n as u64;
            pending = Some(line);
        }
        let (Some(first), Some(last)) = (first, pending) else {
            return Err(bad("empty"));
        };
        let tag: MacLine = serde_json::from_slice(&last).map_err(|_| bad("no MAC line"))?;
        let tag = hex::decode(tag.mac).map_err(|_| bad("malformed MAC"))?;
        mac.verify_slice(&tag)
            .map_err(|_| bad("does not authenticate with this filesystem's key"))?;
        let head: CacheHead = serde_json::from_slice(&first).map_err(|_| bad("no head line"))?;
        if head.kmsfs_snapshot_cache != CACHE_VERSION
            || !head.fs_uuid.eq_ignore_ascii_case(fs_uuid)
            || head.chunk_size != chunk_size
        {
            return Err(bad("written for another filesystem, chunk size or version"));
        }
        let mut file = r.into_inner();
        let start = first.len() as u64;
        file.seek(SeekFrom::Start(start))?;
        Ok(CacheReader {
            r: BufReader::with_capacity(256 * 1024, file),
            off: start,
            end: mac_at,
            next: None,
        })
    }

    /// The entry for `path`, if the cache has one. Paths must be asked for
    /// in walk order; entries before `path` are skipped for good.
    pub fn find(&mut self, path: &str) -> Option<Seen> {
        loop {
            if self.next.is_none() {
                if self.off >= self.end {
                    return None;
                }
                let mut line = Vec::new();
                let n = self.r.read_until(b'\n', &mut line).ok()?;
                if n == 0 {
                    self.off = self.end;
                    return None;
                }
                self.off += n as u64;
                // Authenticated above: a line that does not parse is a bug,
                // and costs only a read.
                self.next = serde_json::from_slice(&line).ok();
                if self.next.is_none() {
                    continue;
                }
            }
            let p = self.next.as_ref().map(|s| s.p.as_str()).unwrap_or("");
            match walk_cmp(p, path) {
                Ordering::Less => self.next = None,
                Ordering::Equal => return self.next.take(),
                Ordering::Greater => return None,
            }
        }
    }
}

/// The cache the current snapshot writes, in a temporary file beside its
/// final path.
pub(crate) struct CacheWriter {
    path: PathBuf,
    out: BufWriter<tempfile::NamedTempFile>,
    mac: HmacSha256,
    /// Start of the walk (Unix time, nanoseconds), for the racy rule.
    start_ns: i128,
}

/// A complete cache, put in place by [`PendingCache::commit`] once the
/// snapshot it describes is published.
pub(crate) struct PendingCache {
    path: PathBuf,
    tmp: tempfile::NamedTempFile,
}

impl CacheWriter {
    /// Starts the cache for snapshot `snapshot` at `path` (its directory is
    /// created, mode 0700).
    pub fn new(
        path: &Path,
        key: &[u8; 32],
        snapshot: &str,
        fs_uuid: &str,
        chunk_size: u64,
        start_ns: i128,
    ) -> io::Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let tmp = tempfile::Builder::new()
            .prefix(".cache-")
            .tempfile_in(dir)?;
        let mac = <HmacSha256 as Mac>::new_from_slice(key).map_err(io::Error::other)?;
        let mut w = CacheWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(256 * 1024, tmp),
            mac,
            start_ns,
        };
        w.line(&CacheHead {
            kmsfs_snapshot_cache: CACHE_VERSION,
            snapshot: snapshot.to_string(),
            fs_uuid: fs_uuid.to_string(),
            chunk_size,
        })?;
        Ok(w)
    }

    fn line(&mut self, v: &impl Serialize) -> io::Result<()> {
        let mut s = serde_json::to_vec(v).map_err(io::Error::other)?;
        s.push(b'\n');
        self.mac.update(&s);
        self.out.write_all(&s)
    }

    /// Records a file unless its times are too close to the walk's start
    /// to tell a later change apart (see the module documentation).
    pub fn add(&mut self, seen: &Seen) -> io::Result<()> {
        let ns = |(s, n): (i64, i64)| i128::from(s) * 1_000_000_000 + i128::from(n);
        let coarse = seen.mtime.1 == 0 && seen.ctime.1 == 0;
        let margin = if coarse { RACY_COARSE } else { RACY_FINE }.as_nanos() as i128;
        let newest = ns(seen.mtime).max(ns(seen.ctime));
        if newest >= self.start_ns - margin {
            return Ok(());
        }
        self.line(seen)
    }

    /// Appends the MAC and makes the file durable; not yet in place.
    pub fn finish(mut self) -> io::Result<PendingCache> {
        let tag = self.mac.clone().finalize().into_bytes();
        let mut s = serde_json::to_vec(&MacLine {
            mac: hex::encode(tag),
        })
        .map_err(io::Error::other)?;
        s.push(b'\n');
        self.out.write_all(&s)?;
        let tmp = self.out.into_inner().map_err(|e| e.into_error())?;
        tmp.as_file().sync_all()?;
        Ok(PendingCache {
            path: self.path,
            tmp,
        })
    }
}

impl PendingCache {
    /// Renames the cache into place and syncs its directory.
    pub fn commit(self) -> io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        self.tmp.persist(&self.path).map_err(|e| e.error)?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(p: &str, ctime: i64) -> Seen {
        Seen {
            p: p.into(),
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (ctime, 5),
            ctime: (ctime, 5),
            chunks: vec!["ab".into()],
        }
    }

    const START: i128 = 1_000 * 1_000_000_000;

    fn write(path: &Path, key: &[u8; 32], entries: &[Seen]) {
        let mut w = CacheWriter::new(path, key, "s1", "uuid", 4096, START).unwrap();
        for e in entries {
            w.add(e).unwrap();
        }
        w.finish().unwrap().commit().unwrap();
    }

    #[test]
    fn walk_order_is_depth_first_by_name() {
        let mut v = vec!["b", "a/z", "ab", "a", "a/b/c", "a/b"];
        v.sort_by(|x, y| walk_cmp(x, y));
        assert_eq!(v, vec!["a", "a/b", "a/b/c", "a/z", "ab", "b"]);
    }

    #[test]
    fn entries_are_found_in_walk_order_and_racy_ones_left_out() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("cache/fs.cache");
        let key = cache_key(b"k").unwrap();
        let entries = [
            seen("a/b", 10),
            seen("a/c", 10),
            seen("racy", 1_000),
            seen("z", 10),
        ];
        write(&path, &key, &entries);
        let mut r = CacheReader::open(&path, &key, "UUID", 4096).unwrap();
        assert_eq!(r.find("a"), None);
        assert_eq!(r.find("a/b"), Some(entries[0].clone()));
        assert_eq!(r.find("a/bb"), None);
        // "a/c" was passed: gone for good.
        assert_eq!(r.find("racy"), None);
        assert_eq!(r.find("z"), Some(entries[3].clone()));
        assert_eq!(r.find("zz"), None);
        // Another filesystem or chunk size: ignored.
        assert!(CacheReader::open(&path, &key, "other", 4096).is_none());
        assert!(CacheReader::open(&path, &key, "uuid", 8192).is_none());
    }

    #[test]
    fn a_changed_byte_or_another_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("fs.cache");
        let key = cache_key(b"k").unwrap();
        write(&path, &key, &[seen("a", 10)]);
        assert!(CacheReader::open(&path, &cache_key(b"other").unwrap(), "uuid", 4096).is_none());
        let good = std::fs::read(&path).unwrap();
        let text = String::from_utf8(good).unwrap();
        let bad = text.replacen("\"size\":3", "\"size\":4", 1);
        assert_ne!(bad, text);
        std::fs::write(&path, bad).unwrap();
        assert!(CacheReader::open(&path, &key, "uuid", 4096).is_none());
        assert!(CacheReader::open(&d.path().join("missing"), &key, "uuid", 4096).is_none());
    }
}
