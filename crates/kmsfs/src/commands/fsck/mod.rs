//! `kmsfs fsck CIPHERDIR [--json] [--repair]`: checks a filesystem offline,
//! like `gocryptfs -fsck`, with the KMS but without mounting.
//!
//! The header is unlocked exactly as `kmsfs mount` does (its MAC verified),
//! then every directory IV, name, long-name sidecar, symlink target,
//! extended attribute and regular file (header, length, and every byte
//! read through the contents layer) is checked. Exit codes follow fsck(8): 0 clean, 1 all problems
//! repaired, 4 problems left, 8 the check could not run.

mod files;
pub mod report;
mod sys;
mod walk;
mod xattrs;

use std::io::Write as _;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};

use anyhow::Context as _;
use kmsfs_core::keys::FsKeys;

use crate::commands::{absolute, kms_access, print_json, runtime};
use crate::fsheader::unlock;
use crate::kmsconfig::load_kms_config;
use report::{operational_json, Report, EXIT_CLEAN, EXIT_OPERATIONAL};

/// Spans queued ahead of the workers (bounds the open files).
const QUEUE: usize = 64;
/// At most this many reader threads.
const MAX_WORKERS: usize = 4;
/// Stack of the walker thread (reserved, not committed, until used).
const WALK_STACK: usize = 256 << 20;

/// Arguments of `kmsfs fsck`.
#[derive(Debug, clap::Args)]
pub struct FsckArgs {
    /// The backing (encrypted) directory.
    pub cipherdir: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Remove orphan long-name sidecars (the only damage that can be
    /// repaired without guessing).
    #[arg(long)]
    pub repair: bool,
}

/// Runs the check and exits with the fsck(8) code (returns only when clean).
pub fn run_fsck(config_path: &Path, args: FsckArgs) -> anyhow::Result<()> {
    let code = match check(config_path, &args) {
        Ok(report) => {
            if args.json {
                print_json(&report.to_json())?;
            } else {
                print!("{}", report.to_text());
            }
            report.exit_code()
        }
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("kmsfs: error: {msg}");
            if args.json {
                print_json(&operational_json(&args.cipherdir, &msg))?;
            }
            EXIT_OPERATIONAL
        }
    };
    if code == EXIT_CLEAN {
        return Ok(());
    }
    // The keys were dropped (and zeroized) when `check` returned.
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

/// Unlocks the filesystem and checks the whole tree; an error means the
/// check could not run at all.
fn check(config_path: &Path, args: &FsckArgs) -> anyhow::Result<Report> {
    let cipherdir = absolute(&args.cipherdir)?;
    let root = sys::open_root(&cipherdir)
        .with_context(|| format!("cannot open the backing directory {}", cipherdir.display()))?;
    let (_, hdr) = crate::fsheader::read_header_at(root.as_fd(), &cipherdir)?;
    let cfg = load_kms_config(config_path)?;
    let access = kms_access(&cfg)?;
    let unlocked = runtime()?.block_on(unlock(&access, &cipherdir, hdr))?;
    let keys = unlocked.keys;
    drop(unlocked.master);
    check_tree(&keys, &root, &cipherdir, args.repair)
}

/// Checks the tree below `root` with the filesystem's keys.
fn check_tree(
    keys: &FsKeys,
    root: &OwnedFd,
    cipherdir: &Path,
    repair: bool,
) -> anyhow::Result<Report> {
    let sink = files::Sink::default();
    let workers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, MAX_WORKERS);
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let rx = Mutex::new(rx);
    let counts = std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| files::worker(&rx, &sink));
        }
        // The walk recurses once per directory level (at most
        // `walk::MAX_DEPTH`): give it a stack that holds that many frames.
        let walk = std::thread::Builder::new()
            .name("fsck-walk".into())
            .stack_size(WALK_STACK)
            .spawn_scoped(s, || {
                let mut walker = walk::Walker::new(keys, &sink, tx, repair);
                walker.walk_root(root, cipherdir);
                // Dropping the walker closes the channel: the workers
                // finish the queue and stop.
                walker.counts
            })
            .context("cannot start the walker thread")?;
        walk.join()
            .map_err(|_| anyhow::anyhow!("the walker thread panicked"))
    })?;
    let (mut problems, bytes) = sink.into_parts();
    problems.sort_by(|a, b| a.backing.cmp(&b.backing).then(a.kind.cmp(&b.kind)));
    let mut counts = counts;
    counts.bytes = bytes;
    Ok(Report {
        cipherdir: cipherdir.to_path_buf(),
        problems,
        counts,
    })
}
