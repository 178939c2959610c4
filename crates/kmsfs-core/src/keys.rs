//! The key hierarchy: one master key, one HKDF subkey per purpose.
//!
//! ```text
//! master key (32 random bytes, the only key the KMS wraps)
//!   └─ PRK = HKDF-Extract(salt = filesystem UUID, ikm = master key)
//!        ├─ "kmsfs v1 contents"   → 32-byte contents root
//!        │     └─ per file: HKDF-Expand(root, "kmsfs v1 file" ‖ nonce) → 64-byte XTS key
//!        ├─ "kmsfs v1 names"      → 64-byte AES-256-SIV key
//!        ├─ "kmsfs v1 symlinks"   → 32-byte AES-256-GCM key
//!        ├─ "kmsfs v1 header mac" → 32-byte HMAC-SHA256 key
//!        ├─ "kmsfs v1 key check"  → 16-byte key check value (not a key)
//!        ├─ "kmsfs v1 snapshot manifest" → 32-byte HMAC-SHA256 key of snapshot manifests
//!        ├─ "kmsfs v1 xattr names"  → 32-byte HMAC-SHA256 key (extended attribute names)
//!        └─ "kmsfs v1 xattr values" → 32-byte AES-256-GCM key (extended attribute values)
//! ```
//!
//! Salting with the UUID means two filesystems that somehow shared a master
//! key would still share no subkey.

use crate::secret::SecretBytes;
use crate::xts::{Xts256, XtsError};
use hkdf::Hkdf;
use sha2::Sha256;

/// Length of the filesystem master key in bytes.
pub const MASTER_KEY_LEN: usize = 32;
/// Length of a per-file nonce in bytes.
pub const FILE_NONCE_LEN: usize = 16;

const LABEL_CONTENTS: &[u8] = b"kmsfs v1 contents";
const LABEL_FILE: &[u8] = b"kmsfs v1 file";
const LABEL_NAMES: &[u8] = b"kmsfs v1 names";
const LABEL_SYMLINKS: &[u8] = b"kmsfs v1 symlinks";
const LABEL_HEADER_MAC: &[u8] = b"kmsfs v1 header mac";
const LABEL_KEY_CHECK: &[u8] = b"kmsfs v1 key check";
const LABEL_SNAPSHOT_MANIFEST: &[u8] = b"kmsfs v1 snapshot manifest";
const LABEL_XATTR_NAMES: &[u8] = b"kmsfs v1 xattr names";
const LABEL_XATTR_VALUES: &[u8] = b"kmsfs v1 xattr values";

/// Length of the key check value in bytes.
pub const KEY_CHECK_LEN: usize = 16;

/// The filesystem master key: the one secret the KMS wraps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKey(SecretBytes);

/// Why a key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    /// An unwrapped key had the wrong length (a wrong or foreign KMS ciphertext).
    #[error("master key must be {MASTER_KEY_LEN} bytes, got {0}")]
    BadLength(usize),
    /// A derived XTS key was refused (cannot happen with HKDF output in practice).
    #[error("derived contents key refused: {0}")]
    Xts(#[from] XtsError),
}

impl MasterKey {
    /// A fresh master key from the OS CSPRNG.
    pub fn generate() -> Result<Self, KeyError> {
        SecretBytes::random(MASTER_KEY_LEN)
            .map(MasterKey)
            .map_err(KeyError::Random)
    }

    /// Adopts unwrapped key bytes, checking their length.
    pub fn from_secret(bytes: SecretBytes) -> Result<Self, KeyError> {
        if bytes.len() != MASTER_KEY_LEN {
            return Err(KeyError::BadLength(bytes.len()));
        }
        Ok(MasterKey(bytes))
    }

    /// The raw key, for handing to the KMS to wrap.
    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }
}

/// Every subkey a mounted filesystem needs, derived once at mount.
#[derive(Debug)]
pub struct FsKeys {
    contents_root: SecretBytes,
    names: SecretBytes,
    symlinks: SecretBytes,
    header_mac: SecretBytes,
    snapshot_manifest: SecretBytes,
    xattr_names: SecretBytes,
    xattr_values: SecretBytes,
    key_check: [u8; KEY_CHECK_LEN],
}

impl FsKeys {
    /// Derives all subkeys of the filesystem `uuid` from its master key.
    pub fn derive(master: &MasterKey, uuid: &[u8; 16]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(uuid), master.expose());
        let expand = |label: &[u8], len: usize| {
            let mut out = SecretBytes::zeroed(len);
            // Lengths here are at most 64 bytes, far below HKDF's 255*32 limit.
            hk.expand(label, out.expose_mut())
                .expect("HKDF output length is within limits");
            out
        };
        FsKeys {
            contents_root: expand(LABEL_CONTENTS, 32),
            names: expand(LABEL_NAMES, 64),
            symlinks: expand(LABEL_SYMLINKS, 32),
            header_mac: expand(LABEL_HEADER_MAC, 32),
            snapshot_manifest: expand(LABEL_SNAPSHOT_MANIFEST, 32),
            xattr_names: expand(LABEL_XATTR_NAMES, 32),
            xattr_values: expand(LABEL_XATTR_VALUES, 32),
            key_check: {
                let mut kcv = [0u8; KEY_CHECK_LEN];
                hk.expand(LABEL_KEY_CHECK, &mut kcv)
                    .expect("HKDF output length is within limits");
                kcv
            },
        }
    }

    /// The key check value: identifies the master key (and UUID) without
    /// revealing it, so a host can recognise a key it has seen before. It
    /// is an HKDF output under its own label, independent of every subkey,
    /// and so not secret.
    pub fn key_check(&self) -> [u8; KEY_CHECK_LEN] {
        self.key_check
    }

    /// The AES-256-XTS cipher of the file with this nonce (fscrypt v2 style:
    /// one key per file, so equal plaintexts in two files never match).
    pub fn file_cipher(&self, nonce: &[u8; FILE_NONCE_LEN]) -> Result<Xts256, KeyError> {
        let hk = Hkdf::<Sha256>::from_prk(self.contents_root.expose())
            .expect("contents root is a full-length PRK");
        let mut info = [0u8; LABEL_FILE.len() + FILE_NONCE_LEN];
        info[..LABEL_FILE.len()].copy_from_slice(LABEL_FILE);
        info[LABEL_FILE.len()..].copy_from_slice(nonce);
        let mut key = SecretBytes::zeroed(64);
        hk.expand(&info, key.expose_mut())
            .expect("HKDF output length is within limits");
        let key: &[u8; 64] = key
            .expose()
            .try_into()
            .expect("buffer was allocated with 64 bytes");
        Ok(Xts256::new(key)?)
    }

    /// The 64-byte AES-256-SIV key for file names.
    pub(crate) fn names_key(&self) -> &[u8] {
        self.names.expose()
    }

    /// The 32-byte AES-256-GCM key for symlink targets.
    pub(crate) fn symlinks_key(&self) -> &[u8] {
        self.symlinks.expose()
    }

    /// The 32-byte HMAC-SHA256 key that authenticates a snapshot manifest
    /// (`kmsfs snapshot`): only a holder of the master key can write a
    /// manifest a restore accepts, and it is independent of every other
    /// subkey, so the snapshot code never touches the contents or name keys.
    pub fn snapshot_manifest_key(&self) -> &[u8] {
        self.snapshot_manifest.expose()
    }

    /// The 32-byte HMAC-SHA256 key that names extended attributes.
    pub(crate) fn xattr_names_key(&self) -> &[u8] {
        self.xattr_names.expose()
    }

    /// The 32-byte AES-256-GCM key of extended attribute values.
    pub(crate) fn xattr_values_key(&self) -> &[u8] {
        self.xattr_values.expose()
    }

    /// The 32-byte HMAC-SHA256 key that authenticates the filesystem header.
    pub(crate) fn header_mac_key(&self) -> &[u8] {
        self.header_mac.expose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subkeys_are_distinct_and_uuid_bound() {
        let m = MasterKey::generate().unwrap();
        let a = FsKeys::derive(&m, &[1; 16]);
        let b = FsKeys::derive(&m, &[2; 16]);
        let all = [
            a.contents_root.expose(),
            &a.names.expose()[..32],
            &a.names.expose()[32..],
            a.symlinks.expose(),
            a.header_mac.expose(),
            a.snapshot_manifest.expose(),
            a.xattr_names.expose(),
            a.xattr_values.expose(),
        ];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x, y);
            }
        }
        assert_ne!(a.header_mac.expose(), b.header_mac.expose());
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn key_check_is_deterministic_and_bound_to_key_and_uuid() {
        let m = MasterKey::generate().unwrap();
        let same = MasterKey::from_secret(SecretBytes::from_slice(m.expose())).unwrap();
        let other = MasterKey::generate().unwrap();
        let a = FsKeys::derive(&m, &[1; 16]);
        assert_eq!(a.key_check(), FsKeys::derive(&same, &[1; 16]).key_check());
        assert_ne!(a.key_check(), FsKeys::derive(&other, &[1; 16]).key_check());
        assert_ne!(a.key_check(), FsKeys::derive(&m, &[2; 16]).key_check());
        assert_ne!(a.key_check(), [0u8; KEY_CHECK_LEN]);
    }

    #[test]
    fn key_check_is_no_part_of_any_key() {
        let m = MasterKey::generate().unwrap();
        let k = FsKeys::derive(&m, &[3; 16]);
        let kcv = k.key_check();
        for key in [
            m.expose(),
            k.contents_root.expose(),
            k.names.expose(),
            k.symlinks.expose(),
            k.header_mac.expose(),
            k.snapshot_manifest.expose(),
            k.xattr_names.expose(),
            k.xattr_values.expose(),
        ] {
            assert!(
                !key.windows(KEY_CHECK_LEN).any(|w| w == kcv),
                "the key check value appears inside a key"
            );
        }
        // Nor a prefix of a per-file key (the expansion of another label
        // with the same PRK would start with the same bytes).
        let mut file_key = SecretBytes::zeroed(64);
        Hkdf::<Sha256>::from_prk(k.contents_root.expose())
            .unwrap()
            .expand(LABEL_FILE, file_key.expose_mut())
            .unwrap();
        assert!(!file_key.expose().windows(KEY_CHECK_LEN).any(|w| w == kcv));
    }

    /// The value docs/format.md section 2 gives for the worked example's
    /// master key (00 01 .. 1f) and UUID.
    #[test]
    fn key_check_worked_example() {
        let master: Vec<u8> = (0u8..32).collect();
        let m = MasterKey::from_secret(SecretBytes::new(master)).unwrap();
        let uuid = [
            0x6b, 0x6d, 0x73, 0x66, 0x73, 0x2d, 0x40, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x01,
        ];
        let kcv = FsKeys::derive(&m, &uuid).key_check();
        println!("{}", hex(&kcv));
        assert_eq!(hex(&kcv), "7c2db665185fbea28f8bf15d867e7f75");
    }

    #[test]
    fn master_key_length_is_checked() {
        assert!(matches!(
            MasterKey::from_secret(SecretBytes::zeroed(31)),
            Err(KeyError::BadLength(31))
        ));
    }
}
