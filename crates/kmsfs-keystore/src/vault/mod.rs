//! HashiCorp Vault / OpenBao client: HTTP core with HA failover
//! ([`client`]), authentication ([`auth`]), Transit key wrapping
//! ([`transit`]), diagnostics ([`health`]) and the token's lifetime:
//! renewal and revocation ([`session`]).

pub mod auth;
pub mod client;
pub mod health;
pub mod session;
pub mod transit;

pub use auth::Credentials;
pub use client::VaultClient;
pub use health::{NodeHealth, NodeState, SealStatus, TokenInfo};
pub use session::RenewedToken;
pub use transit::{ciphertext_version, KeyInfo, WrappedKey};
