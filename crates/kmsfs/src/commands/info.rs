//! `kmsfs info` (no KMS needed) and the hidden `kmsfs unlock-check`.

use std::path::{Path, PathBuf};

use kmsfs_core::header::FORMAT_VERSION;
use serde_json::json;

use crate::commands::{absolute, kms_access, print_json, runtime, uuid_string};
use crate::fsheader::{read_header, unlock};
use crate::kmsconfig::{load_kms_config, registry_path};
use crate::registry::Registry;
use crate::timefmt::rfc3339_utc;

/// Arguments of `kmsfs info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// The backing (encrypted) directory.
    pub cipherdir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of the hidden `kmsfs unlock-check`.
#[derive(Debug, clap::Args)]
pub struct UnlockCheckArgs {
    /// The backing (encrypted) directory.
    pub cipherdir: PathBuf,
}

/// Prints what the header says, without the KMS (nothing is authenticated
/// yet: the MAC needs the KMS), and the key check value this host recorded
/// at create, from the registry beside `config_path`.
pub fn run_info(config_path: &Path, args: InfoArgs) -> anyhow::Result<()> {
    let hdr = read_header(&args.cipherdir)?;
    let h = hdr.unverified();
    let path = absolute(&args.cipherdir)?;
    let id = uuid_string(&h.uuid);
    // The registry only adds the recorded key check value: a broken one
    // must not stop the header from being shown.
    let registry = Registry::load(&registry_path(config_path)).unwrap_or_else(|e| {
        eprintln!("kmsfs: warning: {e:#} (the recorded key check value cannot be shown)");
        Registry::default()
    });
    if let Some(e) = registry
        .by_path(&path)
        .filter(|e| !e.uuid.eq_ignore_ascii_case(&id))
    {
        eprintln!(
            "kmsfs: warning: this host created filesystem {} in {}, but its kmsfs.header is \
             filesystem {id}'s: the header was replaced, and a mount will refuse it",
            e.uuid,
            path.display()
        );
    }
    let recorded = registry
        .by_path(&path)
        .filter(|e| e.uuid.eq_ignore_ascii_case(&id))
        .or_else(|| registry.by_uuid(&id))
        .and_then(|e| e.kcv);
    let slot0 = h
        .slots
        .first()
        .ok_or_else(|| anyhow::anyhow!("{}: header has no key slot", path.display()))?;
    let slots: Vec<_> = h
        .slots
        .iter()
        .enumerate()
        .map(|(i, s)| crate::commands::slot::slot_json(i, s))
        .collect();
    let v0 = slot0.vault();
    let v = json!({
        "path": path,
        "uuid": uuid_string(&h.uuid),
        "format_version": FORMAT_VERSION,
        "cipher": "aes-256-xts",
        "data_unit_size": 4096,
        "names_cipher": "aes-256-siv",
        "kms_type": slot0.kms_type().as_str(),
        "key_name": v0.map(|v| v.key_name.clone()),
        "kms_key_version": v0.map(|v| v.key_version),
        "derived_context": v0.map(|v| v.uses_context),
        "created": rfc3339_utc(h.created),
        "slot_count": h.slots.len(),
        "slots": slots,
        "key_check_value": recorded.map(|k| k.to_string()),
    });
    if args.json {
        return print_json(&v);
    }
    println!("path:             {}", path.display());
    println!("uuid:             {}", uuid_string(&h.uuid));
    println!("format version:   {FORMAT_VERSION}");
    println!("cipher:           aes-256-xts (4096-byte units, per-file keys)");
    println!("names cipher:     aes-256-siv");
    println!("created:          {}", rfc3339_utc(h.created));
    println!("key slots:        {}", h.slots.len());
    for (i, s) in h.slots.iter().enumerate() {
        println!("key slot:         {}", crate::slotkms::describe(i, s));
    }
    if let Some(v) = v0 {
        println!("kms_key_version:  {}", v.key_version);
    }
    match recorded {
        Some(k) => println!("key check value:  {k} (recorded on this host at create)"),
        None => println!("key check value:  not recorded on this host"),
    }
    Ok(())
}

/// Unlocks the filesystem with the KMS and verifies the header MAC; prints
/// `ok`. For scripts and tests; the master key is never printed.
pub fn run_unlock_check(config_path: &Path, args: UnlockCheckArgs) -> anyhow::Result<()> {
    let hdr = read_header(&args.cipherdir)?;
    let cfg = load_kms_config(config_path)?;
    let access = kms_access(&cfg)?;
    let rt = runtime()?;
    rt.block_on(unlock(&access, &args.cipherdir, hdr))?;
    println!("ok");
    Ok(())
}
