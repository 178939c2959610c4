//! The `kmsfs` binary; also `mount.kmsfs` when invoked under that name.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};
use kmsfs::commands::{
    self, CreateArgs, FsckArgs, InfoArgs, KmsArgs, ListArgs, RewrapArgs, SlotArgs, SnapshotArgs,
    UnlockCheckArgs,
};
use kmsfs::{kmsconfig, mount};

/// kmsfs: an encrypted directory whose key is wrapped by a KMS
/// (HashiCorp Vault / OpenBao Transit).
#[derive(Debug, Parser)]
#[command(name = "kmsfs", version, propagate_version = true)]
struct Cli {
    /// KMS configuration file; the registry of filesystems sits beside it.
    #[arg(
        long,
        global = true,
        env = "KMSFS_CONFIG",
        value_name = "PATH",
        default_value = kmsconfig::DEFAULT_CONFIG_PATH
    )]
    config: PathBuf,
    /// No confirmations, summaries or progress on success (listings,
    /// reports and --json output stay); errors and warnings are printed.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount a filesystem.
    Mount(mount::MountArgs),
    /// Unmount a filesystem.
    Umount(mount::UmountArgs),
    /// Configure and check the KMS.
    Kms(KmsArgs),
    /// Create a new encrypted filesystem in a backing directory.
    Create(CreateArgs),
    /// Show a filesystem's header (no KMS needed).
    Info(InfoArgs),
    /// List the filesystems created on this host.
    List(ListArgs),
    /// Check a filesystem offline (exit 0 clean, 1 repaired, 4 errors left, 8 could not run).
    Fsck(FsckArgs),
    /// Re-wrap filesystem keys with the newest KMS key version, or another key.
    Rewrap(RewrapArgs),
    /// List, add and remove key slots (copies of the key wrapped by other KMSes).
    Slot(SlotArgs),
    /// Snapshots to an object store (S3 or a directory): create, list, restore, delete.
    Snapshot(SnapshotArgs),
    /// Unlock a filesystem with the KMS and verify its header; prints "ok".
    #[command(hide = true)]
    UnlockCheck(UnlockCheckArgs),
    /// Write man pages or shell completions into a directory (for scripts/install).
    #[command(hide = true)]
    Generate(kmsfs::generate::GenerateArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KMSFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// True for commands that read a KMS token or hold a master key.
fn holds_secrets(command: &Command) -> bool {
    match command {
        Command::Mount(_)
        | Command::Kms(_)
        | Command::Create(_)
        | Command::Rewrap(_)
        | Command::Slot(_)
        | Command::Fsck(_)
        | Command::UnlockCheck(_) => true,
        Command::Snapshot(a) => a.holds_secrets(),
        Command::Umount(_) | Command::Info(_) | Command::List(_) | Command::Generate(_) => false,
    }
}

fn run(config: &Path, command: Command) -> anyhow::Result<()> {
    if holds_secrets(&command) {
        kmsfs::hardening::harden_process()?;
    }
    match command {
        Command::Mount(a) => mount::run_mount(config, a),
        Command::Umount(a) => mount::run_umount(a),
        Command::Kms(a) => commands::run_kms(config, a),
        Command::Create(a) => commands::run_create(config, a),
        Command::Info(a) => commands::run_info(config, a),
        Command::List(a) => commands::run_list(config, a),
        Command::Fsck(a) => commands::run_fsck(config, a),
        Command::Rewrap(a) => commands::run_rewrap(config, a),
        Command::Slot(a) => commands::run_slot(config, a),
        Command::Snapshot(a) => commands::run_snapshot(config, a),
        Command::UnlockCheck(a) => commands::run_unlock_check(config, a),
        Command::Generate(a) => kmsfs::generate::run_generate(Cli::command(), a),
    }
}

fn report(result: anyhow::Result<()>, json: bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if json => {
            let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
            eprintln!("{}", error_json(&e.to_string(), &causes));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("kmsfs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// True when the command line asks for JSON (`--json` before any `--`):
/// the error, if any, is then one JSON object too, so that a script
/// reading JSON never has to parse a text message.
fn wants_json(args: &[OsString]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

/// `{"error": MESSAGE, "causes": [CAUSE, ...]}` on one line: the error's
/// own message and the chain of causes below it, outermost first.
fn error_json(message: &str, causes: &[String]) -> String {
    serde_json::json!({ "error": message, "causes": causes }).to_string()
}

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let argv0: Option<OsString> = args.next();
    let invoked_as = argv0
        .as_deref()
        .map(Path::new)
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned());
    // mount(8) runs `mount.fuse.kmsfs` for a mounted `fuse.kmsfs`
    // (`mount -o remount,ro`), `mount.kmsfs` for an fstab line of type kmsfs.
    if matches!(
        invoked_as.as_deref(),
        Some("mount.kmsfs" | "mount.fuse.kmsfs")
    ) {
        init_logging();
        return report(mount::run_mount_helper(args.collect()), false);
    }
    let json = wants_json(&args.collect::<Vec<_>>());
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) if json => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let message = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("{}", error_json(message, &[]));
            return ExitCode::FAILURE;
        }
        Err(e) => {
            // Usage errors: same prefix and exit code as every other error.
            eprint!("kmsfs: {}", e.render());
            return ExitCode::FAILURE;
        }
    };
    init_logging();
    kmsfs::output::set_quiet(cli.quiet);
    report(run(&cli.config, cli.command), json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_asked_for_before_a_double_dash_only() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(wants_json(&args(&["kms", "check", "--json"])));
        assert!(!wants_json(&args(&["kms", "check"])));
        assert!(!wants_json(&args(&["mount", "--", "--json"])));
        assert!(!wants_json(&args(&["info", "--jsonx"])));
    }

    #[test]
    fn errors_as_json_are_one_object() {
        let e = anyhow::anyhow!("inner \"cause\"").context("outer");
        let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
        let v: serde_json::Value =
            serde_json::from_str(&error_json(&e.to_string(), &causes)).expect("valid JSON");
        assert_eq!(v["error"], "outer");
        assert_eq!(v["causes"], serde_json::json!(["inner \"cause\""]));
    }
}
