//! The error type of every KMS operation.
//!
//! Messages are written for an operator reading a log or a terminal: they say
//! what failed, where, and what to check. They never contain a token, an
//! AppRole secret id, or key material: only addresses, paths, key names,
//! HTTP statuses and the error strings the server returned (which do not echo
//! secrets).

use std::path::PathBuf;

/// Everything that can go wrong talking to the KMS.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// No configured address could be reached (connection refused, DNS,
    /// timeout, or no node answered as active).
    #[error("KMS unreachable (tried {addresses}): {detail}")]
    Unreachable {
        /// The addresses that were tried, comma-separated.
        addresses: String,
        /// What happened at each address.
        detail: String,
    },

    /// The server answered but is sealed: an operator must unseal it.
    #[error("KMS at {address} is sealed; unseal it (bao/vault operator unseal) and retry")]
    Sealed {
        /// The sealed server.
        address: String,
    },

    /// The server refused the request (HTTP 403) although the token is
    /// valid: its policies do not allow this path.
    #[error("KMS permission denied: {detail}")]
    PermissionDenied {
        /// Which request was refused and what to check.
        detail: String,
    },

    /// The token itself is no longer accepted: expired, revoked or never
    /// valid (the server refuses even `auth/token/lookup-self`).
    #[error("KMS token expired, revoked or invalid: {detail}")]
    TokenExpired {
        /// Which request was refused and what to do.
        detail: String,
    },

    /// The Transit key does not exist. kmsfs never creates a key implicitly.
    #[error("KMS key '{key}' not found (kmsfs never creates KMS keys; create it with `bao write -f transit/keys/{key}`)")]
    KeyNotFound {
        /// The key name.
        key: String,
    },

    /// The server refused to decrypt: wrong key, wrong derivation context,
    /// tampered or truncated ciphertext, or a key version below the key's
    /// `min_decryption_version`.
    #[error("KMS rejected the wrapped key for key '{key}': {detail}")]
    CiphertextRejected {
        /// The key name.
        key: String,
        /// The server's explanation.
        detail: String,
    },

    /// TLS failed: unknown certificate authority, bad certificate, or a
    /// plain-HTTP/HTTPS mismatch. Also used for unreadable CA or client
    /// certificate files.
    #[error("TLS error talking to the KMS: {detail}")]
    Tls {
        /// What went wrong; check `ca_cert` / `VAULT_CACERT`.
        detail: String,
    },

    /// Logging in (AppRole) failed, or no credentials are available.
    #[error("KMS authentication failed: {detail}")]
    AuthFailed {
        /// Why; never contains the secret id or token.
        detail: String,
    },

    /// A token file, secret id file or client key file is unusable.
    #[error("{}: {detail}", path.display())]
    SecretFile {
        /// The offending file.
        path: PathBuf,
        /// Missing, empty, or readable by other users (with a fix).
        detail: String,
    },

    /// A token or secret-id file does not exist (yet): a Vault Agent sink
    /// that is written after boot. Retried until the caller's deadline.
    #[error("{}: {detail} (waiting for it, e.g. for a Vault Agent sink; check the agent if it never appears)", path.display())]
    CredentialsNotReady {
        /// The missing file.
        path: PathBuf,
        /// What reading it said.
        detail: String,
    },

    /// The KMS configuration is invalid (malformed TOML, unknown type,
    /// missing field, unreadable file).
    #[error("KMS configuration: {detail}")]
    Config {
        /// What is wrong; names the file and line when there is one.
        detail: String,
    },

    /// Any other unexpected HTTP answer from the server.
    #[error("KMS returned HTTP {status} for {path}: {}", if errors.is_empty() { "(no error message)".to_string() } else { errors.join("; ") })]
    Http {
        /// The HTTP status.
        status: u16,
        /// The API path, without the address.
        path: String,
        /// The `errors` strings from the response body.
        errors: Vec<String>,
    },

    /// A KMIP server refused or failed an operation (KMIP Result Status
    /// other than Success).
    #[error("KMIP server at {address} refused {operation}: {detail}")]
    KmipFailure {
        /// `HOST:PORT` of the server.
        address: String,
        /// The KMIP operation.
        operation: &'static str,
        /// The Result Reason value, if the server gave one.
        reason: Option<u32>,
        /// The Result Reason's name and the server's Result Message.
        detail: String,
    },

    /// The KMIP key does not exist, or this client certificate may not see it.
    #[error("KMIP key '{key}' not found at {address} (kmsfs never creates KMS keys: create an AES-256 key whose usage mask allows Encrypt and Decrypt, activate it, and give its Unique Identifier or name:NAME; objects of another client certificate may be invisible)")]
    KmipKeyNotFound {
        /// The key as configured (Unique Identifier or `name:NAME`).
        key: String,
        /// `HOST:PORT` of the server that answered.
        address: String,
    },

    /// The key exists but cannot be used as asked (state not Active, usage
    /// mask without Encrypt or Decrypt, not an AES key).
    #[error("KMS key '{key}' cannot be used: {detail}")]
    KeyNotUsable {
        /// The key's identifier.
        key: String,
        /// Why, and what to do.
        detail: String,
    },

    /// The server's answer could not be understood.
    #[error("unexpected KMS response for {path}: {detail}")]
    Protocol {
        /// The API path.
        path: String,
        /// What was wrong with it.
        detail: String,
    },
}

impl KmsError {
    /// True for errors worth retrying on another attempt or node.
    /// A 429 or 5xx answer that kept coming until the deadline is one too:
    /// a rate limit or an election passes.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            KmsError::Unreachable { .. }
                | KmsError::Sealed { .. }
                | KmsError::Http {
                    status: 429 | 500 | 502..=504,
                    ..
                }
        )
    }

    /// True when the same request may succeed later without anyone changing
    /// the configuration: the KMS is unreachable or sealed, or a credential
    /// file has not been written yet. Boot-time mounts retry these until
    /// their `kms_timeout`.
    pub fn is_retryable(&self) -> bool {
        self.is_transient() || matches!(self, KmsError::CredentialsNotReady { .. })
    }
}

/// Shorthand for results of KMS operations.
pub type Result<T, E = KmsError> = std::result::Result<T, E>;
