//! Which key slots a KMS configuration can reach, and the clients that
//! reach them.
//!
//! A slot records the KMS it was wrapped by (addresses as configured, Transit
//! mount, namespace, key name). A configuration reaches a Transit slot
//! through its own addresses and credentials only: the addresses in a slot
//! come from an unauthenticated header and are compared, never contacted.
//! Slots are tried best match first ([`Reach`]); the slot's own Transit
//! mount and namespace are used, so a slot written through another mount of
//! the same KMS is still reachable.
//!
//! A KMIP configuration reaches KMIP slots the same way: through its own
//! addresses and client certificate, matched by address and key Unique
//! Identifier. A configuration never opens a slot of the other KMS type.

use std::sync::{Arc, Mutex};

use kmsfs_core::header::{KeySlot, KmipSlot, SlotKms, VaultSlot};
use kmsfs_keystore::{KmipClient, KmsConfig, KmsError, KmsKind, VaultClient};

/// How well a slot matches a configuration, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reach {
    /// Same addresses (one in common), Transit mount, namespace and key name.
    Exact,
    /// Same addresses, mount and namespace; another key (e.g. after
    /// `rewrap --new-key`).
    SameKms,
    /// Same mount, namespace and key name, but no address in common (the
    /// configuration's addresses changed since the slot was written).
    SameKey,
    /// Another slot of the configuration's KMS type (another Transit mount
    /// or KMIP server): tried last, through this configuration's KMS.
    OtherVault,
    /// A slot of another KMS type: this configuration cannot open it.
    OtherType,
}

fn norm(addr: &str) -> String {
    addr.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// True when the configuration and the slot list an address in common.
pub fn shares_address(cfg: &KmsConfig, addresses: &[String]) -> bool {
    addresses
        .iter()
        .any(|a| cfg.addresses.iter().any(|c| norm(c) == norm(a)))
}

fn same_mount(cfg: &KmsConfig, v: &VaultSlot) -> bool {
    cfg.transit_path.trim_matches('/') == v.transit_path.trim_matches('/')
        && cfg.namespace == v.namespace
}

/// How a KMIP slot matches a KMIP configuration. The slot holds the key's
/// Unique Identifier; a configured `name:NAME` key matches no identifier
/// here (it is resolved only by asking the server), so such slots rank by
/// address alone.
fn kmip_reach(cfg: &KmsConfig, k: &KmipSlot) -> Reach {
    let addr = shares_address(cfg, &k.addresses);
    let key = k.key_id == cfg.key_name;
    match (addr, key) {
        (true, true) => Reach::Exact,
        (true, false) => Reach::SameKms,
        (false, true) => Reach::SameKey,
        (false, false) => Reach::OtherVault,
    }
}

/// How `slot` matches `cfg`.
pub fn reach(cfg: &KmsConfig, slot: &KeySlot) -> Reach {
    // A configuration for one kind of KMS never opens a slot of the other.
    let v = match (&slot.kms, cfg.kind) {
        (SlotKms::Vault(v), KmsKind::Vault) => v,
        (SlotKms::Kmip(k), KmsKind::Kmip) => return kmip_reach(cfg, k),
        _ => return Reach::OtherType,
    };
    let addr = shares_address(cfg, &v.addresses);
    let mount = same_mount(cfg, v);
    let key = v.key_name == cfg.key_name;
    match (addr && mount, key) {
        (true, true) => Reach::Exact,
        (true, false) => Reach::SameKms,
        (false, true) if mount => Reach::SameKey,
        _ => Reach::OtherVault,
    }
}

/// Slot indices in the order to try them with `cfg` (best match first,
/// then header order); slots of another KMS type are left out.
pub fn try_order(cfg: &KmsConfig, slots: &[KeySlot]) -> Vec<usize> {
    let mut order: Vec<(Reach, usize)> = slots
        .iter()
        .enumerate()
        .map(|(i, s)| (reach(cfg, s), i))
        .filter(|(r, _)| *r != Reach::OtherType)
        .collect();
    order.sort();
    order.into_iter().map(|(_, i)| i).collect()
}

/// A one-line description of a slot for messages:
/// `slot 1 'dr' (vault key 'kmsfs' v2, mount transit, at https://dr:8200)`.
pub fn describe(index: usize, slot: &KeySlot) -> String {
    match &slot.kms {
        SlotKms::Vault(v) => format!(
            "slot {index} '{}' (vault key '{}' v{}, mount {}{}, at {})",
            slot.label,
            v.key_name,
            v.key_version,
            v.transit_path,
            v.namespace
                .as_deref()
                .map(|n| format!(", namespace {n}"))
                .unwrap_or_default(),
            v.addresses.join(", ")
        ),
        SlotKms::Kmip(k) => format!(
            "slot {index} '{}' (kmip key id '{}', at {})",
            slot.label,
            k.key_id,
            k.addresses.join(", ")
        ),
    }
}

/// The configured KMS: for Vault, one client per Transit mount and
/// namespace that the slots use (built on first use, kept for retries);
/// for KMIP, the one KMIP client.
pub struct KmsAccess {
    cfg: KmsConfig,
    clients: Mutex<Vec<MountClient>>,
    kmip: Option<KmipClient>,
}

/// A client for one Transit mount path and namespace.
type MountClient = (String, Option<String>, Arc<VaultClient>);

impl std::fmt::Debug for KmsAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsAccess")
            .field("addresses", &self.cfg.addresses)
            .finish_non_exhaustive()
    }
}

impl KmsAccess {
    /// Builds the client for the configuration itself (reading the token
    /// file, or the KMIP certificates and key, so a bad one fails here,
    /// before any slot is tried).
    pub fn new(cfg: &KmsConfig) -> Result<Self, KmsError> {
        if cfg.kind == KmsKind::Kmip {
            return Ok(KmsAccess {
                cfg: cfg.clone(),
                clients: Mutex::new(Vec::new()),
                kmip: Some(KmipClient::new(cfg)?),
            });
        }
        let base = VaultClient::new(cfg)?;
        Ok(KmsAccess {
            cfg: cfg.clone(),
            clients: Mutex::new(vec![(
                cfg.transit_path.clone(),
                cfg.namespace.clone(),
                Arc::new(base),
            )]),
            kmip: None,
        })
    }

    /// The KMIP client, when the configuration is of type `kmip`.
    pub fn kmip(&self) -> Option<&KmipClient> {
        self.kmip.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &KmsConfig {
        &self.cfg
    }

    /// The Transit client for the configuration's own mount and namespace
    /// (none for a KMIP configuration).
    pub fn base(&self) -> Option<Arc<VaultClient>> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.first().map(|c| Arc::clone(&c.2))
    }

    /// A client for `transit_path` / `namespace` through this
    /// configuration's addresses and credentials.
    pub fn client_for(
        &self,
        transit_path: &str,
        namespace: Option<&str>,
    ) -> Result<Arc<VaultClient>, KmsError> {
        if self.cfg.kind != KmsKind::Vault {
            return Err(KmsError::Config {
                detail: "a KMIP configuration cannot open a Vault Transit slot".into(),
            });
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, c)) = clients
            .iter()
            .find(|(t, n, _)| t == transit_path && n.as_deref() == namespace)
        {
            return Ok(Arc::clone(c));
        }
        let mut cfg = self.cfg.clone();
        cfg.transit_path = transit_path.to_string();
        cfg.namespace = namespace.map(str::to_string);
        let c = Arc::new(VaultClient::new(&cfg)?);
        clients.push((cfg.transit_path, cfg.namespace, Arc::clone(&c)));
        Ok(c)
    }

    /// Every Transit client built so far, the configuration's own first.
    pub fn vault_clients(&self) -> Vec<Arc<VaultClient>> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.iter().map(|c| Arc::clone(&c.2)).collect()
    }

    /// The client for a Transit slot.
    pub fn client_for_slot(&self, v: &VaultSlot) -> Result<Arc<VaultClient>, KmsError> {
        self.client_for(&v.transit_path, v.namespace.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmsfs_keystore::AuthConfig;

    fn cfg(addr: &str, key: &str) -> KmsConfig {
        KmsConfig::new(
            vec![addr.into()],
            key,
            AuthConfig::Token { token_file: None },
        )
    }

    fn slot(label: &str, addr: &str, key: &str, mount: &str) -> KeySlot {
        KeySlot {
            label: label.into(),
            created: 0,
            kms: SlotKms::Vault(VaultSlot {
                addresses: vec![addr.into()],
                transit_path: mount.into(),
                namespace: None,
                key_name: key.into(),
                key_version: 1,
                uses_context: false,
                wrapped_key: "vault:v1:x".into(),
            }),
        }
    }

    #[test]
    fn the_dr_configuration_tries_the_dr_slot_first() {
        let slots = vec![
            slot("primary", "https://p:8200", "kmsfs", "transit"),
            slot("dr", "https://dr:8200/", "kmsfs", "transit"),
            slot("other-mount", "https://dr:8200", "kmsfs", "transit2"),
            slot("new-key", "https://DR:8200", "kmsfs-2", "transit"),
        ];
        let dr = cfg("https://dr:8200", "kmsfs");
        assert_eq!(reach(&dr, &slots[0]), Reach::SameKey);
        assert_eq!(reach(&dr, &slots[1]), Reach::Exact);
        assert_eq!(reach(&dr, &slots[2]), Reach::OtherVault);
        assert_eq!(reach(&dr, &slots[3]), Reach::SameKms);
        assert_eq!(try_order(&dr, &slots), vec![1, 3, 0, 2]);
        let primary = cfg("https://p:8200", "kmsfs");
        assert_eq!(try_order(&primary, &slots), vec![0, 1, 2, 3]);
    }

    #[test]
    fn kmip_slots_are_never_tried_with_a_vault_configuration() {
        let k = KeySlot {
            label: "escrow".into(),
            created: 0,
            kms: SlotKms::Kmip(kmsfs_core::header::KmipSlot {
                addresses: vec!["https://p:8200".into()],
                key_id: "1".into(),
                wrapped: "w".into(),
            }),
        };
        let c = cfg("https://p:8200", "kmsfs");
        assert_eq!(reach(&c, &k), Reach::OtherType);
        assert!(try_order(&c, &[k]).is_empty());
    }

    #[test]
    fn a_kmip_configuration_tries_only_kmip_slots_best_match_first() {
        let kmip = |label: &str, addr: &str, uid: &str| KeySlot {
            label: label.into(),
            created: 0,
            kms: SlotKms::Kmip(kmsfs_core::header::KmipSlot {
                addresses: vec![addr.into()],
                key_id: uid.into(),
                wrapped: "w".into(),
            }),
        };
        let slots = vec![
            slot("vault", "kmip-1:5696", "7", "transit"),
            kmip("other-server", "kmip-9:5696", "8"),
            kmip("old-key", "kmip-1:5696", "6"),
            kmip("primary", "KMIP-1:5696", "7"),
        ];
        let mut c = cfg("kmip-1:5696", "7");
        c.kind = KmsKind::Kmip;
        assert_eq!(reach(&c, &slots[0]), Reach::OtherType);
        assert_eq!(reach(&c, &slots[1]), Reach::OtherVault);
        assert_eq!(reach(&c, &slots[2]), Reach::SameKms);
        assert_eq!(reach(&c, &slots[3]), Reach::Exact);
        assert_eq!(try_order(&c, &slots), vec![3, 2, 1]);
    }
}
