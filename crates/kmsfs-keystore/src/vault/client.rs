//! The HTTP core: node selection, failover, retries, authentication headers.

use std::error::Error as _;
use std::fs;
use std::sync::Mutex;
use std::time::Duration;

use kmsfs_core::secret::SecretBytes;
use reqwest::header::HeaderValue;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use zeroize::{Zeroize as _, Zeroizing};

use crate::config::KmsConfig;
use crate::error::{KmsError, Result};
use crate::secret_file::read_secret_file;
use crate::vault::auth::Credentials;
use crate::vault::retry::Deadline;

/// An async client for the parts of the Vault / OpenBao HTTP API kmsfs uses.
///
/// Built from a [`KmsConfig`] without touching the network. Every request
/// goes to the best usable node of the configured addresses (the active
/// node, else a standby, which forwards; found with parallel `sys/health`
/// probes and remembered until it fails), fails over to the next node on
/// connection errors, timeouts and sealed nodes, and retries 429 and 5xx
/// answers with backoff and jitter, for at most `attempts` rounds, all
/// within one deadline of `timeout_secs` (modules `vault::ha` and
/// `vault::retry`). With AppRole the client logs in on first use
/// and once more when a request is refused with 403 (expired token).
///
/// Tokens are held in [`SecretBytes`]; HTTP header copies made by `reqwest`
/// are marked sensitive but cannot be zeroized.
pub struct VaultClient {
    pub(crate) http: reqwest::Client,
    pub(crate) addresses: Vec<String>,
    pub(crate) namespace: Option<String>,
    pub(crate) transit_path: String,
    pub(crate) key_name: String,
    pub(crate) timeout: Duration,
    pub(crate) attempts: u32,
    pub(crate) credentials: Credentials,
    pub(crate) token: tokio::sync::Mutex<Option<SecretBytes>>,
    /// The node that answered last (the active one when it is known).
    pub(crate) active: Mutex<Option<usize>>,
}

/// The token self-lookup path, used to tell a dead token from a narrow policy.
const LOOKUP_SELF: &str = "auth/token/lookup-self";

impl std::fmt::Debug for VaultClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultClient")
            .field("addresses", &self.addresses)
            .field("namespace", &self.namespace)
            .field("transit_path", &self.transit_path)
            .field("key_name", &self.key_name)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

/// A raw answer: status and body (zeroized when dropped, since bodies may
/// carry plaintext keys or tokens).
pub(crate) struct Reply {
    pub status: u16,
    pub body: Zeroizing<Vec<u8>>,
    /// The `Retry-After` header, when the server sent one (in seconds).
    pub retry_after: Option<Duration>,
}

pub(crate) enum Transport {
    Tls(String),
    Other(String),
}

impl VaultClient {
    /// Builds a client from a configuration, reading the token file (or
    /// `VAULT_TOKEN` / `BAO_TOKEN` when the token auth has no file), the CA
    /// file (or `VAULT_CACERT` / `BAO_CACERT`) and the client certificate.
    /// No network access happens here.
    pub fn new(config: &KmsConfig) -> Result<Self> {
        let credentials = Credentials::from_config(&config.auth)?;
        Self::with_credentials(config, credentials)
    }

    /// Like [`VaultClient::new`] with credentials supplied by the caller
    /// (`config.auth` is ignored).
    pub fn with_credentials(config: &KmsConfig, credentials: Credentials) -> Result<Self> {
        config.validate()?;
        if config.kind != crate::config::KmsKind::Vault {
            return Err(KmsError::Config {
                detail: format!(
                    "the configured KMS is of type \"{}\", not \"vault\"; this command cannot use it yet",
                    config.kind.as_str()
                ),
            });
        }
        unsupported_tls_env(|k| std::env::var(k).ok())?;
        let timeout = Duration::from_secs(config.timeout_secs);
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            // No idle connections kept: each request opens its own, driven
            // by the runtime that sends it. A pooled connection belongs to
            // the runtime that opened it and hangs when that one is not
            // running, which would stall the revoke a dropped client sends
            // from a thread of its own (`session.rs`). kmsfs makes a
            // handful of requests per command, so little is lost.
            .pool_max_idle_per_host(0)
            .timeout(timeout)
            .connect_timeout(timeout)
            // Never follow redirects: the token header would go along.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kmsfs/", env!("CARGO_PKG_VERSION")));

        let ca_path = config.ca_cert.clone().or_else(|| {
            ["VAULT_CACERT", "BAO_CACERT"]
                .iter()
                .filter_map(std::env::var_os)
                .find(|v| !v.is_empty())
                .map(Into::into)
        });
        if let Some(ca) = ca_path {
            let pem = fs::read(&ca).map_err(|e| KmsError::Tls {
                detail: format!("cannot read CA certificate {}: {e}", ca.display()),
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| KmsError::Tls {
                detail: format!("invalid CA certificate {}: {e}", ca.display()),
            })?;
            if certs.is_empty() {
                return Err(KmsError::Tls {
                    detail: format!("no PEM certificate found in {}", ca.display()),
                });
            }
            // Only the given CA, as the vault CLI does with VAULT_CACERT.
            builder = builder.tls_built_in_root_certs(false);
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        } else {
            // No CA given: the operating system's trust store (what the
            // vault CLI uses; SSL_CERT_FILE / SSL_CERT_DIR are honoured),
            // not a list compiled into the binary.
            builder = builder
                .tls_built_in_webpki_certs(false)
                .tls_built_in_native_certs(true);
        }
        if let (Some(cert), Some(key)) = (&config.client_cert, &config.client_key) {
            let cert_pem = fs::read(cert).map_err(|e| KmsError::Tls {
                detail: format!("cannot read client certificate {}: {e}", cert.display()),
            })?;
            let key_pem = read_secret_file(key, false)?;
            let mut both = Zeroizing::new(Vec::with_capacity(cert_pem.len() + key_pem.len() + 1));
            both.extend_from_slice(&cert_pem);
            both.push(b'\n');
            both.extend_from_slice(key_pem.expose());
            let id = reqwest::Identity::from_pem(&both).map_err(|e| KmsError::Tls {
                detail: format!(
                    "invalid client certificate/key {} / {}: {e}",
                    cert.display(),
                    key.display()
                ),
            })?;
            builder = builder.identity(id);
        }
        let http = builder.build().map_err(|e| KmsError::Tls {
            detail: format!("cannot build the HTTPS client: {}", error_chain(&e)),
        })?;

        // Without a token of its own, kmsfs talks to the agent named by
        // VAULT_AGENT_ADDR, which adds its auto-auth token to each request.
        let addresses = match (&credentials, crate::vault::auth::agent_address()) {
            (Credentials::Agent, Some(agent)) => vec![agent],
            _ => config
                .addresses
                .iter()
                .map(|a| a.trim_end_matches('/').to_string())
                .collect(),
        };
        Ok(VaultClient {
            http,
            addresses,
            namespace: config.namespace.clone().filter(|n| !n.is_empty()),
            transit_path: config.transit_path.trim_matches('/').to_string(),
            key_name: config.key_name.clone(),
            timeout,
            attempts: config.attempts,
            credentials,
            token: tokio::sync::Mutex::new(None),
            active: Mutex::new(None),
        })
    }

    /// The configured Transit key name (`key_name`).
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The configured addresses, without trailing slashes.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// The address currently believed to be the active node, if known.
    pub fn active_address(&self) -> Option<String> {
        let idx = *self.active.lock().unwrap_or_else(|p| p.into_inner());
        idx.map(|i| self.addresses[i].clone())
    }

    /// An authenticated API call with failover, 403 re-login (AppRole) and
    /// permission mapping. Returns any other status for the caller to map.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply> {
        let mut relogged_in = false;
        // One deadline for the request, its retries and the lookup below.
        let deadline = Deadline::after(self.timeout);
        loop {
            let token = self.current_token().await?;
            let reply = self
                .send_until(method.clone(), path, body, token.as_ref(), true, deadline)
                .await?;
            if reply.status == 403 {
                if !relogged_in && self.credentials.can_login() {
                    relogged_in = true;
                    if let Credentials::TokenFile(_) = &self.credentials {
                        // The file may have been rotated since it was read
                        // (an agent renewing its sink): try the new token.
                        if self.current_token().await.ok().flatten() != token {
                            tracing::info!(
                                path,
                                "KMS refused the request (403); the token file changed, retrying"
                            );
                            continue;
                        }
                    } else if let Some(t) = &token {
                        tracing::info!(path, "KMS refused the request (403); logging in again");
                        self.invalidate_token(t).await;
                        continue;
                    }
                }
                let errs = api_errors(&reply.body);
                // Vault answers 403 both for a dead token and for a policy
                // that does not cover the path: a token that cannot even look
                // itself up is the former.
                if path != LOOKUP_SELF
                    && self
                        .send_until(
                            Method::GET,
                            LOOKUP_SELF,
                            None,
                            token.as_ref(),
                            true,
                            deadline,
                        )
                        .await
                        .map(|r| r.status == 403)
                        .unwrap_or(false)
                {
                    return Err(KmsError::TokenExpired {
                        detail: format!(
                            "{method} /v1/{path} refused and the token cannot look itself up; \
                             replace the token (or its file) with a valid one"
                        ),
                    });
                }
                return Err(KmsError::PermissionDenied {
                    detail: format!(
                        "{method} /v1/{path}: {}; the token is valid, so check that its policy allows this path",
                        if errs.is_empty() { "permission denied".into() } else { errs.join("; ") }
                    ),
                });
            }
            return Ok(reply);
        }
    }

    /// One request to one node, bounded by `limit`; no retries.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_to_within(
        &self,
        addr: &str,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&SecretBytes>,
        with_namespace: bool,
        limit: Duration,
    ) -> std::result::Result<Reply, Transport> {
        let url = format!("{addr}/v1/{path}");
        let mut req = self.http.request(method, &url).timeout(limit);
        if let Some(t) = token {
            // Shared with reqwest without a copy, and wiped when its last
            // user drops it.
            let shared = bytes::Bytes::from_owner(LockedBytes(t.clone()));
            let mut hv = HeaderValue::from_maybe_shared(shared).map_err(|_| {
                Transport::Other(
                    "the token contains characters not allowed in an HTTP header".into(),
                )
            })?;
            hv.set_sensitive(true);
            req = req.header("X-Vault-Token", hv);
        }
        if with_namespace {
            if let Some(ns) = &self.namespace {
                req = req.header("X-Vault-Namespace", ns.as_str());
            }
        }
        if let Some(b) = body {
            // The body may carry a plaintext key: hand reqwest a locked copy
            // that is zeroized when its last user drops it.
            let shared = bytes::Bytes::from_owner(LockedBytes(SecretBytes::from_slice(b)));
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(shared);
        }
        let mut resp = req.send().await.map_err(|e| classify(&e, limit))?;
        let status = resp.status().as_u16();
        let retry_after = crate::vault::retry::retry_after(resp.headers());
        let body = read_body(&mut resp).await.map_err(|e| match e {
            BodyError::Http(e) => classify(&e, limit),
            BodyError::TooLarge => Transport::Other(format!(
                "the answer to {path} is larger than {MAX_RESPONSE} bytes"
            )),
        })?;
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }
}

/// A transport failure as TLS (not worth another node) or anything else.
fn classify(e: &reqwest::Error, limit: Duration) -> Transport {
    if e.is_timeout() {
        return Transport::Other(format!("timed out after {:.1} s", limit.as_secs_f64()));
    }
    let cause = innermost_cause(e);
    if is_tls_error(e) {
        return Transport::Tls(format!(
            "{cause} (check `ca_cert` / VAULT_CACERT and the address scheme)"
        ));
    }
    if e.is_connect() {
        return Transport::Other(format!("cannot connect: {cause}"));
    }
    Transport::Other(cause)
}

/// Refuses the vault CLI's TLS variables kmsfs does not implement yet, so
/// that none is silently ignored (an operator who set VAULT_SKIP_VERIFY
/// must not believe it applies, nor that a CA directory is trusted).
fn unsupported_tls_env(get: impl Fn(&str) -> Option<String>) -> Result<()> {
    for (var, fix) in [
        (
            "VAULT_CAPATH",
            "concatenate the CA certificates into one PEM file and pass it with --ca-cert",
        ),
        (
            "BAO_CAPATH",
            "concatenate the CA certificates into one PEM file and pass it with --ca-cert",
        ),
        (
            "VAULT_TLS_SERVER_NAME",
            "use an address whose host name matches the server certificate",
        ),
        (
            "BAO_TLS_SERVER_NAME",
            "use an address whose host name matches the server certificate",
        ),
        (
            "VAULT_SKIP_VERIFY",
            "give the server's CA with --ca-cert instead",
        ),
        (
            "BAO_SKIP_VERIFY",
            "give the server's CA with --ca-cert instead",
        ),
    ] {
        let Some(v) = get(var) else { continue };
        let v = v.trim();
        let off = v.is_empty()
            || (var.ends_with("SKIP_VERIFY")
                && ["0", "false", "f", "no"].contains(&v.to_ascii_lowercase().as_str()));
        if !off {
            return Err(KmsError::Config {
                detail: format!(
                    "{var} is set, but kmsfs does not support it (it would be ignored): unset it and {fix}"
                ),
            });
        }
    }
    Ok(())
}

/// Largest response body accepted; real answers are a few KiB.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// A secret lent to `bytes::Bytes::from_owner`, so that buffers reqwest
/// keeps (request bodies, header values) live in locked memory and are
/// zeroized when dropped.
struct LockedBytes(SecretBytes);

impl AsRef<[u8]> for LockedBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.expose()
    }
}

enum BodyError {
    Http(reqwest::Error),
    TooLarge,
}

/// Reads a response body (which may carry a plaintext key or a token) into
/// zeroizing memory. The buffer grows by moving into a fresh one, never by
/// `realloc`, which would free the old bytes without wiping them; each
/// chunk reqwest hands over is wiped too when we are its only owner. (Copies
/// in hyper's and rustls's own buffers are beyond our reach.)
async fn read_body(
    resp: &mut reqwest::Response,
) -> std::result::Result<Zeroizing<Vec<u8>>, BodyError> {
    let hint = resp.content_length().unwrap_or(0).min(MAX_RESPONSE as u64) as usize;
    let mut buf = Zeroizing::new(Vec::with_capacity(hint));
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Http)? {
        let need = buf.len() + chunk.len();
        if need > MAX_RESPONSE {
            wipe_chunk(chunk);
            return Err(BodyError::TooLarge);
        }
        if need > buf.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(buf.capacity() * 2)));
            bigger.extend_from_slice(&buf);
            buf = bigger; // the old buffer is zeroized as it drops
        }
        buf.extend_from_slice(&chunk);
        wipe_chunk(chunk);
    }
    Ok(buf)
}

/// Zeroizes a received chunk when no one else shares its memory.
fn wipe_chunk(chunk: bytes::Bytes) {
    if let Ok(mut owned) = chunk.try_into_mut() {
        owned.as_mut().zeroize();
    }
}

/// The `errors` strings of a Vault error body (or a short excerpt of a
/// non-JSON body).
pub(crate) fn api_errors(body: &[u8]) -> Vec<String> {
    #[derive(Deserialize)]
    struct ErrBody {
        #[serde(default)]
        errors: Vec<String>,
    }
    match serde_json::from_slice::<ErrBody>(body) {
        Ok(e) => e.errors.iter().map(|m| clean_message(m)).collect(),
        Err(_) if body.is_empty() => Vec::new(),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let mut excerpt: String = text.trim().chars().take(200).collect();
            if text.trim().chars().count() > 200 {
                excerpt.push('…');
            }
            vec![excerpt]
        }
    }
}

/// Flattens Go multierror text ("1 error occurred:\n\t* permission
/// denied\n\n") into one line ("permission denied").
fn clean_message(m: &str) -> String {
    m.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && (!l.ends_with("occurred:") || !l.contains("error")))
        .map(|l| l.strip_prefix("* ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Parses the `data` object of a successful answer.
pub(crate) fn parse_data<T: DeserializeOwned>(path: &str, body: &[u8]) -> Result<T> {
    #[derive(Deserialize)]
    struct Envelope<T> {
        data: T,
    }
    serde_json::from_slice::<Envelope<T>>(body)
        .map(|e| e.data)
        .map_err(|e| KmsError::Protocol {
            path: path.to_string(),
            detail: format!("cannot parse the response: {e}"),
        })
}

/// Maps a status the caller has no specific meaning for.
pub(crate) fn http_error(path: &str, reply: &Reply) -> KmsError {
    KmsError::Http {
        status: reply.status,
        path: format!("/v1/{path}"),
        errors: api_errors(&reply.body),
    }
}

/// True when a rustls error is somewhere in the error's source chain
/// (directly, or inside the `io::Error` tokio-rustls wraps it in). Decided by
/// type, never by the text: a host named `vault-tls.corp` appears in every
/// message about it, DNS failures included.
fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        // `io::Error::source` skips the error it wraps (it returns that
        // error's source), so step into the wrapped one explicitly.
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// The deepest error in the chain: the actual reason ("Connection refused",
/// "invalid peer certificate: UnknownIssuer") without reqwest's wrapping.
fn innermost_cause(e: &reqwest::Error) -> String {
    let mut last: &dyn std::error::Error = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}

fn error_chain(e: &reqwest::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthConfig;
    use crate::vault::health::NodeState;
    use std::io::{Read as _, Write as _};

    /// A one-shot HTTP server answering 200 with `body`, written in small
    /// pieces, without Content-Length (the body ends when the connection
    /// closes), so the reader cannot size its buffer up front.
    fn serve_once(body: Vec<u8>) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 4096];
            let _ = conn.read(&mut req);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
            for piece in body.chunks(777) {
                if conn.write_all(piece).is_err() {
                    return;
                }
                let _ = conn.flush();
            }
        });
        addr
    }

    fn client_for(addr: &str) -> VaultClient {
        let cfg = KmsConfig::new(
            vec![addr.to_string()],
            "k",
            AuthConfig::Token { token_file: None },
        );
        VaultClient::with_credentials(&cfg, Credentials::Token(SecretBytes::from_slice(b"t")))
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn bodies_without_length_are_read_whole() {
        let mut body = br#"{"version":"1.2.3","cluster_name":""#.to_vec();
        body.extend(std::iter::repeat_n(b'c', 100_000));
        body.extend_from_slice(br#""}"#);
        let addr = serve_once(body);
        let h = client_for(&addr).node_health(&addr).await;
        assert_eq!(h.state, NodeState::Active);
        assert_eq!(h.version.as_deref(), Some("1.2.3"));
        assert_eq!(h.cluster_name.map(|c| c.len()), Some(100_000));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn oversized_bodies_are_refused() {
        let addr = serve_once(vec![b' '; MAX_RESPONSE + 4096]);
        let h = client_for(&addr).node_health(&addr).await;
        match h.state {
            NodeState::Unreachable(d) => assert!(d.contains("larger than"), "{d}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// A server that answers a TLS ClientHello with plain HTTP: a real
    /// rustls error, classified as TLS.
    #[tokio::test(flavor = "multi_thread")]
    async fn tls_failures_are_tls_by_type() {
        let addr = serve_once(b"{}".to_vec()).replace("http://", "https://");
        let h = client_for(&addr).node_health(&addr).await;
        assert!(matches!(h.state, NodeState::Tls(_)), "{:?}", h.state);
    }

    /// A DNS failure for a host whose name says "tls" and "certificate"
    /// is not a TLS error (the old text search called it one).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_host_named_tls_that_does_not_resolve_is_not_a_tls_error() {
        let addr = "https://vault-tls-certificate-handshake.invalid:8200";
        let h = client_for(addr).node_health(addr).await;
        assert!(
            matches!(h.state, NodeState::Unreachable(_)),
            "{:?}",
            h.state
        );
        let plain = "http://vault-tls.invalid:8200";
        let h = client_for("http://127.0.0.1:1").node_health(plain).await;
        assert!(
            matches!(h.state, NodeState::Unreachable(_)),
            "{:?}",
            h.state
        );
    }

    #[test]
    fn unsupported_tls_variables_are_refused_not_ignored() {
        assert!(unsupported_tls_env(|_| None).is_ok());
        for (k, v) in [
            ("VAULT_SKIP_VERIFY", "true"),
            ("VAULT_SKIP_VERIFY", "1"),
            ("BAO_CAPATH", "/etc/ssl/vault"),
            ("VAULT_TLS_SERVER_NAME", "vault.corp"),
        ] {
            let e = unsupported_tls_env(|q| (q == k).then(|| v.to_string()))
                .unwrap_err()
                .to_string();
            assert!(e.contains(k) && e.contains("not support"), "{e}");
        }
        for v in ["", "false", "0"] {
            assert!(unsupported_tls_env(|q| (q == "VAULT_SKIP_VERIFY").then(|| v.into())).is_ok());
        }
    }

    #[test]
    fn multierror_is_flattened() {
        let body = br#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#;
        assert_eq!(api_errors(body), vec!["permission denied".to_string()]);
        assert_eq!(api_errors(b""), Vec::<String>::new());
        assert_eq!(
            api_errors(b"Client sent an HTTP request to an HTTPS server.\n"),
            vec!["Client sent an HTTP request to an HTTPS server.".to_string()]
        );
    }
}
