//! The subcommands other than `mount` / `umount`.
//!
//! Each `run_*` function takes the configuration path (`--config`) and its
//! parsed arguments, prints its result to stdout and returns an error for
//! the binary to print as `kmsfs: error: ...`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_keystore::{KmsConfig, VaultClient};

pub mod create;
pub mod fsck;
pub mod info;
pub mod kms;
pub mod list;
pub mod rewrap;
pub mod slot;
pub mod snapshot;
pub mod snapshot_rewrap;

pub use create::{run_create, CreateArgs};
pub use fsck::{run_fsck, FsckArgs};
pub use info::{run_info, run_unlock_check, InfoArgs, UnlockCheckArgs};
pub use kms::{run_kms, KmsArgs, KmsCommand};
pub use list::{run_list, ListArgs};
pub use rewrap::{run_rewrap, RewrapArgs};
pub use slot::{run_slot, SlotArgs};
pub use snapshot::{run_snapshot, SnapshotArgs};

/// A single-threaded tokio runtime for commands that talk to the KMS.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Builds a KMS client (reads the token file; no network yet).
pub fn client(cfg: &KmsConfig) -> anyhow::Result<VaultClient> {
    VaultClient::new(cfg).with_context(|| {
        format!(
            "cannot set up the KMS client for {}",
            cfg.addresses.join(", ")
        )
    })
}

/// The configured KMS, with clients for the key slots it reaches (reads
/// the token file; no network yet).
pub fn kms_access(cfg: &KmsConfig) -> anyhow::Result<crate::slotkms::KmsAccess> {
    crate::slotkms::KmsAccess::new(cfg).with_context(|| {
        format!(
            "cannot set up the KMS client for {}",
            cfg.addresses.join(", ")
        )
    })
}

/// `path` made absolute (canonical when it exists) for messages and the
/// registry.
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(_) if path.is_absolute() => Ok(path.to_path_buf()),
        Err(_) => Ok(std::env::current_dir()
            .context("cannot determine the current directory")?
            .join(path)),
    }
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).context("cannot encode JSON")?
    );
    Ok(())
}

/// The UUID bytes as a hyphenated string.
pub fn uuid_string(uuid: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*uuid).hyphenated().to_string()
}
