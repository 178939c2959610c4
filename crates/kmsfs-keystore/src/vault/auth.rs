//! Authentication: a static token, an AppRole login or a TLS certificate
//! login.
//!
//! Tokens from a login (AppRole, cert) belong to the client that made them:
//! it caches one, logs in again when it is refused, and revokes it when the
//! client is dropped (see [`crate::vault::session`]).

use std::path::PathBuf;

use kmsfs_core::secret::SecretBytes;
use reqwest::Method;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::config::AuthConfig;
use crate::error::{KmsError, Result};
use crate::secret_file::read_secret_file;
use crate::vault::client::{api_errors, VaultClient};

/// The credentials a [`VaultClient`] authenticates with.
#[derive(Debug)]
pub enum Credentials {
    /// A token, used as is (from the environment or the caller).
    Token(SecretBytes),
    /// A token file, re-read at every request: a Vault Agent sink that
    /// appears after boot, or a token rotated in place, is picked up without
    /// a restart.
    TokenFile(PathBuf),
    /// No token: the address is a Vault / OpenBao Agent API proxy with
    /// auto-auth (`VAULT_AGENT_ADDR`), which adds the token itself.
    Agent,
    /// AppRole: the secret id is re-read from its file at every login, so a
    /// rotated secret id is picked up.
    AppRole {
        /// Mount path of the AppRole auth method (default `approle`).
        mount: String,
        /// The role id.
        role_id: String,
        /// File holding the secret id.
        secret_id_file: PathBuf,
    },
    /// TLS certificate login (the client certificate of the configuration
    /// is the credential).
    Cert {
        /// Mount path of the cert auth method (default `cert`).
        mount: String,
        /// Certificate role to log in as; `None` lets the server choose.
        name: Option<String>,
    },
}

impl Credentials {
    /// Resolves an [`AuthConfig`]: reads the token file (or `VAULT_TOKEN`,
    /// then `BAO_TOKEN`, when no file is configured). AppRole secret ids are
    /// read at login time.
    pub fn from_config(auth: &AuthConfig) -> Result<Self> {
        match auth {
            AuthConfig::Token {
                token_file: Some(p),
            } => {
                // Checked now so a wrong mode or an empty file fails at once;
                // a file that does not exist yet (an agent sink at boot) is
                // waited for by the requests that need it.
                match read_secret_file(p, true) {
                    Err(_) if !p.exists() => {}
                    Err(e) => return Err(e),
                    Ok(_) => {}
                }
                Ok(Credentials::TokenFile(p.clone()))
            }
            AuthConfig::Token { token_file: None } => {
                for var in ["VAULT_TOKEN", "BAO_TOKEN"] {
                    if let Some(v) = std::env::var_os(var) {
                        let v = Zeroizing::new(v.into_encoded_bytes());
                        let trimmed = v.trim_ascii();
                        if !trimmed.is_empty() {
                            return Ok(Credentials::Token(SecretBytes::from_slice(trimmed)));
                        }
                    }
                }
                if agent_address().is_some() {
                    return Ok(Credentials::Agent);
                }
                Err(KmsError::AuthFailed {
                    detail: "no token: set `auth.token_file` in the KMS configuration, or VAULT_TOKEN / BAO_TOKEN, \
                             or VAULT_AGENT_ADDR for an agent with auto-auth".into(),
                })
            }
            AuthConfig::AppRole {
                role_id,
                secret_id_file,
                path,
            } => Ok(Credentials::AppRole {
                mount: path.trim_matches('/').to_string(),
                role_id: role_id.clone(),
                secret_id_file: secret_id_file.clone(),
            }),
            AuthConfig::Cert { name, path } => Ok(Credentials::Cert {
                mount: path.trim_matches('/').to_string(),
                name: name.clone(),
            }),
        }
    }

    /// True when a fresh token can be obtained by logging in again.
    pub(crate) fn can_login(&self) -> bool {
        matches!(
            self,
            Credentials::AppRole { .. } | Credentials::TokenFile(_) | Credentials::Cert { .. }
        )
    }

    /// True when kmsfs logs in itself (AppRole, cert): the token is its own,
    /// made for this process, and revoked when the client is dropped.
    pub fn logs_in(&self) -> bool {
        matches!(self, Credentials::AppRole { .. } | Credentials::Cert { .. })
    }
}

/// `VAULT_AGENT_ADDR` (or `BAO_AGENT_ADDR`): the address of a local agent
/// API proxy that replaces the configured addresses, as for the vault CLI.
pub(crate) fn agent_address() -> Option<String> {
    ["VAULT_AGENT_ADDR", "BAO_AGENT_ADDR"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .map(|v| v.trim().trim_end_matches('/').to_string())
        .find(|v| !v.is_empty())
}

/// Reads a token or secret-id file for one request. A file that does not
/// exist yet is [`KmsError::CredentialsNotReady`], which callers retry
/// until their deadline (a Vault Agent sink written after boot).
pub(crate) fn read_credential_file(path: &std::path::Path) -> Result<SecretBytes> {
    match read_secret_file(path, true) {
        Err(KmsError::SecretFile { path, detail }) if !path.exists() => {
            Err(KmsError::CredentialsNotReady { path, detail })
        }
        other => other,
    }
}

impl VaultClient {
    /// The token to use, logging in first when there is none yet; `None`
    /// behind an agent with auto-auth. A token file is re-read every time.
    pub(crate) async fn current_token(&self) -> Result<Option<SecretBytes>> {
        match &self.credentials {
            Credentials::Agent => Ok(None),
            Credentials::TokenFile(p) => read_credential_file(p).map(Some),
            Credentials::Token(t) => Ok(Some(t.clone())),
            Credentials::AppRole { .. } | Credentials::Cert { .. } => {
                let mut guard = self.token.lock().await;
                if let Some(t) = guard.as_ref() {
                    return Ok(Some(t.clone()));
                }
                let fresh = self.login_fresh().await?;
                *guard = Some(fresh.clone());
                Ok(Some(fresh))
            }
        }
    }

    /// Drops the cached token if it is still `stale`, so the next request
    /// logs in again (another task may already have refreshed it). The
    /// token is revoked: a 403 may come from a policy, not an expiry, and
    /// a login of ours must not be left alive.
    pub(crate) async fn invalidate_token(&self, stale: &SecretBytes) {
        let dropped = {
            let mut guard = self.token.lock().await;
            if guard.as_ref() == Some(stale) {
                guard.take()
            } else {
                None
            }
        };
        if let Some(t) = dropped {
            self.revoke_token(t).await;
        }
    }

    /// Logs in now (AppRole, cert) and caches the token; with token
    /// credentials checks nothing and succeeds. Useful to fail early at
    /// mount time. A token this client logged in with before is revoked.
    pub async fn login(&self) -> Result<()> {
        if self.credentials.logs_in() {
            let t = self.login_fresh().await?;
            let old = self.token.lock().await.replace(t);
            if let Some(old) = old {
                self.revoke_token(old).await;
            }
        }
        Ok(())
    }

    /// Logs in with the configured method and returns the new token.
    async fn login_fresh(&self) -> Result<SecretBytes> {
        match &self.credentials {
            Credentials::Cert { mount, name } => self.login_cert(mount, name.as_deref()).await,
            _ => self.login_approle().await,
        }
    }

    /// `auth/<mount>/login` of the cert method: the TLS client certificate
    /// is the credential, `name` picks the certificate role.
    async fn login_cert(&self, mount: &str, name: Option<&str>) -> Result<SecretBytes> {
        let body = serde_json::to_vec(&serde_json::json!({ "name": name })).map_err(|e| {
            KmsError::AuthFailed {
                detail: format!("cannot encode the login request: {e}"),
            }
        })?;
        let path = format!("auth/{mount}/login");
        let reply = self
            .send(Method::POST, &path, Some(&body), None, true)
            .await?;
        if reply.status != 200 {
            let errs = api_errors(&reply.body);
            return Err(KmsError::AuthFailed {
                detail: format!(
                    "certificate login at /v1/{path} returned HTTP {}: {}; check that the \
                     client certificate (client_cert) is trusted by a role of the cert auth method{}",
                    reply.status,
                    if errs.is_empty() { "(no message)".into() } else { errs.join("; ") },
                    name.map(|n| format!(" (role '{n}')")).unwrap_or_default()
                ),
            });
        }
        let token = parse_login_token(&reply.body, "certificate")?;
        tracing::debug!(mount = %mount, "logged in to the KMS with a TLS certificate");
        Ok(token)
    }

    async fn login_approle(&self) -> Result<SecretBytes> {
        let Credentials::AppRole {
            mount,
            role_id,
            secret_id_file,
        } = &self.credentials
        else {
            return Err(KmsError::AuthFailed {
                detail: "not configured for AppRole".into(),
            });
        };
        let secret_id = read_credential_file(secret_id_file)?;
        let secret_id =
            std::str::from_utf8(secret_id.expose()).map_err(|_| KmsError::SecretFile {
                path: secret_id_file.clone(),
                detail: "the secret id is not valid UTF-8".into(),
            })?;
        #[derive(serde::Serialize)]
        struct Login<'a> {
            role_id: &'a str,
            secret_id: &'a str,
        }
        let body = Zeroizing::new(serde_json::to_vec(&Login { role_id, secret_id }).map_err(
            |e| KmsError::AuthFailed {
                detail: format!("cannot encode the login request: {e}"),
            },
        )?);
        let path = format!("auth/{mount}/login");
        let reply = self
            .send(Method::POST, &path, Some(&body), None, true)
            .await?;
        if reply.status != 200 {
            let errs = api_errors(&reply.body);
            return Err(KmsError::AuthFailed {
                detail: format!(
                    "AppRole login at /v1/{path} returned HTTP {}: {}; check role_id and the secret id in {}",
                    reply.status,
                    if errs.is_empty() { "(no message)".into() } else { errs.join("; ") },
                    secret_id_file.display()
                ),
            });
        }
        let token = parse_login_token(&reply.body, "AppRole")?;
        tracing::debug!(mount = %mount, "logged in to the KMS with AppRole");
        Ok(token)
    }
}

/// The `auth.client_token` of a login answer, in locked memory.
fn parse_login_token(body: &[u8], method: &str) -> Result<SecretBytes> {
    #[derive(Deserialize)]
    struct Auth {
        client_token: Zeroizing<String>,
    }
    #[derive(Deserialize)]
    struct LoginReply {
        auth: Option<Auth>,
    }
    let parsed: LoginReply = serde_json::from_slice(body).map_err(|e| KmsError::AuthFailed {
        detail: format!("cannot parse the {method} login response: {e}"),
    })?;
    let auth = parsed.auth.ok_or_else(|| KmsError::AuthFailed {
        detail: format!("{method} login response has no token"),
    })?;
    Ok(SecretBytes::from_slice(auth.client_token.as_bytes()))
}
