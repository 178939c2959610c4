//! The KMIP client: key lookup, wrap (Encrypt), unwrap (Decrypt), checks.

use std::sync::Arc;
use std::time::Duration;

use kmsfs_core::secret::SecretBytes;
use tokio::time::Instant;

use super::blob::Blob;
use super::conn::{tls_config, Failure, Session};
use super::message::{
    self, reasons, values, CipherMode, KeyAttributes, KeyState, Operation, ProtocolVersion,
};
use crate::config::{KmipCipher, KmsConfig, KmsKind};
use crate::error::{KmsError, Result};

/// A key wrapped by a KMIP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmipWrapped {
    /// The Unique Identifier of the key that wrapped it (a `name:NAME`
    /// key is resolved with Locate first).
    pub key_id: String,
    /// The wrapped-key string (see [`super::blob`]).
    pub blob: String,
    /// The mode the server encrypted with.
    pub mode: CipherMode,
    /// True when the context was bound as GCM additional data (and must be
    /// given again to unwrap); CBC cannot bind a context.
    pub uses_context: bool,
}

/// What `kms check` learns from a KMIP server.
#[derive(Debug, Clone)]
pub struct KmipStatus {
    /// The address that answered.
    pub address: String,
    /// The negotiated protocol version.
    pub version: ProtocolVersion,
    /// Vendor Identification from Query, if given.
    pub vendor: Option<String>,
    /// Operations the server lists in Query (enumeration values).
    pub operations: Vec<u32>,
    /// The key's attributes.
    pub key: KeyAttributes,
}

impl KmipStatus {
    /// True when Query listed `op` (or listed nothing at all, which some
    /// servers do).
    pub fn supports(&self, op: u32) -> bool {
        self.operations.is_empty() || self.operations.contains(&op)
    }
}

/// An async client for a KMIP server (or several, tried in order).
///
/// Built from a [`KmsConfig`] of type `kmip` without touching the network.
/// Every operation opens one mutual-TLS connection, negotiates the
/// protocol version (Discover Versions: 1.4, else 1.3, else 1.2), and runs
/// its requests on it. One deadline (`timeout_secs`) covers the whole
/// operation across every address: an address that refuses or does not
/// answer is skipped for the next one, in order; a definite answer (a
/// TLS refusal, a KMIP error) ends the operation.
pub struct KmipClient {
    addresses: Vec<String>,
    key: String,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    cipher: KmipCipher,
}

impl std::fmt::Debug for KmipClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmipClient")
            .field("addresses", &self.addresses)
            .field("key", &self.key)
            .field("timeout", &self.timeout)
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

impl KmipClient {
    /// Builds a client: validates the configuration, reads the CA and
    /// client certificates and the client key (which must be mode 0600).
    pub fn new(config: &KmsConfig) -> Result<Self> {
        config.validate()?;
        if config.kind != KmsKind::Kmip {
            return Err(KmsError::Config {
                detail: "the configuration is not of type \"kmip\"".into(),
            });
        }
        let missing = |f: &str| KmsError::Config {
            detail: format!("`{f}` is required for a KMIP server (mutual TLS)"),
        };
        let ca = config
            .ca_cert
            .as_deref()
            .ok_or_else(|| missing("ca_cert"))?;
        let cert = config
            .client_cert
            .as_deref()
            .ok_or_else(|| missing("client_cert"))?;
        let key = config
            .client_key
            .as_deref()
            .ok_or_else(|| missing("client_key"))?;
        Ok(KmipClient {
            addresses: config.addresses.clone(),
            key: config.key_name.clone(),
            tls: tls_config(ca, cert, key)?,
            timeout: Duration::from_secs(config.timeout_secs),
            cipher: config.cipher.unwrap_or_default(),
        })
    }

    /// The configured key: a Unique Identifier or `name:NAME`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The configured addresses.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// One line for logs and `kms show`.
    pub fn describe(&self) -> String {
        format!(
            "KMIP key '{}' at {} (cipher {})",
            self.key,
            self.addresses.join(", "),
            self.cipher.as_str()
        )
    }

    /// Runs `op` on a session with the first address that answers, within
    /// one overall deadline.
    async fn run(&self, op: Op<'_>) -> Result<Out> {
        let deadline = Instant::now() + self.timeout;
        let mut tried = Vec::new();
        for (i, address) in self.addresses.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                tried.push(format!("{address}: not tried, the deadline had passed"));
                continue;
            }
            // Share what is left among the addresses not yet tried, so one
            // address that never answers cannot use up the whole deadline.
            let left = (self.addresses.len() - i) as u32;
            let step_deadline = if left == 1 {
                deadline
            } else {
                now + (deadline - now) / left
            };
            let mut session = match Session::open(address, &self.tls, step_deadline).await {
                Ok(s) => s,
                Err(Failure::Transport(detail)) => {
                    tracing::warn!(%address, %detail, "KMIP server unreachable; trying the next address");
                    tried.push(detail);
                    continue;
                }
                Err(Failure::Fatal(e)) => return Err(e),
            };
            // The connection is up: the rest of the overall deadline is its.
            session.extend_deadline(deadline);
            let result = self.perform(&mut session, &op).await;
            session.close().await;
            match result {
                Ok(v) => return Ok(v),
                Err(Failure::Transport(detail)) => {
                    tracing::warn!(%address, %detail, "KMIP connection failed; trying the next address");
                    tried.push(detail);
                }
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
        Err(KmsError::Unreachable {
            addresses: self.addresses.join(", "),
            detail: format!(
                "{}: {} (overall deadline {} s)",
                op.name(),
                tried.join("; "),
                self.timeout.as_secs()
            ),
        })
    }

    async fn perform(&self, s: &mut Session, op: &Op<'_>) -> Result<Out, Failure> {
        match *op {
            Op::Wrap { plaintext, context } => {
                wrap_on(s, &self.key, self.cipher, plaintext, context)
                    .await
                    .map(Out::Wrapped)
            }
            Op::Unwrap { key, blob, context } => {
                unwrap_on(s, key, blob, context).await.map(Out::Plain)
            }
            Op::Status => status_on(s, &self.key).await.map(Out::Status),
            Op::Resolve => resolve(s, &self.key).await.map(Out::Uid),
        }
    }

    /// Wraps `plaintext` (a master key) with the configured key: KMIP
    /// Encrypt with a server-chosen random IV. With KMIP 1.4 and cipher
    /// `auto` or `gcm` the mode is AES-GCM and `context` (if any) is bound
    /// as additional data; with an older server, cipher `cbc`, or a server
    /// that refuses GCM under `auto`, AES-CBC with PKCS#5 padding, which
    /// binds no context.
    ///
    /// Checks first that the key is an Active AES key whose usage mask
    /// allows Encrypt, so the plaintext is never sent to an unusable key.
    pub async fn wrap(
        &self,
        plaintext: &SecretBytes,
        context: Option<&[u8]>,
    ) -> Result<KmipWrapped> {
        if plaintext.is_empty() || plaintext.len() > 512 {
            return Err(KmsError::Protocol {
                path: "Encrypt".into(),
                detail: format!("refusing to wrap {} bytes", plaintext.len()),
            });
        }
        match self.run(Op::Wrap { plaintext, context }).await? {
            Out::Wrapped(w) => Ok(w),
            _ => Err(out_mismatch()),
        }
    }

    /// Unwraps a blob made by [`KmipClient::wrap`] with key `key_id` (a
    /// Unique Identifier, or `name:NAME`); `context` as given to `wrap`
    /// when [`KmipWrapped::uses_context`] was true.
    pub async fn unwrap(
        &self,
        key_id: &str,
        blob: &str,
        context: Option<&[u8]>,
    ) -> Result<SecretBytes> {
        let parsed = Blob::parse(blob).map_err(|detail| KmsError::CiphertextRejected {
            key: key_id.to_string(),
            detail,
        })?;
        let op = Op::Unwrap {
            key: key_id,
            blob: &parsed,
            context,
        };
        match self.run(op).await? {
            Out::Plain(p) => Ok(p),
            _ => Err(out_mismatch()),
        }
    }

    /// Query, key lookup and attributes, for `kms check`.
    pub async fn status(&self) -> Result<KmipStatus> {
        match self.run(Op::Status).await? {
            Out::Status(st) => Ok(st),
            _ => Err(out_mismatch()),
        }
    }

    /// The configured key's Unique Identifier (Locate for `name:NAME`).
    pub async fn resolve_key(&self) -> Result<String> {
        match self.run(Op::Resolve).await? {
            Out::Uid(u) => Ok(u),
            _ => Err(out_mismatch()),
        }
    }
}

/// One client operation, run on whichever session answers.
enum Op<'a> {
    Wrap {
        plaintext: &'a SecretBytes,
        context: Option<&'a [u8]>,
    },
    Unwrap {
        key: &'a str,
        blob: &'a Blob,
        context: Option<&'a [u8]>,
    },
    Status,
    Resolve,
}

impl Op<'_> {
    fn name(&self) -> &'static str {
        match self {
            Op::Wrap { .. } => "wrap",
            Op::Unwrap { .. } => "unwrap",
            Op::Status => "check",
            Op::Resolve => "locate",
        }
    }
}

/// What an [`Op`] produced.
enum Out {
    Wrapped(KmipWrapped),
    Plain(SecretBytes),
    Status(KmipStatus),
    Uid(String),
}

fn out_mismatch() -> KmsError {
    KmsError::Protocol {
        path: "(client)".into(),
        detail: "internal error: operation result of the wrong kind".into(),
    }
}

async fn wrap_on(
    s: &mut Session,
    key: &str,
    cipher: KmipCipher,
    plaintext: &SecretBytes,
    context: Option<&[u8]>,
) -> Result<KmipWrapped, Failure> {
    let uid = resolve(s, key).await?;
    let attrs = get_attributes(s, key, &uid).await?;
    usable(key, &attrs, values::USAGE_ENCRYPT, "Encrypt")?;
    let modes: &[CipherMode] = match (cipher, s.version >= ProtocolVersion::V1_4) {
        (KmipCipher::Cbc, _) | (KmipCipher::Auto, false) => &[CipherMode::Cbc],
        (KmipCipher::Auto, true) => &[CipherMode::Gcm, CipherMode::Cbc],
        (KmipCipher::Gcm, true) => &[CipherMode::Gcm],
        (KmipCipher::Gcm, false) => {
            return Err(Failure::Fatal(KmsError::Config {
                detail: format!(
                "cipher \"gcm\" needs KMIP 1.4, but {} speaks {}; use cipher \"auto\" or \"cbc\"",
                s.address, s.version
            ),
            }))
        }
    };
    let mut last = None;
    for &mode in modes {
        match encrypt(s, &uid, mode, plaintext, context).await {
            Ok(w) => return Ok(w),
            // Under `auto`, a server that cannot do GCM gets CBC.
            Err(Failure::Fatal(KmsError::KmipFailure {
                reason: Some(r), ..
            })) if mode == CipherMode::Gcm
                && modes.len() > 1
                && matches!(
                    r,
                    reasons::INVALID_FIELD
                        | reasons::FEATURE_NOT_SUPPORTED
                        | reasons::CRYPTOGRAPHIC_FAILURE
                        | reasons::OPERATION_NOT_SUPPORTED
                ) =>
            {
                tracing::info!(address = %s.address, reason = r, "KMIP server refused AES-GCM; wrapping with AES-CBC");
                last = Some(r);
            }
            Err(Failure::Fatal(KmsError::KmipFailure { reason, detail, .. })) => {
                return Err(explain_refusal(
                    s,
                    key,
                    &uid,
                    reason,
                    detail,
                    values::USAGE_ENCRYPT,
                    "Encrypt",
                )
                .await)
            }
            Err(e) => return Err(e),
        }
    }
    Err(Failure::Fatal(KmsError::Protocol {
        path: format!("{} Encrypt", s.address),
        detail: format!("no cipher mode accepted (last reason {last:?})"),
    }))
}

async fn unwrap_on(
    s: &mut Session,
    key: &str,
    blob: &Blob,
    context: Option<&[u8]>,
) -> Result<SecretBytes, Failure> {
    if blob.mode == CipherMode::Gcm && s.version < ProtocolVersion::V1_4 {
        return Err(Failure::Fatal(KmsError::Protocol {
            path: format!("{} Decrypt", s.address),
            detail: format!(
                "the key was wrapped with AES-GCM, which needs KMIP 1.4, but the server speaks {}",
                s.version
            ),
        }));
    }
    let uid = resolve(s, key).await?;
    let gcm = blob.mode == CipherMode::Gcm;
    let payload = message::decrypt_payload(
        &uid,
        blob.mode,
        &blob.ciphertext,
        &blob.iv,
        if gcm { context } else { None },
        gcm.then_some(blob.tag.as_slice()),
    );
    let reply = s.exchange(Operation::Decrypt, payload).await?;
    match s.success(&reply, Operation::Decrypt) {
        Ok(p) => {
            let plain =
                message::parse_decrypt(&p).map_err(|e| s.malformed(Operation::Decrypt, e))?;
            Ok(SecretBytes::from_slice(plain))
        }
        Err(Failure::Fatal(KmsError::KmipFailure { reason, detail, .. })) => Err(explain_refusal(
            s,
            key,
            &uid,
            reason,
            detail,
            values::USAGE_DECRYPT,
            "Decrypt",
        )
        .await),
        Err(e) => Err(e),
    }
}

async fn status_on(s: &mut Session, key: &str) -> Result<KmipStatus, Failure> {
    let reply = s
        .exchange(Operation::Query, message::query_payload())
        .await?;
    let q = message::parse_query(&s.success(&reply, Operation::Query)?)
        .map_err(|e| s.malformed(Operation::Query, e))?;
    let uid = resolve(s, key).await?;
    let attrs = get_attributes(s, key, &uid).await?;
    Ok(KmipStatus {
        address: s.address.clone(),
        version: s.version,
        vendor: q.vendor,
        operations: q.operations,
        key: attrs,
    })
}

/// The Unique Identifier of `key` (Locate by Name for `name:NAME`).
async fn resolve(s: &mut Session, key: &str) -> Result<String, Failure> {
    let Some(name) = key.strip_prefix("name:") else {
        return Ok(key.to_string());
    };
    let reply = s
        .exchange(Operation::Locate, message::locate_by_name_payload(name))
        .await?;
    let payload = s.success(&reply, Operation::Locate)?;
    let uids = message::parse_locate(&payload).map_err(|e| s.malformed(Operation::Locate, e))?;
    match uids.as_slice() {
        [uid] => Ok(uid.clone()),
        [] => Err(Failure::Fatal(KmsError::KmipKeyNotFound {
            key: key.to_string(),
            address: s.address.clone(),
        })),
        many => Err(Failure::Fatal(KmsError::Config {
            detail: format!(
                "KMIP name '{name}' matches several keys at {} (Unique Identifiers {}); configure the key by its Unique Identifier",
                s.address,
                many.join(", ")
            ),
        })),
    }
}

async fn get_attributes(s: &mut Session, key: &str, uid: &str) -> Result<KeyAttributes, Failure> {
    let reply = s
        .exchange(
            Operation::GetAttributes,
            message::get_attributes_payload(uid),
        )
        .await?;
    match s.success(&reply, Operation::GetAttributes) {
        Ok(p) => {
            message::parse_get_attributes(&p).map_err(|e| s.malformed(Operation::GetAttributes, e))
        }
        Err(Failure::Fatal(KmsError::KmipFailure {
            reason: Some(reasons::ITEM_NOT_FOUND),
            ..
        })) => Err(Failure::Fatal(KmsError::KmipKeyNotFound {
            key: key.to_string(),
            address: s.address.clone(),
        })),
        Err(e) => Err(e),
    }
}

/// Refuses a key that is not an Active AES key allowing `bit`.
fn usable(key: &str, a: &KeyAttributes, bit: i32, op: &str) -> Result<(), Failure> {
    let refuse = |detail: String| {
        Err(Failure::Fatal(KmsError::KeyNotUsable {
            key: key.to_string(),
            detail,
        }))
    };
    match a.state {
        Some(KeyState::Active) => {}
        Some(KeyState::PreActive) => {
            return refuse(format!(
                "KMIP key {} is Pre-Active; activate it on the KMIP server",
                a.uid
            ))
        }
        Some(state) => {
            return refuse(format!(
                "KMIP key {} is {state}, not Active: it can no longer {op}; wrap with a new key \
                 (kmsfs rewrap --new-key) while the old one can still decrypt",
                a.uid
            ))
        }
        None => {
            return refuse(format!(
                "the server did not report the state of KMIP key {}",
                a.uid
            ))
        }
    }
    if let Some(alg) = a.algorithm {
        if alg != values::ALG_AES {
            return refuse(format!(
                "KMIP key {} is not an AES key (Cryptographic Algorithm {alg})",
                a.uid
            ));
        }
    }
    match a.usage_mask {
        Some(m) if m & bit != 0 => Ok(()),
        Some(m) => refuse(format!(
            "the usage mask of KMIP key {} (0x{m:x}) does not allow {op}",
            a.uid
        )),
        None => Ok(()),
    }
}

/// Why Decrypt (or Encrypt) was refused, with the key's state when that
/// is the cause, else the server's answer as a rejected ciphertext.
async fn explain_refusal(
    s: &mut Session,
    key: &str,
    uid: &str,
    reason: Option<u32>,
    detail: String,
    bit: i32,
    op: &str,
) -> Failure {
    if reason == Some(reasons::ITEM_NOT_FOUND) {
        return Failure::Fatal(KmsError::KmipKeyNotFound {
            key: key.to_string(),
            address: s.address.clone(),
        });
    }
    match get_attributes(s, key, uid).await {
        Ok(a) => {
            if let Err(f) = usable(key, &a, bit, op) {
                return f;
            }
        }
        Err(f @ Failure::Fatal(KmsError::KmipKeyNotFound { .. })) => return f,
        Err(_) => {}
    }
    match reason {
        Some(reasons::PERMISSION_DENIED) | Some(reasons::AUTHENTICATION_NOT_SUCCESSFUL) => {
            Failure::Fatal(KmsError::PermissionDenied {
                detail: format!(
                    "KMIP server at {} refused {op} with key {uid}: {detail} (may this client certificate use the key?)",
                    s.address
                ),
            })
        }
        _ => Failure::Fatal(KmsError::CiphertextRejected {
            key: uid.to_string(),
            detail: format!(
                "KMIP {op} failed at {}: {detail} (wrong key or context, or a damaged wrapped key)",
                s.address
            ),
        }),
    }
}

async fn encrypt(
    s: &mut Session,
    uid: &str,
    mode: CipherMode,
    plaintext: &SecretBytes,
    context: Option<&[u8]>,
) -> Result<KmipWrapped, Failure> {
    let aad = if mode == CipherMode::Gcm {
        context
    } else {
        None
    };
    let payload = message::encrypt_payload(uid, mode, plaintext.expose(), aad);
    let reply = s.exchange(Operation::Encrypt, payload).await?;
    let p = s.success(&reply, Operation::Encrypt)?;
    let r = message::parse_encrypt(&p).map_err(|e| s.malformed(Operation::Encrypt, e))?;
    let bad = |detail: String| {
        Failure::Fatal(KmsError::Protocol {
            path: format!("{} Encrypt", s.address),
            detail,
        })
    };
    let iv = r.iv.ok_or_else(|| {
        bad("the server returned no IV although a random IV was asked for".into())
    })?;
    let n = plaintext.len();
    let expected = match mode {
        CipherMode::Gcm => n,
        CipherMode::Cbc => (n / 16 + 1) * 16,
    };
    if r.data.len() != expected {
        return Err(bad(format!(
            "{} ciphertext of {} bytes for {n} bytes of key (expected {expected})",
            mode.as_str(),
            r.data.len()
        )));
    }
    // The plaintext must not come back (a server that "encrypts" by echoing).
    if r.data == plaintext.expose() {
        return Err(bad("the ciphertext equals the plaintext".into()));
    }
    let blob = Blob {
        mode,
        iv: iv.to_vec(),
        tag: r.tag.map(<[u8]>::to_vec).unwrap_or_default(),
        ciphertext: r.data.to_vec(),
    };
    blob.check()
        .map_err(|e| bad(format!("unusable reply: {e}")))?;
    Ok(KmipWrapped {
        key_id: uid.to_string(),
        blob: blob.encode(),
        mode,
        uses_context: mode == CipherMode::Gcm && context.is_some(),
    })
}
