//! The mount daemon's control socket, through which `kmsfs snapshot
//! create` takes a point-in-time snapshot of a mounted filesystem.
//!
//! One Unix socket per mount, `/run/kmsfs/ctl-DEV-INO.sock`, named after
//! the backing root's device and inode numbers (so two mounts of restored
//! copies with the same UUID do not collide). The directory is `0700`
//! root, the socket `0600`, and the daemon checks the peer's credentials
//! (`SO_PEERCRED`): only root may freeze a mount.
//!
//! The protocol is one line per request and per answer:
//!
//! ```text
//! TRACK                 -> OK                 record inodes whose contents change
//! FREEZE <timeout_ms>   -> FROZEN <drain_us>  syncfs, then hold modifying requests
//! CHANGED               -> CHANGED <ino>...   inodes changed since TRACK
//! THAW                  -> THAWED <held_us>   writes resume; how long they were held
//! (any)                 -> ERR <message>
//! ```
//!
//! The daemon thaws by itself when the client closes the connection (or
//! dies) and when the freeze timeout passes; a `THAW` after that is
//! answered with an error, so the client knows its capture is not from
//! one instant. A second client while one session is open is refused.

pub mod client;
pub mod server;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where control sockets live.
pub const RUN_DIR: &str = "/run/kmsfs";

/// The longest freeze a client may ask for.
pub const MAX_FREEZE: std::time::Duration = std::time::Duration::from_secs(600);

/// The control socket of the mount of `cipherdir`, whose metadata is `md`.
pub fn socket_path(md: &std::fs::Metadata) -> PathBuf {
    Path::new(RUN_DIR).join(format!("ctl-{:x}-{}.sock", md.dev(), md.ino()))
}
