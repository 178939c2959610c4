//! The filesystem header: `kmsfs.header` at the root of the backing directory.
//!
//! It carries everything needed to mount except the master key itself: the
//! format version, feature flags, the filesystem UUID, the cipher choices
//! and one or more key slots, each a copy of the master key wrapped by a KMS.
//! A SHA-256 checksum detects accidental damage without the KMS; an
//! HMAC-SHA256 under a subkey of the master key detects tampering once the
//! key is unwrapped, and covers every slot: a slot cannot be added, removed
//! or changed without the master key. See `docs/format.md` for the byte
//! layout; the slot encoding lives in [`crate::slots`].

use crate::keys::FsKeys;
pub use crate::slots::{KeySlot, KmipSlot, KmsType, SlotKms, VaultSlot};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Name of the header file in the backing root.
pub const HEADER_FILE_NAME: &str = "kmsfs.header";
/// First eight bytes of every header.
pub const HEADER_MAGIC: [u8; 8] = *b"KMSFSHDR";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u16 = 3;
/// Feature bits this build understands (none are defined in version 3).
pub const KNOWN_FEATURES: u64 = 0;
/// Most key slots a header may carry.
pub const MAX_SLOTS: usize = 8;
/// Largest header accepted.
pub const MAX_HEADER_LEN: usize = 16 * 1024;

/// Contents cipher id: AES-256-XTS, 4096-byte units, per-file keys.
pub const CONTENTS_AES256_XTS: u8 = 1;
/// Names cipher id: AES-256-SIV, zero-padded to 16, base64url, long-name files.
pub const NAMES_AES256_SIV: u8 = 1;
/// KDF id: HKDF-SHA256 salted with the UUID.
pub const KDF_HKDF_SHA256: u8 = 1;
/// log2 of the data unit size.
pub const UNIT_LOG2: u8 = 12;

const FIXED_LEN: usize = 52;
const CHECKSUM_LEN: usize = 32;
const MAC_LEN: usize = 32;

/// The decoded filesystem header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Feature bits (all understood by this build).
    pub features: u64,
    /// The filesystem UUID.
    pub uuid: [u8; 16],
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
    /// Key slots, at least one.
    pub slots: Vec<KeySlot>,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Shorter than the fixed part plus trailer.
    #[error("header is truncated ({0} bytes)")]
    Truncated(usize),
    /// Longer than any header this build writes.
    #[error("header is too large ({0} bytes)")]
    TooLarge(usize),
    /// Not a kmsfs header.
    #[error("not a kmsfs header (bad magic)")]
    BadMagic,
    /// A format version this build does not know.
    #[error("unsupported format version {0} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    /// Stored length disagrees with the file's length.
    #[error("header length field says {declared} bytes but the file has {actual}")]
    LengthMismatch {
        /// Length recorded in the header.
        declared: usize,
        /// Length of the bytes given.
        actual: usize,
    },
    /// The SHA-256 checksum does not match: the file is damaged.
    #[error("header checksum mismatch: the header file is corrupt")]
    ChecksumMismatch,
    /// Feature bits this build does not understand.
    #[error("header uses unknown feature flags {0:#x}; upgrade kmsfs")]
    UnknownFeatures(u64),
    /// A cipher, KDF or KMS id this build does not know.
    #[error("unsupported {field} id {value}")]
    Unsupported {
        /// Which field.
        field: &'static str,
        /// The value found.
        value: u8,
    },
    /// A structural problem inside the header.
    #[error("malformed header: {0}")]
    Malformed(&'static str),
    /// Two key slots share a label.
    #[error("two key slots are labelled '{0}'")]
    DuplicateLabel(String),
    /// The HMAC does not verify under the unwrapped key.
    #[error("header authentication failed: the header was tampered with, or the KMS returned a key that is not this filesystem's")]
    BadMac,
}

impl Header {
    /// Encodes the header and seals it with the header MAC subkey of `keys`.
    pub fn encode(&self, keys: &FsKeys) -> Result<Vec<u8>, HeaderError> {
        if self.slots.is_empty() {
            return Err(HeaderError::Malformed("no key slots"));
        }
        if self.slots.len() > MAX_SLOTS {
            return Err(HeaderError::Malformed("too many key slots"));
        }
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&HEADER_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]); // total length, filled in below
        out.extend_from_slice(&self.features.to_le_bytes());
        out.extend_from_slice(&self.uuid);
        out.extend_from_slice(&self.created.to_le_bytes());
        out.extend_from_slice(&[
            CONTENTS_AES256_XTS,
            UNIT_LOG2,
            NAMES_AES256_SIV,
            KDF_HKDF_SHA256,
            self.slots.len() as u8,
            0,
            0,
            0,
        ]);
        debug_assert_eq!(out.len(), FIXED_LEN);
        crate::slots::check_labels_unique(&self.slots)?;
        for slot in &self.slots {
            slot.encode_into(&mut out)?;
        }
        let total = out.len() + CHECKSUM_LEN + MAC_LEN;
        if total > MAX_HEADER_LEN {
            return Err(HeaderError::TooLarge(total));
        }
        out[10..12].copy_from_slice(&(total as u16).to_le_bytes());
        let checksum = Sha256::digest(&out);
        let mac = mac(keys, &out);
        out.extend_from_slice(&checksum);
        out.extend_from_slice(&mac);
        Ok(out)
    }
}

/// A header whose structure and checksum are sound but whose MAC has not
/// been checked yet (that needs the unwrapped master key).
#[derive(Debug, Clone)]
pub struct UnverifiedHeader {
    header: Header,
    body: Vec<u8>,
    mac: [u8; MAC_LEN],
}

impl UnverifiedHeader {
    /// Parses header bytes; checks magic, version, length, checksum, features and ids.
    pub fn parse(bytes: &[u8]) -> Result<Self, HeaderError> {
        if bytes.len() > MAX_HEADER_LEN {
            return Err(HeaderError::TooLarge(bytes.len()));
        }
        if bytes.len() < 8 || bytes[..8] != HEADER_MAGIC {
            return Err(if bytes.len() < 8 {
                HeaderError::Truncated(bytes.len())
            } else {
                HeaderError::BadMagic
            });
        }
        if bytes.len() < FIXED_LEN + CHECKSUM_LEN + MAC_LEN {
            return Err(HeaderError::Truncated(bytes.len()));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let declared = usize::from(u16::from_le_bytes([bytes[10], bytes[11]]));
        if declared != bytes.len() {
            return Err(HeaderError::LengthMismatch {
                declared,
                actual: bytes.len(),
            });
        }
        let body_len = bytes.len() - CHECKSUM_LEN - MAC_LEN;
        let (body, trailer) = bytes.split_at(body_len);
        if Sha256::digest(body).as_slice() != &trailer[..CHECKSUM_LEN] {
            return Err(HeaderError::ChecksumMismatch);
        }
        let mut r = Reader { buf: body, pos: 12 };
        let features = u64::from_le_bytes(r.array()?);
        if features & !KNOWN_FEATURES != 0 {
            return Err(HeaderError::UnknownFeatures(features & !KNOWN_FEATURES));
        }
        let uuid: [u8; 16] = r.array()?;
        let created = i64::from_le_bytes(r.array()?);
        let [contents, unit_log2, names, kdf, nslots, r0, r1, r2] = r.array()?;
        for (field, value, want) in [
            ("contents cipher", contents, CONTENTS_AES256_XTS),
            ("data unit size (log2)", unit_log2, UNIT_LOG2),
            ("names cipher", names, NAMES_AES256_SIV),
            ("key derivation", kdf, KDF_HKDF_SHA256),
        ] {
            if value != want {
                return Err(HeaderError::Unsupported { field, value });
            }
        }
        if [r0, r1, r2] != [0, 0, 0] {
            return Err(HeaderError::Malformed("reserved bytes are not zero"));
        }
        let nslots = usize::from(nslots);
        if nslots == 0 {
            return Err(HeaderError::Malformed("no key slots"));
        }
        if nslots > MAX_SLOTS {
            return Err(HeaderError::Malformed("too many key slots"));
        }
        let mut slots = Vec::with_capacity(nslots);
        for _ in 0..nslots {
            slots.push(KeySlot::decode(&mut r)?);
        }
        crate::slots::check_labels_unique(&slots)?;
        if r.pos != body.len() {
            return Err(HeaderError::Malformed("trailing bytes after the key slots"));
        }
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&trailer[CHECKSUM_LEN..]);
        Ok(UnverifiedHeader {
            header: Header {
                features,
                uuid,
                created,
                slots,
            },
            body: body.to_vec(),
            mac,
        })
    }

    /// The header's fields, not yet authenticated: fine for display and for
    /// asking the KMS to unwrap, never for trusting.
    pub fn unverified(&self) -> &Header {
        &self.header
    }

    /// Checks the MAC with the keys derived from the unwrapped master key.
    pub fn verify(self, keys: &FsKeys) -> Result<Header, HeaderError> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(keys.header_mac_key())
            .map_err(|_| HeaderError::BadMac)?;
        m.update(&self.body);
        m.verify_slice(&self.mac).map_err(|_| HeaderError::BadMac)?;
        Ok(self.header)
    }
}

fn mac(keys: &FsKeys, body: &[u8]) -> [u8; MAC_LEN] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(keys.header_mac_key())
        .expect("HMAC accepts any key length");
    m.update(body);
    m.finalize().into_bytes().into()
}

/// A bounds-checked cursor over header bytes.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl Reader<'_> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&[u8], HeaderError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(HeaderError::Malformed(
                "a field runs past the end of the header",
            ))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], HeaderError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}
