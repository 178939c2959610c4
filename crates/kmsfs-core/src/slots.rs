//! Key slots of the filesystem header (format version 3).
//!
//! A slot is one copy of the master key wrapped by one KMS, with what an
//! operator (and `kmsfs mount`) needs to find that KMS again: a label unique
//! in the header, the time it was added, and the KMS identity as a short
//! list of typed fields. The fields are `(tag, value)` pairs so that a new
//! kind of KMS (KMIP, type 2, is already defined) needs no format change;
//! parsing is strict: unknown tags, fields a KMS type does not use, missing
//! or repeated fields, fields out of order, bad lengths and control
//! characters are all refused. See `docs/format.md` §3 for the bytes.
//!
//! Nothing read from a slot is trusted before the header MAC verifies; in
//! particular the addresses recorded in a slot are for operators: kmsfs
//! only ever talks to the KMS its own configuration names.

use crate::header::{HeaderError, Reader};

/// Longest slot label, in bytes.
pub const MAX_LABEL_LEN: usize = 64;
/// Most addresses recorded in one slot.
pub const MAX_SLOT_ADDRESSES: usize = 16;
/// Longest text field other than the wrapped key, in bytes.
pub const MAX_FIELD_LEN: usize = 1024;
/// Longest wrapped key, in bytes.
pub const MAX_WRAPPED_LEN: usize = 4096;

const SLOT_FLAG_CONTEXT: u8 = 0x01;

/// Field tags (`docs/format.md` §3, "Key slot fields").
mod tag {
    /// A KMS address as configured (repeats, in order, once per address).
    pub const ADDRESS: u8 = 1;
    /// Vault: the Transit key name.
    pub const KEY_NAME: u8 = 2;
    /// Vault: the key version, 4 bytes little-endian.
    pub const KEY_VERSION: u8 = 3;
    /// Vault: the Transit mount path.
    pub const TRANSIT_PATH: u8 = 4;
    /// Vault: the namespace (absent when none).
    pub const NAMESPACE: u8 = 5;
    /// The wrapped master key (Vault: `vault:vN:...`; KMIP: opaque).
    pub const WRAPPED: u8 = 6;
    /// KMIP: the key's unique identifier.
    pub const KMIP_KEY_ID: u8 = 7;
    /// Highest tag this build knows.
    pub const MAX: u8 = 7;
}

/// Which kind of KMS wrapped a key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KmsType {
    /// HashiCorp Vault / OpenBao Transit secrets engine (id 1).
    VaultTransit,
    /// A KMIP server (id 2).
    Kmip,
}

impl KmsType {
    /// The id stored in the header.
    pub fn id(self) -> u8 {
        match self {
            KmsType::VaultTransit => 1,
            KmsType::Kmip => 2,
        }
    }

    /// The type for a stored id, if this build knows it.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(KmsType::VaultTransit),
            2 => Some(KmsType::Kmip),
            _ => None,
        }
    }

    /// The name used in configuration, `kmsfs info` and `kmsfs slot list`.
    pub fn as_str(self) -> &'static str {
        match self {
            KmsType::VaultTransit => "vault",
            KmsType::Kmip => "kmip",
        }
    }
}

/// A slot wrapped by Vault / OpenBao Transit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultSlot {
    /// The KMS addresses as configured when the slot was written.
    pub addresses: Vec<String>,
    /// Mount path of the Transit engine.
    pub transit_path: String,
    /// Vault Enterprise / OpenBao namespace, if any.
    pub namespace: Option<String>,
    /// The Transit key's name.
    pub key_name: String,
    /// The key version that produced `wrapped_key`.
    pub key_version: u32,
    /// True when the key is derived and the filesystem UUID is the context.
    pub uses_context: bool,
    /// The Transit ciphertext (`vault:vN:<base64>`); not secret.
    pub wrapped_key: String,
}

/// A slot wrapped by a KMIP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmipSlot {
    /// The KMIP server addresses (`host:port`) as configured.
    pub addresses: Vec<String>,
    /// The wrapping key's KMIP unique identifier.
    pub key_id: String,
    /// The wrapped master key, in a text form the KMIP client defines; not secret.
    pub wrapped: String,
}

/// The KMS-specific part of a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotKms {
    /// Vault / OpenBao Transit.
    Vault(VaultSlot),
    /// KMIP.
    Kmip(KmipSlot),
}

/// One wrapped copy of the master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// Unique in the header; see [`validate_label`].
    pub label: String,
    /// When the slot was written, seconds since the Unix epoch.
    pub created: i64,
    /// Which KMS, how to find it, and the wrapped key.
    pub kms: SlotKms,
}

impl KeySlot {
    /// The slot's KMS type.
    pub fn kms_type(&self) -> KmsType {
        match self.kms {
            SlotKms::Vault(_) => KmsType::VaultTransit,
            SlotKms::Kmip(_) => KmsType::Kmip,
        }
    }

    /// The KMS addresses recorded in the slot.
    pub fn addresses(&self) -> &[String] {
        match &self.kms {
            SlotKms::Vault(v) => &v.addresses,
            SlotKms::Kmip(k) => &k.addresses,
        }
    }

    /// The Vault part, for a Transit slot.
    pub fn vault(&self) -> Option<&VaultSlot> {
        match &self.kms {
            SlotKms::Vault(v) => Some(v),
            SlotKms::Kmip(_) => None,
        }
    }

    /// Appends the slot's bytes to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), HeaderError> {
        validate_label(&self.label).map_err(HeaderError::Malformed)?;
        let mut fields: Vec<(u8, Vec<u8>)> = Vec::new();
        let flags;
        match &self.kms {
            SlotKms::Vault(v) => {
                flags = if v.uses_context { SLOT_FLAG_CONTEXT } else { 0 };
                push_addresses(&mut fields, &v.addresses)?;
                fields.push((tag::KEY_NAME, v.key_name.as_bytes().to_vec()));
                fields.push((tag::KEY_VERSION, v.key_version.to_le_bytes().to_vec()));
                fields.push((tag::TRANSIT_PATH, v.transit_path.as_bytes().to_vec()));
                if let Some(ns) = &v.namespace {
                    fields.push((tag::NAMESPACE, ns.as_bytes().to_vec()));
                }
                fields.push((tag::WRAPPED, v.wrapped_key.as_bytes().to_vec()));
            }
            SlotKms::Kmip(k) => {
                flags = 0;
                push_addresses(&mut fields, &k.addresses)?;
                fields.push((tag::WRAPPED, k.wrapped.as_bytes().to_vec()));
                fields.push((tag::KMIP_KEY_ID, k.key_id.as_bytes().to_vec()));
            }
        }
        out.push(self.kms_type().id());
        out.push(flags);
        out.push(self.label.len() as u8);
        out.extend_from_slice(self.label.as_bytes());
        out.extend_from_slice(&self.created.to_le_bytes());
        out.push(fields.len() as u8);
        for (t, value) in &fields {
            check_value(*t, value)?;
            out.push(*t);
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
            out.extend_from_slice(value);
        }
        Ok(())
    }

    /// Reads one slot at the reader's position.
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<KeySlot, HeaderError> {
        let [kms, flags, label_len] = r.array()?;
        let kms_type = KmsType::from_id(kms).ok_or(HeaderError::Unsupported {
            field: "KMS type",
            value: kms,
        })?;
        let allowed_flags = match kms_type {
            KmsType::VaultTransit => SLOT_FLAG_CONTEXT,
            KmsType::Kmip => 0,
        };
        if flags & !allowed_flags != 0 {
            return Err(HeaderError::Unsupported {
                field: "key slot flags",
                value: flags,
            });
        }
        let label = std::str::from_utf8(r.take(usize::from(label_len))?)
            .map_err(|_| HeaderError::Malformed("slot label is not UTF-8"))?
            .to_string();
        validate_label(&label).map_err(HeaderError::Malformed)?;
        let created = i64::from_le_bytes(r.array()?);
        let [count] = r.array()?;
        let mut f = Fields::default();
        let mut last_tag = 0u8;
        for _ in 0..count {
            let [t] = r.array()?;
            let len = usize::from(u16::from_le_bytes(r.array()?));
            let value = r.take(len)?;
            if t == 0 || t > tag::MAX {
                return Err(HeaderError::Unsupported {
                    field: "key slot field tag",
                    value: t,
                });
            }
            // Canonical order: ascending tags; only addresses repeat.
            if t < last_tag || (t == last_tag && t != tag::ADDRESS) {
                return Err(HeaderError::Malformed(
                    "key slot fields repeated or out of order",
                ));
            }
            last_tag = t;
            check_value(t, value)?;
            f.set(t, value)?;
        }
        let kms = match kms_type {
            KmsType::VaultTransit => {
                if f.kmip_key_id.is_some() {
                    return Err(HeaderError::Malformed(
                        "a Vault key slot carries a KMIP field",
                    ));
                }
                SlotKms::Vault(VaultSlot {
                    addresses: f.addresses()?,
                    transit_path: f.transit_path.ok_or(HeaderError::Malformed(
                        "Vault key slot without transit path",
                    ))?,
                    namespace: f.namespace,
                    key_name: f
                        .key_name
                        .ok_or(HeaderError::Malformed("Vault key slot without key name"))?,
                    key_version: f
                        .key_version
                        .ok_or(HeaderError::Malformed("Vault key slot without key version"))?,
                    uses_context: flags & SLOT_FLAG_CONTEXT != 0,
                    wrapped_key: f
                        .wrapped
                        .ok_or(HeaderError::Malformed("key slot without wrapped key"))?,
                })
            }
            KmsType::Kmip => {
                if f.key_name.is_some()
                    || f.key_version.is_some()
                    || f.transit_path.is_some()
                    || f.namespace.is_some()
                {
                    return Err(HeaderError::Malformed(
                        "a KMIP key slot carries a Vault field",
                    ));
                }
                SlotKms::Kmip(KmipSlot {
                    addresses: f.addresses()?,
                    key_id: f
                        .kmip_key_id
                        .ok_or(HeaderError::Malformed("KMIP key slot without key id"))?,
                    wrapped: f
                        .wrapped
                        .ok_or(HeaderError::Malformed("key slot without wrapped key"))?,
                })
            }
        };
        Ok(KeySlot {
            label,
            created,
            kms,
        })
    }
}

fn push_addresses(
    fields: &mut Vec<(u8, Vec<u8>)>,
    addresses: &[String],
) -> Result<(), HeaderError> {
    if addresses.is_empty() {
        return Err(HeaderError::Malformed("key slot without an address"));
    }
    if addresses.len() > MAX_SLOT_ADDRESSES {
        return Err(HeaderError::Malformed("too many addresses in a key slot"));
    }
    for (i, a) in addresses.iter().enumerate() {
        if addresses[..i].contains(a) {
            return Err(HeaderError::Malformed("repeated address in a key slot"));
        }
        fields.push((tag::ADDRESS, a.as_bytes().to_vec()));
    }
    Ok(())
}

/// Length and content rules of a field value (the same on both sides).
fn check_value(t: u8, value: &[u8]) -> Result<(), HeaderError> {
    if t == tag::KEY_VERSION {
        return if value.len() == 4 {
            Ok(())
        } else {
            Err(HeaderError::Malformed("key version field is not 4 bytes"))
        };
    }
    let max = if t == tag::WRAPPED {
        MAX_WRAPPED_LEN
    } else {
        MAX_FIELD_LEN
    };
    if value.is_empty() || value.len() > max {
        return Err(HeaderError::Malformed("key slot field length out of range"));
    }
    let s = std::str::from_utf8(value)
        .map_err(|_| HeaderError::Malformed("key slot field is not UTF-8"))?;
    // Slots are shown before they are authenticated: no terminal controls.
    if s.chars().any(char::is_control) {
        return Err(HeaderError::Malformed(
            "key slot field holds a control character",
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Fields {
    addresses: Vec<String>,
    key_name: Option<String>,
    key_version: Option<u32>,
    transit_path: Option<String>,
    namespace: Option<String>,
    wrapped: Option<String>,
    kmip_key_id: Option<String>,
}

impl Fields {
    fn set(&mut self, t: u8, value: &[u8]) -> Result<(), HeaderError> {
        if t == tag::KEY_VERSION {
            let mut v = [0u8; 4];
            v.copy_from_slice(value);
            self.key_version = Some(u32::from_le_bytes(v));
            return Ok(());
        }
        // check_value has accepted it as UTF-8 already.
        let s = String::from_utf8_lossy(value).into_owned();
        match t {
            tag::ADDRESS => {
                if self.addresses.contains(&s) {
                    return Err(HeaderError::Malformed("repeated address in a key slot"));
                }
                if self.addresses.len() == MAX_SLOT_ADDRESSES {
                    return Err(HeaderError::Malformed("too many addresses in a key slot"));
                }
                self.addresses.push(s);
            }
            tag::KEY_NAME => self.key_name = Some(s),
            tag::TRANSIT_PATH => self.transit_path = Some(s),
            tag::NAMESPACE => self.namespace = Some(s),
            tag::WRAPPED => self.wrapped = Some(s),
            tag::KMIP_KEY_ID => self.kmip_key_id = Some(s),
            _ => {
                return Err(HeaderError::Unsupported {
                    field: "key slot field tag",
                    value: t,
                })
            }
        }
        Ok(())
    }

    fn addresses(&mut self) -> Result<Vec<String>, HeaderError> {
        if self.addresses.is_empty() {
            return Err(HeaderError::Malformed("key slot without an address"));
        }
        Ok(std::mem::take(&mut self.addresses))
    }
}

/// Checks a slot label: 1 to 64 ASCII letters, digits, `.`, `_` or `-`,
/// starting with a letter or digit, and not all digits (so that
/// `kmsfs slot remove DIR 1` always means slot index 1).
pub fn validate_label(label: &str) -> Result<(), &'static str> {
    if label.is_empty() || label.len() > MAX_LABEL_LEN {
        return Err("slot label must be 1 to 64 characters");
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("slot label may hold only ASCII letters, digits, '.', '_' and '-'");
    }
    if !label.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("slot label must start with a letter or digit");
    }
    if label.bytes().all(|b| b.is_ascii_digit()) {
        return Err("slot label must not be all digits (that reads as a slot index)");
    }
    Ok(())
}

/// Refuses two slots with the same label.
pub(crate) fn check_labels_unique(slots: &[KeySlot]) -> Result<(), HeaderError> {
    for (i, s) in slots.iter().enumerate() {
        if slots[..i].iter().any(|o| o.label == s.label) {
            return Err(HeaderError::DuplicateLabel(s.label.clone()));
        }
    }
    Ok(())
}
