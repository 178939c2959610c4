//! The snapshot manifest: one JSON object per line, authenticated as a
//! whole with HMAC-SHA256 under a key derived from the filesystem key.
//!
//! ```text
//! {"kmsfs_snapshot":1,"id":..,"label":..,"created":..,"fs_uuid":..,"chunk_size":..,"header":"<base64>"}
//! {"path":"","type":"dir","mode":..,...}            one line per backing entry, parents first
//! ...
//! {"summary":{"entries":..,"files":..,"bytes":..,"chunks":..}}
//! {"mac":"<hex HMAC-SHA256 of every byte above>"}
//! ```
//!
//! The manifest holds only what the backing directory shows anyone who can
//! read it: encrypted names, sizes, modes, owners, times, symlink targets as
//! stored (encrypted), the `user.kmsfs.*` extended attributes as stored
//! (encrypted attributes and ACLs) and the header (wrapped keys only). The label is the
//! operator's and is stored as given.
//!
//! It is written to a local temporary file while the backing directory is
//! read (memory stays bounded however many files there are) and uploaded
//! last, after every object it names.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The manifest format version this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// The first line: what the snapshot is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Head {
    /// Format version ([`MANIFEST_VERSION`]).
    pub kmsfs_snapshot: u32,
    /// The snapshot id (also the manifest's object name).
    pub id: String,
    /// The operator's label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// When it was taken (Unix seconds, UTC).
    pub created: i64,
    /// The filesystem UUID (as in `kmsfs info`).
    pub fs_uuid: String,
    /// Chunk size the backing files were cut at.
    pub chunk_size: u64,
    /// `kmsfs.header`, byte for byte, base64: every key slot travels with
    /// the data.
    pub header: String,
}

/// The type of a backing entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file (its contents in `chunks`).
    File,
    /// Another name of a regular file listed earlier (`link`).
    Hardlink,
    /// A symbolic link (`target`, as stored).
    Symlink,
    /// A FIFO.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device (`rdev`).
    Char,
    /// A block device (`rdev`).
    Block,
}

/// One backing entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the backing root, `/`-separated; `""` is the root.
    pub path: String,
    /// What it is.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Permission and special bits (no file type bits).
    #[serde(default)]
    pub mode: u32,
    /// Owner.
    #[serde(default)]
    pub uid: u32,
    /// Group.
    #[serde(default)]
    pub gid: u32,
    /// Access time: seconds, nanoseconds.
    #[serde(default)]
    pub atime: (i64, i64),
    /// Modification time: seconds, nanoseconds.
    #[serde(default)]
    pub mtime: (i64, i64),
    /// Size in bytes (regular files).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// The file's chunks in order: hex SHA-256 of the stored bytes, or ""
    /// for a chunk of zero bytes (a hole, stored as none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
    /// Symlink target as stored in the backing directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Device number (devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
    /// Hard links: the path listed earlier that this is another name of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// The backing entry's `user.kmsfs.*` extended attributes (the file's
    /// encrypted attributes and ACLs, docs/format.md section 8): name and
    /// base64 value, sorted by name; regular files (on their first name
    /// only) and directories.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<(String, String)>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Totals, authenticated with the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Backing entries (the root included).
    pub entries: u64,
    /// Regular files (hard links counted once).
    pub files: u64,
    /// Bytes in regular files.
    pub bytes: u64,
    /// Chunk references (holes excluded).
    pub chunks: u64,
}

#[derive(Serialize, Deserialize)]
struct SummaryLine {
    summary: Summary,
}

#[derive(Serialize, Deserialize)]
struct MacLine {
    mac: String,
}

type HmacSha256 = Hmac<Sha256>;

/// Writes a manifest to a local file, line by line, keeping the MAC.
pub(crate) struct ManifestWriter {
    out: BufWriter<File>,
    mac: HmacSha256,
}

impl ManifestWriter {
    /// Starts a manifest in `file` with its head line.
    pub(crate) fn new(file: File, key: &[u8], head: &Head) -> io::Result<Self> {
        let mac = <HmacSha256 as Mac>::new_from_slice(key)
            .map_err(|_| io::Error::other("manifest key has an invalid length"))?;
        let mut w = ManifestWriter {
            out: BufWriter::with_capacity(256 * 1024, file),
            mac,
        };
        w.line(head)?;
        Ok(w)
    }

    fn line(&mut self, v: &impl Serialize) -> io::Result<()> {
        let mut s = serde_json::to_vec(v).map_err(io::Error::other)?;
        s.push(b'\n');
        self.mac.update(&s);
        self.out.write_all(&s)
    }

    /// Appends one entry.
    pub(crate) fn entry(&mut self, e: &Entry) -> io::Result<()> {
        self.line(e)
    }

    /// Appends bytes that are already manifest lines (a copy).
    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.mac.update(bytes);
        self.out.write_all(bytes)
    }

    /// Appends the summary and the MAC; returns the file, rewound, and its
    /// length.
    pub(crate) fn finish(mut self, summary: &Summary) -> io::Result<(File, u64)> {
        self.line(&SummaryLine {
            summary: summary.clone(),
        })?;
        self.seal()
    }

    /// Appends the MAC line; returns the file, rewound, and its length.
    fn seal(mut self) -> io::Result<(File, u64)> {
        let tag = self.mac.clone().finalize().into_bytes();
        let mut s = serde_json::to_vec(&MacLine {
            mac: hex::encode(tag),
        })
        .map_err(io::Error::other)?;
        s.push(b'\n');
        self.out.write_all(&s)?;
        let mut f = self.out.into_inner().map_err(|e| e.into_error())?;
        let len = f.stream_position()?;
        f.seek(SeekFrom::Start(0))?;
        Ok((f, len))
    }
}

/// A downloaded manifest (a local temporary file), parsed but not yet
/// authenticated until [`Manifest::verify`] succeeds.
#[derive(Debug)]
pub struct Manifest {
    file: File,
    /// The head line.
    pub head: Head,
    /// The summary line.
    pub summary: Summary,
    /// Offset of the MAC line (the MAC covers `[0, mac_at)`).
    mac_at: u64,
    mac: Vec<u8>,
}

impl Manifest {
    /// Parses the manifest in `file` (structure only).
    pub(crate) fn parse(mut file: File) -> Result<Manifest, String> {
        file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        let mut r = BufReader::new(&file);
        let mut line = Vec::new();
        let mut off = 0u64;
        let n = r.read_until(b'\n', &mut line).map_err(|e| e.to_string())?;
        let head: Head = serde_json::from_slice(&line)
            .map_err(|e| format!("the manifest's first line is not a snapshot head: {e}"))?;
        if head.kmsfs_snapshot != MANIFEST_VERSION {
            return Err(format!(
                "manifest format {} is not supported by this build (it reads {MANIFEST_VERSION})",
                head.kmsfs_snapshot
            ));
        }
        off += n as u64;
        // Find the last two lines without holding the rest.
        let mut prev: Option<(u64, Vec<u8>)> = None;
        let mut last: Option<(u64, Vec<u8>)> = None;
        loop {
            line.clear();
            let n = r.read_until(b'\n', &mut line).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                return Err("the manifest is truncated (no final newline)".into());
            }
            prev = last.take();
            last = Some((off, std::mem::take(&mut line)));
            off += n as u64;
        }
        let (Some((_, sum)), Some((mac_at, mac))) = (prev, last) else {
            return Err("the manifest is truncated (no summary or MAC line)".into());
        };
        let summary: SummaryLine = serde_json::from_slice(&sum)
            .map_err(|e| format!("the manifest's summary line is malformed: {e}"))?;
        let mac: MacLine = serde_json::from_slice(&mac)
            .map_err(|e| format!("the manifest's last line is not its MAC: {e}"))?;
        let mac = hex::decode(&mac.mac).map_err(|e| format!("the manifest's MAC: {e}"))?;
        drop(r);
        Ok(Manifest {
            file,
            head,
            summary: summary.summary,
            mac_at,
            mac,
        })
    }

    /// Checks the MAC with the key derived from the filesystem key. Until
    /// this succeeds nothing in the manifest may be trusted.
    pub fn verify(&self, key: &[u8]) -> Result<Verified<'_>, String> {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key)
            .map_err(|_| "manifest key has an invalid length".to_string())?;
        let mut f = &self.file;
        f.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        let mut left = self.mac_at;
        let mut buf = vec![0u8; 256 * 1024];
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = f.read(&mut buf[..want]).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the manifest changed while it was read".into());
            }
            mac.update(&buf[..n]);
            left -= n as u64;
        }
        mac.verify_slice(&self.mac).map_err(|_| {
            "the manifest does not authenticate with this filesystem's key: it was tampered with, \
             or belongs to another filesystem"
                .to_string()
        })?;
        Ok(Verified(self))
    }

    /// Writes this manifest again into `out` with `head` as its first line
    /// and every other line (entries, summary) copied byte for byte, under
    /// a new MAC with `key`; returns the file, rewound, and its length.
    /// `snapshot rewrap` uses it to replace the header a snapshot carries.
    pub(crate) fn rewrite_head(
        &self,
        key: &[u8],
        head: &Head,
        out: File,
    ) -> io::Result<(File, u64)> {
        let mut w = ManifestWriter::new(out, key, head)?;
        let mut f = &self.file;
        f.seek(SeekFrom::Start(0))?;
        let mut r = BufReader::with_capacity(256 * 1024, f);
        let mut first = Vec::new();
        let start = r.read_until(b'\n', &mut first)? as u64;
        let mut left = self.mac_at.checked_sub(start).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the manifest's MAC line is misplaced",
            )
        })?;
        let mut buf = vec![0u8; 256 * 1024];
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = r.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the manifest changed while it was read",
                ));
            }
            w.raw(&buf[..n])?;
            left -= n as u64;
        }
        w.seal()
    }

    /// The manifest's bytes, as downloaded.
    pub(crate) fn raw(&self) -> &File {
        &self.file
    }

    /// The entries, in order (parents before children). Only meaningful
    /// after [`Manifest::verify`] (or for bookkeeping that trusts nothing).
    pub fn entries(&self) -> Result<Entries<'_>, String> {
        let mut f = &self.file;
        f.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        let mut r = BufReader::with_capacity(256 * 1024, f);
        let mut skip = Vec::new();
        let n = r.read_until(b'\n', &mut skip).map_err(|e| e.to_string())?;
        Ok(Entries {
            r,
            off: n as u64,
            left: self.summary.entries,
            end: self.mac_at,
        })
    }
}

/// A manifest whose MAC checked out: what a restore accepts.
#[derive(Debug, Clone, Copy)]
pub struct Verified<'a>(&'a Manifest);

impl Verified<'_> {
    /// The authenticated manifest.
    pub fn manifest(&self) -> &Manifest {
        self.0
    }
}

/// Iterator over a manifest's entries.
pub struct Entries<'a> {
    r: BufReader<&'a File>,
    off: u64,
    left: u64,
    end: u64,
}

impl Iterator for Entries<'_> {
    type Item = Result<Entry, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let mut line = Vec::new();
        match self.r.read_until(b'\n', &mut line) {
            Ok(0) => Some(Err("the manifest has fewer entries than its summary".into())),
            Ok(n) => {
                self.off += n as u64;
                if self.off >= self.end {
                    return Some(Err("the manifest has fewer entries than its summary".into()));
                }
                Some(
                    serde_json::from_slice(&line)
                        .map_err(|e| format!("a manifest entry is malformed: {e}")),
                )
            }
            Err(e) => Some(Err(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> Head {
        Head {
            kmsfs_snapshot: MANIFEST_VERSION,
            id: "x".into(),
            label: None,
            created: 1,
            fs_uuid: "u".into(),
            chunk_size: 4096,
            header: "aGVhZA==".into(),
        }
    }

    fn entry(p: &str) -> Entry {
        Entry {
            path: p.into(),
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            atime: (1, 2),
            mtime: (3, 4),
            size: 5,
            chunks: vec!["ab".into()],
            target: None,
            rdev: None,
            link: None,
            xattrs: Vec::new(),
        }
    }

    fn written(key: &[u8]) -> (File, Summary) {
        let mut w = ManifestWriter::new(tempfile::tempfile().unwrap(), key, &head()).unwrap();
        w.entry(&entry("a")).unwrap();
        w.entry(&entry("b")).unwrap();
        let s = Summary {
            entries: 2,
            files: 2,
            bytes: 10,
            chunks: 2,
        };
        (w.finish(&s).unwrap().0, s)
    }

    #[test]
    fn round_trip_verifies_with_the_key_only() {
        let (f, s) = written(&[7; 32]);
        let m = Manifest::parse(f).unwrap();
        assert_eq!(m.summary, s);
        m.verify(&[7; 32]).unwrap();
        assert!(m.verify(&[8; 32]).is_err());
        let es: Vec<_> = m.entries().unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(es, vec![entry("a"), entry("b")]);
    }

    #[test]
    fn attributes_round_trip_and_older_entries_still_read() {
        let mut e = entry("a");
        e.xattrs = vec![("user.kmsfs.id".into(), "AAE=".into())];
        let line = serde_json::to_string(&e).unwrap();
        assert!(
            line.contains(r#""xattrs":[["user.kmsfs.id","AAE="]]"#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Entry>(&line).unwrap(), e);
        // None: no field, as written before snapshots carried attributes.
        let old = serde_json::to_string(&entry("a")).unwrap();
        assert!(!old.contains("xattrs"), "{old}");
        assert_eq!(serde_json::from_str::<Entry>(&old).unwrap(), entry("a"));
    }

    #[test]
    fn any_changed_byte_fails_verification() {
        let (mut f, _) = written(&[7; 32]);
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        // Change one byte of the second entry's path ("b" -> "c").
        let pos = bytes
            .windows(10)
            .position(|w| w == b"{\"path\":\"b")
            .unwrap()
            + 9;
        bytes[pos] = b'c';
        let mut t = tempfile::tempfile().unwrap();
        t.write_all(&bytes).unwrap();
        let m = Manifest::parse(t).unwrap();
        assert!(m.verify(&[7; 32]).is_err());
    }

    #[test]
    fn truncated_manifest_is_refused() {
        let (mut f, _) = written(&[7; 32]);
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        // Drop the MAC line.
        let cut = bytes[..bytes.len() - 1]
            .iter()
            .rposition(|b| *b == b'\n')
            .unwrap()
            + 1;
        let mut t = tempfile::tempfile().unwrap();
        t.write_all(&bytes[..cut]).unwrap();
        let m = Manifest::parse(t);
        assert!(m.is_err() || m.unwrap().verify(&[7; 32]).is_err());
    }
}
