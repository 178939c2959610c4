//! kmsfs core: the on-disk format and the cryptography, with no FUSE and no network.
pub mod secret;
