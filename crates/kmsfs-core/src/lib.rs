//! kmsfs core: the on-disk format and the cryptography, with no FUSE and no network.
//!
//! `docs/format.md` describes every byte this crate reads or writes.
pub mod contents;
pub mod header;
pub mod keys;
pub mod layout;
mod locked_arena;
pub mod names;
pub mod secret;
pub mod slots;
pub mod units;
pub mod xattr_crypto;
pub mod xts;
