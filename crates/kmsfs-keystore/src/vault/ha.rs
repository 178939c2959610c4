//! High availability: which node each request goes to, failover between
//! nodes, and retries within one deadline (the policy is in
//! [`super::retry`]).
//!
//! A Vault / OpenBao cluster has one active node. Standbys (`sys/health`
//! 429) forward requests to it, and performance standbys (473) serve or
//! forward them, so all three are usable: behind a load balancer, or with
//! only standbys reachable, kmsfs still works. The active node is
//! preferred when it is known (one hop fewer).
//!
//! When no node is remembered, every configured address is probed at once
//! (`sys/health`, in parallel). The first active node to answer ends the
//! probe; once a standby has answered, the probe waits at most
//! [`PREFER_ACTIVE_GRACE`] more for an active one. Nodes are then tried
//! best first: active, performance standby, standby. Sealed, uninitialised,
//! DR-secondary and unreachable nodes are not tried.
//!
//! The node that gave a real answer is remembered until it fails.

use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use kmsfs_core::secret::SecretBytes;
use reqwest::Method;
use serde::Deserialize;

use crate::error::{KmsError, Result};
use crate::vault::client::{api_errors, Reply, Transport, VaultClient};
use crate::vault::health::{NodeHealth, NodeState};
use crate::vault::retry::{verdict, Backoff, Deadline, Verdict};

/// How long a probe that found a usable standby keeps waiting for an
/// active node to answer too.
pub(crate) const PREFER_ACTIVE_GRACE: Duration = Duration::from_millis(250);

impl NodeState {
    /// True for nodes that serve API requests: the active node, standbys
    /// (which forward) and performance standbys.
    pub fn is_usable(&self) -> bool {
        self.preference().is_some()
    }

    /// Rank among usable nodes, best first; `None` for unusable ones.
    fn preference(&self) -> Option<u8> {
        match self {
            NodeState::Active => Some(0),
            NodeState::PerformanceStandby => Some(1),
            NodeState::Standby => Some(2),
            _ => None,
        }
    }
}

/// The outcome that ends a request when no node gives a final answer.
enum Last {
    /// Node failures: the error to report.
    Error(KmsError),
    /// A retryable answer (429, 500) that kept coming: handed to the
    /// caller, which maps it to an error naming the status.
    Reply(Reply),
}

impl VaultClient {
    /// Sends one request with failover and retries, within a deadline of
    /// `timeout_secs` from now.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&SecretBytes>,
        with_namespace: bool,
    ) -> Result<Reply> {
        let deadline = Deadline::after(self.timeout);
        self.send_until(method, path, body, token, with_namespace, deadline)
            .await
    }

    /// Sends one request to the best usable node, failing over to the
    /// others and retrying retryable answers for at most `attempts` rounds,
    /// all before `deadline`. Returns the first final answer (any status
    /// but 429 and 5xx), or the last 429/500 answer when they kept coming;
    /// sealed and unreachable nodes end as [`KmsError::Sealed`] /
    /// [`KmsError::Unreachable`].
    pub(crate) async fn send_until(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&SecretBytes>,
        with_namespace: bool,
        deadline: Deadline,
    ) -> Result<Reply> {
        let mut backoff = Backoff::default();
        let mut last: Option<Last> = None;
        let mut retry_after = None;
        for round in 0..self.attempts.max(1) {
            if round > 0 {
                let pause = backoff.next_pause(retry_after.take());
                if !deadline.fits(pause) {
                    break;
                }
                tracing::debug!(?pause, round, path, "retrying the KMS request");
                tokio::time::sleep(pause).await;
            }
            let remembered = self.remembered();
            let mut candidates = match remembered {
                Some(i) => vec![i],
                None => match self.probe_order(deadline, &[]).await {
                    Ok(c) => c,
                    Err(e) if e.is_transient() => {
                        tracing::debug!(error = %e, round, "no usable KMS node");
                        last = Some(Last::Error(e));
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            // One more probe per round when every candidate failed: the
            // first probe stops at the first active node, and a remembered
            // node was not probed at all.
            let mut reprobed = false;
            let mut k = 0;
            while k < candidates.len() {
                let idx = candidates[k];
                // A remembered node is tried before the others are probed:
                // leave room for all of them should it hang.
                let pool = if remembered.is_some() && !reprobed {
                    self.addresses.len()
                } else {
                    candidates.len()
                };
                let Some(limit) = deadline.share(pool.saturating_sub(k)) else {
                    break;
                };
                k += 1;
                let addr = &self.addresses[idx];
                let sent = self
                    .send_to_within(
                        addr,
                        method.clone(),
                        path,
                        body,
                        token,
                        with_namespace,
                        limit,
                    )
                    .await;
                let node_failed = match sent {
                    Ok(reply) => {
                        let errs = api_errors(&reply.body);
                        match verdict(reply.status, &errs) {
                            Verdict::Final => {
                                self.remember(idx);
                                return Ok(reply);
                            }
                            Verdict::Sealed => {
                                last = Some(Last::Error(KmsError::Sealed {
                                    address: addr.clone(),
                                }));
                                true
                            }
                            Verdict::NodeDown => {
                                tracing::info!(address = %addr, status = reply.status, path, "KMS node cannot serve; failing over");
                                last = Some(Last::Error(KmsError::Unreachable {
                                    addresses: addr.clone(),
                                    detail: format!("HTTP {}: {}", reply.status, errs.join("; ")),
                                }));
                                true
                            }
                            Verdict::Busy => {
                                tracing::info!(address = %addr, status = reply.status, path, "KMS busy or failing; retrying");
                                retry_after = reply.retry_after.or(retry_after);
                                last = Some(Last::Reply(reply));
                                false
                            }
                        }
                    }
                    Err(Transport::Tls(detail)) => {
                        return Err(KmsError::Tls {
                            detail: format!("{addr}: {detail}"),
                        })
                    }
                    Err(Transport::Other(detail)) => {
                        tracing::warn!(address = %addr, %detail, "KMS request failed; failing over");
                        last = Some(Last::Error(KmsError::Unreachable {
                            addresses: addr.clone(),
                            detail,
                        }));
                        true
                    }
                };
                if node_failed {
                    self.forget_active(idx);
                    if !reprobed && k == candidates.len() {
                        // Find another node now rather than after a pause.
                        reprobed = true;
                        match self.probe_order(deadline, &candidates).await {
                            Ok(more) => candidates.extend(more),
                            Err(e) if e.is_transient() => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            if deadline.passed() {
                break;
            }
        }
        match last {
            Some(Last::Reply(r)) => Ok(r),
            Some(Last::Error(e)) => Err(e),
            None => Err(KmsError::Unreachable {
                addresses: self.addresses.join(", "),
                detail: format!(
                    "no answer within the deadline of {} s",
                    self.timeout.as_secs()
                ),
            }),
        }
    }

    fn remembered(&self) -> Option<usize> {
        *self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, idx: usize) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = Some(idx);
    }

    fn forget_active(&self, idx: usize) {
        let mut a = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if *a == Some(idx) {
            *a = None;
        }
    }

    /// Probes every address but those in `exclude` in parallel and returns
    /// the usable ones, best first (see the module documentation). When
    /// none is usable: sealed if a node is sealed, else a TLS error if one
    /// failed TLS, else unreachable with every node's state.
    pub(crate) async fn probe_order(
        &self,
        deadline: Deadline,
        exclude: &[usize],
    ) -> Result<Vec<usize>> {
        let limit = deadline.remaining();
        let mut seen: Vec<(usize, NodeHealth)> = Vec::new();
        if !limit.is_zero() {
            let mut pending: FuturesUnordered<_> = self
                .addresses
                .iter()
                .enumerate()
                .filter(|(i, _)| !exclude.contains(i))
                .map(|(i, a)| async move { (i, self.node_health_within(a, limit).await) })
                .collect();
            let mut grace: Option<tokio::time::Instant> = None;
            loop {
                let next = match grace {
                    Some(g) => match tokio::time::timeout_at(g, pending.next()).await {
                        Ok(n) => n,
                        Err(_) => break,
                    },
                    None => pending.next().await,
                };
                let Some((i, h)) = next else { break };
                let active = h.state == NodeState::Active;
                if h.state.is_usable() && grace.is_none() {
                    grace = Some(tokio::time::Instant::now() + PREFER_ACTIVE_GRACE);
                }
                seen.push((i, h));
                if active {
                    break;
                }
            }
        }
        let mut usable: Vec<(u8, usize)> = seen
            .iter()
            .filter_map(|(i, h)| h.state.preference().map(|p| (p, *i)))
            .collect();
        if !usable.is_empty() {
            usable.sort_unstable();
            return Ok(usable.into_iter().map(|(_, i)| i).collect());
        }
        seen.sort_by_key(|(i, _)| *i);
        if let Some((_, h)) = seen.iter().find(|(_, h)| h.state == NodeState::Sealed) {
            return Err(KmsError::Sealed {
                address: h.address.clone(),
            });
        }
        if let Some((_, h)) = seen
            .iter()
            .find(|(_, h)| matches!(h.state, NodeState::Tls(_)))
        {
            if let NodeState::Tls(d) = &h.state {
                return Err(KmsError::Tls {
                    detail: format!("{}: {d}", h.address),
                });
            }
        }
        Err(KmsError::Unreachable {
            addresses: self.addresses.join(", "),
            detail: if seen.is_empty() {
                format!(
                    "no node answered within the deadline of {} s",
                    self.timeout.as_secs()
                )
            } else {
                seen.iter()
                    .map(|(_, h)| format!("{}: {}", h.address, h.state))
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        })
    }

    /// `GET /v1/sys/health` on one node, interpreted. Never fails: transport
    /// problems become [`NodeState::Unreachable`] or [`NodeState::Tls`].
    pub async fn node_health(&self, addr: &str) -> NodeHealth {
        self.node_health_within(addr, self.timeout).await
    }

    /// [`VaultClient::node_health`] within `limit`.
    pub(crate) async fn node_health_within(&self, addr: &str, limit: Duration) -> NodeHealth {
        #[derive(Deserialize, Default)]
        struct Raw {
            version: Option<String>,
            cluster_name: Option<String>,
        }
        let addr = addr.trim_end_matches('/');
        let (state, raw) = match self
            .send_to_within(addr, Method::GET, "sys/health", None, None, false, limit)
            .await
        {
            Err(Transport::Tls(d)) => (NodeState::Tls(d), Raw::default()),
            Err(Transport::Other(d)) => (NodeState::Unreachable(d), Raw::default()),
            Ok(r) => {
                let raw = serde_json::from_slice::<Raw>(&r.body).unwrap_or_default();
                let state = match r.status {
                    400 if String::from_utf8_lossy(&r.body).contains("HTTPS server") => {
                        NodeState::Tls(
                            "the server speaks HTTPS but the address is http://; use https://"
                                .into(),
                        )
                    }
                    200 => NodeState::Active,
                    429 => NodeState::Standby,
                    472 => NodeState::DrSecondary,
                    473 => NodeState::PerformanceStandby,
                    501 => NodeState::NotInitialized,
                    503 => NodeState::Sealed,
                    other => NodeState::Unexpected(other),
                };
                (state, raw)
            }
        };
        NodeHealth {
            address: addr.to_string(),
            state,
            version: raw.version,
            cluster_name: raw.cluster_name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthConfig, KmsConfig};
    use crate::vault::auth::Credentials;
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// What a scripted node answers: `(status, body)` for a request path.
    type Script = Box<dyn FnMut(&str) -> (u16, String) + Send>;

    /// A loopback HTTP server answering each request (one per connection)
    /// as `script` says: fault injection without a real cluster. Counts the
    /// API requests (everything but `sys/health`).
    struct Node {
        addr: String,
        api_hits: Arc<AtomicUsize>,
    }

    fn node(script: Script) -> Node {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let api_hits = Arc::new(AtomicUsize::new(0));
        let hits = Arc::clone(&api_hits);
        let script = Arc::new(Mutex::new(script));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                // A probe dropped before it sent anything (the client stops
                // waiting once an active node answered) is no request.
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                if !path.starts_with("/v1/sys/health") {
                    hits.fetch_add(1, Ordering::SeqCst);
                }
                let (status, text) = (script.lock().unwrap())(&path);
                if status == 0 {
                    // A node that hangs: holds the connection, never answers.
                    std::thread::sleep(Duration::from_secs(30));
                    continue;
                }
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        Node { addr, api_hits }
    }

    const KEY: &str =
        r#"{"data":{"name":"k","type":"aes256-gcm96","latest_version":1,"keys":{"1":1}}}"#;

    /// A node whose `sys/health` answers `health` and whose API answers
    /// the key, or the statuses in `faults` first, one per request.
    fn scripted(health: u16, faults: Vec<u16>) -> Node {
        let mut faults = faults.into_iter();
        node(Box::new(move |path| {
            if path.starts_with("/v1/sys/health") {
                return (health, r#"{"version":"2.7.2"}"#.into());
            }
            match faults.next() {
                Some(s) => (s, format!(r#"{{"errors":["injected {s}"]}}"#)),
                None => (200, KEY.into()),
            }
        }))
    }

    fn client(addrs: &[&str], timeout_secs: u64, attempts: u32) -> VaultClient {
        let mut cfg = KmsConfig::new(
            addrs.iter().map(|a| a.to_string()).collect(),
            "k",
            AuthConfig::Token { token_file: None },
        );
        cfg.timeout_secs = timeout_secs;
        cfg.attempts = attempts;
        VaultClient::with_credentials(&cfg, Credentials::Token(SecretBytes::from_slice(b"t")))
            .unwrap()
    }

    /// Standbys (429) forward requests and performance standbys (473)
    /// serve them: a client that only reaches those still works.
    #[tokio::test(flavor = "multi_thread")]
    async fn standbys_and_performance_standbys_are_usable() {
        for health in [429, 473] {
            let n = scripted(health, vec![]);
            let c = client(&[&n.addr], 5, 3);
            let k = c
                .read_key("k")
                .await
                .unwrap_or_else(|e| panic!("{health}: {e}"));
            assert_eq!(k.latest_version, 1);
            assert_eq!(n.api_hits.load(Ordering::SeqCst), 1);
        }
        // Sealed, uninitialised and DR-secondary nodes are not used.
        for (health, sealed) in [(503, true), (501, false), (472, false)] {
            let n = scripted(health, vec![]);
            let e = client(&[&n.addr], 2, 2).read_key("k").await.unwrap_err();
            assert_eq!(
                matches!(e, KmsError::Sealed { .. }),
                sealed,
                "{health}: {e}"
            );
            assert!(e.is_retryable(), "{e}");
            assert_eq!(n.api_hits.load(Ordering::SeqCst), 0);
        }
    }

    /// With a standby listed first, the active node gets the request.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_active_node_is_preferred() {
        let standby = scripted(429, vec![]);
        let active = scripted(200, vec![]);
        let dead = "http://127.0.0.1:1";
        let c = client(&[dead, &standby.addr, &active.addr], 5, 3);
        c.read_key("k").await.unwrap();
        c.read_key("k").await.unwrap();
        assert_eq!(active.api_hits.load(Ordering::SeqCst), 2);
        assert_eq!(standby.api_hits.load(Ordering::SeqCst), 0);
        assert_eq!(c.active_address().as_deref(), Some(active.addr.as_str()));
    }

    /// 503, 502, 504, 500 and 429 answers are retried (backoff, jitter)
    /// until one succeeds, on the same node when it is the only one.
    #[tokio::test(flavor = "multi_thread")]
    async fn server_errors_and_rate_limits_are_retried() {
        let n = scripted(200, vec![503, 429, 500, 502, 504]);
        let c = client(&[&n.addr], 20, 6);
        c.read_key("k").await.unwrap();
        assert_eq!(n.api_hits.load(Ordering::SeqCst), 6);
        // At most `attempts` rounds: the last 429 goes to the caller.
        let n = scripted(200, vec![429; 10]);
        let e = client(&[&n.addr], 20, 3).read_key("k").await.unwrap_err();
        assert!(matches!(e, KmsError::Http { status: 429, .. }), "{e:?}");
        assert!(e.is_retryable(), "{e}");
        assert_eq!(n.api_hits.load(Ordering::SeqCst), 3);
        // A node that fails is left for the next one in the same round.
        let bad = scripted(200, vec![503; 10]);
        let good = scripted(429, vec![]);
        let c = client(&[&bad.addr, &good.addr], 20, 1);
        c.read_key("k").await.unwrap();
        assert_eq!(bad.api_hits.load(Ordering::SeqCst), 1);
        assert_eq!(good.api_hits.load(Ordering::SeqCst), 1);
    }

    /// The remembered node hangs: it gets only a share of the deadline,
    /// and the request still succeeds on another node in time.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_remembered_node_that_hangs_leaves_time_for_the_others() {
        let mut served = false;
        let flaky = node(Box::new(move |path| {
            if path.starts_with("/v1/sys/health") {
                return (200, "{}".into());
            }
            if served {
                return (0, String::new());
            }
            served = true;
            (200, KEY.into())
        }));
        let standby = scripted(429, vec![]);
        let c = client(&[&flaky.addr, &standby.addr], 6, 1);
        c.read_key("k").await.unwrap();
        assert_eq!(c.active_address().as_deref(), Some(flaky.addr.as_str()));
        c.read_key("k").await.unwrap();
        assert_eq!(standby.api_hits.load(Ordering::SeqCst), 1);
        assert_eq!(c.active_address().as_deref(), Some(standby.addr.as_str()));
    }

    /// Answers that asking again cannot change are returned at once.
    #[tokio::test(flavor = "multi_thread")]
    async fn client_errors_are_not_retried() {
        for status in [400, 404, 405] {
            let n = scripted(200, vec![status; 5]);
            let e = client(&[&n.addr], 20, 5).read_key("k").await.unwrap_err();
            assert!(!e.is_retryable(), "{status}: {e}");
            assert_eq!(n.api_hits.load(Ordering::SeqCst), 1, "{status}");
        }
        // 403: one request, then one lookup-self to tell a dead token from
        // a narrow policy; nothing more.
        let n = scripted(200, vec![403; 5]);
        let e = client(&[&n.addr], 20, 5).read_key("k").await.unwrap_err();
        assert!(matches!(e, KmsError::TokenExpired { .. }), "{e:?}");
        assert_eq!(n.api_hits.load(Ordering::SeqCst), 2);
    }

    /// Nodes that accept connections and never answer: one deadline covers
    /// the probes and every attempt on every node, not attempts × nodes ×
    /// timeout (9 s and more here; the bound below is 5 s for a 1 s
    /// deadline, wide enough for a loaded machine).
    #[tokio::test(flavor = "multi_thread")]
    async fn one_deadline_covers_every_node_and_attempt() {
        let mut addrs = Vec::new();
        let mut keep = Vec::new();
        for _ in 0..3 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            addrs.push(format!("http://{}", l.local_addr().unwrap()));
            keep.push(l); // accepted by the kernel, never answered
        }
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let c = client(&refs, 1, 3);
        let start = std::time::Instant::now();
        let e = c.read_key("k").await.unwrap_err();
        let took = start.elapsed();
        assert!(matches!(e, KmsError::Unreachable { .. }), "{e:?}");
        assert!(e.is_retryable());
        assert!(took < Duration::from_secs(5), "took {took:?}");
        drop(keep);
    }
}
