//! Listing and deleting snapshots. Neither needs the filesystem key: what
//! they show comes from manifest heads, unauthenticated (a restore is what
//! authenticates).

use std::collections::HashSet;

use futures::StreamExt as _;
use serde::Serialize;

use crate::error::SnapshotError;
use crate::manifest::Head;
use crate::objects::{chunk_rel, manifest_rel, parse_chunk, rfc3339, ChunkId};
use crate::restore::fetch_manifest;
use crate::target::Store;

/// One snapshot in a target, as its manifest head says.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// The snapshot id.
    pub id: String,
    /// When it was taken (RFC 3339, UTC).
    pub created: Option<String>,
    /// The operator's label.
    pub label: Option<String>,
    /// The filesystem's UUID.
    pub fs_uuid: Option<String>,
    /// Size of the manifest object.
    pub manifest_bytes: u64,
    /// Set when the manifest head could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Longest manifest head read (a header is at most 16 KiB, 22 KiB as base64).
const HEAD_READ: u64 = 64 * 1024;

/// The snapshots in `store`, oldest first.
pub async fn list(store: &Store) -> Result<Vec<SnapshotInfo>, SnapshotError> {
    let mut out = Vec::new();
    for (id, size) in store.snapshot_ids().await? {
        let head = read_head(store, &id, size).await;
        out.push(match head {
            Ok(h) => SnapshotInfo {
                id,
                created: Some(rfc3339(h.created)),
                label: h.label,
                fs_uuid: Some(h.fs_uuid),
                manifest_bytes: size,
                error: None,
            },
            Err(e) => SnapshotInfo {
                id,
                created: None,
                label: None,
                fs_uuid: None,
                manifest_bytes: size,
                error: Some(e),
            },
        });
    }
    Ok(out)
}

/// The head line of snapshot `id`'s manifest (`size` bytes long), read
/// with one ranged GET; not authenticated.
async fn read_head(store: &Store, id: &str, size: u64) -> Result<Head, String> {
    let rel = manifest_rel(id);
    match store
        .os
        .get_range(&store.path(&rel), 0..size.min(HEAD_READ))
        .await
    {
        Ok(b) => {
            let line = b.split(|c| *c == b'\n').next().unwrap_or(&[]);
            serde_json::from_slice::<Head>(line).map_err(|e| format!("unreadable head: {e}"))
        }
        Err(e) => Err(store.error(&format!("reading {rel}"), e).to_string()),
    }
}

/// A snapshot id and its manifest head, or why it could not be read.
pub type SnapshotHead = (String, Result<Head, String>);

/// Every snapshot in `store` with its manifest head (or why it could not
/// be read), oldest first. Nothing here is authenticated: for advice such
/// as `kms check`, never for a restore.
pub async fn heads(store: &Store) -> Result<Vec<SnapshotHead>, SnapshotError> {
    let mut out = Vec::new();
    for (id, size) in store.snapshot_ids().await? {
        let head = read_head(store, &id, size).await;
        out.push((id, head));
    }
    Ok(out)
}

/// What `delete` removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeleteStats {
    /// The snapshot deleted.
    pub id: String,
    /// Chunk objects deleted (no other snapshot used them).
    pub objects_deleted: u64,
    /// Chunk objects kept because another snapshot uses them.
    pub objects_kept: u64,
}

/// Deletes snapshot `id`: its manifest first (so it is gone at once), then
/// the chunk objects no other snapshot in the target names. An interrupted
/// delete leaves unreferenced chunks, never a snapshot with missing ones.
///
/// Do not run it while a `create` to the same target is under way: that
/// run may be about to name a chunk this one removes.
pub async fn delete(store: &Store, id: &str) -> Result<DeleteStats, SnapshotError> {
    let m = fetch_manifest(store, id).await?;
    let bad = |detail: String| SnapshotError::Manifest {
        target: store.display.clone(),
        id: id.to_string(),
        detail,
    };
    let mut mine: HashSet<ChunkId> = HashSet::new();
    for e in m.entries().map_err(bad)? {
        for h in e.map_err(bad)?.chunks {
            if let Some(c) = parse_chunk(&h) {
                mine.insert(c);
            }
        }
    }
    drop(m);
    let total = mine.len() as u64;
    for (other, _) in store.snapshot_ids().await? {
        if other == id || mine.is_empty() {
            continue;
        }
        let om = fetch_manifest(store, &other).await?;
        let obad = |detail: String| SnapshotError::Manifest {
            target: store.display.clone(),
            id: other.clone(),
            detail: format!("{detail}; nothing was deleted"),
        };
        for e in om.entries().map_err(obad)? {
            for h in e.map_err(obad)?.chunks {
                if let Some(c) = parse_chunk(&h) {
                    mine.remove(&c);
                }
            }
        }
    }
    let rel = manifest_rel(id);
    store
        .os
        .delete(&store.path(&rel))
        .await
        .map_err(|e| store.error(&format!("deleting {rel}"), e))?;
    let deleted = mine.len() as u64;
    let mut s = futures::stream::iter(mine.into_iter().map(|c| async move {
        let rel = chunk_rel(&c);
        match store.os.delete(&store.path(&rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store.error(&format!("deleting {rel}"), e)),
        }
    }))
    .buffer_unordered(8);
    while let Some(r) = s.next().await {
        r?;
    }
    store.sync_all()?;
    Ok(DeleteStats {
        id: id.to_string(),
        objects_deleted: deleted,
        objects_kept: total - deleted,
    })
}
