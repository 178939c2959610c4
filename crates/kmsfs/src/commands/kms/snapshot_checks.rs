//! `kms check` for snapshots: per snapshot in the targets this host used
//! (`snapshot-targets.toml`, see [`crate::snapshot_targets`]), per key slot
//! on this KMS, is the slot's key version below the key's
//! `min_decryption_version` (the snapshot can no longer be restored
//! through it), or the only version a planned raise would cut off? Each
//! warning names the `kmsfs snapshot rewrap` to run.
//!
//! Snapshot heads are read without the filesystem key, so nothing here is
//! authenticated: it is advice, like the per-filesystem checks. A target
//! that cannot be reached within [`TARGET_TIMEOUT`] is a warning.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kmsfs_core::header::{KeySlot, SlotKms, UnverifiedHeader};
use kmsfs_keystore::{KeyInfo, KmsConfig, VaultClient};
use kmsfs_snapshot::{S3Options, Store, Target};

use super::{Checks, Plans, Status};
use crate::slotkms::{self, Reach};
use crate::snapshot_targets::{targets_path, KnownTarget, KnownTargets};

/// How long one target may take to list its snapshots and their heads.
const TARGET_TIMEOUT: Duration = Duration::from_secs(20);

/// Name of these checks in the output.
const CHECK: &str = "snapshot";

/// Adds the snapshot checks for every known target to `c`.
pub(super) async fn snapshot_checks(
    cfg: &KmsConfig,
    client: &VaultClient,
    config_path: &Path,
    plans: &Plans,
    c: &mut Checks,
) {
    let path = targets_path(config_path);
    let known = match KnownTargets::load(&path) {
        Ok(k) => k,
        Err(e) => {
            c.add(Status::Warn, CHECK, format!("{e:#}"));
            return;
        }
    };
    let mut keys: BTreeMap<String, Option<KeyInfo>> = BTreeMap::new();
    for t in &known.targets {
        let heads = match tokio::time::timeout(TARGET_TIMEOUT, list_heads(t)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                c.add(
                    Status::Warn,
                    CHECK,
                    format!("{}: cannot check its snapshots: {e}", t.target),
                );
                continue;
            }
            Err(_) => {
                c.add(
                    Status::Warn,
                    CHECK,
                    format!(
                        "{}: cannot check its snapshots: no answer within {} s",
                        t.target,
                        TARGET_TIMEOUT.as_secs()
                    ),
                );
                continue;
            }
        };
        let mut warned = false;
        for (id, head) in &heads {
            let name = format!("{} snapshot {id}", t.target);
            let slots = match head {
                Ok(s) => s,
                Err(e) => {
                    c.add(Status::Warn, CHECK, format!("{name}: {e}"));
                    warned = true;
                    continue;
                }
            };
            let rewrap = format!("kmsfs snapshot rewrap {} {id}", t.target);
            for w in slot_warnings(cfg, client, slots, plans, &mut keys, &rewrap).await {
                c.add(Status::Warn, CHECK, format!("{name}: {w}"));
                warned = true;
            }
        }
        if !warned {
            c.add(
                Status::Ok,
                CHECK,
                format!(
                    "{}: {} snapshot(s), none wrapped with a key version this KMS no longer (or, as planned, will no longer) decrypts",
                    t.target,
                    heads.len()
                ),
            );
        }
    }
}

/// The key slots of every snapshot in `t` (or why a head is unreadable).
async fn list_heads(
    t: &KnownTarget,
) -> Result<Vec<(String, Result<Vec<KeySlot>, String>)>, String> {
    use base64::Engine as _;
    let target = Target::parse(&t.target).map_err(|e| e.to_string())?;
    let s3 = S3Options {
        endpoint: t.s3_endpoint.clone(),
    };
    let store = Store::open(&target, &s3, false).map_err(|e| e.to_string())?;
    let heads = kmsfs_snapshot::heads(&store)
        .await
        .map_err(|e| e.to_string())?;
    Ok(heads
        .into_iter()
        .map(|(id, head)| {
            let slots = head.and_then(|h| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(&h.header)
                    .map_err(|e| format!("its header is not base64: {e}"))?;
                UnverifiedHeader::parse(&bytes)
                    .map(|u| u.unverified().slots.clone())
                    .map_err(|e| format!("its header: {e}"))
            });
            (id, slots)
        })
        .collect())
}

/// Warnings for the `slots` of one header on this KMS: a key version below
/// `min_decryption_version`, or one a planned raise would cut off.
async fn slot_warnings(
    cfg: &KmsConfig,
    client: &VaultClient,
    slots: &[KeySlot],
    plans: &Plans,
    keys: &mut BTreeMap<String, Option<KeyInfo>>,
    rewrap: &str,
) -> Vec<String> {
    // Slots on this KMS, as the filesystem checks pick them: an address in
    // common; failing that, the configured key's slots.
    let reach: Vec<Reach> = slots.iter().map(|s| slotkms::reach(cfg, s)).collect();
    let here = |r: &Reach| matches!(r, Reach::Exact | Reach::SameKms);
    let fallback = !reach.iter().any(here);
    let mut out = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        let mine = here(&reach[i]) || (fallback && reach[i] == Reach::SameKey);
        let SlotKms::Vault(v) = &slot.kms else {
            continue;
        };
        if !mine {
            continue;
        }
        let others: Vec<String> = (0..slots.len())
            .filter(|&j| j != i)
            .map(|j| format!("{j} '{}'", slots[j].label))
            .collect();
        let rest = if others.is_empty() {
            " (its only slot: the snapshot cannot be restored until this is fixed)".to_string()
        } else {
            format!(" (other slots: {})", others.join(", "))
        };
        if !keys.contains_key(&v.key_name) {
            let k = client.read_key(&v.key_name).await.ok();
            keys.insert(v.key_name.clone(), k);
        }
        let head = format!("slot {i} '{}'", slot.label);
        let cmd = format!("{rewrap} --slot {}", slot.label);
        let Some(Some(info)) = keys.get(&v.key_name) else {
            out.push(format!("{head}: cannot read its KMS key '{}'", v.key_name));
            continue;
        };
        if v.key_version < info.min_decryption_version {
            out.push(format!(
                "{head}: wrapped with key '{}' version {} but min_decryption_version is {}: this slot CANNOT be opened{rest}; lower min_decryption_version to {}, run `{cmd}`, then raise it again",
                v.key_name, v.key_version, info.min_decryption_version, v.key_version
            ));
        } else if let Some(&planned) = plans.get(&v.key_name) {
            if v.key_version < planned {
                out.push(format!(
                    "{head}: wrapped with key '{}' version {}: the planned min_decryption_version {planned} would cut it off{rest}; run `{cmd}` first",
                    v.key_name, v.key_version
                ));
            }
        }
    }
    out
}
