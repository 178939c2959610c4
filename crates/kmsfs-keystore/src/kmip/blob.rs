//! The wrapped-key string a KMIP key slot stores.
//!
//! ```text
//! kmip:v1:gcm:<base64 IV>:<base64 tag>:<base64 ciphertext>
//! kmip:v1:cbc:<base64 IV>:<base64 ciphertext>
//! ```
//!
//! `v1` is the version of this format. The mode records how the KMS
//! encrypted the key: AES-GCM with a 16-byte tag (KMIP 1.4 servers), or
//! AES-CBC with PKCS#5 padding. The IV is the random one the server chose
//! and returned; it is not secret. Base64 is the standard alphabet with
//! padding (which has no `:`). Parsing is strict: every field present,
//! nothing extra, canonical base64, lengths within bounds. The key's unique
//! identifier is not part of the blob: the key slot holds it.

use base64::Engine as _;

use super::message::{CipherMode, GCM_TAG_LEN};

/// The prefix of every blob of this format version.
pub const PREFIX: &str = "kmip:v1:";

/// Largest ciphertext accepted (master keys are 32 or 64 bytes).
const MAX_CIPHERTEXT: usize = 1024;
/// IV length bounds (GCM nonces are 12 bytes or more, CBC IVs 16).
const MIN_IV: usize = 8;
const MAX_IV: usize = 64;

/// A parsed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// How the key was encrypted.
    pub mode: CipherMode,
    /// The server's IV or nonce.
    pub iv: Vec<u8>,
    /// The GCM tag (empty for CBC).
    pub tag: Vec<u8>,
    /// The ciphertext.
    pub ciphertext: Vec<u8>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(field: &str, what: &str) -> Result<Vec<u8>, String> {
    let v = base64::engine::general_purpose::STANDARD
        .decode(field)
        .map_err(|e| format!("the {what} is not base64: {e}"))?;
    // Only the canonical spelling, so one blob has one string.
    if b64(&v) != field {
        return Err(format!("the {what} is not canonical base64"));
    }
    Ok(v)
}

impl Blob {
    /// The blob's string form.
    pub fn encode(&self) -> String {
        match self.mode {
            CipherMode::Gcm => format!(
                "{PREFIX}gcm:{}:{}:{}",
                b64(&self.iv),
                b64(&self.tag),
                b64(&self.ciphertext)
            ),
            CipherMode::Cbc => format!("{PREFIX}cbc:{}:{}", b64(&self.iv), b64(&self.ciphertext)),
        }
    }

    /// Parses and checks a blob; the error says what is wrong (never the
    /// blob itself, which is not secret but long).
    pub fn parse(s: &str) -> Result<Blob, String> {
        let rest = s.strip_prefix(PREFIX).ok_or_else(|| {
            if s.starts_with("kmip:") {
                "unsupported KMIP blob version (this build reads kmip:v1:)".to_string()
            } else {
                "not a KMIP wrapped key (expected kmip:v1:...)".to_string()
            }
        })?;
        let fields: Vec<&str> = rest.split(':').collect();
        let blob = match fields.as_slice() {
            ["gcm", iv, tag, ct] => Blob {
                mode: CipherMode::Gcm,
                iv: unb64(iv, "IV")?,
                tag: unb64(tag, "tag")?,
                ciphertext: unb64(ct, "ciphertext")?,
            },
            ["cbc", iv, ct] => Blob {
                mode: CipherMode::Cbc,
                iv: unb64(iv, "IV")?,
                tag: Vec::new(),
                ciphertext: unb64(ct, "ciphertext")?,
            },
            [mode, ..] if *mode != "gcm" && *mode != "cbc" => {
                return Err(format!("unknown KMIP wrapping mode '{mode}'"))
            }
            _ => return Err("wrong number of fields in the KMIP wrapped key".into()),
        };
        blob.check()?;
        Ok(blob)
    }

    /// Bounds every field (shared by [`Blob::parse`] and the client, which
    /// checks what a server returned before storing it).
    pub fn check(&self) -> Result<(), String> {
        if !(MIN_IV..=MAX_IV).contains(&self.iv.len()) {
            return Err(format!("IV of {} bytes", self.iv.len()));
        }
        let ct = self.ciphertext.len();
        if ct == 0 || ct > MAX_CIPHERTEXT {
            return Err(format!("ciphertext of {ct} bytes"));
        }
        match self.mode {
            CipherMode::Gcm if self.tag.len() != GCM_TAG_LEN => Err(format!(
                "GCM tag of {} bytes, not {GCM_TAG_LEN}",
                self.tag.len()
            )),
            CipherMode::Cbc if ct % 16 != 0 => {
                Err(format!("CBC ciphertext of {ct} bytes, not whole blocks"))
            }
            CipherMode::Cbc if self.iv.len() != 16 => {
                Err(format!("CBC IV of {} bytes, not 16", self.iv.len()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gcm() -> Blob {
        Blob {
            mode: CipherMode::Gcm,
            iv: vec![1; 16],
            tag: vec![2; 16],
            ciphertext: vec![3; 32],
        }
    }

    #[test]
    fn round_trips() {
        let cbc = Blob {
            mode: CipherMode::Cbc,
            iv: vec![4; 16],
            tag: vec![],
            ciphertext: vec![5; 48],
        };
        for b in [gcm(), cbc] {
            let s = b.encode();
            assert!(s.starts_with("kmip:v1:"), "{s}");
            assert_eq!(Blob::parse(&s).unwrap(), b);
        }
        assert!(gcm().encode().starts_with("kmip:v1:gcm:AQEB"));
    }

    #[test]
    fn strict() {
        let s = gcm().encode();
        let bad = [
            "vault:v1:abc".to_string(),
            "kmip:v2:gcm:a:b:c".into(),
            s.replace("kmip:v1:gcm", "kmip:v1:ecb"),
            format!("{s}:AAAA"),
            s.rsplit_once(':').unwrap().0.to_string(),
            s.replace("AQEB", "AQE*"),
            // Non-canonical base64 (trailing bits set).
            "kmip:v1:cbc:BAQEBAQEBAQEBAQEBAQEBB==:AAAAAAAAAAAAAAAAAAAAAA==".into(),
            // CBC ciphertext not whole blocks.
            format!("kmip:v1:cbc:{}:{}", b64(&[0; 16]), b64(&[0; 20])),
            // Short tag.
            format!(
                "kmip:v1:gcm:{}:{}:{}",
                b64(&[0; 12]),
                b64(&[0; 8]),
                b64(&[0; 32])
            ),
            // Empty ciphertext.
            format!("kmip:v1:cbc:{}:", b64(&[0; 16])),
        ];
        for b in bad {
            assert!(Blob::parse(&b).is_err(), "accepted {b}");
        }
        assert!(Blob::parse("kmip:v2:x")
            .unwrap_err()
            .contains("unsupported KMIP blob version"));
    }
}
