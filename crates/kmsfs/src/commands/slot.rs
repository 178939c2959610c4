//! `kmsfs slot list|add|remove`: the key slots of a filesystem's header.
//!
//! Each slot is the same master key wrapped by one KMS (a disaster-recovery
//! cluster, another key). `add` and `remove` unlock the header with the
//! current configuration first: the header MAC covers every slot, so only
//! someone who can open the filesystem can change its slots.
//!
//! Both are allowed while the filesystem is mounted: the daemon read the
//! header once at mount, holds the master key (which never changes), and
//! never writes the header; its `flock` on the backing directory only
//! keeps a second daemon out. Header writers serialise among themselves
//! with [`HeaderLock`].

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_core::header::{Header, KeySlot, SlotKms, MAX_SLOTS};
use kmsfs_core::keys::FsKeys;
use kmsfs_core::slots::validate_label;
use kmsfs_keystore::{KmsConfig, KmsKind};
use serde_json::json;

use crate::audit::{Event, Field, Op};
use crate::commands::rewrap::{probe_slots, select_slot};
use crate::commands::{absolute, kms_access, print_json, runtime, uuid_string};
use crate::fsheader::{read_header, read_header_bytes, unlock, Unlocked};
use crate::header_update::{replace_header, HeaderLock};
use crate::kmsconfig::load_kms_config;
use crate::slotkms::{self, shares_address};
use crate::slotwrap::{wrap_new_slot, NewSlot};
use crate::timefmt::{now_secs, rfc3339_utc};

/// Arguments of `kmsfs slot`.
#[derive(Debug, clap::Args)]
pub struct SlotArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: SlotCommand,
}

/// `kmsfs slot` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SlotCommand {
    /// List the key slots (from the header alone; no KMS needed).
    List(ListArgs),
    /// Wrap the master key with another KMS (a DR cluster, another key).
    Add(AddArgs),
    /// Remove a key slot.
    Remove(RemoveArgs),
}

/// Arguments of `kmsfs slot list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The backing (encrypted) directory.
    pub cipherdir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kmsfs slot add`.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The backing (encrypted) directory.
    pub cipherdir: PathBuf,
    /// KMS configuration (as written by `kmsfs kms set`) of the KMS that
    /// wraps the new slot; its `key_name` is the key used.
    #[arg(long, value_name = "FILE")]
    pub kms_config: PathBuf,
    /// Label of the new slot (default `slot-N`).
    #[arg(long, value_name = "LABEL")]
    pub label: Option<String>,
    /// Print JSON (the new slot, as `slot list --json` shows it) instead of
    /// text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kmsfs slot remove`.
#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    /// The backing (encrypted) directory.
    pub cipherdir: PathBuf,
    /// The slot: its label, or its index in `slot list`.
    #[arg(value_name = "LABEL|INDEX")]
    pub slot: String,
    /// Remove it even when it is the only slot the current configuration
    /// can open.
    #[arg(long)]
    pub force: bool,
    /// Print JSON (the removed slot and the slots left) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `kmsfs slot` subcommand.
pub fn run_slot(config_path: &Path, args: SlotArgs) -> anyhow::Result<()> {
    match args.command {
        SlotCommand::List(a) => run_list(a),
        SlotCommand::Add(a) => {
            let mut event = Event::new(Op::SlotAdd);
            event.cipherdir(&a.cipherdir);
            let result = run_add(config_path, a, &mut event);
            event.finish(&result);
            result
        }
        SlotCommand::Remove(a) => {
            let mut event = Event::new(Op::SlotRemove);
            event.cipherdir(&a.cipherdir);
            let result = run_remove(config_path, a, &mut event);
            event.finish(&result);
            result
        }
    }
}

/// One slot as JSON (`slot list --json`).
pub fn slot_json(index: usize, s: &KeySlot) -> serde_json::Value {
    let mut v = json!({
        "index": index,
        "label": s.label,
        "kms_type": s.kms_type().as_str(),
        "created": rfc3339_utc(s.created),
        "addresses": s.addresses(),
    });
    match &s.kms {
        SlotKms::Vault(x) => {
            v["transit_path"] = json!(x.transit_path);
            v["namespace"] = json!(x.namespace);
            v["key_name"] = json!(x.key_name);
            v["key_version"] = json!(x.key_version);
            v["derived_context"] = json!(x.uses_context);
        }
        SlotKms::Kmip(x) => {
            v["key_id"] = json!(x.key_id);
        }
    }
    v
}

fn run_list(a: ListArgs) -> anyhow::Result<()> {
    let hdr = read_header(&a.cipherdir)?;
    let h = hdr.unverified();
    if a.json {
        let slots: Vec<_> = h
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| slot_json(i, s))
            .collect();
        return print_json(&json!({
            "path": absolute(&a.cipherdir)?,
            "uuid": uuid_string(&h.uuid),
            "authenticated": false,
            "slots": slots,
        }));
    }
    let mut rows: Vec<Vec<String>> = vec![[
        "INDEX",
        "LABEL",
        "TYPE",
        "KEY",
        "VERSION",
        "MOUNT",
        "NAMESPACE",
        "CREATED",
        "ADDRESSES",
    ]
    .map(String::from)
    .to_vec()];
    for (i, s) in h.slots.iter().enumerate() {
        let (key, version, mount, ns) = match &s.kms {
            SlotKms::Vault(v) => (
                v.key_name.clone(),
                format!(
                    "v{}{}",
                    v.key_version,
                    if v.uses_context { "+ctx" } else { "" }
                ),
                v.transit_path.clone(),
                v.namespace.clone().unwrap_or_else(|| "-".into()),
            ),
            SlotKms::Kmip(k) => (k.key_id.clone(), "-".into(), "-".into(), "-".into()),
        };
        rows.push(vec![
            i.to_string(),
            s.label.clone(),
            s.kms_type().as_str().into(),
            key,
            version,
            mount,
            ns,
            rfc3339_utc(s.created),
            s.addresses().join(","),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    crate::info_eprintln!(
        "(read from the header without the KMS: not authenticated until a mount or unlock)"
    );
    Ok(())
}

/// The first free `slot-N` label.
fn default_label(h: &Header) -> String {
    (1..)
        .map(|n| format!("slot-{n}"))
        .find(|l| h.slots.iter().all(|s| &s.label != l))
        .unwrap_or_else(|| "slot-x".into())
}

fn run_add(config_path: &Path, a: AddArgs, event: &mut Event) -> anyhow::Result<()> {
    let dir = &a.cipherdir;
    let cfg = load_kms_config(config_path)?;
    let new_cfg = KmsConfig::load(&a.kms_config).map_err(|e| {
        anyhow::anyhow!(
            "--kms-config: {e} (write it with `kmsfs --config {} kms set ...`)",
            a.kms_config.display()
        )
    })?;
    let access = kms_access(&cfg)?;
    let new_access = kms_access(&new_cfg)?;
    let rt = runtime()?;
    let lock = HeaderLock::acquire(dir)?;
    let (old_bytes, hdr) = read_header_bytes(dir)?;
    let label = match &a.label {
        Some(l) => {
            validate_label(l).map_err(|e| anyhow::anyhow!("--label '{l}': {e}"))?;
            l.clone()
        }
        None => default_label(hdr.unverified()),
    };
    event
        .set(Field::SlotLabel, label.clone())
        .set(Field::KmsType, new_cfg.kind.as_str())
        .set(Field::KmsKeyName, new_cfg.key_name.clone())
        .set(Field::KmsAddresses, new_cfg.addresses.join(","));
    let Unlocked {
        header,
        keys,
        master,
        ..
    } = rt.block_on(unlock(&access, dir, hdr))?;
    event.uuid(&header.uuid);
    if header.slots.iter().any(|s| s.label == label) {
        anyhow::bail!(
            "{}: a key slot is already labelled '{label}'; choose another --label",
            dir.display()
        );
    }
    if header.slots.len() >= MAX_SLOTS {
        anyhow::bail!(
            "{}: the header already has {MAX_SLOTS} key slots, the most it can hold; remove one first",
            dir.display()
        );
    }
    if let Some((i, s)) = header.slots.iter().enumerate().find(|(_, s)| match &s.kms {
        SlotKms::Vault(v) => {
            new_cfg.kind == KmsKind::Vault
                && v.key_name == new_cfg.key_name
                && v.transit_path == new_cfg.transit_path
                && v.namespace == new_cfg.namespace
                && shares_address(&new_cfg, &v.addresses)
        }
        SlotKms::Kmip(k) => {
            new_cfg.kind == KmsKind::Kmip
                && k.key_id == new_cfg.key_name
                && shares_address(&new_cfg, &k.addresses)
        }
    }) {
        let hint = match &s.kms {
            SlotKms::Vault(_) => format!(
                "; `kmsfs rewrap {} --slot {}` moves it to the key's newest version",
                dir.display(),
                s.label
            ),
            SlotKms::Kmip(_) => String::new(),
        };
        anyhow::bail!(
            "{}: {} already wraps the master key with this KMS key{hint}",
            dir.display(),
            slotkms::describe(i, s),
        );
    }
    let uuid = header.uuid;
    let key_name = new_cfg.key_name.clone();
    let NewSlot { kms, back } = rt
        .block_on(wrap_new_slot(&new_access, &key_name, &master, &uuid))
        .with_context(|| {
            format!(
                "cannot add a slot to {}: wrapping the master key with KMS key '{key_name}' at {} failed; header unchanged",
                dir.display(),
                new_cfg.addresses.join(", ")
            )
        })?;
    // Verify: the new slot unwraps, through the new KMS, to this key.
    if back != master {
        anyhow::bail!(
            "the new slot does not unwrap to {}'s master key; header unchanged",
            dir.display()
        );
    }
    let slot = KeySlot {
        label: label.clone(),
        created: now_secs(),
        kms,
    };
    let mut new_header = header.clone();
    new_header.slots.push(slot);
    let index = new_header.slots.len() - 1;
    event.slot(index, &new_header.slots[index]);
    // The header is proven with the key the new KMS gave back.
    let proof = FsKeys::derive(&back, &uuid);
    replace_header(&lock, dir, &old_bytes, &new_header, &keys, &proof)?;
    if a.json {
        return print_json(&json!({
            "path": absolute(dir)?,
            "uuid": uuid_string(&uuid),
            "added": slot_json(index, &new_header.slots[index]),
        }));
    }
    crate::info_println!(
        "added {} to {}",
        slotkms::describe(index, &new_header.slots[index]),
        dir.display()
    );
    Ok(())
}

fn run_remove(config_path: &Path, a: RemoveArgs, event: &mut Event) -> anyhow::Result<()> {
    let dir = &a.cipherdir;
    let cfg = load_kms_config(config_path)?;
    let access = kms_access(&cfg)?;
    let rt = runtime()?;
    let lock = HeaderLock::acquire(dir)?;
    let (old_bytes, hdr) = read_header_bytes(dir)?;
    let Unlocked {
        header,
        keys,
        master,
        slot: opened,
    } = rt.block_on(unlock(&access, dir, hdr))?;
    event.uuid(&header.uuid);
    let i = select_slot(&header, &a.slot, dir)?;
    event.slot(i, &header.slots[i]);
    let victim = slotkms::describe(i, &header.slots[i]);
    if header.slots.len() == 1 {
        anyhow::bail!(
            "refusing to remove {victim} from {}: it is the last key slot, and without it \
             nobody can open the filesystem",
            dir.display()
        );
    }
    let reach = rt.block_on(probe_slots(&access, &header, &master, opened));
    let openable: Vec<usize> = (0..reach.len()).filter(|&j| reach[j].is_ok()).collect();
    if openable == [i] && !a.force {
        let rest: Vec<String> = (0..header.slots.len())
            .filter(|&j| j != i)
            .map(|j| slotkms::describe(j, &header.slots[j]))
            .collect();
        anyhow::bail!(
            "refusing to remove {victim} from {}: it is the only slot this KMS configuration \
             ({}) can open; afterwards only {} can; pass --force if that is intended",
            dir.display(),
            cfg.addresses.join(", "),
            rest.join("; ")
        );
    }
    let mut new_header = header.clone();
    new_header.slots.remove(i);
    replace_header(&lock, dir, &old_bytes, &new_header, &keys, &keys)?;
    if a.json {
        let left: Vec<_> = new_header
            .slots
            .iter()
            .enumerate()
            .map(|(j, s)| slot_json(j, s))
            .collect();
        return print_json(&json!({
            "path": absolute(dir)?,
            "uuid": uuid_string(&header.uuid),
            "removed": slot_json(i, &header.slots[i]),
            "slots": left,
        }));
    }
    let left: Vec<String> = new_header
        .slots
        .iter()
        .enumerate()
        .map(|(j, s)| format!("{j} '{}'", s.label))
        .collect();
    crate::info_println!(
        "removed {victim} from {}; slots now: {}",
        dir.display(),
        left.join(", ")
    );
    Ok(())
}
