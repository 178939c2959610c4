//! The filesystem header file (`CIPHERDIR/kmsfs.header`): reading it without
//! the KMS, unlocking it with the KMS, and replacing it safely.
//!
//! The mount code calls exactly [`read_header`] and [`unlock`] (and
//! [`crate::kmsconfig::load_kms_config`]).

use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_core::header::{
    Header, HeaderError, KeySlot, SlotKms, UnverifiedHeader, HEADER_FILE_NAME,
};
use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_keystore::KmsError;

use crate::slotkms::{self, KmsAccess};

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

/// What went wrong with one key slot during an unlock.
#[derive(Debug)]
pub enum SlotFailure {
    /// The KMS refused or could not be reached.
    Kms(KmsError),
    /// The KMS returned a key, but the header does not authenticate with it
    /// (tampering), or the key is malformed.
    Header(String),
    /// The slot was not tried: this configuration cannot open it.
    Skipped(String),
}

impl std::fmt::Display for SlotFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotFailure::Kms(e) => write!(f, "through the configured KMS: {e}"),
            SlotFailure::Header(d) => write!(f, "{d}"),
            SlotFailure::Skipped(d) => write!(f, "not tried: {d}"),
        }
    }
}

/// One slot and why it did not open the filesystem.
#[derive(Debug)]
pub struct SlotAttempt {
    /// The slot's index in the header.
    pub index: usize,
    /// [`slotkms::describe`] of the slot.
    pub slot: String,
    /// What happened.
    pub failure: SlotFailure,
}

/// Why a filesystem could not be unlocked: every slot, and why each failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot unlock {}: {}", cipherdir.display(), summary(attempts))]
pub struct UnlockError {
    /// The backing directory.
    pub cipherdir: PathBuf,
    /// Each slot of the header, in the order tried (untried ones last).
    pub attempts: Vec<SlotAttempt>,
}

fn summary(attempts: &[SlotAttempt]) -> String {
    let tried = attempts
        .iter()
        .filter(|a| !matches!(a.failure, SlotFailure::Skipped(_)))
        .count();
    if attempts.len() == 1 {
        let a = &attempts[0];
        return format!("{}: {}", a.slot, a.failure);
    }
    let head = if tried == 0 {
        "no key slot can be opened with this KMS configuration".to_string()
    } else {
        format!("no key slot opened with this KMS configuration ({tried} tried)")
    };
    let lines: Vec<String> = attempts
        .iter()
        .map(|a| format!("\n  {}: {}", a.slot, a.failure))
        .collect();
    format!("{head}:{}", lines.concat())
}

impl UnlockError {
    /// True when trying again later may succeed: a KMS was unreachable or
    /// sealed or a credential file is not there yet, and no slot failed for a reason that retrying cannot change
    /// (a header that does not authenticate).
    pub fn is_retryable(&self) -> bool {
        let definitive = self
            .attempts
            .iter()
            .any(|a| matches!(a.failure, SlotFailure::Header(_)));
        !definitive
            && self
                .attempts
                .iter()
                .any(|a| matches!(&a.failure, SlotFailure::Kms(e) if e.is_retryable()))
    }

    /// The first KMS error, when a KMS is what failed.
    pub fn kms_error(&self) -> Option<&KmsError> {
        self.attempts.iter().find_map(|a| match &a.failure {
            SlotFailure::Kms(e) => Some(e),
            _ => None,
        })
    }
}

/// An unlocked filesystem: the authenticated header and the keys.
pub struct Unlocked {
    /// The header, authenticated by its MAC.
    pub header: Header,
    /// The derived filesystem keys.
    pub keys: FsKeys,
    /// The master key.
    pub master: MasterKey,
    /// The index of the slot that opened it.
    pub slot: usize,
}

/// Unwraps one key slot through `access`; the master key it holds. A slot
/// of the other KMS type is skipped. A KMIP slot is always given the
/// filesystem UUID as context: the KMIP client binds it only for AES-GCM
/// blobs (which `create` and `slot add` always wrap with it), never for CBC.
pub async fn unwrap_slot(
    access: &KmsAccess,
    slot: &KeySlot,
    uuid: &[u8; 16],
) -> Result<MasterKey, SlotFailure> {
    let kind = access.config().kind;
    let secret = match (&slot.kms, access.kmip()) {
        (SlotKms::Vault(v), None) => {
            let client = access.client_for_slot(v).map_err(SlotFailure::Kms)?;
            let ctx = slot_context(v.uses_context, uuid);
            client
                .unwrap(&v.key_name, &v.wrapped_key, ctx)
                .await
                .map_err(SlotFailure::Kms)?
        }
        (SlotKms::Kmip(k), Some(client)) => client
            .unwrap(&k.key_id, &k.wrapped, Some(uuid.as_slice()))
            .await
            .map_err(SlotFailure::Kms)?,
        _ => {
            return Err(SlotFailure::Skipped(format!(
                "a {} slot; this configuration is for {}",
                slot.kms_type().as_str(),
                kind.as_str()
            )))
        }
    };
    MasterKey::from_secret(secret)
        .map_err(|e| SlotFailure::Header(format!("unwrapped to an invalid master key: {e}")))
}

/// Unlocks a filesystem: asks the configured KMS to unwrap the slots it can
/// reach, best match first ([`slotkms::try_order`]), passing the filesystem
/// UUID as the context (Transit: when the slot says the key is derived;
/// KMIP: bound only by AES-GCM blobs);
/// derives the filesystem keys and verifies the header MAC. The first slot
/// that yields a key under which the header authenticates wins. Only the
/// returned [`Header`] is trusted.
///
/// When no slot opens it, the error lists every slot and why.
pub async fn unlock(
    access: &KmsAccess,
    cipherdir: &Path,
    hdr: UnverifiedHeader,
) -> Result<Unlocked, UnlockError> {
    let uuid = hdr.unverified().uuid;
    let slots = hdr.unverified().slots.clone();
    let order = slotkms::try_order(access.config(), &slots);
    let mut attempts: Vec<SlotAttempt> = Vec::new();
    let mut down: Option<String> = None;
    for &i in &order {
        let slot = &slots[i];
        if let Some(why) = &down {
            // Every slot goes through the same configured KMS: once it is
            // down, asking again for the next slot only adds timeouts.
            attempts.push(SlotAttempt {
                index: i,
                slot: slotkms::describe(i, slot),
                failure: SlotFailure::Skipped(why.clone()),
            });
            continue;
        }
        let failure = match unwrap_slot(access, slot, &uuid).await {
            Ok(master) => {
                let keys = FsKeys::derive(&master, &uuid);
                match hdr.clone().verify(&keys) {
                    Ok(header) => {
                        return Ok(Unlocked {
                            header,
                            keys,
                            master,
                            slot: i,
                        })
                    }
                    Err(e) => {
                        SlotFailure::Header(format!("{}: {e}", header_path(cipherdir).display()))
                    }
                }
            }
            Err(f) => f,
        };
        if let SlotFailure::Kms(KmsError::Unreachable { .. } | KmsError::Sealed { .. }) = &failure {
            down = Some(format!(
                "the configured KMS ({}) is not available",
                access.config().addresses.join(", ")
            ));
        }
        attempts.push(SlotAttempt {
            index: i,
            slot: slotkms::describe(i, slot),
            failure,
        });
    }
    for (i, slot) in slots.iter().enumerate() {
        if !order.contains(&i) {
            attempts.push(SlotAttempt {
                index: i,
                slot: slotkms::describe(i, slot),
                failure: SlotFailure::Skipped(format!(
                    "a {} slot; this configuration is for {}",
                    slot.kms_type().as_str(),
                    access.config().kind.as_str()
                )),
            });
        }
    }
    Err(UnlockError {
        cipherdir: cipherdir.to_path_buf(),
        attempts,
    })
}

/// Replaces `cipherdir/kmsfs.header` atomically with `bytes`
/// (temporary file, fsync, rename, directory fsync; mode [`HEADER_MODE`]).
pub fn write_header(cipherdir: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let path = header_path(cipherdir);
    kmsfs_keystore::write_atomic(&path, bytes, HEADER_MODE)
        .with_context(|| format!("cannot write {}", path.display()))
}
