//! Health and diagnostics: `sys/health`, `sys/seal-status`,
//! `auth/token/lookup-self`, for a doctor command.

use std::fmt;

use futures_util::future::join_all;
use reqwest::Method;
use serde::Deserialize;

use crate::error::{KmsError, Result};
use crate::vault::client::{http_error, parse_data, Transport, VaultClient};

/// What `sys/health` says about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    /// 200: initialized, unsealed, active.
    Active,
    /// 429: unsealed standby.
    Standby,
    /// 472: disaster-recovery secondary.
    DrSecondary,
    /// 473: performance standby.
    PerformanceStandby,
    /// 501: not initialized.
    NotInitialized,
    /// 503: sealed.
    Sealed,
    /// Any other status.
    Unexpected(u16),
    /// Connection refused, DNS failure, timeout…
    Unreachable(String),
    /// TLS handshake or certificate failure.
    Tls(String),
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeState::Active => write!(f, "active"),
            NodeState::Standby => write!(f, "standby (HTTP 429)"),
            NodeState::DrSecondary => write!(f, "DR secondary (HTTP 472)"),
            NodeState::PerformanceStandby => write!(f, "performance standby (HTTP 473)"),
            NodeState::NotInitialized => write!(f, "not initialized (HTTP 501)"),
            NodeState::Sealed => write!(f, "sealed (HTTP 503)"),
            NodeState::Unexpected(s) => write!(f, "unexpected HTTP {s}"),
            NodeState::Unreachable(d) => write!(f, "unreachable: {d}"),
            NodeState::Tls(d) => write!(f, "TLS error: {d}"),
        }
    }
}

/// One node's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealth {
    /// The node address.
    pub address: String,
    /// Its state.
    pub state: NodeState,
    /// Server version, when it answered.
    pub version: Option<String>,
    /// Cluster name, when it answered and is unsealed.
    pub cluster_name: Option<String>,
}

/// `sys/seal-status` of a node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SealStatus {
    /// Sealed?
    pub sealed: bool,
    /// Initialized?
    pub initialized: bool,
    /// Seal type (`shamir`, `awskms`, …).
    #[serde(rename = "type", default)]
    pub seal_type: Option<String>,
    /// Storage backend (`inmem` for a dev server: all data lost on restart),
    /// reported by OpenBao and recent Vault.
    #[serde(default)]
    pub storage_type: Option<String>,
    /// Server version.
    #[serde(default)]
    pub version: Option<String>,
    /// Cluster name.
    #[serde(default)]
    pub cluster_name: Option<String>,
}

/// What `kms check` shows about one node: its health and, when it
/// answered, its seal status (seal type, storage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    /// `sys/health`.
    pub health: NodeHealth,
    /// `sys/seal-status`, or why it could not be read.
    pub seal: std::result::Result<SealStatus, String>,
}

impl SealStatus {
    /// True for Shamir seals: after a restart an operator must unseal
    /// the node by hand (auto-unseal seals such as `awskms` or `transit`
    /// unseal themselves).
    pub fn is_shamir(&self) -> bool {
        self.seal_type.as_deref() == Some("shamir")
    }

    /// True when the server keeps everything in memory (a dev server):
    /// keys wrapped there are lost when it stops.
    pub fn is_in_memory(&self) -> bool {
        self.storage_type.as_deref() == Some("inmem")
    }
}

/// `auth/token/lookup-self` of the client's token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TokenInfo {
    /// Display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Policies attached.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Remaining time to live in seconds; 0 means no expiry (root tokens).
    #[serde(default)]
    pub ttl: u64,
    /// Whether the token can be renewed.
    #[serde(default)]
    pub renewable: bool,
    /// RFC 3339 expiry time, if any.
    #[serde(default)]
    pub expire_time: Option<String>,
    /// `service` or `batch`.
    #[serde(rename = "type", default)]
    pub token_type: Option<String>,
}

impl VaultClient {
    /// `sys/health` of every configured address, in order (probed in
    /// parallel).
    pub async fn health(&self) -> Vec<NodeHealth> {
        join_all(self.addresses.iter().map(|a| self.node_health(a))).await
    }

    /// `sys/health` and `sys/seal-status` of every configured address, in
    /// order (all probed in parallel; unauthenticated).
    pub async fn node_reports(&self) -> Vec<NodeReport> {
        join_all(self.addresses.iter().map(|a| async move {
            let (health, seal) = tokio::join!(self.node_health(a), self.node_seal_status(a));
            NodeReport { health, seal }
        }))
        .await
    }

    /// `sys/seal-status` of one node (sealed or not; unauthenticated).
    pub async fn node_seal_status(&self, addr: &str) -> std::result::Result<SealStatus, String> {
        let reply = self
            .send_to_within(
                addr.trim_end_matches('/'),
                Method::GET,
                "sys/seal-status",
                None,
                None,
                false,
                self.timeout,
            )
            .await
            .map_err(|t| match t {
                Transport::Tls(d) | Transport::Other(d) => d,
            })?;
        if reply.status != 200 {
            return Err(format!("HTTP {}", reply.status));
        }
        serde_json::from_slice::<SealStatus>(&reply.body)
            .map_err(|e| format!("cannot parse /v1/sys/seal-status: {e}"))
    }

    /// `sys/seal-status` of the first address that answers (sealed or not;
    /// unauthenticated).
    pub async fn seal_status(&self) -> Result<SealStatus> {
        let mut details = Vec::new();
        for a in &self.addresses {
            let resp = self
                .http
                .get(format!("{a}/v1/sys/seal-status"))
                .send()
                .await;
            match resp {
                Ok(r) if r.status().is_success() => {
                    return r
                        .json::<SealStatus>()
                        .await
                        .map_err(|e| KmsError::Protocol {
                            path: "/v1/sys/seal-status".into(),
                            detail: e.to_string(),
                        });
                }
                Ok(r) => details.push(format!("{a}: HTTP {}", r.status().as_u16())),
                Err(e) => details.push(format!("{a}: {e}")),
            }
        }
        Err(KmsError::Unreachable {
            addresses: self.addresses.join(", "),
            detail: details.join("; "),
        })
    }

    /// Looks up the client's own token: TTL, renewability, expiry, policies.
    pub async fn token_info(&self) -> Result<TokenInfo> {
        let path = "auth/token/lookup-self";
        let reply = self.call(Method::GET, path, None).await?;
        if reply.status != 200 {
            return Err(http_error(path, &reply));
        }
        parse_data(path, &reply.body)
    }
}
