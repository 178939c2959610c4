//! KMIP client: wraps the master key with KMIP Encrypt and unwraps it with
//! KMIP Decrypt, under an AES-256 key that never leaves the KMIP server.
//!
//! * [`ttlv`]: the binary encoding (strict decoder, exact-size encoder);
//! * [`message`]: requests and replies for Discover Versions, Query,
//!   Locate, Get Attributes, Encrypt and Decrypt;
//! * [`conn`]: mutual TLS (rustls, TLS 1.2 or 1.3) and one request/reply
//!   exchange, in locked memory;
//! * [`cert`]: certificate expiry dates for `kms check`;
//! * [`blob`]: the wrapped-key string, `kmip:v1:gcm:...` or `kmip:v1:cbc:...`;
//! * [`client`]: [`KmipClient`], with failover across `HOST:PORT`
//!   addresses under one deadline per operation.
//!
//! # Protocol versions
//!
//! Each connection starts with Discover Versions offering 1.4, 1.3 and 1.2
//! (the request itself is sent as 1.2) and uses the newest the server
//! lists. 1.2 is the minimum: Encrypt and Decrypt first appear there.
//! Authenticated encryption (the GCM tag and additional data fields of
//! Encrypt and Decrypt) needs 1.4, so with a 1.2 or 1.3 server, or when a
//! 1.4 server refuses GCM, the key is wrapped with AES-CBC and PKCS#5
//! padding, and the server's random IV is kept in the blob. The blob records
//! the mode; unwrapping always follows the blob.
//!
//! # Why an own TTLV codec, not NLnet Labs' `kmip-protocol` / `kmip-ttlv`
//!
//! Evaluated November 2026 against the crates' sources (crates.io releases
//! kmip-protocol 0.4.3 of 2022-10-18 and kmip-ttlv 0.3.5 of 2023-01-23,
//! and the repositories' main branches):
//!
//! * **Correctness for this use.** `kmip-protocol` implements neither
//!   Encrypt nor Decrypt: its operation list marks both "Not implemented
//!   (KMIP 1.2)", nor the 1.4 fields GCM needs. It was written for Krill's
//!   signing keys (Create Key Pair, Sign, Activate, Revoke, Destroy). Using
//!   it would mean forking it to add exactly the messages kmsfs needs.
//! * **Secret handling.** Both crates (de)serialize through serde into
//!   ordinary `Vec<u8>` buffers, including the read buffer of the response
//!   that carries the unwrapped master key, and never zeroize them. Here
//!   requests and replies live in kmsfs' locked, zeroized [`SecretBytes`]
//!   and the decoder borrows from them without copying.
//! * **Upkeep.** The last releases are from 2022 and 2023. The released
//!   `kmip-protocol` pins rustls 0.19 / tokio-rustls 0.22 / webpki 0.21
//!   (long unsupported); its main branch moved to rustls 0.23 in July 2026
//!   but is unreleased, and it relies on `maybe-async`, whose `is_sync`
//!   feature switches every user in a build to blocking I/O when any
//!   crate enables it (feature unification).
//! * **Size.** kmsfs needs six operations and ten TTLV types: the codec
//!   and messages here are a few hundred lines, tested against the
//!   specification's encoding examples, against strict-decoding cases
//!   (every truncation, padding, lengths, nesting), and end to end against
//!   a real PyKMIP server (`tests/tests/keystore_kmip.rs`).
//!
//! Revisit if a maintained crate gains Encrypt/Decrypt and zeroizing buffers.
//!
//! # Secrets
//!
//! The master key is in [`SecretBytes`] from start to end: the Encrypt
//! request is encoded into a locked buffer of exactly the right size, and
//! the Decrypt reply is read into one, so neither is reallocated or left
//! behind in freed heap memory by kmsfs. rustls' record buffers hold
//! copies while a record is sent or received and are not zeroized; that
//! is outside kmsfs' control. The client key file follows the token-file
//! rule (mode 0600, owner root or the caller, not a symbolic link) and is
//! read into locked memory; its parsed DER is wiped after the signing key
//! is built.
//!
//! [`SecretBytes`]: kmsfs_core::secret::SecretBytes

pub mod blob;
pub mod cert;
pub mod client;
pub mod conn;
pub mod message;
pub mod ttlv;

pub use blob::Blob;
pub use client::{KmipClient, KmipStatus, KmipWrapped};
pub(crate) use conn::split_address;
pub use message::{CipherMode, KeyAttributes, KeyState, ProtocolVersion};
