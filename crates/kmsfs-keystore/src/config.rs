//! The KMS configuration, stored as TOML.
//!
//! ```toml
//! type = "vault"
//! addresses = ["https://vault-1:8200", "https://vault-2:8200"]
//! key_name = "kmsfs"
//! transit_path = "transit"
//! namespace = "team-a"          # optional
//! ca_cert = "/etc/kmsfs/ca.pem" # optional
//! timeout_secs = 10
//! auth = { method = "approle", role_id = "…", secret_id_file = "/etc/kmsfs/secret-id" }
//! ```
//!
//! Other `auth` methods: `{ method = "token", token_file = "…" }` (or no
//! file: `VAULT_TOKEN` / `VAULT_AGENT_ADDR` at run time) and
//! `{ method = "cert", name = "…" }` (TLS certificate login with
//! `client_cert` / `client_key`).
//!
//! A KMIP server (`type = "kmip"`) is configured with the same file:
//!
//! ```toml
//! type = "kmip"
//! addresses = ["kmip-1.corp:5696", "kmip-2.corp:5696"]   # HOST:PORT, tried in order
//! key_name = "name:kmsfs"        # a Unique Identifier, or name:NAME (Locate)
//! ca_cert = "/etc/kmsfs/kmip-ca.pem"
//! client_cert = "/etc/kmsfs/kmip-client.pem"
//! client_key = "/etc/kmsfs/kmip-client.key"   # mode 0600
//! timeout_secs = 10              # one deadline per operation, all addresses
//! cipher = "auto"                # auto (GCM with KMIP 1.4, else CBC), gcm or cbc
//! ```
//!
//! Mutual TLS is a KMIP server's only authentication, so the three
//! certificate settings are required and the Vault-only settings (`auth`,
//! `transit_path`, `namespace`, `attempts`) are refused.
//!
//! The configuration never holds a token, secret id or private key, only
//! the paths of the files holding them.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic_file::write_atomic;
use crate::error::{KmsError, Result};
use crate::secret_file::{open_protected, FileRole};

/// Largest configuration file accepted (real ones are a few hundred bytes).
const MAX_CONFIG_FILE: u64 = 1024 * 1024;

/// The kind of KMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KmsKind {
    /// HashiCorp Vault or OpenBao, Transit secrets engine.
    #[serde(rename = "vault")]
    Vault,
    /// A KMIP server (KMIP 1.2 to 1.4 over mutual TLS).
    #[serde(rename = "kmip")]
    Kmip,
}

impl KmsKind {
    /// The name used in the configuration's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            KmsKind::Vault => "vault",
            KmsKind::Kmip => "kmip",
        }
    }
}

/// Which cipher mode a KMIP server is asked to wrap with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KmipCipher {
    /// AES-GCM when the server speaks KMIP 1.4 and accepts it, else
    /// AES-CBC with PKCS#5 padding.
    #[default]
    Auto,
    /// AES-GCM only (KMIP 1.4); fail otherwise.
    Gcm,
    /// AES-CBC with PKCS#5 padding only.
    Cbc,
}

impl KmipCipher {
    /// The setting's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KmipCipher::Auto => "auto",
            KmipCipher::Gcm => "gcm",
            KmipCipher::Cbc => "cbc",
        }
    }
}

/// Settings that only a Vault configuration may have.
const VAULT_ONLY: [&str; 5] = [
    "auth",
    "transit_path",
    "namespace",
    "attempts",
    "allow_insecure_http",
];

/// How to authenticate to Vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum AuthConfig {
    /// A token read from `token_file`; when `token_file` is absent, from the
    /// environment (`VAULT_TOKEN`, then `BAO_TOKEN`) when the client is built.
    Token {
        /// File holding the token (mode 0600 or stricter).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_file: Option<PathBuf>,
    },
    /// AppRole login with a role id and a secret id read from a file.
    #[serde(rename = "approle")]
    AppRole {
        /// The role id (not secret on its own).
        role_id: String,
        /// File holding the secret id (mode 0600 or stricter).
        secret_id_file: PathBuf,
        /// Mount path of the AppRole auth method.
        #[serde(default = "default_approle_path")]
        path: String,
    },
    /// TLS certificate login: the client certificate (`client_cert` /
    /// `client_key`, required) is the credential; no secret file.
    #[serde(rename = "cert")]
    Cert {
        /// The certificate role to log in as (`auth/cert/certs/NAME`); when
        /// absent the server picks any role the certificate matches.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Mount path of the cert auth method.
        #[serde(default = "default_cert_path")]
        path: String,
    },
}

fn default_auth() -> AuthConfig {
    AuthConfig::Token { token_file: None }
}
fn default_approle_path() -> String {
    "approle".into()
}
fn default_cert_path() -> String {
    "cert".into()
}
fn default_transit_path() -> String {
    "transit".into()
}
fn default_timeout_secs() -> u64 {
    10
}
fn default_attempts() -> u32 {
    3
}

/// True when `url` names this machine: `localhost`, 127.0.0.0/8 or `::1`.
/// Only there may plain HTTP carry a key without `allow_insecure_http`.
fn is_loopback_url(url: &str) -> bool {
    let Some(host) = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
    else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Connection settings for the KMS that wraps kmsfs master keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsConfig {
    /// KMS kind: `"vault"` or `"kmip"`.
    #[serde(rename = "type")]
    pub kind: KmsKind,
    /// Server addresses, tried in order: for Vault `https://host:8200` (the
    /// active node of an HA cluster is picked by `sys/health`), for KMIP
    /// `HOST:PORT`.
    pub addresses: Vec<String>,
    /// The key that wraps the filesystem master key: for Vault the Transit
    /// key name, for KMIP its Unique Identifier or `name:NAME`.
    pub key_name: String,
    /// Mount path of the Transit engine.
    #[serde(default = "default_transit_path")]
    pub transit_path: String,
    /// Vault Enterprise / OpenBao namespace (`X-Vault-Namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Authentication method (Vault only; required there, and refused in a
    /// KMIP configuration, where mutual TLS authenticates).
    #[serde(default = "default_auth")]
    pub auth: AuthConfig,
    /// PEM file of the CA that signed the server certificate; when absent,
    /// `VAULT_CACERT` / `BAO_CACERT` is used if set, else the built-in roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `client_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for mutual TLS (with `client_cert`), mode 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// Deadline of each KMS request as a whole, in seconds: every node,
    /// every retry and the pauses between them.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Vault: at most this many rounds per request (a round tries each
    /// usable node once), within the deadline.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// KMIP only: the cipher mode to wrap with (default `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher: Option<KmipCipher>,
    /// Vault only: accept `http://` addresses that are not loopback. Over
    /// plain HTTP the unwrapped master key itself crosses the network.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure_http: bool,
}

impl KmsConfig {
    /// A token-authenticated configuration with defaults for everything else.
    pub fn new(addresses: Vec<String>, key_name: impl Into<String>, auth: AuthConfig) -> Self {
        KmsConfig {
            kind: KmsKind::Vault,
            addresses,
            key_name: key_name.into(),
            transit_path: default_transit_path(),
            namespace: None,
            auth,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            timeout_secs: default_timeout_secs(),
            attempts: default_attempts(),
            cipher: None,
            allow_insecure_http: false,
        }
    }

    /// A KMIP configuration: `addresses` are `HOST:PORT`, `key` a Unique
    /// Identifier or `name:NAME`; mutual TLS with the three PEM files.
    pub fn new_kmip(
        addresses: Vec<String>,
        key: impl Into<String>,
        ca_cert: PathBuf,
        client_cert: PathBuf,
        client_key: PathBuf,
    ) -> Self {
        KmsConfig {
            kind: KmsKind::Kmip,
            ca_cert: Some(ca_cert),
            client_cert: Some(client_cert),
            client_key: Some(client_key),
            ..Self::new(addresses, key, default_auth())
        }
    }

    /// Reads and validates a TOML configuration file. Errors name the file,
    /// and the line and column for malformed TOML.
    ///
    /// The file must be a regular file (not a symbolic link), owned by root
    /// or the caller and not writable by group or others: whoever can change
    /// it can send the next master key to a KMS of their choosing.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |detail: String| KmsError::Config {
            detail: format!("{}: {detail}", path.display()),
        };
        let (file, _) = open_protected(path, FileRole::Config).map_err(bad)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        if text.len() as u64 > MAX_CONFIG_FILE {
            return Err(bad(format!(
                "larger than {MAX_CONFIG_FILE} bytes; not a kmsfs KMS configuration"
            )));
        }
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let table: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, origin, &e))?;
        let line_of = |key: &str| {
            text.lines()
                .position(|l| {
                    let l = l.trim_start();
                    l.starts_with(key) && l[key.len()..].trim_start().starts_with('=')
                })
                .map(|i| format!(", line {}", i + 1))
                .unwrap_or_default()
        };
        match table.get("type") {
            None => {
                return Err(KmsError::Config {
                    detail: format!(
                        "{origin}: missing `type` (expected type = \"vault\" or type = \"kmip\")"
                    ),
                })
            }
            Some(toml::Value::String(s)) if s == "vault" => {
                if !table.contains_key("auth") {
                    return Err(KmsError::Config {
                        detail: format!(
                            "{origin}: missing `auth` (e.g. auth = {{ method = \"token\", token_file = \"/etc/kmsfs/token\" }})"
                        ),
                    });
                }
                if let Some(k) = ["cipher"].iter().find(|k| table.contains_key(**k)) {
                    return Err(KmsError::Config {
                        detail: format!(
                            "{origin}{}: `{k}` is a KMIP setting; a Vault configuration does not take it",
                            line_of(k)
                        ),
                    });
                }
            }
            Some(toml::Value::String(s)) if s == "kmip" => {
                if let Some(k) = VAULT_ONLY.iter().find(|k| table.contains_key(**k)) {
                    return Err(KmsError::Config {
                        detail: format!(
                            "{origin}{}: `{k}` is a Vault setting; a KMIP configuration does not take it \
                             (KMIP authenticates with the client certificate)",
                            line_of(k)
                        ),
                    });
                }
            }
            Some(other) => {
                let line = line_of("type");
                return Err(KmsError::Config {
                    detail: format!(
                        "{origin}{line}: unsupported KMS type {other}; use \"vault\" (HashiCorp Vault / OpenBao Transit) or \"kmip\" (a KMIP server)"
                    ),
                });
            }
        }
        let cfg: KmsConfig = toml::from_str(text).map_err(|e| toml_error(text, origin, &e))?;
        cfg.validate().map_err(|e| match e {
            KmsError::Config { detail } => KmsError::Config {
                detail: format!("{origin}: {detail}"),
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Checks values serde cannot: non-empty address list with `http(s)://`
    /// schemes, non-empty key name, positive timeout and attempts, and
    /// client certificate and key given together.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(KmsError::Config { detail });
        if self.kind == KmsKind::Kmip {
            return self.validate_kmip();
        }
        if self.cipher.is_some() {
            return bad(
                "`cipher` is a KMIP setting; a Vault configuration does not take it".into(),
            );
        }
        if self.addresses.is_empty() {
            return bad("`addresses` is empty; give at least one https://host:port".into());
        }
        for a in &self.addresses {
            if !(a.starts_with("https://") || a.starts_with("http://")) {
                return bad(format!(
                    "address '{a}' must start with https:// (or http:// for a local dev server)"
                ));
            }
            if a.starts_with("http://") && !self.allow_insecure_http && !is_loopback_url(a) {
                return bad(format!(
                    "address '{a}' is plain http:// to a host that is not this machine: the \
                     unwrapped master key would cross the network unencrypted. Use https:// \
                     (or pass --allow-insecure-http / set allow_insecure_http = true if the \
                     network path is otherwise protected)"
                ));
            }
        }
        if self.key_name.trim().is_empty() || self.key_name.contains('/') {
            return bad(format!("invalid key_name '{}'", self.key_name));
        }
        if self.transit_path.trim_matches('/').is_empty() {
            return bad("`transit_path` is empty".into());
        }
        if self.timeout_secs == 0 {
            return bad("`timeout_secs` must be at least 1".into());
        }
        if self.attempts == 0 {
            return bad("`attempts` must be at least 1".into());
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return bad("`client_cert` and `client_key` must be given together".into());
        }
        if let AuthConfig::AppRole { role_id, path, .. } = &self.auth {
            if role_id.trim().is_empty() {
                return bad("AppRole `role_id` is empty".into());
            }
            if path.trim_matches('/').is_empty() {
                return bad("AppRole `path` is empty".into());
            }
        }
        if let AuthConfig::Cert { path, .. } = &self.auth {
            if path.trim_matches('/').is_empty() {
                return bad("cert auth `path` is empty".into());
            }
            if self.client_cert.is_none() {
                return bad(
                    "cert auth logs in with the TLS client certificate: set `client_cert` and \
                     `client_key` (kms set --client-cert F --client-key F)"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The checks of a KMIP configuration: `HOST:PORT` addresses, a key,
    /// all three certificate files, a positive timeout, no Vault settings.
    fn validate_kmip(&self) -> Result<()> {
        let bad = |detail: String| Err(KmsError::Config { detail });
        if self.addresses.is_empty() {
            return bad(
                "`addresses` is empty; give at least one HOST:PORT of a KMIP server".into(),
            );
        }
        for a in &self.addresses {
            if a.contains("://") {
                return bad(format!(
                    "KMIP address '{a}' must be HOST:PORT, without a scheme (KMIP is not HTTP)"
                ));
            }
            crate::kmip::split_address(a).map_err(|detail| KmsError::Config { detail })?;
        }
        let key = self.key_name.trim();
        if key.is_empty() || key != self.key_name {
            return bad(format!(
                "invalid KMIP key '{}': give its Unique Identifier or name:NAME",
                self.key_name
            ));
        }
        if let Some(name) = key.strip_prefix("name:") {
            if name.trim().is_empty() {
                return bad("KMIP key 'name:' has an empty name".into());
            }
        }
        for (field, value) in [
            ("ca_cert", &self.ca_cert),
            ("client_cert", &self.client_cert),
            ("client_key", &self.client_key),
        ] {
            if value.is_none() {
                return bad(format!(
                    "`{field}` is required for a KMIP server: mutual TLS is how it authenticates kmsfs"
                ));
            }
        }
        if self.timeout_secs == 0 {
            return bad("`timeout_secs` must be at least 1".into());
        }
        if self.namespace.is_some()
            || self.transit_path != default_transit_path()
            || self.attempts != default_attempts()
            || self.auth != default_auth()
            || self.allow_insecure_http
        {
            return bad(
                "`auth`, `transit_path`, `namespace` and `attempts` are Vault settings; a KMIP \
                 configuration does not take them"
                    .into(),
            );
        }
        Ok(())
    }

    /// The configuration as a TOML table, without the settings its kind
    /// does not use (so a KMIP file has no Vault `auth`).
    pub fn to_table(&self) -> Result<toml::Table> {
        let mut table = toml::Table::try_from(self).map_err(|e| KmsError::Config {
            detail: format!("cannot serialize configuration: {e}"),
        })?;
        if self.kind == KmsKind::Kmip {
            for k in VAULT_ONLY {
                table.remove(k);
            }
        }
        Ok(table)
    }

    /// Writes the configuration as TOML atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(&self.to_table()?).map_err(|e| KmsError::Config {
            detail: format!("cannot serialize configuration: {e}"),
        })?;
        write_atomic(path, text.as_bytes(), 0o600).map_err(|e| KmsError::Config {
            detail: format!("cannot write {}: {e}", path.display()),
        })
    }

    /// A configuration from the usual Vault/OpenBao environment variables,
    /// or `None` when neither `VAULT_ADDR` nor `BAO_ADDR` is set.
    ///
    /// * `VAULT_ADDR` / `BAO_ADDR`: address, or several comma-separated;
    /// * `KMSFS_KMS_KEY`: Transit key name (default `kmsfs`);
    /// * `KMSFS_TOKEN_FILE`: token file; without it the token is taken from
    ///   `VAULT_TOKEN` / `BAO_TOKEN` when the client is built and kept in
    ///   memory only (never written to a configuration);
    /// * `VAULT_NAMESPACE` / `BAO_NAMESPACE`, `VAULT_CACERT` / `BAO_CACERT`,
    ///   `VAULT_CLIENT_CERT` / `VAULT_CLIENT_KEY`.
    pub fn from_env() -> Option<Self> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// [`KmsConfig::from_env`] with an explicit variable lookup (for tests).
    pub fn from_env_with(var: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let get = |names: &[&str]| {
            names
                .iter()
                .filter_map(|n| var(n))
                .find(|v| !v.trim().is_empty())
        };
        let addrs = get(&["VAULT_ADDR", "BAO_ADDR"])?;
        let addresses = addrs
            .split(',')
            .map(|a| a.trim().trim_end_matches('/').to_string())
            .filter(|a| !a.is_empty())
            .collect();
        let auth = AuthConfig::Token {
            token_file: get(&["KMSFS_TOKEN_FILE"]).map(PathBuf::from),
        };
        let mut cfg = KmsConfig::new(
            addresses,
            get(&["KMSFS_KMS_KEY"]).unwrap_or_else(|| "kmsfs".into()),
            auth,
        );
        cfg.namespace = get(&["VAULT_NAMESPACE", "BAO_NAMESPACE"]);
        cfg.ca_cert = get(&["VAULT_CACERT", "BAO_CACERT"]).map(PathBuf::from);
        cfg.client_cert = get(&["VAULT_CLIENT_CERT", "BAO_CLIENT_CERT"]).map(PathBuf::from);
        cfg.client_key = get(&["VAULT_CLIENT_KEY", "BAO_CLIENT_KEY"]).map(PathBuf::from);
        Some(cfg)
    }
}

fn toml_error(text: &str, origin: &str, e: &toml::de::Error) -> KmsError {
    let location = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!(", line {line}, column {col}")
        }
        None => String::new(),
    };
    KmsError::Config {
        detail: format!("{origin}{location}: {}", e.message().trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    const GOOD: &str = r#"
type = "vault"
addresses = ["https://a:8200", "https://b:8200"]
key_name = "kmsfs"
namespace = "ns1"
ca_cert = "/etc/ca.pem"
auth = { method = "approle", role_id = "rid", secret_id_file = "/etc/sid" }
"#;

    #[test]
    fn parses_approle_with_defaults() {
        let c = KmsConfig::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.addresses.len(), 2);
        assert_eq!(c.transit_path, "transit");
        assert_eq!(c.timeout_secs, 10);
        assert_eq!(c.attempts, 3);
        assert_eq!(
            c.auth,
            AuthConfig::AppRole {
                role_id: "rid".into(),
                secret_id_file: "/etc/sid".into(),
                path: "approle".into()
            }
        );
    }

    #[test]
    fn parses_token_auth_table() {
        let t = "type = \"vault\"\naddresses = [\"http://127.0.0.1:8200\"]\nkey_name = \"k\"\n[auth]\nmethod = \"token\"\ntoken_file = \"/run/tok\"\n";
        let c = KmsConfig::parse(t, "t.toml").unwrap();
        assert_eq!(
            c.auth,
            AuthConfig::Token {
                token_file: Some("/run/tok".into())
            }
        );
    }

    #[test]
    fn cert_auth_needs_a_client_certificate() {
        let base = "type = \"vault\"\naddresses = [\"https://v:8200\"]\nkey_name = \"k\"\nauth = { method = \"cert\", name = \"web\" }\n";
        let e = KmsConfig::parse(base, "c.toml").unwrap_err().to_string();
        assert!(e.contains("client_cert") && e.contains("c.toml"), "{e}");
        let t = format!("{base}client_cert = \"/c.pem\"\nclient_key = \"/c.key\"\n");
        let c = KmsConfig::parse(&t, "c.toml").unwrap();
        assert_eq!(
            c.auth,
            AuthConfig::Cert {
                name: Some("web".into()),
                path: "cert".into()
            }
        );
        let text = toml::to_string(&c.to_table().unwrap()).unwrap();
        assert_eq!(KmsConfig::parse(&text, "t").unwrap(), c);
    }

    #[test]
    fn malformed_toml_names_file_and_line() {
        let t = "type = \"vault\"\naddresses = [\"https://a\"]\nkey_name = kmsfs\n";
        let e = KmsConfig::parse(t, "/etc/kmsfs/kms.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/kmsfs/kms.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn wrong_field_type_has_line() {
        let t = "type = \"vault\"\naddresses = [\"https://a\"]\nkey_name = \"k\"\ntimeout_secs = \"ten\"\nauth = { method = \"token\" }\n";
        let e = KmsConfig::parse(t, "c.toml").unwrap_err().to_string();
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn unknown_type_is_rejected() {
        let t = "\ntype = \"aws-kms\"\naddresses = [\"https://a\"]\nkey_name = \"k\"\nauth = { method = \"token\" }\n";
        let e = KmsConfig::parse(t, "c.toml").unwrap_err().to_string();
        assert!(e.contains("unsupported KMS type"), "{e}");
        assert!(e.contains("aws-kms") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn unknown_field_and_auth_method_rejected() {
        let t = "type = \"vault\"\naddresses = [\"https://a\"]\nkey_name = \"k\"\nauth = { method = \"token\" }\ntoken = \"s.x\"\n";
        let e = KmsConfig::parse(t, "c.toml").unwrap_err().to_string();
        assert!(e.contains("token") && e.contains("line 5"), "{e}");
        let t = "type = \"vault\"\naddresses = [\"https://a\"]\nkey_name = \"k\"\nauth = { method = \"ldap\" }\n";
        assert!(KmsConfig::parse(t, "c.toml").is_err());
    }

    #[test]
    fn validation_errors() {
        let t =
            "type = \"vault\"\naddresses = []\nkey_name = \"k\"\nauth = { method = \"token\" }\n";
        let e = KmsConfig::parse(t, "c.toml").unwrap_err().to_string();
        assert!(e.contains("addresses"), "{e}");
        let t = "type = \"vault\"\naddresses = [\"vault:8200\"]\nkey_name = \"k\"\nauth = { method = \"token\" }\n";
        assert!(KmsConfig::parse(t, "c.toml").is_err());
        let t = "type = \"vault\"\naddresses = [\"https://v\"]\nkey_name = \"k\"\nclient_cert = \"/c\"\nauth = { method = \"token\" }\n";
        assert!(KmsConfig::parse(t, "c.toml").is_err());
    }

    #[test]
    fn save_is_0600_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kms.toml");
        let c = KmsConfig::parse(GOOD, "t").unwrap();
        c.save(&p).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(KmsConfig::load(&p).unwrap(), c);
    }

    #[test]
    fn load_refuses_writable_linked_or_foreign_config() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kms.toml");
        let c = KmsConfig::parse(GOOD, "t").unwrap();
        c.save(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(KmsConfig::load(&p).unwrap(), c, "0644 is fine");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o666)).unwrap();
        let e = KmsConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains(&format!("chmod go-w {}", p.display())), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let link = d.path().join("link.toml");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let e = KmsConfig::load(&link).unwrap_err().to_string();
        assert!(
            e.contains("link.toml") && e.contains("symbolic link"),
            "{e}"
        );
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
            let e = KmsConfig::load(&p).unwrap_err().to_string();
            assert!(
                e.contains("uid 65534") && e.contains(&format!("chown root:root {}", p.display())),
                "{e}"
            );
        }
    }

    #[test]
    fn load_missing_file_names_it() {
        let e = KmsConfig::load(Path::new("/nonexistent/kms.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/kms.toml"), "{e}");
    }

    const KMIP: &str = r#"
type = "kmip"
addresses = ["kmip-1:5696", "[::1]:5696"]
key_name = "name:kmsfs"
ca_cert = "/etc/kmsfs/ca.pem"
client_cert = "/etc/kmsfs/client.pem"
client_key = "/etc/kmsfs/client.key"
"#;

    #[test]
    fn kmip_parses_and_saves_without_vault_settings() {
        let c = KmsConfig::parse(KMIP, "k.toml").unwrap();
        assert_eq!(c.kind, KmsKind::Kmip);
        assert_eq!(c.timeout_secs, 10);
        assert_eq!(c.cipher, None);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kms.toml");
        c.save(&p).unwrap();
        let text = fs::read_to_string(&p).unwrap();
        for vault_only in VAULT_ONLY {
            assert!(!text.contains(vault_only), "{vault_only} in\n{text}");
        }
        assert_eq!(KmsConfig::load(&p).unwrap(), c);
        let mut cbc = c.clone();
        cbc.cipher = Some(KmipCipher::Cbc);
        cbc.save(&p).unwrap();
        assert!(fs::read_to_string(&p).unwrap().contains("cipher = \"cbc\""));
        assert_eq!(KmsConfig::load(&p).unwrap(), cbc);
    }

    #[test]
    fn kmip_validation_is_strict() {
        let with = |from: &str, to: &str| KMIP.replace(from, to);
        let cases = [
            (
                format!("{KMIP}auth = {{ method = \"token\" }}\n"),
                "`auth` is a Vault setting",
            ),
            (
                format!("{KMIP}transit_path = \"t\"\n"),
                "`transit_path` is a Vault setting",
            ),
            (format!("{KMIP}cipher = \"ecb\"\n"), "unknown variant `ecb`"),
            (
                with("kmip-1:5696", "https://kmip-1:5696"),
                "without a scheme",
            ),
            (with("kmip-1:5696", "kmip-1"), "HOST:PORT"),
            (with("[::1]:5696", "::1:5696"), "brackets"),
            (with("name:kmsfs", "name:"), "empty name"),
            (with("name:kmsfs", ""), "invalid KMIP key"),
            (
                with("client_key = \"/etc/kmsfs/client.key\"\n", ""),
                "`client_key` is required",
            ),
            (
                with("ca_cert = \"/etc/kmsfs/ca.pem\"\n", ""),
                "`ca_cert` is required",
            ),
            (format!("{KMIP}timeout_secs = 0\n"), "timeout_secs"),
        ];
        for (text, want) in cases {
            let e = KmsConfig::parse(&text, "k.toml").unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("k.toml"), "{want}: {e}");
        }
        // A Vault configuration takes no `cipher` and still needs `auth`.
        let e = KmsConfig::parse(&format!("{GOOD}cipher = \"gcm\"\n"), "v.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("KMIP setting"), "{e}");
        let no_auth = "type = \"vault\"\naddresses = [\"https://a\"]\nkey_name = \"k\"\n";
        let e = KmsConfig::parse(no_auth, "v.toml").unwrap_err().to_string();
        assert!(e.contains("missing `auth`"), "{e}");
    }

    #[test]
    fn from_env() {
        assert!(KmsConfig::from_env_with(|_| None).is_none());
        let c = KmsConfig::from_env_with(|k| match k {
            "BAO_ADDR" => Some("http://a:1/, http://b:2".into()),
            "VAULT_TOKEN" => Some("s.secret".into()),
            "KMSFS_KMS_KEY" => Some("fs".into()),
            "VAULT_CACERT" => Some("/ca.pem".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.addresses, vec!["http://a:1", "http://b:2"]);
        assert_eq!(c.key_name, "fs");
        assert_eq!(c.ca_cert.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(c.auth, AuthConfig::Token { token_file: None });
        let text = toml::to_string(&c).unwrap();
        assert!(!text.contains("s.secret"));
    }

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        let cfg = |a: &str| {
            KmsConfig::new(
                vec![a.to_string()],
                "k",
                AuthConfig::Token { token_file: None },
            )
        };
        for ok in [
            "http://127.0.0.1:8200",
            "http://127.9.9.9:1",
            "http://localhost:8200",
            "http://[::1]:8200",
            "https://vault.corp:8200",
        ] {
            cfg(ok).validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "http://vault.corp:8200",
            "http://10.0.0.5:8200",
            "http://127.0.0.1.evil.example:8200",
            "http://[::2]:8200",
        ] {
            let e = cfg(bad).validate().unwrap_err().to_string();
            assert!(
                e.contains("unencrypted") && e.contains("--allow-insecure-http"),
                "{bad}: {e}"
            );
            let mut allowed = cfg(bad);
            allowed.allow_insecure_http = true;
            allowed.validate().unwrap();
        }
        let mut c = cfg("http://vault.corp:8200");
        c.allow_insecure_http = true;
        let text = toml::to_string(&c.to_table().unwrap()).unwrap();
        assert!(text.contains("allow_insecure_http = true"), "{text}");
        assert_eq!(KmsConfig::parse(&text, "t").unwrap(), c);
    }
}
