//! The filesystem header file (`CIPHERDIR/kmsfs.header`): reading it without
//! the KMS, unlocking it with the KMS, and replacing it safely.
//!
//! The mount code calls exactly [`read_header`] and [`unlock`] (and
//! [`crate::kmsconfig::load_kms_config`]).

use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_core::header::{Header, HeaderError, KmsType, UnverifiedHeader, HEADER_FILE_NAME};
use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_keystore::{KmsError, VaultClient};

/// Permission bits of `kmsfs.header` (it holds only the wrapped key, but
/// nobody other than the owner needs it).
pub const HEADER_MODE: u32 = 0o600;

/// Name of the backup kept while `kmsfs rewrap` replaces the header.
pub const HEADER_BACKUP_NAME: &str = "kmsfs.header.bak";

/// Path of the header file in `cipherdir`.
pub fn header_path(cipherdir: &Path) -> PathBuf {
    cipherdir.join(HEADER_FILE_NAME)
}

/// Reads and parses `cipherdir/kmsfs.header` (structure and checksum; no
/// KMS). A missing file is "not a kmsfs filesystem: <dir>/kmsfs.header not
/// found"; every other error names the file and the problem.
pub fn read_header(cipherdir: &Path) -> anyhow::Result<UnverifiedHeader> {
    read_header_bytes(cipherdir).map(|(_, h)| h)
}

/// Like [`read_header`], also returning the file's bytes.
pub fn read_header_bytes(cipherdir: &Path) -> anyhow::Result<(Vec<u8>, UnverifiedHeader)> {
    let dir = match std::fs::File::open(cipherdir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => anyhow::bail!(
            "not a kmsfs filesystem: {} not found",
            header_path(cipherdir).display()
        ),
        Err(e) => anyhow::bail!("cannot open {}: {e}", cipherdir.display()),
    };
    read_header_at(std::os::fd::AsFd::as_fd(&dir), cipherdir)
}

/// Reads and parses the header through `dir`, an open descriptor of
/// `cipherdir`: a symlink or FIFO planted in its place is refused, never
/// followed or blocked on.
pub fn read_header_at(
    dir: std::os::fd::BorrowedFd<'_>,
    cipherdir: &Path,
) -> anyhow::Result<(Vec<u8>, UnverifiedHeader)> {
    let path = header_path(cipherdir);
    let bytes = match kmsfs_core::layout::read_header_file(dir) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            anyhow::bail!("not a kmsfs filesystem: {} not found", path.display())
        }
        Err(e) => anyhow::bail!(
            "cannot read {}: {e}; restore it from a backup (kmsfs.header.bak if a rewrap was interrupted)",
            path.display()
        ),
    };
    let hdr = UnverifiedHeader::parse(&bytes).map_err(|e| header_error(&path, &e))?;
    Ok((bytes, hdr))
}

/// An operator-facing error for a header problem in `path`.
fn header_error(path: &Path, e: &HeaderError) -> anyhow::Error {
    let hint = match e {
        HeaderError::ChecksumMismatch
        | HeaderError::Truncated(_)
        | HeaderError::LengthMismatch { .. }
        | HeaderError::Malformed(_) => {
            "; the file is damaged: restore it from a backup (kmsfs.header.bak if a rewrap was interrupted)"
        }
        HeaderError::BadMagic => "; this is not a kmsfs header file",
        _ => "",
    };
    anyhow::anyhow!("{}: {e}{hint}", path.display())
}

/// The Transit `context` for a slot: the filesystem UUID for derived keys.
pub fn slot_context(uses_context: bool, uuid: &[u8; 16]) -> Option<&[u8]> {
    uses_context.then_some(uuid.as_slice())
}

/// Why a filesystem could not be unlocked.
#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    /// The KMS refused or could not be reached; see [`UnlockError::is_retryable`].
    #[error("cannot unlock {}: key '{key}': {error}", cipherdir.display())]
    Kms {
        /// The backing directory.
        cipherdir: PathBuf,
        /// The KMS key of the slot that failed.
        key: String,
        /// What the KMS client reported.
        error: KmsError,
    },
    /// The KMS returned a key, but the header does not authenticate with it
    /// (tampering), or the key is malformed.
    #[error("cannot unlock {}: {}: {detail}", cipherdir.display(), file.display())]
    Header {
        /// The backing directory.
        cipherdir: PathBuf,
        /// The header file.
        file: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No key slot uses a KMS this build supports.
    #[error("cannot unlock {}: no key slot uses a supported KMS", cipherdir.display())]
    NoUsableSlot {
        /// The backing directory.
        cipherdir: PathBuf,
    },
}

impl UnlockError {
    /// True when trying again later may succeed: the KMS was unreachable or
    /// sealed. Permission, missing key, rejected ciphertext and header
    /// authentication errors are final.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            UnlockError::Kms {
                error: KmsError::Unreachable { .. } | KmsError::Sealed { .. },
                ..
            }
        )
    }

    /// The KMS error, when the KMS is what failed.
    pub fn kms_error(&self) -> Option<&KmsError> {
        match self {
            UnlockError::Kms { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Unlocks a filesystem: asks the KMS to unwrap slot 0's wrapped master key
/// (then the other slots, if it fails), passing the filesystem UUID as the
/// Transit context when the slot says the key is derived, derives the
/// filesystem keys and verifies the header MAC. Only the returned [`Header`]
/// is trusted.
///
/// When every slot fails: a header authentication failure wins (it is
/// definitive), then a retryable KMS error (another attempt may succeed),
/// then the first slot's error.
pub async fn unlock(
    client: &VaultClient,
    cipherdir: &Path,
    hdr: UnverifiedHeader,
) -> Result<(Header, FsKeys, MasterKey), UnlockError> {
    let uuid = hdr.unverified().uuid;
    let slots = hdr.unverified().slots.clone();
    let mut errors: Vec<UnlockError> = Vec::new();
    for slot in &slots {
        match slot.kms_type {
            KmsType::VaultTransit => {}
        }
        let ctx = slot_context(slot.uses_context, &uuid);
        let secret = match client.unwrap(&slot.key_name, &slot.wrapped_key, ctx).await {
            Ok(s) => s,
            Err(error) => {
                errors.push(UnlockError::Kms {
                    cipherdir: cipherdir.to_path_buf(),
                    key: slot.key_name.clone(),
                    error,
                });
                continue;
            }
        };
        let master = match MasterKey::from_secret(secret) {
            Ok(m) => m,
            Err(e) => {
                errors.push(UnlockError::Header {
                    cipherdir: cipherdir.to_path_buf(),
                    file: header_path(cipherdir),
                    detail: format!(
                        "key '{}' unwrapped to an invalid master key: {e}",
                        slot.key_name
                    ),
                });
                continue;
            }
        };
        let keys = FsKeys::derive(&master, &uuid);
        match hdr.clone().verify(&keys) {
            Ok(header) => return Ok((header, keys, master)),
            Err(e) => errors.push(UnlockError::Header {
                cipherdir: cipherdir.to_path_buf(),
                file: header_path(cipherdir),
                detail: e.to_string(),
            }),
        }
    }
    let pick = errors
        .iter()
        .position(|e| matches!(e, UnlockError::Header { .. }))
        .or_else(|| errors.iter().position(UnlockError::is_retryable))
        .unwrap_or(0);
    if pick < errors.len() {
        Err(errors.swap_remove(pick))
    } else {
        Err(UnlockError::NoUsableSlot {
            cipherdir: cipherdir.to_path_buf(),
        })
    }
}

/// Replaces `cipherdir/kmsfs.header` atomically with `bytes`
/// (temporary file, fsync, rename, directory fsync; mode [`HEADER_MODE`]).
pub fn write_header(cipherdir: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let path = header_path(cipherdir);
    kmsfs_keystore::write_atomic(&path, bytes, HEADER_MODE)
        .with_context(|| format!("cannot write {}", path.display()))
}
