//! The mount daemon's hold on the KMS while the filesystem is mounted.
//!
//! After the key is unwrapped the daemon keeps its KMS clients for its
//! whole life, on a thread of their own (`kms-session`):
//!
//! * a renewable token is renewed at half its TTL, again and again, so a
//!   token shared with the host's other kmsfs commands (a token file) does
//!   not expire while the host is up; failures are logged and retried and
//!   never touch the mount;
//! * an AppRole or certificate login is kept (and renewed) until unmount,
//!   then revoked: [`KmsSession::stop`] ends the renewals and drops the
//!   clients, which revoke the tokens they logged in for.

use std::thread::JoinHandle;

use tokio::sync::oneshot;
use tracing::warn;

use crate::slotkms::KmsAccess;

/// The running renewal thread; stop it at unmount.
pub struct KmsSession {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KmsSession {
    /// Starts renewing the tokens of `access`'s clients on `rt` (the runtime
    /// that unlocked, so their connections stay with it). The token of the
    /// configuration's own client is renewed (a token file or `VAULT_TOKEN`
    /// is the same token for every client), and every login a client holds.
    pub fn start(rt: tokio::runtime::Runtime, access: KmsAccess) -> Self {
        let (tx, rx) = oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("kms-session".into())
            .spawn(move || {
                for (i, c) in access.vault_clients().into_iter().enumerate() {
                    let renew = if c.credentials().logs_in() {
                        c.is_logged_in()
                    } else {
                        i == 0
                    };
                    if renew {
                        rt.spawn(async move { c.keep_renewed().await });
                    }
                }
                let _ = rt.block_on(rx);
                // Ends the renewal tasks and the client handles they hold...
                drop(rt);
                // ...so that the clients go now, revoking their logins.
                drop(access);
            });
        match spawned {
            Ok(thread) => KmsSession {
                stop: Some(tx),
                thread: Some(thread),
            },
            Err(e) => {
                warn!("cannot start KMS token renewal ({e}); the token will not be renewed");
                KmsSession {
                    stop: None,
                    thread: None,
                }
            }
        }
    }

    /// Stops renewing and revokes this mount's own logins (waits for it).
    pub fn stop(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("the KMS session thread panicked");
            }
        }
    }
}

impl Drop for KmsSession {
    fn drop(&mut self) {
        self.finish();
    }
}
