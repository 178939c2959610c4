//! Can the registered filesystems be unlocked with a configuration? Asked
//! by `kms check` (one line per filesystem) and by `kms set` (which
//! refuses, unless `--force`, a configuration that would lock some out).
//!
//! The question is answered the way `mount` answers it: the KMS unwraps
//! the key slots ([`fsheader::unlock`]) and the header must authenticate
//! with the key; the keys are zeroized when dropped.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_keystore::KmsConfig;

use super::{Checks, Status};
use crate::commands::runtime;
use crate::fsheader::{self, read_header};
use crate::kmsconfig::registry_path;
use crate::registry::Registry;
use crate::slotkms::{self, KmsAccess, Reach};

/// What unlocking one registered filesystem gave.
pub(super) enum Outcome {
    /// It unlocks, through the slot described.
    Opens(String),
    /// It does not; `elsewhere` when it has slots of other KMSes (which
    /// another configuration may open).
    Locked {
        /// Why (every slot tried, and what each said).
        why: String,
        /// It has slots of another KMS.
        elsewhere: bool,
    },
    /// Its header cannot be read (the directory is gone or damaged): not a
    /// question of the KMS configuration.
    Unreadable(String),
}

/// Tries to unlock `dir` through `access`.
pub(super) async fn try_unlock(access: &KmsAccess, dir: &Path) -> Outcome {
    let hdr = match read_header(dir) {
        Ok(h) => h,
        Err(e) => return Outcome::Unreadable(format!("{e:#}")),
    };
    let slots = hdr.unverified().slots.clone();
    match fsheader::unlock(access, dir, hdr).await {
        Ok(u) => Outcome::Opens(slotkms::describe(u.slot, &slots[u.slot])),
        Err(e) => Outcome::Locked {
            why: e.to_string(),
            elsewhere: has_other_kms_slot(access.config(), &slots),
        },
    }
}

/// True when some slot belongs to another KMS, judged as the filesystem
/// checks judge it: a slot sharing no address with the configuration is
/// another KMS's (a DR cluster with the same key name and mount included)
/// as soon as some other slot does share one.
fn has_other_kms_slot(cfg: &KmsConfig, slots: &[kmsfs_core::header::KeySlot]) -> bool {
    let reach: Vec<Reach> = slots.iter().map(|s| slotkms::reach(cfg, s)).collect();
    let here = reach
        .iter()
        .any(|r| matches!(r, Reach::Exact | Reach::SameKms));
    reach.iter().any(|r| match r {
        Reach::OtherVault | Reach::OtherType => true,
        Reach::SameKey => here,
        Reach::Exact | Reach::SameKms => false,
    })
}

/// `kms check`: one `unlock` line for `dir`. FAIL when it cannot be
/// unlocked and has no slot of another KMS; WARN when another KMS's slot
/// may still open it (check that one with its own configuration).
pub(super) async fn check_line(access: &KmsAccess, dir: &Path, c: &mut Checks) {
    let name = dir.display();
    match try_unlock(access, dir).await {
        Outcome::Opens(slot) => c.add(
            Status::Ok,
            "unlock",
            format!("{name}: unlocks with this configuration ({slot})"),
        ),
        Outcome::Locked {
            why,
            elsewhere: false,
        } => c.add(
            Status::Fail,
            "unlock",
            format!("{name}: CANNOT be unlocked with this configuration (no mount will work): {why}"),
        ),
        Outcome::Locked {
            why,
            elsewhere: true,
        } => c.add(
            Status::Warn,
            "unlock",
            format!(
                "{name}: cannot be unlocked with this configuration, only through another KMS's slot \
                 (check it with that KMS's configuration): {why}"
            ),
        ),
        // Already reported by the filesystem checks.
        Outcome::Unreadable(_) => {}
    }
}

/// `kms set`: refuses to save `new` when a registered filesystem that can
/// be read does not unlock with it, unless `force`. With `verify` false
/// (the KMS is not contacted) only what the headers show is checked: a
/// filesystem with no key slot of the new configuration's KMS type.
pub(super) fn guard_registered(
    config_path: &Path,
    new: &KmsConfig,
    force: bool,
    verify: bool,
) -> anyhow::Result<()> {
    let reg = Registry::load(&registry_path(config_path))?;
    if reg.is_empty() {
        return Ok(());
    }
    let mut locked: Vec<(PathBuf, String)> = Vec::new();
    if verify {
        let access = KmsAccess::new(new).context("cannot set up the KMS client")?;
        let rt = runtime()?;
        for e in &reg.filesystems {
            match rt.block_on(try_unlock(&access, &e.path)) {
                Outcome::Locked { why, .. } => locked.push((e.path.clone(), why)),
                Outcome::Unreadable(why) => {
                    crate::info_eprintln!("note: not checked: {why}")
                }
                Outcome::Opens(_) => {}
            }
        }
    } else {
        for e in &reg.filesystems {
            let Ok(hdr) = read_header(&e.path) else {
                continue;
            };
            let slots = &hdr.unverified().slots;
            if slots
                .iter()
                .all(|s| slotkms::reach(new, s) == Reach::OtherType)
            {
                locked.push((
                    e.path.clone(),
                    format!(
                        "none of its {} key slot(s) is for a {} KMS",
                        slots.len(),
                        new.kind.as_str()
                    ),
                ));
            }
        }
    }
    if locked.is_empty() {
        return Ok(());
    }
    let list: String = locked
        .iter()
        .map(|(p, why)| format!("\n  {}: {why}", p.display()))
        .collect();
    if force {
        eprintln!(
            "warning: saving anyway (--force): {} registered filesystem(s) cannot be unlocked with the new configuration:{list}",
            locked.len()
        );
        return Ok(());
    }
    anyhow::bail!(
        "refusing to replace {}: {} registered filesystem(s) cannot be unlocked with the new configuration \
         (their mounts would fail):{list}\n\
         add a key slot for this KMS first (kmsfs slot add DIR --kms-config FILE), or pass --force to save it anyway",
        config_path.display(),
        locked.len()
    )
}
