//! `kmsfs rewrap`: move filesystems to the newest version of their KMS key,
//! or to another key, without changing the master key.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_core::header::{Header, UnverifiedHeader};
use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_keystore::VaultClient;

use crate::commands::{absolute, client, runtime};
use crate::fsheader::{
    header_path, read_header_bytes, slot_context, unlock, write_header, HEADER_BACKUP_NAME,
    HEADER_MODE,
};
use crate::kmsconfig::{load_kms_config, registry_path};
use crate::registry::Registry;

/// Arguments of `kmsfs rewrap`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["cipherdirs", "all"])))]
pub struct RewrapArgs {
    /// Backing directories to rewrap.
    pub cipherdirs: Vec<PathBuf>,
    /// Rewrap every registered filesystem.
    #[arg(long, conflicts_with = "cipherdirs")]
    pub all: bool,
    /// Move to this Transit key instead of the newest version of the
    /// current one (the key must exist).
    #[arg(long, value_name = "NAME")]
    pub new_key: Option<String>,
}

/// What happened to one filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapOutcome {
    /// Key name and version before.
    pub old: (String, u32),
    /// Key name and version after.
    pub new: (String, u32),
    /// False when the slot was already at the newest version of the key.
    pub changed: bool,
}

/// Rewraps slot 0 of the filesystem in `dir` (other slots, for another KMS,
/// are kept as they are). The header on disk is replaced only after the
/// new wrapped key has been unwrapped again and shown to authenticate the
/// new header; a backup (`kmsfs.header.bak`) exists while it is replaced.
pub async fn rewrap_one(
    client: &VaultClient,
    dir: &Path,
    new_key: Option<&str>,
) -> anyhow::Result<RewrapOutcome> {
    let (old_bytes, hdr): (Vec<u8>, UnverifiedHeader) = read_header_bytes(dir)?;
    // Authenticate the current header first: never rewrap a forged one.
    let (header, keys, master): (Header, FsKeys, MasterKey) = unlock(client, dir, hdr).await?;
    let uuid = header.uuid;
    let slot = header
        .slots
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{}: no key slot", header_path(dir).display()))?;
    let old = (slot.key_name.clone(), slot.key_version);
    let from_ctx = slot_context(slot.uses_context, &uuid);
    let to_name = new_key.unwrap_or(&slot.key_name).to_string();
    let same_key = to_name == slot.key_name;
    let to_info = client
        .read_key(&to_name)
        .await
        .with_context(|| format!("reading KMS key '{to_name}'"))?;
    if same_key && slot.key_version >= to_info.latest_version {
        return Ok(RewrapOutcome {
            old: old.clone(),
            new: old,
            changed: false,
        });
    }
    let to_derived = if same_key {
        slot.uses_context
    } else {
        to_info.derived
    };
    let to_ctx = slot_context(to_derived, &uuid);
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
    .with_context(|| format!("KMS rewrap of {} to key '{to_name}' failed", dir.display()))?;

    // Prove the new wrapped key before writing anything.
    let back = client
        .unwrap(&to_name, &wrapped.ciphertext, to_ctx)
        .await
        .with_context(|| {
            format!(
                "the KMS cannot unwrap the rewrapped key for {}; header left unchanged",
                dir.display()
            )
        })?;
    let back = MasterKey::from_secret(back)
        .map_err(|e| anyhow::anyhow!("rewrapped key for {} is invalid: {e}", dir.display()))?;
    if back != master {
        anyhow::bail!(
            "the rewrapped key for {} does not unwrap to the filesystem's master key; header left unchanged",
            dir.display()
        );
    }
    let mut new_header = header.clone();
    new_header.slots[0].key_name = to_name.clone();
    new_header.slots[0].key_version = wrapped.key_version;
    new_header.slots[0].wrapped_key = wrapped.ciphertext;
    new_header.slots[0].uses_context = to_derived;
    let new_bytes = new_header
        .encode(&keys)
        .with_context(|| format!("cannot encode the new header for {}", dir.display()))?;
    let proof_keys = FsKeys::derive(&back, &uuid);
    let verified = UnverifiedHeader::parse(&new_bytes)
        .and_then(|h| h.verify(&proof_keys))
        .with_context(|| format!("the new header for {} does not verify", dir.display()))?;
    if verified != new_header {
        anyhow::bail!("the new header for {} does not round-trip", dir.display());
    }

    // Backup, replace, re-read and verify, drop the backup.
    let backup = dir.join(HEADER_BACKUP_NAME);
    kmsfs_keystore::write_atomic(&backup, &old_bytes, HEADER_MODE)
        .with_context(|| format!("cannot write backup {}", backup.display()))?;
    write_header(dir, &new_bytes)?;
    let reread = read_header_bytes(dir).and_then(|(bytes, h)| {
        let h = h
            .verify(&proof_keys)
            .map_err(|e| anyhow::anyhow!("{}: {e}", header_path(dir).display()))?;
        if bytes != new_bytes || h != new_header {
            anyhow::bail!(
                "{} does not read back as written",
                header_path(dir).display()
            );
        }
        Ok(())
    });
    if let Err(e) = reread {
        // Put the previous (valid) header back.
        write_header(dir, &old_bytes).with_context(|| {
            format!(
                "{e:#}; restoring the previous header also failed: it is in {}",
                backup.display()
            )
        })?;
        let _ = std::fs::remove_file(&backup);
        return Err(e.context(format!(
            "the new header for {} did not verify after writing; previous header restored",
            dir.display()
        )));
    }
    std::fs::remove_file(&backup)
        .with_context(|| format!("rewrap done but cannot remove {}", backup.display()))?;
    Ok(RewrapOutcome {
        old,
        new: (to_name, wrapped.key_version),
        changed: true,
    })
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
    let client = client(&cfg)?;
    let rt = runtime()?;
    let bar = (dirs.len() > 3).then(|| {
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
    for dir in &dirs {
        let shown = absolute(dir).unwrap_or_else(|_| dir.clone());
        if let Some(b) = &bar {
            b.set_message(shown.display().to_string());
        }
        match rt.block_on(rewrap_one(&client, dir, args.new_key.as_deref())) {
            Ok(o) if o.changed => lines.push(format!(
                "{}: {} v{} -> {} v{}",
                shown.display(),
                o.old.0,
                o.old.1,
                o.new.0,
                o.new.1
            )),
            Ok(o) => lines.push(format!(
                "{}: {} v{} -> {} v{} (already the newest version, unchanged)",
                shown.display(),
                o.old.0,
                o.old.1,
                o.new.0,
                o.new.1
            )),
            Err(e) => {
                failures += 1;
                lines.push(format!("{}: FAILED: {e:#}", shown.display()));
            }
        }
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for l in &lines {
        println!("{l}");
    }
    if failures > 0 {
        anyhow::bail!(
            "rewrap failed for {failures} of {} filesystem(s); their headers are unchanged",
            dirs.len()
        );
    }
    Ok(())
}
