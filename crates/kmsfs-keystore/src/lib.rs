//! KMS key wrapping for kmsfs.
//!
//! The filesystem master key never leaves the host in the clear: it is
//! wrapped (encrypted) by a key held in HashiCorp Vault or OpenBao's Transit
//! engine, and only the wrapped form is stored. This crate is a small typed
//! async client for the parts of the Vault HTTP API that needs:
//!
//! * [`config`]: the `KmsConfig` TOML file (and an environment fallback);
//! * [`vault`]: the client ([`VaultClient`]) with HA failover, token and
//!   AppRole auth, TLS, Transit wrap/unwrap/rewrap, and health checks;
//! * [`kmip`]: the KMIP client ([`KmipClient`]): Encrypt/Decrypt over
//!   mutual TLS, and why kmsfs has its own TTLV codec;
//! * [`kms`]: [`KmsClient`], one interface over both;
//! * [`error`]: [`KmsError`], which tells unreachable, sealed, denied,
//!   missing key and rejected ciphertext apart;
//! * [`atomic_file`] and [`secret_file`]: safe file writing and reading.

#![warn(missing_docs)]

pub mod atomic_file;
pub mod config;
pub mod error;
pub mod kmip;
pub mod kms;
pub mod secret_file;
pub mod vault;

pub use atomic_file::write_atomic;
pub use config::{AuthConfig, KmipCipher, KmsConfig, KmsKind};
pub use error::KmsError;
pub use kmip::{KmipClient, KmipStatus, KmipWrapped};
pub use kms::{KmsClient, WrappedMasterKey};
pub use secret_file::read_secret_file;
pub use vault::{
    Credentials, KeyInfo, NodeHealth, NodeReport, NodeState, RenewedToken, SealStatus, TokenInfo,
    VaultClient, WrappedKey,
};
