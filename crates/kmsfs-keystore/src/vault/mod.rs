//! HashiCorp Vault / OpenBao client: HTTP core ([`client`]), node choice
//! and failover (`ha`), the retry policy (`retry`), authentication
//! ([`auth`]), Transit key wrapping ([`transit`]), diagnostics
//! ([`health`]) and the token's lifetime: renewal and revocation
//! ([`session`]).

pub mod auth;
pub mod client;
pub(crate) mod ha;
pub mod health;
pub(crate) mod retry;
pub mod session;
pub mod transit;

pub use auth::Credentials;
pub use client::VaultClient;
pub use health::{NodeHealth, NodeReport, NodeState, SealStatus, TokenInfo};
pub use session::RenewedToken;
pub use transit::{ciphertext_version, KeyInfo, WrappedKey};
