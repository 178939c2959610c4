//! `kmsfs create`: a new encrypted filesystem in a backing directory.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_core::header::{Header, KeySlot, SlotKms, HEADER_FILE_NAME};
use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_core::layout::{self, DIR_IV_NAME};
use std::os::fd::AsFd;

use crate::audit::{Event, Field, Op};
use crate::commands::{absolute, kms_access, print_json, runtime, uuid_string};
use crate::fsheader::{header_path, write_header};
use crate::keycheck::KeyCheck;
use crate::kmsconfig::{load_kms_config, registry_path};
use crate::registry::{Entry, Registry};
use crate::slotwrap::wrap_new_slot;
use crate::timefmt::now_secs;

/// Label of the slot `create` writes.
pub const PRIMARY_LABEL: &str = "primary";

/// Arguments of `kmsfs create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The backing directory: must be empty or not exist (its parent must).
    pub cipherdir: PathBuf,
    /// KMS key to wrap the master key with: a Transit key name, or a KMIP
    /// Unique Identifier or `name:NAME` (default: `key_name` from the KMS
    /// configuration). kmsfs never creates KMS keys.
    #[arg(long, value_name = "NAME")]
    pub kms_key: Option<String>,
    /// Print JSON (path, UUID, key, key check value) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Checks that `dir` can receive a new filesystem; returns whether it exists.
fn check_target(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            if dir.join(HEADER_FILE_NAME).exists() {
                anyhow::bail!(
                    "{} already holds a kmsfs filesystem ({} exists); refusing to overwrite it",
                    dir.display(),
                    header_path(dir).display()
                );
            }
            let mut it = std::fs::read_dir(dir)
                .with_context(|| format!("cannot read directory {}", dir.display()))?;
            if it.next().is_some() {
                anyhow::bail!(
                    "{} is not empty; kmsfs create needs an empty or new directory",
                    dir.display()
                );
            }
            Ok(true)
        }
        Ok(_) => anyhow::bail!("{} exists and is not a directory", dir.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !parent.is_dir() {
                anyhow::bail!(
                    "cannot create {}: parent directory {} does not exist",
                    dir.display(),
                    parent.display()
                );
            }
            Ok(false)
        }
        Err(e) => Err(anyhow::anyhow!("cannot access {}: {e}", dir.display())),
    }
}

/// Removes what a failed create wrote (best effort).
fn roll_back(dir: &Path, created_dir: bool) {
    for name in [HEADER_FILE_NAME, DIR_IV_NAME] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    if created_dir {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Creates the filesystem; prints its UUID on stdout, and its key check
/// value (not secret) on stderr for pinning on other hosts (or all of it
/// as JSON on stdout). Records an audit event either way.
pub fn run_create(config_path: &Path, args: CreateArgs) -> anyhow::Result<()> {
    let mut event = Event::new(Op::Create);
    event.cipherdir(&args.cipherdir);
    let result = create(config_path, args, &mut event);
    event.finish(&result);
    result
}

fn create(config_path: &Path, args: CreateArgs, event: &mut Event) -> anyhow::Result<()> {
    let dir = args.cipherdir.clone();
    let existed = check_target(&dir)?;
    let cfg = load_kms_config(config_path)?;
    let key_name = args.kms_key.clone().unwrap_or_else(|| cfg.key_name.clone());
    event.set(Field::KmsType, cfg.kind.as_str());
    event.set(Field::KmsKeyName, key_name.clone());
    let access = kms_access(&cfg)?;
    let rt = runtime()?;

    // Everything that talks to the KMS happens before anything is written.
    let uuid = *uuid::Uuid::new_v4().as_bytes();
    let master = MasterKey::generate().context("cannot generate the master key")?;
    let fail = || {
        format!(
            "cannot create {}: wrapping the master key with KMS key '{key_name}' at {} failed",
            dir.display(),
            cfg.addresses.join(", ")
        )
    };
    let new_slot = rt
        .block_on(wrap_new_slot(&access, &key_name, &master, &uuid))
        .with_context(fail)?;
    // The wrapped key was unwrapped again: prove it is the master key
    // before relying on it.
    if new_slot.back != master {
        return Err(anyhow::anyhow!(
            "the KMS unwrapped the new key slot to a different key"
        ))
        .with_context(fail);
    }
    event.uuid(&uuid);
    let keys = FsKeys::derive(&master, &uuid);
    let kcv = KeyCheck::of(&keys);
    let key_desc = match &new_slot.kms {
        SlotKms::Vault(v) => format!(
            "KMS key '{}' version {}{}",
            v.key_name,
            v.key_version,
            if v.uses_context { ", derived" } else { "" }
        ),
        SlotKms::Kmip(k) => format!("KMIP key '{}'", k.key_id),
    };
    let slot = KeySlot {
        label: PRIMARY_LABEL.into(),
        created: now_secs(),
        kms: new_slot.kms,
    };
    event.slot(0, &slot);
    let slot_json = crate::commands::slot::slot_json(0, &slot);
    let header = Header {
        features: 0,
        uuid,
        created: now_secs(),
        slots: vec![slot],
    };
    let bytes = header
        .encode(&keys)
        .with_context(|| format!("cannot encode the header for {}", dir.display()))?;
    if !existed {
        std::fs::create_dir(&dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let written = (|| {
        let handle =
            std::fs::File::open(&dir).with_context(|| format!("cannot open {}", dir.display()))?;
        layout::create_dir_iv(handle.as_fd())
            .with_context(|| format!("cannot write {}", dir.join(DIR_IV_NAME).display()))?;
        // The header's rename fsyncs the directory, which makes the IV's
        // entry durable too.
        write_header(&dir, &bytes)
    })();
    if let Err(e) = written {
        roll_back(&dir, !existed);
        return Err(e);
    }

    let abs = absolute(&dir)?;
    let id = uuid_string(&uuid);
    let reg_path = registry_path(config_path);
    let registered = Registry::load(&reg_path).and_then(|mut reg| {
        reg.add(Entry {
            path: abs.clone(),
            uuid: id.clone(),
            kcv: Some(kcv),
        });
        reg.save(&reg_path)
    });
    let registered = match registered {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "kmsfs: warning: filesystem created but not registered in {}: {e:#} \
             (`kmsfs list`, `rewrap --all` and `kms check` will not know it, and mounts \
             here need -o kcv={kcv} to detect a replaced header)",
                reg_path.display()
            );
            false
        }
    };
    if args.json {
        return print_json(&serde_json::json!({
            "path": abs,
            "uuid": id,
            "key_check_value": kcv.to_string(),
            "registered": registered,
            "registry": reg_path,
            "slot": slot_json,
        }));
    }
    crate::info_eprintln!("created kmsfs filesystem in {} ({key_desc})", abs.display());
    crate::info_eprintln!(
        "key check value: {kcv} (not secret; on hosts that mount it without having created it, \
         add -o kcv={kcv} so that a replaced kmsfs.header is refused)"
    );
    crate::info_println!("{id}");
    Ok(())
}
