//! Wrapping the master key into a new key slot, with either kind of KMS
//! (`create`, `slot add`, `rewrap` of a KMIP slot).

use kmsfs_core::header::{KmipSlot, SlotKms, VaultSlot};
use kmsfs_core::keys::MasterKey;
use kmsfs_core::secret::SecretBytes;
use kmsfs_keystore::{KmipClient, KmsError};

use crate::fsheader::slot_context;
use crate::slotkms::KmsAccess;

/// A freshly wrapped slot, and the key the KMS unwraps it to again.
pub struct NewSlot {
    /// The slot's KMS part, ready to go into a header.
    pub kms: SlotKms,
    /// What the KMS returned when asked to unwrap the new slot: the caller
    /// compares it with the master key before writing anything.
    pub back: MasterKey,
}

/// Wraps `master` with `key` of the configured KMS (a Transit key name, or
/// a KMIP Unique Identifier or `name:NAME`), binding the filesystem UUID as
/// context where the KMS can (a derived Transit key; KMIP AES-GCM), then
/// unwraps the result again so it is proven before anyone relies on it.
/// KMIP slots record the key's Unique Identifier, never its name.
pub async fn wrap_new_slot(
    access: &KmsAccess,
    key: &str,
    master: &MasterKey,
    uuid: &[u8; 16],
) -> Result<NewSlot, KmsError> {
    let cfg = access.config();
    let plain = SecretBytes::from_slice(master.expose());
    let unusable = |key: &str, e: String| KmsError::CiphertextRejected {
        key: key.to_string(),
        detail: format!("the KMS unwrapped the new slot to an unusable key: {e}"),
    };
    if let Some(configured) = access.kmip() {
        let other;
        let client = if key == cfg.key_name {
            configured
        } else {
            let mut c = cfg.clone();
            c.key_name = key.to_string();
            other = KmipClient::new(&c)?;
            &other
        };
        let w = client.wrap(&plain, Some(uuid.as_slice())).await?;
        let back = client
            .unwrap(&w.key_id, &w.blob, Some(uuid.as_slice()))
            .await?;
        let back = MasterKey::from_secret(back).map_err(|e| unusable(&w.key_id, e.to_string()))?;
        return Ok(NewSlot {
            kms: SlotKms::Kmip(KmipSlot {
                addresses: cfg.addresses.clone(),
                key_id: w.key_id,
                wrapped: w.blob,
            }),
            back,
        });
    }
    let client = access.base().ok_or_else(|| KmsError::Config {
        detail: "no Transit client for this configuration".into(),
    })?;
    let info = client.read_key(key).await?;
    let ctx = slot_context(info.derived, uuid);
    let wrapped = client.wrap(key, &plain, ctx).await?;
    let back = client.unwrap(key, &wrapped.ciphertext, ctx).await?;
    let back = MasterKey::from_secret(back).map_err(|e| unusable(key, e.to_string()))?;
    Ok(NewSlot {
        kms: SlotKms::Vault(VaultSlot {
            addresses: cfg.addresses.clone(),
            transit_path: cfg.transit_path.clone(),
            namespace: cfg.namespace.clone(),
            key_name: key.to_string(),
            key_version: wrapped.key_version,
            uses_context: info.derived,
            wrapped_key: wrapped.ciphertext,
        }),
        back,
    })
}
