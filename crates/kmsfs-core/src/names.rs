//! File names and symlink targets.
//!
//! Names are encrypted deterministically with AES-256-SIV, using the parent
//! directory's 16-byte IV (stored in `kmsfs.diriv` inside each backing
//! directory) as associated data: a lookup encrypts the wanted name and opens
//! it directly, and equal names in different directories look unrelated.
//! The plaintext is zero-padded to a multiple of 16 bytes (a name cannot
//! contain NUL, so the padding is unambiguous) to hide exact lengths, and the
//! result is base64url without padding, which never contains `.` and so
//! never collides with kmsfs's own entries.
//!
//! An encoded name longer than 255 bytes (plaintext names over 160 bytes)
//! is stored as `kmsfs.longname.<base64url(SHA-256(encoded))>`, with the full
//! encoded name in a sidecar file of that name plus `.name`.
//!
//! Symlink targets are not looked up, so they get randomised encryption:
//! AES-256-GCM under a random 96-bit nonce, stored as
//! base64url(nonce ‖ ciphertext ‖ tag). The associated data binds a target
//! to its entry ([`SymlinkBinding`]: the directory IV and the backing name),
//! so a target moved to another entry by someone who can write the backing
//! store fails to decrypt; renaming a symlink therefore re-encrypts it.

use crate::keys::FsKeys;
use aes_gcm::aead::{Aead, KeyInit as _, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use aes_siv::siv::Aes256Siv;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Length of a directory IV.
pub const DIR_IV_LEN: usize = 16;
/// Backing file in every directory that holds the directory IV.
pub const DIR_IV_NAME: &str = "kmsfs.diriv";
/// Permission bits of a directory IV file: read-only, as it never changes.
pub const DIR_IV_MODE: u32 = 0o440;
/// Prefix of a hashed long name in a backing directory.
pub const LONGNAME_PREFIX: &str = "kmsfs.longname.";
/// Suffix of the sidecar file that holds a long name's full encoding.
pub const LONGNAME_SUFFIX: &str = ".name";
/// Longest plaintext name accepted (Linux NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
/// Longest encoded name stored directly in a backing directory.
pub const MAX_SHORT_ENCODED_LEN: usize = 255;
/// Longest symlink target accepted: its encoding must fit the backing
/// filesystem's 4095-byte symlink limit.
pub const MAX_SYMLINK_LEN: usize = 3040;

const NAME_PAD: usize = 16;
const GCM_NONCE_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;

/// Why a name or symlink target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, `.`/`..`, or containing `/` or NUL.
    #[error("invalid file name")]
    Invalid,
    /// More than 255 bytes (or a symlink target over the limit).
    #[error("name or symlink target too long")]
    TooLong,
    /// The backing name is not valid base64url.
    #[error("backing name is not valid base64url")]
    BadEncoding,
    /// Decryption failed: the name was tampered with or is from another directory.
    #[error("backing name failed authentication")]
    Tampered,
    /// Decrypted padding is malformed.
    #[error("decrypted name has bad padding")]
    BadPadding,
}

impl NameError {
    /// The errno a filesystem should return.
    pub fn errno(&self) -> i32 {
        match self {
            NameError::Invalid => libc::EINVAL,
            NameError::TooLong => libc::ENAMETOOLONG,
            _ => libc::EIO,
        }
    }
}

/// How a plaintext name is stored in its backing directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncryptedName {
    /// The encoded name is the backing entry name.
    Short(String),
    /// The backing entry is `hashed`; its sidecar `hashed + ".name"` holds `full`.
    Long {
        /// The backing entry name (`kmsfs.longname.…`).
        hashed: String,
        /// The full encoded name, stored in the sidecar.
        full: String,
    },
}

impl EncryptedName {
    /// The name of the backing directory entry.
    pub fn backing_name(&self) -> &str {
        match self {
            EncryptedName::Short(s) => s,
            EncryptedName::Long { hashed, .. } => hashed,
        }
    }
}

/// What an entry found in a backing directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingEntry<'a> {
    /// kmsfs's own metadata (directory IV, filesystem header, sidecars): hide it.
    Internal,
    /// A hashed long name; read its sidecar to decrypt.
    LongName(&'a str),
    /// A directly encoded name.
    Encoded(&'a str),
}

/// A fresh directory IV from the OS CSPRNG.
pub fn new_dir_iv() -> Result<[u8; DIR_IV_LEN], getrandom::Error> {
    let mut iv = [0u8; DIR_IV_LEN];
    getrandom::fill(&mut iv)?;
    Ok(iv)
}

/// Sorts a backing directory entry name into what it holds.
pub fn classify(backing_name: &str) -> BackingEntry<'_> {
    if backing_name.starts_with(LONGNAME_PREFIX) && !backing_name.ends_with(LONGNAME_SUFFIX) {
        BackingEntry::LongName(backing_name)
    } else if backing_name.contains('.') {
        BackingEntry::Internal
    } else {
        BackingEntry::Encoded(backing_name)
    }
}

/// Checks a plaintext name (one path component).
pub fn validate_name(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(NameError::Invalid);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    Ok(())
}

/// Encrypts the name `name` for the directory with IV `dir_iv`.
pub fn encrypt_name(
    keys: &FsKeys,
    dir_iv: &[u8; DIR_IV_LEN],
    name: &[u8],
) -> Result<EncryptedName, NameError> {
    validate_name(name)?;
    let padded_len = name.len().div_ceil(NAME_PAD) * NAME_PAD;
    let mut padded = vec![0u8; padded_len];
    padded[..name.len()].copy_from_slice(name);
    let ct = siv(keys)
        .encrypt([dir_iv.as_slice()], &padded)
        .map_err(|_| NameError::Invalid)?;
    let full = URL_SAFE_NO_PAD.encode(ct);
    if full.len() <= MAX_SHORT_ENCODED_LEN {
        Ok(EncryptedName::Short(full))
    } else {
        Ok(EncryptedName::Long {
            hashed: long_name_for(&full),
            full,
        })
    }
}

/// The hashed backing name for a full encoded name.
pub fn long_name_for(full: &str) -> String {
    let digest = Sha256::digest(full.as_bytes());
    format!("{LONGNAME_PREFIX}{}", URL_SAFE_NO_PAD.encode(digest))
}

/// Decrypts a full encoded name (a short backing name, or a sidecar's contents).
pub fn decrypt_name(
    keys: &FsKeys,
    dir_iv: &[u8; DIR_IV_LEN],
    encoded: &str,
) -> Result<Vec<u8>, NameError> {
    // 255 plaintext bytes pad to 256; with the 16-byte tag that is 272 bytes.
    if encoded.len() > 4 * (MAX_NAME_LEN + 1 + 16) / 3 + 4 {
        return Err(NameError::TooLong);
    }
    let ct = URL_SAFE_NO_PAD
        .decode(encoded.as_bytes())
        .map_err(|_| NameError::BadEncoding)?;
    if ct.len() < 16 + NAME_PAD || (ct.len() - 16) % NAME_PAD != 0 {
        return Err(NameError::BadEncoding);
    }
    let mut plain = siv(keys)
        .decrypt([dir_iv.as_slice()], &ct)
        .map_err(|_| NameError::Tampered)?;
    let len = plain.iter().position(|&b| b == 0).unwrap_or(plain.len());
    if plain[len..].iter().any(|&b| b != 0) || plain.len() - len >= NAME_PAD {
        return Err(NameError::BadPadding);
    }
    plain.truncate(len);
    validate_name(&plain).map_err(|_| NameError::BadPadding)?;
    Ok(plain)
}

fn siv(keys: &FsKeys) -> Aes256Siv {
    Aes256Siv::new(aes_siv::Key::<Aes256Siv>::from_slice(keys.names_key()))
}

fn gcm(keys: &FsKeys) -> Aes256Gcm {
    Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(keys.symlinks_key()))
}

/// Associated data label of symlink targets (format version 2).
const SYMLINK_AD_LABEL: &[u8] = b"kmsfs symlink";

/// The entry a symlink target belongs to: the IV of its directory and its
/// backing name (for a long name, the hashed `kmsfs.longname.…` entry name,
/// which commits to the full encoded name through SHA-256).
#[derive(Debug, Clone, Copy)]
pub struct SymlinkBinding<'a> {
    /// IV of the directory holding the symlink.
    pub dir_iv: &'a [u8; DIR_IV_LEN],
    /// The symlink's backing entry name.
    pub backing_name: &'a [u8],
}

impl SymlinkBinding<'_> {
    fn associated_data(&self) -> Vec<u8> {
        let mut ad =
            Vec::with_capacity(SYMLINK_AD_LABEL.len() + DIR_IV_LEN + self.backing_name.len());
        ad.extend_from_slice(SYMLINK_AD_LABEL);
        ad.extend_from_slice(self.dir_iv);
        ad.extend_from_slice(self.backing_name);
        ad
    }
}

/// Encrypts a symlink target for the entry `binding` (randomised: equal
/// targets encrypt differently).
pub fn encrypt_symlink(
    keys: &FsKeys,
    target: &[u8],
    binding: SymlinkBinding<'_>,
) -> Result<String, NameError> {
    if target.is_empty() || target.contains(&0) {
        return Err(NameError::Invalid);
    }
    if target.len() > MAX_SYMLINK_LEN {
        return Err(NameError::TooLong);
    }
    let mut nonce = [0u8; GCM_NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| NameError::Invalid)?;
    let ad = binding.associated_data();
    let ct = gcm(keys)
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: target,
                aad: &ad,
            },
        )
        .map_err(|_| NameError::Invalid)?;
    let mut out = Vec::with_capacity(GCM_NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(URL_SAFE_NO_PAD.encode(out))
}

/// Decrypts the stored target of the symlink entry `binding`; a target
/// stored for another entry fails with [`NameError::Tampered`].
pub fn decrypt_symlink(
    keys: &FsKeys,
    stored: &[u8],
    binding: SymlinkBinding<'_>,
) -> Result<Vec<u8>, NameError> {
    let raw = URL_SAFE_NO_PAD
        .decode(stored)
        .map_err(|_| NameError::BadEncoding)?;
    if raw.len() < GCM_NONCE_LEN + GCM_TAG_LEN {
        return Err(NameError::BadEncoding);
    }
    let (nonce, ct) = raw.split_at(GCM_NONCE_LEN);
    let ad = binding.associated_data();
    gcm(keys)
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &ad })
        .map_err(|_| NameError::Tampered)
}

/// The plaintext length of a symlink target stored in `stored_len` bytes,
/// without decrypting it (`None` for a length no target encodes to).
pub fn symlink_target_len(stored_len: u64) -> Option<u64> {
    // base64url without padding: 4 characters per 3 bytes, and a final
    // group of 2 or 3 characters for 1 or 2 bytes; 1 left over is invalid.
    let raw = match stored_len % 4 {
        0 => stored_len / 4 * 3,
        2 => stored_len / 4 * 3 + 1,
        3 => stored_len / 4 * 3 + 2,
        _ => return None,
    };
    raw.checked_sub((GCM_NONCE_LEN + GCM_TAG_LEN) as u64)
        .filter(|&n| n > 0)
}
