//! The key check value (KCV) in its text form: 32 lowercase hex digits.
//!
//! The KCV is derived from the master key and the filesystem UUID under its
//! own HKDF label ([`kmsfs_core::keys::FsKeys::key_check`]). It is not
//! secret: it reveals nothing about any key, but two different master keys
//! give different values. A host records it outside the backing store (the
//! registry at `create`, or `-o kcv=` in fstab) and refuses to mount when
//! the key a header unwraps to has another one.

use std::fmt;
use std::str::FromStr;

use kmsfs_core::keys::{FsKeys, KEY_CHECK_LEN};
use serde::{Deserialize, Serialize};

/// A key check value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyCheck([u8; KEY_CHECK_LEN]);

impl KeyCheck {
    /// The key check value of unlocked filesystem keys.
    pub fn of(keys: &FsKeys) -> Self {
        KeyCheck(keys.key_check())
    }
}

impl fmt::Display for KeyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for KeyCheck {
    type Err = String;

    /// Parses exactly 32 hex digits (either case).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "'{s}' is not a key check value: expected {} hex digits, as printed by \
                 `kmsfs create` and shown by `kmsfs info`",
                2 * KEY_CHECK_LEN
            )
        };
        // `from_str_radix` alone would accept a leading `+`.
        if s.len() != 2 * KEY_CHECK_LEN || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; KEY_CHECK_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(KeyCheck(out))
    }
}

impl TryFrom<String> for KeyCheck {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<KeyCheck> for String {
    fn from(k: KeyCheck) -> String {
        k.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_anything_else() {
        let k: KeyCheck = "7C2DB665185fbea28f8bf15d867e7f75".parse().expect("parse");
        assert_eq!(k.to_string(), "7c2db665185fbea28f8bf15d867e7f75");
        for bad in [
            "",
            "7c2db665185fbea28f8bf15d867e7f7",
            "7c2db665185fbea28f8bf15d867e7f750",
            "7c2db665185fbea28f8bf15d867e7f7g",
            "+c2db665185fbea28f8bf15d867e7f75",
            "7c2db665185fbea28f8bf15d867e7fé",
        ] {
            let e = bad.parse::<KeyCheck>().expect_err(bad);
            assert!(e.contains("32 hex digits"), "{e}");
        }
    }
}
