//! One interface over both KMS kinds, for the commands that create, mount
//! and rewrap filesystems.
//!
//! [`KmsClient::wrap`] hands back a [`WrappedMasterKey`] holding everything
//! a key slot needs to find the key again; [`KmsClient::unwrap`] takes it
//! back. The context (the filesystem UUID) is bound where the KMS can
//! bind it: a derived Transit key, or KMIP AES-GCM additional data; the
//! result says whether it was, and unwrap passes it only then.

use kmsfs_core::keys::MasterKey;
use kmsfs_core::secret::SecretBytes;

use crate::config::{KmsConfig, KmsKind};
use crate::error::{KmsError, Result};
use crate::kmip::KmipClient;
use crate::vault::VaultClient;

/// A master key wrapped by either kind of KMS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedMasterKey {
    /// Which kind of KMS wrapped it.
    pub kind: KmsKind,
    /// The wrapping key: the Transit key name, or the KMIP Unique
    /// Identifier (a `name:NAME` key resolved with Locate).
    pub key_id: String,
    /// The Transit key version; 0 for KMIP (a KMIP key has no versions:
    /// rotation is a new key).
    pub key_version: u32,
    /// The ciphertext: `vault:vN:...` or `kmip:v1:...`. Not secret.
    pub blob: String,
    /// True when the context was bound and must be given to unwrap.
    pub uses_context: bool,
}

/// A client for the configured KMS.
#[derive(Debug)]
pub enum KmsClient {
    /// HashiCorp Vault / OpenBao Transit (boxed: it is much larger).
    Vault(Box<VaultClient>),
    /// A KMIP server.
    Kmip(KmipClient),
}

impl KmsClient {
    /// Builds the client the configuration's `type` calls for (reads
    /// token, certificate and key files; no network access).
    pub fn new(config: &KmsConfig) -> Result<Self> {
        Ok(match config.kind {
            KmsKind::Vault => KmsClient::Vault(Box::new(VaultClient::new(config)?)),
            KmsKind::Kmip => KmsClient::Kmip(KmipClient::new(config)?),
        })
    }

    /// The kind of KMS.
    pub fn kind(&self) -> KmsKind {
        match self {
            KmsClient::Vault(_) => KmsKind::Vault,
            KmsClient::Kmip(_) => KmsKind::Kmip,
        }
    }

    /// One line naming the KMS and key, for logs and messages (no secrets).
    pub fn describe(&self) -> String {
        match self {
            KmsClient::Vault(v) => format!(
                "Vault/OpenBao Transit key '{}' at {}",
                v.key_name(),
                v.addresses().join(", ")
            ),
            KmsClient::Kmip(k) => k.describe(),
        }
    }

    /// Wraps `master` with the configured key. `context` (the filesystem
    /// UUID) is bound when the KMS can: a derived Transit key, or KMIP
    /// AES-GCM.
    pub async fn wrap(
        &self,
        master: &MasterKey,
        context: Option<&[u8]>,
    ) -> Result<WrappedMasterKey> {
        let plain = SecretBytes::from_slice(master.expose());
        match self {
            KmsClient::Vault(v) => {
                let key = v.key_name().to_string();
                let info = v.read_key(&key).await?;
                let ctx = if info.derived { context } else { None };
                if info.derived && ctx.is_none() {
                    return Err(KmsError::Config {
                        detail: format!("Transit key '{key}' is derived: a context is required"),
                    });
                }
                let w = v.wrap(&key, &plain, ctx).await?;
                Ok(WrappedMasterKey {
                    kind: KmsKind::Vault,
                    key_id: key,
                    key_version: w.key_version,
                    blob: w.ciphertext,
                    uses_context: ctx.is_some(),
                })
            }
            KmsClient::Kmip(k) => {
                let w = k.wrap(&plain, context).await?;
                Ok(WrappedMasterKey {
                    kind: KmsKind::Kmip,
                    key_id: w.key_id,
                    key_version: 0,
                    blob: w.blob,
                    uses_context: w.uses_context,
                })
            }
        }
    }

    /// Unwraps a key made by [`KmsClient::wrap`] (of the same kind).
    pub async fn unwrap(
        &self,
        wrapped: &WrappedMasterKey,
        context: Option<&[u8]>,
    ) -> Result<MasterKey> {
        let ctx = if wrapped.uses_context { context } else { None };
        if wrapped.uses_context && ctx.is_none() {
            return Err(KmsError::Config {
                detail: "the wrapped key is bound to a context, but none was given".into(),
            });
        }
        if wrapped.kind != self.kind() {
            return Err(KmsError::Config {
                detail: format!(
                    "the key was wrapped by a {} KMS, but the configured KMS is {}",
                    wrapped.kind.as_str(),
                    self.kind().as_str()
                ),
            });
        }
        let plain = match self {
            KmsClient::Vault(v) => v.unwrap(&wrapped.key_id, &wrapped.blob, ctx).await?,
            KmsClient::Kmip(k) => k.unwrap(&wrapped.key_id, &wrapped.blob, ctx).await?,
        };
        MasterKey::from_secret(plain).map_err(|e| KmsError::CiphertextRejected {
            key: wrapped.key_id.clone(),
            detail: format!("the KMS returned an unusable master key: {e}"),
        })
    }
}
