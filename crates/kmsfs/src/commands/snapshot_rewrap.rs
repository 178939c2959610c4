//! `kmsfs snapshot rewrap TARGET (SNAPSHOT|--all) [--new-key NAME] [--slot
//! LABEL]`: after a KMS key rotation, move the wrapped keys a snapshot
//! carries to the newest key version (or another key), as `kmsfs rewrap`
//! does for a backing directory. A snapshot keeps the wrapping it was
//! taken with until it is rewrapped; once `min_decryption_version` is
//! raised past it, it can no longer be restored.
//!
//! Per snapshot: the manifest is fetched, its header unlocked through the
//! KMS and the manifest authenticated with the key that yields; every slot
//! the configuration reaches is rewrapped and proven (unwrapped again);
//! the new header is sealed, shown to authenticate, and the manifest
//! rewritten around it in one atomic step
//! ([`kmsfs_snapshot::replace_header`]).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_core::header::UnverifiedHeader;
use kmsfs_core::keys::FsKeys;
use kmsfs_snapshot::Store;
use serde_json::json;

use crate::audit::{Event, Field, Op};
use crate::commands::rewrap::{rewrap_slots, RewrappedSlots, SlotOutcome, SlotReport};
use crate::commands::snapshot::{open_store, StoreOpts};
use crate::commands::{kms_access, print_json, uuid_string};
use crate::fsheader::{unlock, Unlocked};
use crate::kmsconfig::load_kms_config;
use crate::slotkms::KmsAccess;

/// What to rewrap and how (the arguments of `snapshot rewrap`).
#[derive(Debug)]
pub struct RewrapRequest<'a> {
    /// s3://BUCKET[/PREFIX] or a directory.
    pub target: &'a str,
    /// One snapshot, or `None` for every snapshot in the target.
    pub snapshot: Option<&'a str>,
    /// Move to this key instead of the newest version of the current one.
    pub new_key: Option<&'a str>,
    /// Only this slot (label or index).
    pub slot: Option<&'a str>,
}

/// Runs `kmsfs snapshot rewrap`: every selected snapshot, continuing past
/// failures; one line per slot; fails at the end if any snapshot failed.
pub async fn run_snapshot_rewrap(
    config_path: &Path,
    req: RewrapRequest<'_>,
    opts: &StoreOpts,
) -> anyhow::Result<()> {
    let store = open_store(req.target, opts, false)?;
    let ids: Vec<String> = match req.snapshot {
        Some(id) => vec![id.to_string()],
        None => {
            let all: Vec<String> = kmsfs_snapshot::list(&store)
                .await?
                .into_iter()
                .map(|s| s.id)
                .collect();
            if all.is_empty() {
                anyhow::bail!("--all: no snapshots in {}", store.display());
            }
            all
        }
    };
    let cfg = load_kms_config(config_path)?;
    let access = kms_access(&cfg)?;
    crate::snapshot_targets::remember_quietly(
        config_path,
        req.target,
        opts.s3_endpoint.as_deref(),
        None,
    );
    let mut failures = 0usize;
    let mut lines = Vec::new();
    let mut json_out = Vec::new();
    for id in &ids {
        let shown = format!("{} {id}", store.display());
        let mut event = Event::new(Op::SnapshotRewrap);
        event
            .set(Field::SnapshotTarget, store.display())
            .set(Field::SnapshotId, id.clone());
        match rewrap_snapshot(&access, &store, id, req.new_key, req.slot, &mut event).await {
            Ok(reports) => {
                let failed = reports
                    .iter()
                    .any(|r| matches!(r.outcome, SlotOutcome::Failed(_)));
                let reached = reports
                    .iter()
                    .any(|r| !matches!(r.outcome, SlotOutcome::NotReached(_)));
                if failed || !reached {
                    failures += 1;
                }
                for r in &reports {
                    r.audit(&event, Op::SnapshotRewrap);
                }
                let slots: Vec<_> = reports.iter().map(SlotReport::to_json).collect();
                json_out.push(json!({
                    "snapshot": id,
                    "fs_uuid": event.get(Field::FsUuid),
                    "ok": !failed && reached,
                    "slots": slots,
                }));
                lines.extend(reports.iter().map(|r| format!("{shown}: {}", r.line())));
            }
            Err(e) => {
                failures += 1;
                event.fail(&e);
                json_out.push(json!({"snapshot": id, "ok": false, "error": format!("{e:#}")}));
                lines.push(format!("{shown}: FAILED: {e:#}"));
            }
        }
    }
    if opts.json {
        print_json(&json!(json_out))?;
    } else if failures > 0 || !crate::output::quiet() {
        // Under --quiet the lines are shown only when something failed.
        for l in &lines {
            println!("{l}");
        }
    }
    if failures > 0 {
        anyhow::bail!(
            "snapshot rewrap failed for {failures} of {} snapshot(s) in {}; the slots marked \
             FAILED or not reached are unchanged (a snapshot whose slot is below the key's \
             min_decryption_version cannot be unlocked: lower it, rewrap, raise it again)",
            ids.len(),
            store.display()
        );
    }
    Ok(())
}

/// Rewraps the slots of snapshot `id` that `access` reaches and, when any
/// changed, replaces the header in its manifest.
pub async fn rewrap_snapshot(
    access: &KmsAccess,
    store: &Store,
    id: &str,
    new_key: Option<&str>,
    only: Option<&str>,
    event: &mut Event,
) -> anyhow::Result<Vec<SlotReport>> {
    use base64::Engine as _;
    let what = PathBuf::from(format!("{} snapshot {id}", store.display()));
    let manifest = kmsfs_snapshot::fetch_manifest(store, id).await?;
    let header_bytes = base64::engine::general_purpose::STANDARD
        .decode(&manifest.head.header)
        .map_err(|e| anyhow::anyhow!("{}: header is not base64: {e}", what.display()))?;
    let hdr = UnverifiedHeader::parse(&header_bytes)
        .map_err(|e| anyhow::anyhow!("{}: header: {e}", what.display()))?;
    // Authenticate header and manifest first: never rewrap a forged one.
    let Unlocked {
        header,
        keys,
        master,
        slot: opened,
    } = unlock(access, &what, hdr).await?;
    let fs_uuid = uuid_string(&header.uuid);
    event.set(Field::FsUuid, fs_uuid.clone());
    if !fs_uuid.eq_ignore_ascii_case(&manifest.head.fs_uuid) {
        anyhow::bail!(
            "{}: the manifest names filesystem {} but carries the header of {fs_uuid}",
            what.display(),
            manifest.head.fs_uuid
        );
    }
    let verified = manifest
        .verify(keys.snapshot_manifest_key())
        .map_err(|e| anyhow::anyhow!("{}: {e}", what.display()))?;
    let RewrappedSlots {
        header: new_header,
        reports,
        changed,
    } = rewrap_slots(access, &header, &master, opened, new_key, only, &what).await?;
    if changed {
        // Every new wrapping was shown to unwrap to `master`; the sealed
        // header must authenticate under keys derived from it.
        let proof_keys = FsKeys::derive(&master, &header.uuid);
        let new_bytes = new_header
            .encode(&keys)
            .with_context(|| format!("cannot encode the new header for {}", what.display()))?;
        let back = UnverifiedHeader::parse(&new_bytes)
            .and_then(|h| h.verify(&proof_keys))
            .with_context(|| format!("the new header for {} does not verify", what.display()))?;
        if back != new_header {
            anyhow::bail!("the new header for {} does not round-trip", what.display());
        }
        kmsfs_snapshot::replace_header(store, verified, &new_bytes, keys.snapshot_manifest_key())
            .await
            .with_context(|| {
                format!(
                    "{}: the rewrapped header was not stored; the snapshot keeps its old one",
                    what.display()
                )
            })?;
    }
    Ok(reports)
}
