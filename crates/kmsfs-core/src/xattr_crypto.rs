//! Extended attributes: how a name and value are stored in the backing
//! file's own extended attributes (docs/format.md section 8).
//!
//! Every backing inode that holds encrypted attributes has a random 16-byte
//! *attribute id* in the backing attribute `user.kmsfs.id`, made on the
//! first `setxattr`. Each attribute is then stored as
//!
//! ```text
//! user.kmsfs.x.<base64url(HMAC-SHA256(xattr-names key, "kmsfs xattr name" ‖ id ‖ name)[..24])>
//!   = nonce (12) ‖ AES-256-GCM(xattr-values key, nonce,
//!         plaintext = len(name) (1) ‖ name ‖ value,
//!         associated data = "kmsfs xattr value" ‖ id ‖ backing name)
//! ```
//!
//! The backing name is deterministic, so a lookup computes it directly; it
//! hides the name, and equal names on two inodes look unrelated because
//! the id differs. The value's associated data binds it to the inode's id
//! and to its backing name (itself bound to the plaintext name, which the
//! plaintext repeats and `open` compares): a value moved to another name
//! or to another inode fails to authenticate.
//!
//! A record longer than [`BACKING_PART_MAX`] (a value near the 64 KiB
//! limit plus the name and 28 bytes of overhead) is cut into parts: part 0
//! under the backing name, part `k` under `<backing name>.<k>`. The tag
//! covers the whole record, so a missing, stale or foreign part is
//! detected.

use crate::keys::FsKeys;
use aes_gcm::aead::{Aead, KeyInit as _, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Backing attribute that holds the inode's attribute id.
pub const XATTR_ID_NAME: &str = "user.kmsfs.id";
/// Length of an attribute id.
pub const XATTR_ID_LEN: usize = 16;
/// Prefix of every backing attribute that holds an encrypted attribute.
pub const XATTR_PREFIX: &str = "user.kmsfs.x.";
/// Longest attribute name (Linux `XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME_LEN: usize = 255;
/// Largest attribute value (Linux `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE_LEN: usize = 65536;
/// Largest backing attribute value written: Linux's own limit.
pub const BACKING_PART_MAX: usize = 65536;
/// Most parts a record can need (a 255-byte name and a 64 KiB value).
pub const MAX_PARTS: usize =
    (NONCE_LEN + 1 + MAX_XATTR_NAME_LEN + MAX_XATTR_VALUE_LEN + TAG_LEN).div_ceil(BACKING_PART_MAX);

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const NAME_TAG_LEN: usize = 24;
const NAME_LABEL: &[u8] = b"kmsfs xattr name";
const VALUE_LABEL: &[u8] = b"kmsfs xattr value";

/// An inode's attribute id.
pub type XattrId = [u8; XATTR_ID_LEN];

/// Why an attribute could not be stored or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XattrError {
    /// Empty name, or a name containing NUL.
    #[error("invalid extended attribute name")]
    InvalidName,
    /// Name over 255 bytes.
    #[error("extended attribute name too long")]
    NameTooLong,
    /// Value over 64 KiB.
    #[error("extended attribute value too large")]
    ValueTooLarge,
    /// The stored record does not authenticate (damaged, planted, or moved
    /// from another name or inode).
    #[error("stored extended attribute failed authentication")]
    Tampered,
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

impl XattrError {
    /// The errno a filesystem should return.
    pub fn errno(&self) -> i32 {
        match self {
            XattrError::InvalidName => libc::EINVAL,
            XattrError::NameTooLong => libc::ERANGE,
            XattrError::ValueTooLarge => libc::E2BIG,
            XattrError::Tampered | XattrError::Random => libc::EIO,
        }
    }
}

/// What a backing attribute name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingXattr<'a> {
    /// The attribute id.
    Id,
    /// Part 0 of an encrypted attribute (the name to list and look up).
    Entry(&'a str),
    /// A continuation part of an encrypted attribute.
    Part,
    /// Anything else: not kmsfs's, never shown.
    Foreign,
}

/// Sorts a backing attribute name.
pub fn classify(backing: &str) -> BackingXattr<'_> {
    if backing == XATTR_ID_NAME {
        return BackingXattr::Id;
    }
    match backing.strip_prefix(XATTR_PREFIX) {
        Some(rest) if rest.contains('.') => BackingXattr::Part,
        Some(rest) if !rest.is_empty() => BackingXattr::Entry(backing),
        _ => BackingXattr::Foreign,
    }
}

/// A fresh attribute id from the OS CSPRNG.
pub fn new_id() -> Result<XattrId, XattrError> {
    let mut id = [0u8; XATTR_ID_LEN];
    getrandom::fill(&mut id).map_err(|_| XattrError::Random)?;
    Ok(id)
}

/// Checks a plaintext attribute name.
pub fn validate_name(name: &[u8]) -> Result<(), XattrError> {
    if name.is_empty() || name.contains(&0) {
        return Err(XattrError::InvalidName);
    }
    if name.len() > MAX_XATTR_NAME_LEN {
        return Err(XattrError::NameTooLong);
    }
    Ok(())
}

/// The backing attribute name of `name` on the inode with attribute id `id`.
pub fn backing_name(keys: &FsKeys, id: &XattrId, name: &[u8]) -> Result<String, XattrError> {
    validate_name(name)?;
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(keys.xattr_names_key())
        .map_err(|_| XattrError::InvalidName)?;
    m.update(NAME_LABEL);
    m.update(id);
    m.update(name);
    let tag = m.finalize().into_bytes();
    Ok(format!(
        "{XATTR_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(&tag[..NAME_TAG_LEN])
    ))
}

/// The backing name of part `k` (≥ 1) of the record stored under `base`.
pub fn part_name(base: &str, k: usize) -> String {
    format!("{base}.{k}")
}

fn value_ad(id: &XattrId, backing: &str) -> Vec<u8> {
    let mut ad = Vec::with_capacity(VALUE_LABEL.len() + XATTR_ID_LEN + backing.len());
    ad.extend_from_slice(VALUE_LABEL);
    ad.extend_from_slice(id);
    ad.extend_from_slice(backing.as_bytes());
    ad
}

fn gcm(keys: &FsKeys) -> Aes256Gcm {
    Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(
        keys.xattr_values_key(),
    ))
}

/// Encrypts `name` = `value` for the inode with id `id`; returns the backing
/// name and the record (cut into parts with [`parts`]).
pub fn seal(
    keys: &FsKeys,
    id: &XattrId,
    name: &[u8],
    value: &[u8],
) -> Result<(String, Vec<u8>), XattrError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| XattrError::Random)?;
    seal_with_nonce(keys, id, name, value, &nonce)
}

fn seal_with_nonce(
    keys: &FsKeys,
    id: &XattrId,
    name: &[u8],
    value: &[u8],
    nonce: &[u8; NONCE_LEN],
) -> Result<(String, Vec<u8>), XattrError> {
    let backing = backing_name(keys, id, name)?;
    if value.len() > MAX_XATTR_VALUE_LEN {
        return Err(XattrError::ValueTooLarge);
    }
    let mut plain = Vec::with_capacity(1 + name.len() + value.len());
    plain.push(name.len() as u8);
    plain.extend_from_slice(name);
    plain.extend_from_slice(value);
    let ad = value_ad(id, &backing);
    let ct = gcm(keys)
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: &plain,
                aad: &ad,
            },
        )
        .map_err(|_| XattrError::ValueTooLarge)?;
    let mut record = Vec::with_capacity(NONCE_LEN + ct.len());
    record.extend_from_slice(nonce);
    record.extend_from_slice(&ct);
    Ok((backing, record))
}

/// The parts a record is stored as, part 0 first.
pub fn parts(record: &[u8]) -> impl Iterator<Item = &[u8]> {
    record.chunks(BACKING_PART_MAX)
}

/// Decrypts the record stored under `backing` on the inode with id `id`;
/// returns the plaintext name and value.
pub fn open(
    keys: &FsKeys,
    id: &XattrId,
    backing: &str,
    record: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), XattrError> {
    if record.len() < NONCE_LEN + TAG_LEN + 2 {
        return Err(XattrError::Tampered);
    }
    let (nonce, ct) = record.split_at(NONCE_LEN);
    let ad = value_ad(id, backing);
    let mut plain = gcm(keys)
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &ad })
        .map_err(|_| XattrError::Tampered)?;
    let name_len = usize::from(plain[0]);
    if name_len == 0 || plain.len() < 1 + name_len {
        return Err(XattrError::Tampered);
    }
    let value = plain.split_off(1 + name_len);
    let name = plain[1..].to_vec();
    // The backing name must be the one this name maps to: a record sealed
    // under one name and its backing name copied to another is refused.
    if backing_name(keys, id, &name)? != backing || value.len() > MAX_XATTR_VALUE_LEN {
        return Err(XattrError::Tampered);
    }
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;

    fn keys() -> FsKeys {
        FsKeys::derive(&MasterKey::generate().unwrap(), &[7; 16])
    }

    #[test]
    fn round_trip_including_the_largest_name_and_value() {
        let k = keys();
        let id = new_id().unwrap();
        let name = vec![b'n'; MAX_XATTR_NAME_LEN];
        let value = vec![0xa5u8; MAX_XATTR_VALUE_LEN];
        let (backing, record) = seal(&k, &id, &name, &value).unwrap();
        assert!(backing.len() <= 255);
        assert_eq!(classify(&backing), BackingXattr::Entry(&backing));
        let cut: Vec<&[u8]> = parts(&record).collect();
        assert_eq!(cut.len(), MAX_PARTS);
        assert!(cut.iter().all(|p| p.len() <= BACKING_PART_MAX));
        assert_eq!(classify(&part_name(&backing, 1)), BackingXattr::Part);
        assert_eq!(
            open(&k, &id, &backing, &cut.concat()).unwrap(),
            (name, value)
        );
        // An empty value is a value.
        let (b, r) = seal(&k, &id, b"user.e", b"").unwrap();
        assert_eq!(open(&k, &id, &b, &r).unwrap().1, b"");
    }

    #[test]
    fn names_are_deterministic_per_inode_and_hidden() {
        let k = keys();
        let (a, b) = (new_id().unwrap(), new_id().unwrap());
        let n = backing_name(&k, &a, b"user.secret").unwrap();
        assert_eq!(n, backing_name(&k, &a, b"user.secret").unwrap());
        assert_ne!(n, backing_name(&k, &b, b"user.secret").unwrap());
        assert!(!n.contains("secret"));
        let (_, r1) = seal(&k, &a, b"user.secret", b"v").unwrap();
        let (_, r2) = seal(&k, &a, b"user.secret", b"v").unwrap();
        assert_ne!(r1, r2, "values are encrypted with a random nonce");
    }

    #[test]
    fn a_value_moved_to_another_name_or_inode_or_cut_fails() {
        let k = keys();
        let (a, b) = (new_id().unwrap(), new_id().unwrap());
        let (backing, record) = seal(&k, &a, b"user.one", b"value").unwrap();
        let other = backing_name(&k, &a, b"user.two").unwrap();
        assert_eq!(open(&k, &a, &other, &record), Err(XattrError::Tampered));
        assert_eq!(open(&k, &b, &backing, &record), Err(XattrError::Tampered));
        let mut flipped = record.clone();
        flipped[NONCE_LEN + 1] ^= 1;
        assert_eq!(open(&k, &a, &backing, &flipped), Err(XattrError::Tampered));
        assert_eq!(
            open(&k, &a, &backing, &record[..record.len() - 1]),
            Err(XattrError::Tampered)
        );
        assert_eq!(open(&k, &a, &backing, &[]), Err(XattrError::Tampered));
        // Another filesystem's key.
        assert_eq!(
            open(&keys(), &a, &backing, &record),
            Err(XattrError::Tampered)
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The example docs/format.md section 8 gives: the worked example's
    /// master key (00 01 .. 1f) and UUID, attribute id 00 01 .. 0f,
    /// `user.test` = `kmsfs` under the nonce twelve `cc` bytes.
    #[test]
    fn worked_example() {
        let master: Vec<u8> = (0u8..32).collect();
        let m = MasterKey::from_secret(crate::secret::SecretBytes::new(master)).unwrap();
        let uuid = [
            0x6b, 0x6d, 0x73, 0x66, 0x73, 0x2d, 0x40, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x01,
        ];
        let k = FsKeys::derive(&m, &uuid);
        let id: XattrId = core::array::from_fn(|i| i as u8);
        let (name, record) = seal_with_nonce(&k, &id, b"user.test", b"kmsfs", &[0xcc; 12]).unwrap();
        println!("{name}\n{}", hex(&record));
        let doc = include_str!("../../../docs/format.md");
        assert!(
            doc.contains(&format!("`{name}`")),
            "backing name {name} not in docs/format.md"
        );
        assert!(
            doc.contains(&hex(&record)),
            "record {} not in docs/format.md",
            hex(&record)
        );
        assert_eq!(open(&k, &id, &name, &record).unwrap().1, b"kmsfs");
    }

    #[test]
    fn limits_and_classification() {
        let k = keys();
        let id = new_id().unwrap();
        assert_eq!(
            backing_name(&k, &id, &[b'a'; 256]),
            Err(XattrError::NameTooLong)
        );
        assert_eq!(backing_name(&k, &id, b""), Err(XattrError::InvalidName));
        assert_eq!(
            seal(&k, &id, b"user.a", &vec![0; MAX_XATTR_VALUE_LEN + 1]).map(drop),
            Err(XattrError::ValueTooLarge)
        );
        assert_eq!(classify(XATTR_ID_NAME), BackingXattr::Id);
        assert_eq!(classify("user.other"), BackingXattr::Foreign);
        assert_eq!(classify("security.selinux"), BackingXattr::Foreign);
        assert_eq!(classify(XATTR_PREFIX), BackingXattr::Foreign);
    }
}
