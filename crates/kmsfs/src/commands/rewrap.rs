//! `kmsfs rewrap`: move filesystems to the newest version of their KMS key,
//! or to another key, without changing the master key.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_core::header::{Header, KeySlot, KmipSlot, SlotKms, UnverifiedHeader, VaultSlot};
use kmsfs_core::keys::{FsKeys, MasterKey};

use serde_json::json;

use crate::audit::{Event, Field, Op, Priority};
use crate::commands::{absolute, kms_access, print_json, runtime};
use crate::fsheader::{read_header_bytes, slot_context, unlock, unwrap_slot, Unlocked};
use crate::header_update::{replace_header, HeaderLock};
use crate::kmsconfig::{load_kms_config, registry_path};
use crate::registry::Registry;
use crate::slotkms::KmsAccess;
use crate::slotwrap::{wrap_new_slot, NewSlot};

/// Arguments of `kmsfs rewrap`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["cipherdirs", "all"])))]
pub struct RewrapArgs {
    /// Backing directories to rewrap.
    pub cipherdirs: Vec<PathBuf>,
    /// Rewrap every registered filesystem.
    #[arg(long, conflicts_with = "cipherdirs")]
    pub all: bool,
    /// Move to this key instead of the newest version of the current one
    /// (the key must exist): a Transit key name, or for KMIP slots a
    /// Unique Identifier or `name:NAME` (KMIP keys have no versions, so a
    /// KMIP slot changes only with this option).
    #[arg(long, value_name = "NAME")]
    pub new_key: Option<String>,
    /// Rewrap only this slot (label or index); default: every slot the
    /// configured KMS opens.
    #[arg(long, value_name = "LABEL|INDEX")]
    pub slot: Option<String>,
    /// Print JSON (one object per filesystem, one entry per slot) instead
    /// of text.
    #[arg(long)]
    pub json: bool,
}

/// What happened to one key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotOutcome {
    /// Rewrapped: key name and version before and after.
    Rewrapped {
        /// Key name and version before.
        old: (String, u32),
        /// Key name and version after.
        new: (String, u32),
    },
    /// Already at the newest version of its key: left as it was.
    Current((String, u32)),
    /// This configuration's KMS cannot open the slot (it belongs to another
    /// KMS, or the KMS refused it): left as it was.
    NotReached(String),
    /// The KMS opened the slot but rewrapping it failed: left as it was.
    Failed(String),
}

/// One slot's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotReport {
    /// Index in the header.
    pub index: usize,
    /// The slot's label.
    pub label: String,
    /// The slot as it was before (for the audit record: its key).
    pub before: KeySlot,
    /// What happened.
    pub outcome: SlotOutcome,
}

impl SlotReport {
    /// One line, as `rewrap` prints it after the directory.
    pub fn line(&self) -> String {
        let head = format!("slot {} '{}'", self.index, self.label);
        match &self.outcome {
            SlotOutcome::Rewrapped { old, new } => {
                format!("{head}: {} -> {}", key_version(old), key_version(new))
            }
            SlotOutcome::Current((k, 0)) => {
                format!("{head}: {k} (already wrapped by this key, unchanged)")
            }
            SlotOutcome::Current((k, v)) => {
                format!("{head}: {k} v{v} -> {k} v{v} (already the newest version, unchanged)")
            }
            SlotOutcome::NotReached(why) => {
                format!("{head}: not reached by this KMS configuration, unchanged ({why})")
            }
            SlotOutcome::Failed(why) => format!("{head}: FAILED: {why}"),
        }
    }

    /// The report as JSON (`rewrap --json`, `snapshot rewrap --json`):
    /// index, label, `outcome` (`rewrapped`, `unchanged`, `not-reached`,
    /// `failed`), keys and versions (null for KMIP keys, which have none)
    /// or the reason, and `result`, the text line.
    pub fn to_json(&self) -> serde_json::Value {
        let version = |v: u32| (v != 0).then_some(v);
        let mut j = json!({"index": self.index, "label": self.label, "result": self.line()});
        match &self.outcome {
            SlotOutcome::Rewrapped { old, new } => {
                j["outcome"] = json!("rewrapped");
                j["old_key"] = json!(old.0);
                j["old_version"] = json!(version(old.1));
                j["key"] = json!(new.0);
                j["version"] = json!(version(new.1));
            }
            SlotOutcome::Current((k, v)) => {
                j["outcome"] = json!("unchanged");
                j["key"] = json!(k);
                j["version"] = json!(version(*v));
            }
            SlotOutcome::NotReached(why) => {
                j["outcome"] = json!("not-reached");
                j["reason"] = json!(why);
            }
            SlotOutcome::Failed(why) => {
                j["outcome"] = json!("failed");
                j["error"] = json!(why);
            }
        }
        j
    }

    /// Sends the slot's audit record: `base` carries the filesystem (or
    /// snapshot) fields, `op` is [`Op::Rewrap`] or [`Op::SnapshotRewrap`].
    pub fn audit(&self, base: &Event, op: Op) {
        let mut e = base.for_op(op);
        e.slot(self.index, &self.before);
        let set_key = |e: &mut Event, name: Field, ver: Field, (k, v): &(String, u32)| {
            e.set(name, k.clone());
            if *v == 0 {
                e.unset(ver);
            } else {
                e.set(ver, v.to_string());
            }
        };
        match &self.outcome {
            SlotOutcome::Rewrapped { old, new } => {
                set_key(&mut e, Field::OldKmsKeyName, Field::OldKmsKeyVersion, old);
                set_key(&mut e, Field::KmsKeyName, Field::KmsKeyVersion, new);
                e.set(Field::Outcome, "rewrapped").ok();
            }
            SlotOutcome::Current(_) => e.set(Field::Outcome, "unchanged").ok(),
            SlotOutcome::NotReached(why) => e
                .set(Field::Outcome, "not-reached")
                .emit(&format!("not reached: {why}"), Priority::Warning),
            SlotOutcome::Failed(why) => e.set(Field::Outcome, "failed").emit(why, Priority::Error),
        }
    }
}

/// `KEY vN`, or just `KEY` for version 0 (a KMIP key, which has none).
fn key_version((k, v): &(String, u32)) -> String {
    if *v == 0 {
        k.clone()
    } else {
        format!("{k} v{v}")
    }
}

/// Picks a slot by label or index (`LABEL|INDEX` on the command line).
pub fn select_slot(header: &Header, which: &str, dir: &Path) -> anyhow::Result<usize> {
    if let Ok(i) = which.parse::<usize>() {
        if i < header.slots.len() {
            return Ok(i);
        }
        anyhow::bail!(
            "{}: no key slot {i} (the header has {} slot(s), 0..{})",
            dir.display(),
            header.slots.len(),
            header.slots.len() - 1
        );
    }
    header
        .slots
        .iter()
        .position(|s| s.label == which)
        .ok_or_else(|| {
            let labels: Vec<&str> = header.slots.iter().map(|s| s.label.as_str()).collect();
            anyhow::anyhow!(
                "{}: no key slot labelled '{which}' (labels: {})",
                dir.display(),
                labels.join(", ")
            )
        })
}

/// Which slots of `header` this configuration opens: for each slot, `Ok`
/// when the KMS unwraps it to `master`, else why not. The slot that
/// unlocked the header (`opened`) is not asked again.
pub async fn probe_slots(
    access: &KmsAccess,
    header: &Header,
    master: &MasterKey,
    opened: usize,
) -> Vec<Result<(), String>> {
    let mut out = Vec::with_capacity(header.slots.len());
    for (i, slot) in header.slots.iter().enumerate() {
        if i == opened {
            out.push(Ok(()));
            continue;
        }
        out.push(match unwrap_slot(access, slot, &header.uuid).await {
            Ok(m) if &m == master => Ok(()),
            Ok(_) => Err("it unwraps to another key".into()),
            Err(f) => Err(f.to_string()),
        });
    }
    out
}

/// Rewraps one reachable Transit slot; returns the new slot (or `None` when
/// it is current) and the key the new wrapping unwraps to.
async fn rewrap_slot(
    access: &KmsAccess,
    slot: &VaultSlot,
    uuid: &[u8; 16],
    master: &MasterKey,
    new_key: Option<&str>,
) -> anyhow::Result<Option<VaultSlot>> {
    let client = access.client_for_slot(slot)?;
    let from_ctx = slot_context(slot.uses_context, uuid);
    let to_name = new_key.unwrap_or(&slot.key_name).to_string();
    let same_key = to_name == slot.key_name;
    let to_info = client
        .read_key(&to_name)
        .await
        .with_context(|| format!("reading KMS key '{to_name}'"))?;
    if same_key && slot.key_version >= to_info.latest_version {
        return Ok(None);
    }
    let to_derived = if same_key {
        slot.uses_context
    } else {
        to_info.derived
    };
    let to_ctx = slot_context(to_derived, uuid);
    let wrapped = if same_key {
        client
            .rewrap(&slot.key_name, &slot.wrapped_key, from_ctx, None)
            .await
    } else {
        client
            .rewrap_to(
                &slot.key_name,
                &slot.wrapped_key,
                from_ctx,
                &to_name,
                to_ctx,
            )
            .await
    }
    .with_context(|| format!("KMS rewrap to key '{to_name}' failed"))?;
    // Prove the new wrapped key before relying on it.
    let back = client
        .unwrap(&to_name, &wrapped.ciphertext, to_ctx)
        .await
        .context("the KMS cannot unwrap the rewrapped key")?;
    let back = MasterKey::from_secret(back)
        .map_err(|e| anyhow::anyhow!("the rewrapped key is invalid: {e}"))?;
    if &back != master {
        anyhow::bail!("the rewrapped key does not unwrap to the filesystem's master key");
    }
    Ok(Some(VaultSlot {
        key_name: to_name,
        key_version: wrapped.key_version,
        wrapped_key: wrapped.ciphertext,
        uses_context: to_derived,
        ..slot.clone()
    }))
}

/// Moves one reachable KMIP slot to `new_key` (a Unique Identifier or
/// `name:NAME`): KMIP keys have no versions and servers no rewrap, so the
/// master key (already unwrapped with the slot's key) is wrapped again
/// with the new key and unwrapped once more to prove it. Without
/// `new_key`, or when it names the slot's own key, the slot is current.
async fn rewrap_kmip_slot(
    access: &KmsAccess,
    slot: &KmipSlot,
    uuid: &[u8; 16],
    master: &MasterKey,
    new_key: Option<&str>,
) -> anyhow::Result<Option<KmipSlot>> {
    let Some(to) = new_key else {
        return Ok(None);
    };
    if to == slot.key_id {
        return Ok(None);
    }
    let NewSlot { kms, back } = wrap_new_slot(access, to, master, uuid)
        .await
        .with_context(|| format!("wrapping with KMIP key '{to}' failed"))?;
    if &back != master {
        anyhow::bail!("the rewrapped key does not unwrap to the filesystem's master key");
    }
    let SlotKms::Kmip(new) = kms else {
        anyhow::bail!("the configured KMS is not a KMIP server");
    };
    // A `name:NAME` that resolves to the slot's own key changes nothing.
    if new.key_id == slot.key_id {
        return Ok(None);
    }
    Ok(Some(new))
}

/// The outcome of [`rewrap_slots`].
pub struct RewrappedSlots {
    /// The header with every rewrapped slot replaced (not yet sealed).
    pub header: Header,
    /// One report per selected slot.
    pub reports: Vec<SlotReport>,
    /// True when at least one slot changed.
    pub changed: bool,
}

/// Rewraps the slots of an authenticated `header` (opened by slot `opened`
/// to `master`) that `access` reaches — or only `only`, a label or index —
/// and reports each one. Every new wrapping has been unwrapped again to
/// `master` before it is in the returned header. `dir` names the header
/// in messages (a backing directory, or a snapshot). Shared by `rewrap` and
/// `snapshot rewrap`.
pub async fn rewrap_slots(
    access: &KmsAccess,
    header: &Header,
    master: &MasterKey,
    opened: usize,
    new_key: Option<&str>,
    only: Option<&str>,
    dir: &Path,
) -> anyhow::Result<RewrappedSlots> {
    let selected: Vec<usize> = match only {
        Some(which) => vec![select_slot(header, which, dir)?],
        None => (0..header.slots.len()).collect(),
    };
    let reach = probe_slots(access, header, master, opened).await;
    if new_key.is_some() {
        let reached: Vec<String> = selected
            .iter()
            .filter(|&&i| reach[i].is_ok())
            .map(|&i| format!("{} '{}'", i, header.slots[i].label))
            .collect();
        if reached.len() > 1 {
            anyhow::bail!(
                "{}: --new-key would move {} slots ({}) to one key; pick one with --slot LABEL",
                dir.display(),
                reached.len(),
                reached.join(", ")
            );
        }
    }
    let mut new_header = header.clone();
    let mut reports = Vec::new();
    let mut changed = false;
    for &i in &selected {
        let slot = &header.slots[i];
        let outcome = match (&slot.kms, &reach[i]) {
            (_, Err(why)) => SlotOutcome::NotReached(why.clone()),
            (SlotKms::Kmip(k), Ok(())) => {
                match rewrap_kmip_slot(access, k, &header.uuid, master, new_key).await {
                    Ok(Some(nk)) => {
                        let o = SlotOutcome::Rewrapped {
                            old: (k.key_id.clone(), 0),
                            new: (nk.key_id.clone(), 0),
                        };
                        new_header.slots[i].kms = SlotKms::Kmip(nk);
                        changed = true;
                        o
                    }
                    Ok(None) => SlotOutcome::Current((k.key_id.clone(), 0)),
                    Err(e) => SlotOutcome::Failed(format!("{e:#}")),
                }
            }
            (SlotKms::Vault(v), Ok(())) => {
                match rewrap_slot(access, v, &header.uuid, master, new_key).await {
                    Ok(Some(nv)) => {
                        let o = SlotOutcome::Rewrapped {
                            old: (v.key_name.clone(), v.key_version),
                            new: (nv.key_name.clone(), nv.key_version),
                        };
                        new_header.slots[i].kms = SlotKms::Vault(nv);
                        changed = true;
                        o
                    }
                    Ok(None) => SlotOutcome::Current((v.key_name.clone(), v.key_version)),
                    Err(e) => SlotOutcome::Failed(format!("{e:#}")),
                }
            }
        };
        reports.push(SlotReport {
            index: i,
            label: slot.label.clone(),
            before: slot.clone(),
            outcome,
        });
    }
    Ok(RewrappedSlots {
        header: new_header,
        reports,
        changed,
    })
}

/// Rewraps every slot of the filesystem in `dir` that this configuration's
/// KMS opens (or only `only`, a label or index), and reports each slot.
/// Slots of other KMSes are left as they are. The header on disk is
/// replaced once, after every new wrapping has been unwrapped again and the
/// new header shown to authenticate; a backup (`kmsfs.header.bak`) exists
/// while it is replaced. Fails when the header cannot be unlocked or
/// written; per-slot failures are in the report. `event` receives the
/// filesystem UUID once the header is authenticated.
pub async fn rewrap_one(
    access: &KmsAccess,
    dir: &Path,
    new_key: Option<&str>,
    only: Option<&str>,
    event: &mut Event,
) -> anyhow::Result<Vec<SlotReport>> {
    let lock = HeaderLock::acquire(dir)?;
    let (old_bytes, hdr): (Vec<u8>, UnverifiedHeader) = read_header_bytes(dir)?;
    // Authenticate the current header first: never rewrap a forged one.
    let Unlocked {
        header,
        keys,
        master,
        slot: opened,
    } = unlock(access, dir, hdr).await?;
    event.uuid(&header.uuid);
    let RewrappedSlots {
        header: new_header,
        reports,
        changed,
    } = rewrap_slots(access, &header, &master, opened, new_key, only, dir).await?;
    if changed {
        // Every new wrapping was shown above to unwrap to `master`.
        let proof_keys = FsKeys::derive(&master, &header.uuid);
        replace_header(&lock, dir, &old_bytes, &new_header, &keys, &proof_keys)?;
    }
    Ok(reports)
}

/// Rewraps the given (or all registered) filesystems, continuing past
/// failures; fails at the end if any filesystem failed.
pub fn run_rewrap(config_path: &Path, args: RewrapArgs) -> anyhow::Result<()> {
    let dirs: Vec<PathBuf> = if args.all {
        let reg_path = registry_path(config_path);
        let reg = Registry::load(&reg_path)?;
        if reg.is_empty() {
            anyhow::bail!("--all: no registered filesystems in {}", reg_path.display());
        }
        reg.filesystems.into_iter().map(|e| e.path).collect()
    } else {
        args.cipherdirs.clone()
    };
    let cfg = load_kms_config(config_path)?;
    let access = kms_access(&cfg)?;
    let rt = runtime()?;
    let bar = (dirs.len() > 3 && !args.json && !crate::output::quiet()).then(|| {
        let b = indicatif::ProgressBar::with_draw_target(
            Some(dirs.len() as u64),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("rewrap {bar:30} {pos}/{len} {wide_msg}")
        {
            b.set_style(style);
        }
        b
    });
    let mut failures = 0usize;
    let mut lines = Vec::new();
    let mut json_out = Vec::new();
    for dir in &dirs {
        let shown = absolute(dir).unwrap_or_else(|_| dir.clone());
        if let Some(b) = &bar {
            b.set_message(shown.display().to_string());
        }
        let mut event = Event::new(Op::Rewrap);
        event.cipherdir(dir);
        match rt.block_on(rewrap_one(
            &access,
            dir,
            args.new_key.as_deref(),
            args.slot.as_deref(),
            &mut event,
        )) {
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
                    r.audit(&event, Op::Rewrap);
                    lines.push(format!("{}: {}", shown.display(), r.line()));
                }
                let slots: Vec<_> = reports.iter().map(SlotReport::to_json).collect();
                json_out.push(json!({
                    "path": shown,
                    "fs_uuid": event.get(Field::FsUuid),
                    "ok": !failed && reached,
                    "slots": slots,
                }));
            }
            Err(e) => {
                failures += 1;
                event.fail(&e);
                lines.push(format!("{}: FAILED: {e:#}", shown.display()));
                json_out.push(json!({"path": shown, "ok": false, "error": format!("{e:#}")}));
            }
        }
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if args.json {
        print_json(&json!(json_out))?;
    } else if failures > 0 || !crate::output::quiet() {
        // Under --quiet the lines are shown only when something failed.
        for l in &lines {
            println!("{l}");
        }
    }
    if failures > 0 {
        anyhow::bail!(
            "rewrap failed for {failures} of {} filesystem(s); the slots marked FAILED or not reached are unchanged",
            dirs.len()
        );
    }
    Ok(())
}
