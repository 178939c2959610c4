//! `kmsfs generate man|completions DIR`: the man pages and shell
//! completions `scripts/install` puts in place, generated from the clap
//! definitions so they never drift from the real flags.
//!
//! The subcommand is hidden (it is for packagers, not operators) and does
//! nothing until called, so the binary's start-up is unaffected.
//!
//! * kmsfs(8) and one page per subcommand (`kmsfs-mount(8)`,
//!   `kmsfs-kms-set(8)`, ...), rendered by `clap_mangen` from the `Cli`
//!   the binary parses, plus FILES / ENVIRONMENT / SEE ALSO sections;
//! * mount.kmsfs(8), from a clap description of the arguments mount(8)
//!   passes the helper (the helper parses them by hand: mount(8)'s own
//!   flags are not clap's) and the option table below;
//! * kms.toml(5), hand-written roff (`man/kms.toml.5`, embedded): a file
//!   format has no clap definition to render.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Arg, ArgAction};
use clap_complete::Shell;
use clap_mangen::Man;

/// The kms.toml(5) page, hand-written roff.
const KMS_TOML_5: &str = include_str!("../man/kms.toml.5");

/// The manual the generated pages belong to (the `.TH` fifth field).
const MANUAL: &str = "System Manager's Manual";

/// Arguments of the hidden `kmsfs generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// What to generate.
    #[command(subcommand)]
    pub what: GenerateWhat,
}

/// What `kmsfs generate` writes.
#[derive(Debug, clap::Subcommand)]
pub enum GenerateWhat {
    /// Man pages: kmsfs.8, kmsfs-*.8 (one per subcommand), mount.kmsfs.8, kms.toml.5.
    Man {
        /// Directory to write the pages into (created if missing).
        dir: PathBuf,
    },
    /// Shell completions: kmsfs.bash, _kmsfs (zsh) and kmsfs.fish.
    Completions {
        /// Directory to write the scripts into (created if missing).
        dir: PathBuf,
    },
}

/// Runs `kmsfs generate`; `cli` is the binary's full command definition.
/// Prints the path of every file written, one per line.
pub fn run_generate(cli: clap::Command, args: GenerateArgs) -> anyhow::Result<()> {
    let (dir, files) = match args.what {
        GenerateWhat::Man { dir } => {
            create_dir(&dir)?;
            let files = write_man_pages(cli, &dir)?;
            (dir, files)
        }
        GenerateWhat::Completions { dir } => {
            create_dir(&dir)?;
            let files = write_completions(cli, &dir)?;
            (dir, files)
        }
    };
    let mut out = std::io::stdout().lock();
    for f in files {
        writeln!(out, "{}", dir.join(f).display())?;
    }
    Ok(())
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<String> {
    let path = dir.join(name);
    fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(name.to_string())
}

/// Writes every man page into `dir`; returns the file names.
pub fn write_man_pages(cli: clap::Command, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut cli = cli
        .about("encrypted directory whose key is wrapped by a KMS")
        .disable_help_subcommand(true);
    // Propagates global arguments and gives subcommands their display
    // names (kmsfs-mount), which name their pages.
    cli.build();
    let mut files = Vec::new();
    let mut top = Vec::new();
    let man = Man::new(cli.clone()).section("8").manual(MANUAL);
    man.render_title(&mut top)?;
    man.render_name_section(&mut top)?;
    man.render_synopsis_section(&mut top)?;
    top.extend_from_slice(KMSFS_DESCRIPTION.as_bytes());
    man.render_options_section(&mut top)?;
    man.render_subcommands_section(&mut top)?;
    top.extend_from_slice(KMSFS_TRAILER.as_bytes());
    man.render_version_section(&mut top)?;
    files.push(write_file(dir, &man.get_filename(), &top)?);
    for sub in cli.get_subcommands() {
        subcommand_pages(sub, dir, &mut files)?;
    }

    let helper = Man::new(mount_helper_command()).section("8").manual(MANUAL);
    let mut page = Vec::new();
    helper.render_title(&mut page)?;
    helper.render_name_section(&mut page)?;
    helper.render_synopsis_section(&mut page)?;
    helper.render_description_section(&mut page)?;
    helper.render_options_section(&mut page)?;
    page.extend_from_slice(mount_options_section().as_bytes());
    page.extend_from_slice(MOUNT_HELPER_TRAILER.as_bytes());
    helper.render_version_section(&mut page)?;
    files.push(write_file(dir, &helper.get_filename(), &page)?);

    files.push(write_file(dir, "kms.toml.5", KMS_TOML_5.as_bytes())?);
    Ok(files)
}

/// One page per visible subcommand, recursively (`kmsfs-kms-set.8`).
fn subcommand_pages(
    cmd: &clap::Command,
    dir: &Path,
    files: &mut Vec<String>,
) -> anyhow::Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    for sub in cmd.get_subcommands() {
        subcommand_pages(sub, dir, files)?;
    }
    let man = Man::new(cmd.clone()).section("8").manual(MANUAL);
    let mut page = Vec::new();
    man.render(&mut page)?;
    page.extend_from_slice(b".SH \"SEE ALSO\"\n\\fBkmsfs\\fR(8), \\fBkms.toml\\fR(5)\n");
    files.push(write_file(dir, &man.get_filename(), &page)?);
    Ok(())
}

/// Writes the bash, zsh and fish completions into `dir`; returns the file names.
pub fn write_completions(cli: clap::Command, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut cli = cli.disable_help_subcommand(true);
    let mut files = Vec::new();
    for (shell, name) in [
        (Shell::Bash, "kmsfs.bash"),
        (Shell::Zsh, "_kmsfs"),
        (Shell::Fish, "kmsfs.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cli, "kmsfs", &mut script);
        files.push(write_file(dir, name, &script)?);
    }
    Ok(files)
}

const KMSFS_DESCRIPTION: &str = r#".SH DESCRIPTION
\fBkmsfs\fR keeps a directory encrypted with a random 256\-bit key that a Key
Management System wraps: HashiCorp Vault or OpenBao (Transit engine), or a
KMIP server.
\fBkmsfs create\fR makes a new filesystem in a backing directory and stores
only the wrapped key in its header; \fBkmsfs mount\fR has the KMS unwrap the
key, keeps it in locked memory and serves the decrypted view through FUSE.
File contents are encrypted with AES\-256\-XTS, names with AES\-256\-SIV,
extended attributes with AES\-256\-GCM.
.PP
Each subcommand has its own page, \fBkmsfs\-\fR\fIsubcommand\fR(8).
Secrets (tokens, secret ids, client keys) are read from files or the
environment, never from the command line.
.PP
Called as \fBmount.kmsfs\fR, the binary is the helper that \fBmount\fR(8)
runs for \fB\-t kmsfs\fR; see \fBmount.kmsfs\fR(8).
"#;

const KMSFS_TRAILER: &str = r#".SH "EXIT STATUS"
0 on success, 1 on any error (the message on standard error names the file
or server and what to do), except \fBkmsfs fsck\fR: 0 clean, 1 repaired,
4 errors left, 8 could not run.
.SH ENVIRONMENT
.TP
\fBKMSFS_CONFIG\fR
The KMS configuration file, as \fB\-\-config\fR.
.TP
\fBKMSFS_LOG\fR
Log filter (\fBwarn\fR by default; for example \fBinfo\fR or \fBkmsfs=debug\fR).
.TP
\fBKMSFS_JOURNAL_SOCKET\fR
journald's native socket for the audit events (default
\fI/run/systemd/journal/socket\fR). Events go to the journal when the socket
exists and the command runs under systemd (\fBINVOCATION_ID\fR or
\fBJOURNAL_STREAM\fR set), and always from the mount daemon; otherwise to the
log above (target \fBkmsfs::audit\fR, level info). Read them with
\fBjournalctl \-t kmsfs OPERATION=rewrap\fR.
.TP
\fBVAULT_ADDR\fR, \fBVAULT_TOKEN\fR, \fBKMSFS_TOKEN_FILE\fR, \fBVAULT_CACERT\fR, \fBVAULT_AGENT_ADDR\fR
Used when the configuration file does not exist (\fBBAO_\fR names too);
see \fBkms.toml\fR(5).
.SH FILES
.TP
\fI/etc/kmsfs/kms.toml\fR
KMS configuration, written by \fBkmsfs kms set\fR; see \fBkms.toml\fR(5).
.TP
\fI/etc/kmsfs/registry.toml\fR
The filesystems created on this host, with their key check values.
.TP
\fICIPHERDIR/kmsfs.header\fR
The wrapped key and the filesystem's authenticated header.
.SH "SEE ALSO"
\fBmount.kmsfs\fR(8), \fBkms.toml\fR(5), \fBmount\fR(8), \fBfstab\fR(5),
\fBsystemd.mount\fR(5)
"#;

/// The arguments mount(8) passes a helper, as clap sees them (only for the
/// page; `mount::run_mount_helper` parses them).
fn mount_helper_command() -> clap::Command {
    let ignored = |id: &'static str, short: char, help: &'static str| {
        Arg::new(id)
            .short(short)
            .action(ArgAction::SetTrue)
            .help(help)
    };
    clap::Command::new("mount.kmsfs")
        .version(env!("CARGO_PKG_VERSION"))
        .about("mount a kmsfs filesystem (helper for mount(8))")
        .long_about(
            "mount(8) runs mount.kmsfs for file systems of type kmsfs, from the \
             command line (mount -t kmsfs CIPHERDIR MOUNTPOINT) or /etc/fstab. It is \
             the kmsfs binary called by that name and mounts as `kmsfs mount` does: \
             it reads the header, has the KMS unwrap the key (retrying an unreachable \
             or sealed KMS for kms_timeout seconds), mounts, and returns only when the \
             filesystem is usable (exit 0) or has failed (an error naming the cause; \
             nothing is left mounted). The serving daemon logs to syslog or journald. \
             The KMS configuration is the file the kms_config= option names, else \
             $KMSFS_CONFIG, else /etc/kmsfs/kms.toml.",
        )
        .disable_help_flag(true)
        .disable_version_flag(true)
        .arg(
            Arg::new("cipherdir")
                .value_name("CIPHERDIR")
                .required(true)
                .help("The backing (encrypted) directory"),
        )
        .arg(
            Arg::new("mountpoint")
                .value_name("MOUNTPOINT")
                .required(true)
                .help("Where to mount the decrypted view"),
        )
        .arg(
            Arg::new("options")
                .short('o')
                .value_name("OPTIONS")
                .action(ArgAction::Append)
                .help("Comma-separated mount options (see MOUNT OPTIONS); may be repeated"),
        )
        .arg(ignored(
            "fake",
            'f',
            "Fake: check the options and exit without mounting",
        ))
        .arg(ignored(
            "no-mtab",
            'n',
            "Accepted and ignored (no /etc/mtab to write)",
        ))
        .arg(ignored("sloppy", 's', "Accepted and ignored"))
        .arg(ignored("verbose", 'v', "Accepted and ignored"))
        .arg(
            Arg::new("type")
                .short('t')
                .value_name("TYPE")
                .help("Accepted and ignored (mount(8) passes the type)"),
        )
        .arg(
            Arg::new("namespace")
                .short('N')
                .value_name("NS")
                .help("Accepted and ignored"),
        )
}

/// The options `mount_options::parse_options` accepts, for the page.
const MOUNT_OPTIONS: &[(&str, &str)] = &[
    ("ro, rw", "Read-only or read-write (the default)."),
    (
        "allow_other",
        "Let other users than the one who mounted into the mount.",
    ),
    (
        "noexec, exec, noatime, atime, sync, async, dirsync",
        "Passed to the kernel.",
    ),
    (
        "nosuid, nodev",
        "Always on: the modes, owners and device numbers in the backing directory are not authenticated.",
    ),
    (
        "suid, dev",
        "Refused unless allow_suid_dev is given too; only when nobody but root can write the backing directory.",
    ),
    (
        "allow_suid_dev",
        "Lets suid and dev through; on its own it changes nothing.",
    ),
    (
        "no_writeback, writeback",
        "Turn off (on, the default) the kernel's writeback cache.",
    ),
    (
        "uring, no_uring",
        "Serve requests over FUSE io_uring (not, the default) where the kernel offers it, which it does only with the fuse module parameter enable_uring=1; otherwise the mount uses /dev/fuse as without it.",
    ),
    (
        "shared_storage",
        "The backing directory is shared with other shared_storage mounts (other hosts over NFS or CephFS): no writeback cache, no attribute or entry caching.",
    ),
    (
        "acl, noacl",
        "Store and enforce POSIX ACLs (setfacl, default ACLs inherited on create), or refuse them with ENOTSUP. The default is acl with allow_other and noacl without: ACLs cost a request per entry listed and per unlink.",
    ),
    (
        "kms_timeout=SECONDS",
        "How long to keep retrying a KMS that is unreachable or sealed (default 30).",
    ),
    (
        "kcv=HEX",
        "The filesystem's key check value (printed by kmsfs create): the mount is refused unless the unwrapped key matches it. Give it on every host that did not create the filesystem.",
    ),
    (
        "kms_config=PATH",
        "KMS configuration file for this mount.",
    ),
    (
        "_netdev, nofail, auto, noauto, user, users, defaults, x-systemd.*, x-*, comment=*",
        "For mount(8) and systemd; accepted and ignored by kmsfs.",
    ),
];

fn mount_options_section() -> String {
    let mut s = String::from(
        ".SH \"MOUNT OPTIONS\"\nAny option not listed here is refused with an error naming it.\n",
    );
    for (name, meaning) in MOUNT_OPTIONS {
        s.push_str(&format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            roff_escape(name),
            roff_escape(meaning)
        ));
    }
    s
}

/// Escapes text for a roff line: backslashes, hyphens (so they stay
/// ASCII in copy and paste) and a leading control character.
fn roff_escape(text: &str) -> String {
    let mut s = text.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        s.insert_str(0, "\\&");
    }
    s
}

const MOUNT_HELPER_TRAILER: &str = r#".SH EXAMPLES
An \fI/etc/fstab\fR line that waits up to five minutes for a KMS that starts
late and does not block the boot when it is down:
.PP
.nf
.RS
/srv/cipher  /mnt/plain  kmsfs  _netdev,nofail,allow_other,kms_timeout=300  0 0
.RE
.fi
.PP
Example systemd units (a \fB.mount\fR unit and a token renewal timer) are
installed under \fI/usr/local/share/doc/kmsfs/examples/\fR (the prefix may differ).
.SH ENVIRONMENT
.TP
\fBKMSFS_CONFIG\fR
The KMS configuration file (default \fI/etc/kmsfs/kms.toml\fR).
.SH "SEE ALSO"
\fBkmsfs\fR(8), \fBkms.toml\fR(5), \fBmount\fR(8), \fBfstab\fR(5),
\fBsystemd.mount\fR(5)
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roff_escape_keeps_text_literal() {
        assert_eq!(roff_escape("x-systemd.*"), "x\\-systemd.*");
        assert_eq!(roff_escape(".hidden"), "\\&.hidden");
        assert_eq!(roff_escape("a\\b"), "a\\eb");
    }

    #[test]
    fn every_option_on_the_helper_page_is_one_the_parser_accepts() {
        for (names, _) in MOUNT_OPTIONS {
            for name in names.split(", ").filter(|n| !n.contains('*')) {
                let opt = match name.split_once('=') {
                    Some(("kms_timeout", _)) => "kms_timeout=30".to_string(),
                    Some(("kcv", _)) => format!("kcv={}", "0".repeat(32)),
                    Some((k, _)) => format!("{k}=/x"),
                    None => name.to_string(),
                };
                let list = [opt.as_str(), crate::mount_options::ALLOW_SUID_DEV];
                let r = crate::mount_options::parse_options(&list);
                assert!(r.is_ok(), "{opt}: {:?}", r.err());
            }
        }
        // The parser refuses an unknown option, so the check above can fail.
        assert!(crate::mount_options::parse_options(&["no_such_option"]).is_err());
    }
}
