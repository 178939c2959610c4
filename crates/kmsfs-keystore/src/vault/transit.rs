//! Transit: wrapping and unwrapping filesystem master keys.
//!
//! # Derived keys and contexts
//!
//! A Transit key created with `derived=true` derives a distinct key per
//! *context*; every encrypt, decrypt and rewrap must then carry the same
//! context bytes. kmsfs passes the filesystem UUID bytes, binding a wrapped
//! master key to its filesystem. Every method here takes
//! `context: Option<&[u8]>` and the caller decides: check
//! [`KeyInfo::derived`] (from [`VaultClient::read_key`]) and pass the
//! context when it is set. Vault ignores a context for non-derived keys.
//!
//! # Never creating keys
//!
//! Transit's encrypt endpoint silently creates a missing key when the token
//! may `create` on that path. [`VaultClient::wrap`] therefore reads the key
//! first and fails with [`KmsError::KeyNotFound`]. A key deleted between the
//! read and the encrypt would still be recreated; to close that window give
//! kmsfs a policy with only `update` (not `create`) on
//! `transit/encrypt/<key>`.
//!
//! # Policy
//!
//! The least a kmsfs token needs (key `kmsfs`, Transit at `transit/`):
//!
//! ```hcl
//! path "transit/keys/kmsfs"    { capabilities = ["read"] }
//! path "transit/encrypt/kmsfs" { capabilities = ["update"] }
//! path "transit/decrypt/kmsfs" { capabilities = ["update"] }
//! path "transit/rewrap/kmsfs"  { capabilities = ["update"] }
//! ```

use std::collections::BTreeMap;

use base64::Engine as _;
use kmsfs_core::secret::SecretBytes;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{KmsError, Result};
use crate::vault::client::{api_errors, http_error, parse_data, VaultClient};

/// A key wrapped by Transit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// The Transit ciphertext, `vault:vN:<base64>`.
    pub ciphertext: String,
    /// The key version N that wrapped it.
    pub key_version: u32,
}

/// What Transit reports about a key (`GET transit/keys/<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Key name.
    pub name: String,
    /// Key type, e.g. `aes256-gcm96`.
    pub key_type: String,
    /// True when the key derives per-context keys: pass a context.
    pub derived: bool,
    /// True when the key may be exported.
    pub exportable: bool,
    /// True when the key may be deleted.
    pub deletion_allowed: bool,
    /// Newest version.
    pub latest_version: u32,
    /// Ciphertexts of older versions are refused.
    pub min_decryption_version: u32,
    /// Encryption uses at least this version (0: latest).
    pub min_encryption_version: u32,
    /// The key versions still present, ascending.
    pub versions: Vec<u32>,
    /// Whether the key type can encrypt.
    pub supports_encryption: bool,
    /// Whether the key type can decrypt.
    pub supports_decryption: bool,
}

#[derive(Deserialize)]
struct RawKeyInfo {
    name: String,
    #[serde(rename = "type")]
    key_type: String,
    #[serde(default)]
    derived: bool,
    #[serde(default)]
    exportable: bool,
    #[serde(default)]
    deletion_allowed: bool,
    latest_version: u32,
    #[serde(default)]
    min_decryption_version: u32,
    #[serde(default)]
    min_encryption_version: u32,
    #[serde(default)]
    keys: BTreeMap<String, serde_json::Value>,
    #[serde(default = "yes")]
    supports_encryption: bool,
    #[serde(default = "yes")]
    supports_decryption: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct RawWrapped {
    ciphertext: String,
    key_version: Option<u32>,
}

#[derive(Deserialize)]
struct RawPlaintext {
    plaintext: Zeroizing<String>,
}

#[derive(Serialize)]
struct EncryptReq<'a> {
    plaintext: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a str>,
}

#[derive(Serialize)]
struct DecryptReq<'a> {
    ciphertext: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_version: Option<u32>,
}

fn b64(bytes: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Base64 of a secret, written straight into locked memory.
fn b64_secret(secret: &SecretBytes) -> Result<SecretBytes> {
    let engine = &base64::engine::general_purpose::STANDARD;
    let len = base64::encoded_len(secret.len(), true).ok_or_else(|| too_big("(request)"))?;
    let mut out = SecretBytes::zeroed(len);
    let n = engine
        .encode_slice(secret.expose(), out.expose_mut())
        .map_err(|_| too_big("(request)"))?;
    debug_assert_eq!(n, len);
    Ok(out)
}

/// Decodes the base64 plaintext of a decrypt answer straight into locked memory.
fn unb64_secret(path: &str, text: &str) -> Result<SecretBytes> {
    let engine = &base64::engine::general_purpose::STANDARD;
    let mut buf = SecretBytes::zeroed(base64::decoded_len_estimate(text.len()));
    let n = engine
        .decode_slice(text.as_bytes(), buf.expose_mut())
        .map_err(|e| KmsError::Protocol {
            path: path.to_string(),
            detail: format!("plaintext is not base64: {e}"),
        })?;
    Ok(SecretBytes::from_slice(&buf.expose()[..n]))
}

fn too_big(path: &str) -> KmsError {
    KmsError::Protocol {
        path: path.into(),
        detail: "the key is too large to encode".into(),
    }
}

/// The version N of a `vault:vN:...` ciphertext.
pub fn ciphertext_version(ciphertext: &str) -> Option<u32> {
    let rest = ciphertext.strip_prefix("vault:v")?;
    rest.split(':').next()?.parse().ok()
}

/// A request body as JSON in locked memory. Measured first, then written
/// into a buffer of exactly that size: a growing `Vec` would leave copies
/// of the plaintext behind in freed heap memory.
fn encode<T: Serialize>(v: &T) -> Result<SecretBytes> {
    let failed = |e: serde_json::Error| KmsError::Protocol {
        path: "(request)".into(),
        detail: format!("cannot encode the request: {e}"),
    };
    let mut counter = ByteCounter(0);
    serde_json::to_writer(&mut counter, v).map_err(failed)?;
    let mut body = SecretBytes::zeroed(counter.0);
    let mut out: &mut [u8] = body.expose_mut();
    serde_json::to_writer(&mut out, v).map_err(failed)?;
    if !out.is_empty() {
        return Err(KmsError::Protocol {
            path: "(request)".into(),
            detail: "the request encoded to a different length twice".into(),
        });
    }
    Ok(body)
}

/// A writer that only counts bytes.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The text of a secret known to be ASCII (base64).
fn secret_str(s: &SecretBytes) -> Result<&str> {
    std::str::from_utf8(s.expose()).map_err(|_| KmsError::Protocol {
        path: "(request)".into(),
        detail: "base64 output is not ASCII".into(),
    })
}

impl VaultClient {
    fn transit(&self, op: &str, key: &str) -> String {
        format!("{}/{op}/{key}", self.transit_path)
    }

    /// Reads a Transit key's metadata. A missing key is
    /// [`KmsError::KeyNotFound`]; a missing Transit mount is a
    /// [`KmsError::Config`] error naming the mount path.
    pub async fn read_key(&self, key: &str) -> Result<KeyInfo> {
        let path = self.transit("keys", key);
        let reply = self.call(Method::GET, &path, None).await?;
        match reply.status {
            200 => {
                let raw: RawKeyInfo = parse_data(&path, &reply.body)?;
                let mut versions: Vec<u32> =
                    raw.keys.keys().filter_map(|k| k.parse().ok()).collect();
                versions.sort_unstable();
                Ok(KeyInfo {
                    name: raw.name,
                    key_type: raw.key_type,
                    derived: raw.derived,
                    exportable: raw.exportable,
                    deletion_allowed: raw.deletion_allowed,
                    latest_version: raw.latest_version,
                    min_decryption_version: raw.min_decryption_version,
                    min_encryption_version: raw.min_encryption_version,
                    versions,
                    supports_encryption: raw.supports_encryption,
                    supports_decryption: raw.supports_decryption,
                })
            }
            404 => {
                let errs = api_errors(&reply.body);
                if errs.iter().any(|e| e.contains("no handler for route")) {
                    Err(KmsError::Config {
                        detail: format!(
                            "no Transit secrets engine is mounted at '{}/' (check `transit_path` and `namespace`)",
                            self.transit_path
                        ),
                    })
                } else {
                    Err(KmsError::KeyNotFound {
                        key: key.to_string(),
                    })
                }
            }
            _ => Err(http_error(&path, &reply)),
        }
    }

    /// Wraps `plaintext` (a master key) with Transit key `key`.
    ///
    /// Reads the key first and fails with [`KmsError::KeyNotFound`] rather
    /// than letting Transit create it. `context` is required when the key is
    /// derived (see the module documentation); without one the call fails
    /// before sending the plaintext.
    pub async fn wrap(
        &self,
        key: &str,
        plaintext: &SecretBytes,
        context: Option<&[u8]>,
    ) -> Result<WrappedKey> {
        let info = self.read_key(key).await?;
        if !info.supports_encryption {
            return Err(KmsError::Config {
                detail: format!(
                    "Transit key '{key}' of type {} cannot encrypt",
                    info.key_type
                ),
            });
        }
        if info.derived && context.is_none() {
            return Err(KmsError::Config {
                detail: format!(
                    "Transit key '{key}' is derived: a context is required to wrap with it"
                ),
            });
        }
        let pt = b64_secret(plaintext)?;
        let ctx = context.map(b64);
        let body = encode(&EncryptReq {
            plaintext: secret_str(&pt)?,
            context: ctx.as_deref().map(String::as_str),
        })?;
        drop(pt);
        let path = self.transit("encrypt", key);
        let reply = self.call(Method::POST, &path, Some(body.expose())).await?;
        self.wrapped_reply(key, &path, &reply)
    }

    /// Unwraps a `vault:vN:...` ciphertext with Transit key `key`.
    ///
    /// Wrong key, wrong or missing context for a derived key, tampering, and
    /// a version below `min_decryption_version` are all
    /// [`KmsError::CiphertextRejected`].
    pub async fn unwrap(
        &self,
        key: &str,
        ciphertext: &str,
        context: Option<&[u8]>,
    ) -> Result<SecretBytes> {
        let ctx = context.map(b64);
        let body = encode(&DecryptReq {
            ciphertext,
            context: ctx.as_deref().map(String::as_str),
            key_version: None,
        })?;
        let path = self.transit("decrypt", key);
        let reply = self.call(Method::POST, &path, Some(body.expose())).await?;
        if reply.status != 200 {
            return Err(decrypt_error(key, &path, &reply));
        }
        let raw: RawPlaintext = parse_data(&path, &reply.body)?;
        unb64_secret(&path, &raw.plaintext)
    }

    /// Re-encrypts a ciphertext under the latest (or the given) version of
    /// the same Transit key, without the plaintext leaving the KMS. Errors
    /// as [`VaultClient::unwrap`].
    pub async fn rewrap(
        &self,
        key: &str,
        ciphertext: &str,
        context: Option<&[u8]>,
        key_version: Option<u32>,
    ) -> Result<WrappedKey> {
        let ctx = context.map(b64);
        let body = encode(&DecryptReq {
            ciphertext,
            context: ctx.as_deref().map(String::as_str),
            key_version,
        })?;
        let path = self.transit("rewrap", key);
        let reply = self.call(Method::POST, &path, Some(body.expose())).await?;
        if reply.status != 200 {
            return Err(decrypt_error(key, &path, &reply));
        }
        self.wrapped_reply(key, &path, &reply)
    }

    /// Moves a wrapped key from Transit key `from` to Transit key `to`
    /// (unwrap, then [`wrap`](VaultClient::wrap)); the plaintext is held
    /// only in [`SecretBytes`]. Contexts as for each key.
    pub async fn rewrap_to(
        &self,
        from: &str,
        ciphertext: &str,
        from_context: Option<&[u8]>,
        to: &str,
        to_context: Option<&[u8]>,
    ) -> Result<WrappedKey> {
        // Check the destination before unwrapping anything.
        self.read_key(to).await?;
        let plain = self.unwrap(from, ciphertext, from_context).await?;
        self.wrap(to, &plain, to_context).await
    }

    fn wrapped_reply(
        &self,
        key: &str,
        path: &str,
        reply: &super::client::Reply,
    ) -> Result<WrappedKey> {
        if reply.status != 200 {
            if reply.status == 404 || reply.status == 400 {
                let errs = api_errors(&reply.body);
                if errs.iter().any(|e| e.contains("key not found")) {
                    return Err(KmsError::KeyNotFound { key: key.into() });
                }
            }
            return Err(http_error(path, reply));
        }
        let raw: RawWrapped = parse_data(path, &reply.body)?;
        let key_version = raw
            .key_version
            .or_else(|| ciphertext_version(&raw.ciphertext))
            .ok_or_else(|| KmsError::Protocol {
                path: path.to_string(),
                detail: "ciphertext has no version".into(),
            })?;
        Ok(WrappedKey {
            ciphertext: raw.ciphertext,
            key_version,
        })
    }
}

fn decrypt_error(key: &str, path: &str, reply: &super::client::Reply) -> KmsError {
    let errs = api_errors(&reply.body);
    let joined = errs.join("; ");
    match reply.status {
        400 if joined.contains("encryption key not found") => {
            KmsError::KeyNotFound { key: key.into() }
        }
        400 => {
            let hint = if joined.contains("too old") || joined.contains("disallowed by policy") {
                " (the wrapping key version is below the key's min_decryption_version)"
            } else if joined.contains("message authentication failed") {
                " (wrong key or derivation context, or tampered ciphertext)"
            } else {
                ""
            };
            KmsError::CiphertextRejected {
                key: key.into(),
                detail: format!("{joined}{hint}"),
            }
        }
        404 if errs.is_empty() => KmsError::KeyNotFound { key: key.into() },
        _ => http_error(path, reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bodies_are_exact_json_in_locked_memory() {
        let key = SecretBytes::from_slice(&[0xFB; 32]);
        let pt = b64_secret(&key).unwrap();
        assert_eq!(secret_str(&pt).unwrap(), b64(&[0xFB; 32]).as_str());
        let ctx = b64(b"ctx\"\\");
        let req = EncryptReq {
            plaintext: secret_str(&pt).unwrap(),
            context: Some(&ctx),
        };
        let body = encode(&req).unwrap();
        assert_eq!(body.expose(), serde_json::to_vec(&req).unwrap().as_slice());
        let back = unb64_secret("p", secret_str(&pt).unwrap()).unwrap();
        assert_eq!(back, key);
        let e = unb64_secret("transit/decrypt/k", "not base64!").unwrap_err();
        assert!(e.to_string().contains("transit/decrypt/k"), "{e}");
        assert!(unb64_secret("p", "").unwrap().is_empty());
    }

    #[test]
    fn parses_ciphertext_version() {
        assert_eq!(ciphertext_version("vault:v12:abc"), Some(12));
        assert_eq!(ciphertext_version("vault:vx:abc"), None);
        assert_eq!(ciphertext_version("abc"), None);
    }
}
