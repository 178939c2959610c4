//! `kms check` for the nodes of a Vault / OpenBao cluster: each node's
//! state (active, standby, performance standby, sealed, unreachable) and
//! version, whether any node can serve, the storage type and the seal type.

use kmsfs_keystore::{NodeReport, NodeState, SealStatus, VaultClient};

use super::{Checks, Status};

/// Adds one `node` line per configured address and the `reachable`,
/// `seal`, `storage` and `seal-type` lines. Returns false when no node can
/// serve requests (the remaining checks would only repeat that).
pub(super) async fn node_checks(client: &VaultClient, c: &mut Checks) -> bool {
    let reports = client.node_reports().await;
    for r in &reports {
        let status = if r.health.state.is_usable() {
            Status::Ok
        } else {
            Status::Warn
        };
        c.add(status, "node", node_line(r));
    }
    let usable: Vec<&NodeReport> = reports
        .iter()
        .filter(|r| r.health.state.is_usable())
        .collect();
    if usable.is_empty() {
        let sealed: Vec<&str> = reports
            .iter()
            .filter(|r| r.health.state == NodeState::Sealed)
            .map(|r| r.health.address.as_str())
            .collect();
        if !sealed.is_empty() {
            c.add(
                Status::Fail,
                "seal",
                format!(
                    "KMS at {} is sealed and no other node can serve; unseal it (bao operator unseal)",
                    sealed.join(", ")
                ),
            );
        } else {
            c.add(
                Status::Fail,
                "reachable",
                format!(
                    "KMS unreachable: no node can serve requests ({})",
                    reports
                        .iter()
                        .map(|r| format!("{}: {}", r.health.address, r.health.state))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            );
        }
        seal_type(&reports, c);
        return false;
    }
    let active = reports
        .iter()
        .find(|r| r.health.state == NodeState::Active)
        .map(|r| format!("active node {}", r.health.address))
        .unwrap_or_else(|| "no active node among them (standbys forward to it)".into());
    c.add(
        Status::Ok,
        "reachable",
        format!(
            "KMS answers at {} of {} address(es); {active}",
            usable.len(),
            reports.len()
        ),
    );
    match usable.iter().find_map(|r| r.seal.as_ref().ok()) {
        Some(s) if s.is_in_memory() => c.add(
            Status::Warn,
            "storage",
            "KMS uses in-memory storage (a dev server): its keys vanish when it stops, and every filesystem wrapped by it with them; no disaster recovery",
        ),
        Some(s) => c.add(
            Status::Ok,
            "storage",
            format!(
                "storage type {}",
                s.storage_type.as_deref().unwrap_or("unknown")
            ),
        ),
        None => c.add(
            Status::Warn,
            "storage",
            "cannot read sys/seal-status: storage type unknown",
        ),
    }
    seal_type(&reports, c);
    true
}

/// `ADDR: STATE, version V, seal TYPE`.
fn node_line(r: &NodeReport) -> String {
    let h = &r.health;
    let seal = r.seal.as_ref().ok();
    let version = h
        .version
        .clone()
        .or_else(|| seal.and_then(|s| s.version.clone()));
    let mut line = format!("{}: {}", h.address, h.state);
    if let Some(v) = version {
        line.push_str(&format!(", version {v}"));
    }
    if let Some(t) = seal.and_then(|s| s.seal_type.as_deref()) {
        line.push_str(&format!(", seal type {t}"));
    }
    line
}

/// The seal type, from the first node that reports one: Shamir means an
/// operator unseals every node after a restart (and boot-time mounts wait
/// for that); anything else unseals itself.
fn seal_type(reports: &[NodeReport], c: &mut Checks) {
    let Some(s) = reports.iter().find_map(|r| {
        r.seal
            .as_ref()
            .ok()
            .filter(|s: &&SealStatus| s.seal_type.is_some())
    }) else {
        return;
    };
    let t = s.seal_type.as_deref().unwrap_or_default();
    if s.is_shamir() {
        c.add(
            Status::Ok,
            "seal-type",
            "shamir: a KMS node that restarts stays sealed until an operator unseals it (bao operator unseal); until then boot-time mounts wait (kms_timeout) and fail",
        );
    } else {
        c.add(
            Status::Ok,
            "seal-type",
            format!("{t} (auto-unseal): KMS nodes unseal themselves after a restart"),
        );
    }
}
