//! The `kmsfs` command-line tool, as a library.
//!
//! The binary (`src/main.rs`) parses arguments and dispatches; everything
//! that is shared with the mount code or worth testing lives here:
//!
//! * [`fsheader`]: reading a backing directory's `kmsfs.header` without the
//!   KMS ([`fsheader::read_header`]) and unlocking it with the KMS
//!   ([`fsheader::unlock`]);
//! * [`kmsconfig`]: finding the KMS configuration
//!   ([`kmsconfig::load_kms_config`]), from the file or the environment;
//! * [`registry`]: the list of filesystems this host created
//!   (`registry.toml` beside the configuration), with their key check values
//!   ([`keycheck`]);
//! * [`mount_checks`]: what a mount verifies before serving anything (the
//!   header is this filesystem's, the key is the recorded one, the root
//!   directory's names decrypt);
//! * [`hardening`]: non-dumpable, no-core-dump processes for every command
//!   that holds a key or token;
//! * [`slotkms`]: which key slots a KMS configuration reaches, and the
//!   clients that reach them;
//! * [`snapshot_targets`]: the snapshot targets this host used, for
//!   `kms check`;
//! * [`header_update`]: replacing the header under a lock, with a backup
//!   and proof that the new one opens;
//! * [`commands`]: `kms set|show|unset|check`, `create`, `info`, `list`,
//!   `rewrap`, `slot list|add|remove`;
//! * [`mount`], [`mount_options`], [`daemon`]: `kmsfs mount`/`umount`, the
//!   `mount.kmsfs` helper, `-o` option parsing and the daemon start-up;
//! * [`control`], [`live_capture`]: the daemon's control socket and the
//!   point-in-time capture of a mounted filesystem for `snapshot create`;
//! * [`generate`]: the man pages and shell completions `scripts/install` installs;
//! * [`audit`]: the audit records (journald's native protocol, or the log)
//!   of create, mount, umount, rewrap, slot and snapshot operations;
//! * [`output`]: `--quiet`, and the informational prints it silences.

#![warn(missing_docs)]

pub mod audit;
pub mod commands;
pub mod control;
pub mod daemon;
pub mod fsheader;
pub mod generate;
pub mod hardening;
pub mod header_update;
pub mod keycheck;
pub mod kms_session;
pub mod kmsconfig;
pub mod live_capture;
pub mod mount;
pub mod mount_checks;
pub mod mount_options;
pub mod output;
pub mod registry;
pub mod remount;
pub mod slotkms;
pub mod slotwrap;
pub mod snapshot_targets;
pub mod timefmt;
