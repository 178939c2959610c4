//! Replacing the header a snapshot carries, for `kmsfs snapshot rewrap`:
//! after a KMS key rotation a snapshot keeps the wrapping it was taken with
//! until its manifest is written again with the rewrapped header.
//!
//! The manifest is rewritten whole: the new head (same id, label, time,
//! filesystem, chunk size; the new header) and every other line copied
//! byte for byte, under a new MAC with the same manifest key (the master
//! key does not change in a rewrap). It then replaces the old manifest in
//! one step, so a reader (`restore`, `list`, `delete`) sees the old or the
//! new snapshot, never a mix:
//!
//! * S3: one PUT (a multipart upload for a large manifest, which becomes
//!   visible only when it completes) replaces the object atomically; a
//!   failed or interrupted upload leaves the old object as it was.
//! * A directory: a temporary file beside the manifest, fsync, `rename(2)`
//!   over it, fsync of the directory. A crash leaves the old or the new
//!   file, both whole.
//!
//! The old manifest, with the only copy of the old wrapping, is replaced
//! only after the new one has been shown to authenticate; afterwards the
//! new one is read back from the store and checked, and the old one put
//! back if it does not match.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt as _;

use crate::create::put_file;
use crate::error::SnapshotError;
use crate::manifest::{Manifest, Verified};
use crate::objects::manifest_rel;
use crate::restore::fetch_manifest;
use crate::target::Store;
use crate::NoProgress;

/// Replaces the header carried by the verified snapshot `m` with
/// `new_header` (bytes of a `kmsfs.header` the caller has authenticated),
/// re-MACs the manifest with `manifest_key` and publishes it in place of
/// the old one; returns the new manifest's size.
pub async fn replace_header(
    store: &Store,
    m: Verified<'_>,
    new_header: &[u8],
    manifest_key: &[u8],
) -> Result<u64, SnapshotError> {
    use base64::Engine as _;
    let old = m.manifest();
    let id = old.head.id.clone();
    let bad = |detail: String| SnapshotError::Manifest {
        target: store.display.clone(),
        id: id.clone(),
        detail,
    };
    let tmp_err = |e: std::io::Error| SnapshotError::io(std::env::temp_dir(), e);
    let mut head = old.head.clone();
    head.header = base64::engine::general_purpose::STANDARD.encode(new_header);
    let spool = tempfile::tempfile().map_err(tmp_err)?;
    let (mut file, len) = old
        .rewrite_head(manifest_key, &head, spool)
        .map_err(|e| bad(format!("cannot write the new manifest: {e}")))?;
    // The new manifest must parse, authenticate and carry the same entries
    // before the old one is touched.
    let check = file.try_clone().map_err(tmp_err)?;
    let new = Manifest::parse(check).map_err(|e| bad(format!("the new manifest: {e}")))?;
    new.verify(manifest_key)
        .map_err(|e| bad(format!("the new manifest: {e}")))?;
    if new.summary != old.summary || new.head.header != head.header {
        return Err(bad("the new manifest does not round-trip".into()));
    }
    drop(new);
    // The check read through a clone that shares the file offset.
    file.seek(SeekFrom::Start(0)).map_err(tmp_err)?;

    let rel = manifest_rel(&id);
    publish(store, &rel, file).await?;

    // Read it back as a restore would; put the old one back if it differs.
    let back = fetch_manifest(store, &id).await;
    let ok = match &back {
        Ok(b) => b.verify(manifest_key).is_ok() && b.head.header == head.header,
        Err(_) => false,
    };
    if !ok {
        let why = match back {
            Err(e) => e.to_string(),
            Ok(_) => "it does not read back as written".into(),
        };
        let mut raw = old.raw().try_clone().map_err(tmp_err)?;
        raw.seek(SeekFrom::Start(0)).map_err(tmp_err)?;
        let put_back = publish(store, &rel, raw).await;
        return Err(bad(match put_back {
            Ok(()) => format!("the new manifest failed its check ({why}); the old one is back"),
            Err(e) => format!(
                "the new manifest failed its check ({why}) and putting the old one back failed ({e})"
            ),
        }));
    }
    Ok(len)
}

/// Puts `file` (rewound) at `rel` in one atomic step.
async fn publish(store: &Store, rel: &str, file: File) -> Result<(), SnapshotError> {
    match &store.local_root {
        Some(root) => {
            let path = root.join(rel);
            tokio::task::spawn_blocking(move || replace_local(&path, file))
                .await
                .map_err(|e| SnapshotError::Internal(format!("manifest writer: {e}")))?
        }
        None => put_file(store, rel, file, &NoProgress).await,
    }
}

/// Replaces `path` with the contents of `src` durably and atomically: a
/// temporary file beside it, fsync, rename, fsync of the directory. The
/// temporary name does not end in `.manifest`, so no listing takes it for
/// a snapshot.
fn replace_local(path: &std::path::Path, mut src: File) -> Result<(), SnapshotError> {
    let io = |p: &std::path::Path, e: std::io::Error| SnapshotError::io(p, e);
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let tmp = path.with_extension("manifest.rewrap-tmp");
    if let Err(e) = copy_durably(&mut src, &tmp).and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path, e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

/// Copies `src` into a new file `dst` (mode 0600) and fsyncs it.
fn copy_durably(src: &mut File, dst: &std::path::Path) -> std::io::Result<()> {
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dst)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Entry, Head, Kind, ManifestWriter, Summary, MANIFEST_VERSION};
    use crate::target::{S3Options, Target};

    fn entry(p: &str) -> Entry {
        Entry {
            path: p.into(),
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            atime: (1, 2),
            mtime: (3, 4),
            size: 0,
            chunks: Vec::new(),
            target: None,
            rdev: None,
            link: None,
            xattrs: Vec::new(),
        }
    }

    /// Publishes a one-entry manifest for snapshot "s1" in a directory
    /// target.
    fn publish_manifest(dir: &std::path::Path, key: &[u8], header: &str) {
        let head = Head {
            kmsfs_snapshot: MANIFEST_VERSION,
            id: "s1".into(),
            label: Some("l".into()),
            created: 5,
            fs_uuid: "u".into(),
            chunk_size: 4096,
            header: header.into(),
        };
        let mut w = ManifestWriter::new(tempfile::tempfile().unwrap(), key, &head).unwrap();
        w.entry(&entry("")).unwrap();
        let (mut f, _) = w
            .finish(&Summary {
                entries: 1,
                ..Default::default()
            })
            .unwrap();
        std::fs::create_dir_all(dir.join("snapshots")).unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        std::fs::write(dir.join("snapshots/s1.manifest"), bytes).unwrap();
    }

    #[tokio::test]
    async fn the_header_is_replaced_and_everything_else_kept() {
        let d = tempfile::tempdir().unwrap();
        let key = [7u8; 32];
        publish_manifest(d.path(), &key, "b2xk");
        let store = Store::open(
            &Target::Dir(d.path().to_path_buf()),
            &S3Options::default(),
            false,
        )
        .unwrap();
        let m = fetch_manifest(&store, "s1").await.unwrap();
        let before: Vec<Entry> = m.entries().unwrap().map(|e| e.unwrap()).collect();
        replace_header(&store, m.verify(&key).unwrap(), b"new", &key)
            .await
            .unwrap();
        let m = fetch_manifest(&store, "s1").await.unwrap();
        m.verify(&key).unwrap();
        assert!(m.verify(&[8u8; 32]).is_err());
        assert_eq!(m.head.header, "bmV3");
        assert_eq!(m.head.label.as_deref(), Some("l"));
        assert_eq!(m.head.created, 5);
        let after: Vec<Entry> = m.entries().unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(before, after);
        // No temporary file is left, and only the one snapshot is listed.
        let names: Vec<_> = std::fs::read_dir(d.path().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s1.manifest")]);
        assert_eq!(store.snapshot_ids().await.unwrap().len(), 1);
    }
}
