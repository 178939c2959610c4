//! Names in the store: content-addressed chunk objects and manifests.
//!
//! ```text
//! PREFIX/chunks/ab/ab12…(64 hex)   a chunk: the backing bytes it holds, as stored
//! PREFIX/snapshots/ID.manifest      a snapshot (written last)
//! ```

use std::collections::HashSet;

use futures::TryStreamExt as _;

use crate::error::SnapshotError;
use crate::target::Store;

/// Size of a chunk: backing files are cut at multiples of this.
///
/// 1 MiB: a multiple of the 4 KiB backing page, so every chunk boundary is a
/// data-unit boundary and a 1-byte change rewrites one unit and therefore
/// one chunk (two when a merged final unit straddles a boundary); a 1-byte
/// change in a 1 GiB file uploads at most 2 MiB. Smaller chunks would mean
/// more requests per GiB (per-request latency dominates an S3 PUT below
/// about 1 MiB); larger ones would make incrementals and the in-flight
/// buffers (concurrency × chunk size) bigger.
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// Length of a chunk id (SHA-256).
pub type ChunkId = [u8; 32];

/// The store path of a chunk, relative to the prefix.
pub fn chunk_rel(id: &ChunkId) -> String {
    let h = hex::encode(id);
    format!("chunks/{}/{h}", &h[..2])
}

/// The store path of a manifest, relative to the prefix.
pub fn manifest_rel(snapshot: &str) -> String {
    format!("snapshots/{snapshot}.manifest")
}

/// A chunk id from its hex form in a manifest.
pub fn parse_chunk(hex_id: &str) -> Option<ChunkId> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(hex_id, &mut id).ok()?;
    Some(id)
}

/// True for a snapshot id this build could have made (letters, digits,
/// `-`, `.` but not first): anything else never reaches a store path.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl Store {
    /// The ids of every chunk in the store (one listing).
    pub(crate) async fn chunk_ids(&self) -> Result<HashSet<ChunkId>, SnapshotError> {
        let mut out = HashSet::new();
        let prefix = self.path("chunks");
        let mut s = self.os.list(Some(&prefix));
        while let Some(meta) = s
            .try_next()
            .await
            .map_err(|e| self.error("listing chunks", e))?
        {
            if let Some(id) = meta.location.filename().and_then(parse_chunk) {
                out.insert(id);
            }
        }
        Ok(out)
    }

    /// The ids of the snapshots in the store, sorted (ids sort by time).
    pub(crate) async fn snapshot_ids(&self) -> Result<Vec<(String, u64)>, SnapshotError> {
        let prefix = self.path("snapshots");
        let mut s = self.os.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(meta) = s
            .try_next()
            .await
            .map_err(|e| self.error("listing snapshots", e))?
        {
            let rel = self.rel(&meta.location);
            if let Some(id) = rel
                .strip_prefix("snapshots/")
                .and_then(|n| n.strip_suffix(".manifest"))
                .filter(|id| valid_id(id))
            {
                out.push((id.to_string(), meta.size));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// A new snapshot id: UTC time to the millisecond (so ids sort by time,
/// even two taken in one second), then 8 random hex digits.
pub fn new_id(unix_ms: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix_ms.div_euclid(1000));
    let ms = unix_ms.rem_euclid(1000);
    let rnd = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}.{ms:03}Z-{}",
        &rnd[..8]
    )
}

/// RFC 3339 UTC of Unix seconds.
pub fn rfc3339(unix: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Unix seconds to (year, month, day, hour, minute, second), proleptic
/// Gregorian (Howard Hinnant's days-from-civil inverse).
fn civil(unix: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (secs / 3600) as u32,
        ((secs % 3600) / 60) as u32,
        (secs % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_879_021), "2026-11-28T15:17:01Z");
        assert!(new_id(0).starts_with("19700101T000000.000Z-"));
        assert!(new_id(1_999).starts_with("19700101T000001.999Z-"));
        assert!(new_id(999) < new_id(1_000));
        assert!(valid_id(&new_id(0)));
        assert!(!valid_id("../x"));
        assert!(!valid_id(""));
        assert!(!valid_id(".."));
    }

    #[test]
    fn chunk_names_round_trip() {
        let id = [0xab; 32];
        let rel = chunk_rel(&id);
        assert!(rel.starts_with("chunks/ab/abab"));
        assert_eq!(parse_chunk(rel.rsplit('/').next().unwrap()), Some(id));
        assert_eq!(parse_chunk("zz"), None);
    }
}
