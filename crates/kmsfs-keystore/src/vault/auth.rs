//! Authentication: a static token or an AppRole login.

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
    /// A token, used as is (never renewed or re-read).
    Token(SecretBytes),
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
}

impl Credentials {
    /// Resolves an [`AuthConfig`]: reads the token file (or `VAULT_TOKEN`,
    /// then `BAO_TOKEN`, when no file is configured). AppRole secret ids are
    /// read at login time.
    pub fn from_config(auth: &AuthConfig) -> Result<Self> {
        match auth {
            AuthConfig::Token {
                token_file: Some(p),
            } => Ok(Credentials::Token(read_secret_file(p, true)?)),
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
                Err(KmsError::AuthFailed {
                    detail: "no token: set `auth.token_file` in the KMS configuration, or VAULT_TOKEN / BAO_TOKEN".into(),
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
        }
    }

    /// True when a fresh token can be obtained by logging in again.
    pub(crate) fn can_login(&self) -> bool {
        matches!(self, Credentials::AppRole { .. })
    }
}

impl VaultClient {
    /// The token to use, logging in first when there is none yet.
    pub(crate) async fn current_token(&self) -> Result<SecretBytes> {
        let mut guard = self.token.lock().await;
        if let Some(t) = guard.as_ref() {
            return Ok(t.clone());
        }
        let fresh = match &self.credentials {
            Credentials::Token(t) => t.clone(),
            Credentials::AppRole { .. } => self.login_approle().await?,
        };
        *guard = Some(fresh.clone());
        Ok(fresh)
    }

    /// Drops the cached token if it is still `stale`, so the next request
    /// logs in again (another task may already have refreshed it).
    pub(crate) async fn invalidate_token(&self, stale: &SecretBytes) {
        let mut guard = self.token.lock().await;
        if guard.as_ref() == Some(stale) {
            *guard = None;
        }
    }

    /// Logs in now (AppRole) and caches the token; with token credentials
    /// only checks nothing and succeeds. Useful to fail early at mount time.
    pub async fn login(&self) -> Result<()> {
        if let Credentials::AppRole { .. } = self.credentials {
            let t = self.login_approle().await?;
            *self.token.lock().await = Some(t);
        }
        Ok(())
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
        let secret_id = read_secret_file(secret_id_file, true)?;
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
        #[derive(Deserialize)]
        struct Auth {
            client_token: Zeroizing<String>,
        }
        #[derive(Deserialize)]
        struct LoginReply {
            auth: Option<Auth>,
        }
        let parsed: LoginReply =
            serde_json::from_slice(&reply.body).map_err(|e| KmsError::AuthFailed {
                detail: format!("cannot parse the AppRole login response: {e}"),
            })?;
        let auth = parsed.auth.ok_or_else(|| KmsError::AuthFailed {
            detail: "AppRole login response has no token".into(),
        })?;
        tracing::debug!(mount = %mount, "logged in to the KMS with AppRole");
        Ok(SecretBytes::from_slice(auth.client_token.as_bytes()))
    }
}
