//! The life of a token: renewal while kmsfs runs, and revocation of the
//! tokens kmsfs logged in for itself.
//!
//! * **Renewal.** [`VaultClient::keep_renewed`] (run by every mount daemon)
//!   looks the token up, and renews a renewable one at half its remaining
//!   TTL, again and again, for as long as it runs. Failures are logged and
//!   retried; they never end the loop. [`VaultClient::renew_self`] is one
//!   renewal (`kmsfs kms renew`, for a systemd timer).
//! * **Revocation.** A token from a login (AppRole, cert) belongs to the
//!   client that made it: when the client is dropped (a command ends, a mount
//!   daemon unmounts) it is revoked with `auth/token/revoke-self`, so no
//!   live token is left behind for someone to find. Tokens kmsfs did not
//!   make (a token file, `VAULT_TOKEN`, an agent) are never revoked.
//!
//! Nothing here logs or returns a token.

use std::time::Duration;

use kmsfs_core::secret::SecretBytes;
use reqwest::Method;
use serde::Deserialize;

use crate::error::Result;
use crate::vault::auth::Credentials;
use crate::vault::client::{http_error, VaultClient};

/// Longest pause between two looks at a token: a token file replaced by a
/// shorter-lived token is noticed within this time.
const MAX_RENEW_PAUSE: Duration = Duration::from_secs(3600);
/// Shortest pause between two renewals or retries.
const MIN_PAUSE: Duration = Duration::from_secs(1);
/// Longest pause before retrying a failed renewal.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// What a renewal returned (never the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewedToken {
    /// The token's new time to live, in seconds.
    pub ttl: u64,
    /// Whether it can be renewed again.
    pub renewable: bool,
}

/// Half the remaining TTL: when a token is renewed.
fn renew_pause(ttl: u64) -> Duration {
    (Duration::from_secs(ttl) / 2).clamp(MIN_PAUSE, MAX_RENEW_PAUSE)
}

/// How long to wait before trying again after a failure, given the last
/// known TTL: soon enough to get several tries in before it runs out.
fn retry_pause(ttl: u64) -> Duration {
    (Duration::from_secs(ttl) / 10).clamp(MIN_PAUSE, MAX_RETRY_PAUSE)
}

impl VaultClient {
    /// The credentials this client authenticates with.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// True when this client holds a token it logged in for (AppRole,
    /// cert), which it revokes when dropped.
    pub fn is_logged_in(&self) -> bool {
        self.credentials.logs_in() && self.token.try_lock().map(|t| t.is_some()).unwrap_or(true)
    }

    /// Renews the client's token (`auth/token/renew-self`, the token's
    /// default increment) and returns its new TTL. Refused tokens are
    /// [`crate::KmsError::TokenExpired`]; a token that is not renewable is
    /// an HTTP 400 error from the KMS.
    pub async fn renew_self(&self) -> Result<RenewedToken> {
        #[derive(Deserialize)]
        struct Auth {
            #[serde(default)]
            lease_duration: u64,
            #[serde(default)]
            renewable: bool,
        }
        #[derive(Deserialize)]
        struct Reply {
            auth: Option<Auth>,
        }
        let path = "auth/token/renew-self";
        let reply = self.call(Method::POST, path, Some(b"{}")).await?;
        if reply.status != 200 {
            return Err(http_error(path, &reply));
        }
        // Only these two fields are read: the token in the answer is never
        // copied out of the (zeroized) body.
        let parsed: Reply =
            serde_json::from_slice(&reply.body).map_err(|e| crate::KmsError::Protocol {
                path: format!("/v1/{path}"),
                detail: format!("cannot parse the response: {e}"),
            })?;
        let auth = parsed.auth.ok_or_else(|| crate::KmsError::Protocol {
            path: format!("/v1/{path}"),
            detail: "the answer has no `auth` section".into(),
        })?;
        Ok(RenewedToken {
            ttl: auth.lease_duration,
            renewable: auth.renewable,
        })
    }

    /// Keeps the token alive for as long as the future runs: looks it up,
    /// then renews a renewable token at half its remaining TTL, again and
    /// again. Logs each renewal (the new TTL, never the token) and each
    /// failure, and retries failures well before the token would expire;
    /// never returns an error. Returns only when there is nothing to renew:
    /// a token that never expires, or an agent that renews its own.
    pub async fn keep_renewed(&self) {
        if matches!(self.credentials, Credentials::Agent) {
            tracing::info!("KMS token renewal: the agent at VAULT_AGENT_ADDR renews its own token");
            return;
        }
        let mut renew_next = false;
        let mut last_ttl: u64 = 60;
        let mut warned_not_renewable = false;
        loop {
            let step = if renew_next {
                self.renew_self().await.map(|r| (r.ttl, r.renewable, true))
            } else {
                self.token_info().await.map(|t| (t.ttl, t.renewable, false))
            };
            let pause = match step {
                Ok((0, _, _)) => {
                    tracing::info!("the KMS token does not expire: no renewal needed");
                    return;
                }
                Ok((ttl, renewable, renewed)) => {
                    last_ttl = ttl;
                    let pause = renew_pause(ttl);
                    if renewed {
                        tracing::info!(
                            ttl_secs = ttl,
                            "renewed the KMS token: valid for {ttl} s, next renewal in {} s",
                            pause.as_secs()
                        );
                    }
                    if !renewable && !warned_not_renewable {
                        tracing::warn!(
                            ttl_secs = ttl,
                            "the KMS token is not renewable and expires in {ttl} s: replace it before then"
                        );
                        warned_not_renewable = true;
                    }
                    renew_next = renewable;
                    pause
                }
                Err(e) => {
                    let pause = retry_pause(last_ttl);
                    tracing::warn!(
                        "KMS token renewal failed, trying again in {} s: {e}",
                        pause.as_secs()
                    );
                    // Look again first: the token (file) may have changed.
                    renew_next = false;
                    pause
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Revokes `token` (`auth/token/revoke-self` with that token), within
    /// one request timeout; failures are logged only.
    pub(crate) async fn revoke_token(&self, token: SecretBytes) {
        let path = "auth/token/revoke-self";
        let sent = tokio::time::timeout(
            self.timeout,
            self.send(Method::POST, path, None, Some(&token), true),
        )
        .await;
        match sent {
            Ok(Ok(r)) if (200..300).contains(&r.status) => {
                tracing::debug!("revoked the KMS token of this process's login");
            }
            // A token that expired or was revoked already is gone anyway.
            Ok(Ok(r)) if r.status == 403 => {
                tracing::debug!("the KMS login token was no longer valid");
            }
            Ok(Ok(r)) => tracing::warn!(
                "could not revoke the KMS login token: HTTP {} from /v1/{path}",
                r.status
            ),
            Ok(Err(e)) => tracing::warn!("could not revoke the KMS login token: {e}"),
            Err(_) => tracing::warn!(
                "could not revoke the KMS login token: no answer within {} s",
                self.timeout.as_secs()
            ),
        }
    }
}

impl Drop for VaultClient {
    /// Revokes the token of this client's own login (AppRole, cert). The
    /// request runs on a thread with a runtime of its own, so it works
    /// whether or not the caller is inside a runtime (and the HTTP client
    /// keeps no pooled connection tied to another runtime).
    fn drop(&mut self) {
        if !self.credentials.logs_in() {
            return;
        }
        let Some(token) = self.token.get_mut().take() else {
            return;
        };
        let me: &VaultClient = self;
        std::thread::scope(|s| {
            let revoker = s.spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(me.revoke_token(token)),
                    Err(e) => tracing::warn!(
                        "could not revoke the KMS login token: cannot start a runtime: {e}"
                    ),
                }
            });
            if revoker.join().is_err() {
                tracing::warn!(
                    "could not revoke the KMS login token: the revoking thread panicked"
                );
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_half_the_ttl_within_bounds() {
        assert_eq!(renew_pause(20), Duration::from_secs(10));
        assert_eq!(renew_pause(1), MIN_PAUSE);
        assert_eq!(renew_pause(32 * 86_400), MAX_RENEW_PAUSE);
        assert_eq!(retry_pause(20), Duration::from_secs(2));
        assert_eq!(retry_pause(3), MIN_PAUSE);
        assert_eq!(retry_pause(86_400), MAX_RETRY_PAUSE);
    }
}
