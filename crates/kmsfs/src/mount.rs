//! `kmsfs mount`, `kmsfs umount` and the `mount.kmsfs` helper for mount(8).

use crate::audit::{Event, Field, Op};
use crate::daemon::{self, ReadyPipe, SyslogWriter};
use crate::fsheader;
use crate::mount_checks::{self, Expected, KeyVerdict};
use crate::mount_options::{parse_options, ParsedOptions};
use anyhow::{anyhow, bail, Context};
use kmsfs_core::keys::FsKeys;
use kmsfs_fuse::MountSettings;
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Seconds to keep retrying an unreachable or sealed KMS when neither
/// `--kms-timeout` nor `kms_timeout=` says otherwise.
pub const DEFAULT_KMS_TIMEOUT: u64 = 30;
/// FUSE worker threads.
const FUSE_THREADS: usize = 4;
/// Where mount(8) helpers find the KMS configuration without `--config`.
const DEFAULT_CONFIG: &str = "/etc/kmsfs/kms.toml";

/// Arguments of `kmsfs mount`.
#[derive(Debug, Clone, clap::Args)]
pub struct MountArgs {
    /// The backing (encrypted) directory.
    pub cipherdir: PathBuf,
    /// Where to mount the decrypted view.
    pub mountpoint: PathBuf,
    /// Mount options, comma-separated (ro, allow_other, nosuid, kms_timeout=N, ...).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Stay in the foreground, logging to stderr.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Seconds to keep retrying an unreachable or sealed KMS (default 30).
    #[arg(long, value_name = "SECONDS")]
    pub kms_timeout: Option<u64>,
    /// Internal: the descriptor on which a daemonized mount reports back.
    #[arg(long, hide = true)]
    pub ready_fd: Option<i32>,
}

/// Arguments of `kmsfs umount`.
#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    /// The mountpoint to unmount.
    pub mountpoint: PathBuf,
}

/// Runs `kmsfs mount` with the KMS configuration at `config_path`.
///
/// Without `--foreground` the command re-executes itself as a daemon and
/// returns only when the mount is usable (exit 0) or has failed (an error).
///
/// The process that serves the mount records the audit events: `mount`
/// once it is usable (or failed), `umount` when it ends.
pub fn run_mount(config_path: &Path, args: MountArgs) -> anyhow::Result<()> {
    let mut event = Event::new(Op::Mount);
    event.cipherdir(&args.cipherdir).set(
        Field::Mountpoint,
        crate::commands::absolute(&args.mountpoint)
            .unwrap_or_else(|_| args.mountpoint.clone())
            .to_string_lossy(),
    );
    if !args.options.is_empty() {
        event.set(Field::MountOptions, args.options.join(","));
    }
    let opts = parse_options(&args.options).inspect_err(|e| event.fail(e))?;
    if !args.foreground {
        let mut child: Vec<OsString> = vec![
            "--config".into(),
            config_path.into(),
            "mount".into(),
            args.cipherdir.clone().into(),
            args.mountpoint.clone().into(),
        ];
        for o in &args.options {
            child.push("-o".into());
            child.push(o.into());
        }
        if let Some(t) = args.kms_timeout {
            child.push("--kms-timeout".into());
            child.push(t.to_string().into());
        }
        return daemon::spawn_and_wait(child);
    }
    let mut ready = args.ready_fd.map(ReadyPipe::from_fd).transpose()?;
    init_logging(ready.is_some());
    if ready.is_some() {
        // No terminal: audit events go to the journal when it is there.
        crate::audit::set_daemon();
    }
    let result = serve(config_path, &args, &opts, ready.as_mut(), &mut event);
    // Sent already when the mount came up; otherwise this is its failure.
    event.finish(&result);
    if let Err(e) = &result {
        warn!("mount of {} failed: {e:#}", args.cipherdir.display());
        if let Some(r) = ready.as_mut() {
            r.fail(&format!("{e:#}"));
        }
    }
    result
}

fn init_logging(daemon: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KMSFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if daemon {
        SyslogWriter::init();
        builder
            .with_writer(|| SyslogWriter)
            .with_ansi(false)
            .without_time()
            .try_init()
    } else {
        builder.with_writer(std::io::stderr).try_init()
    };
}

/// Mounts in this process and serves until unmounted or signalled.
fn serve(
    config_path: &Path,
    args: &MountArgs,
    opts: &ParsedOptions,
    ready: Option<&mut ReadyPipe>,
    event: &mut Event,
) -> anyhow::Result<()> {
    crate::hardening::harden_daemon()?;
    // Before any thread exists, so every thread inherits the mask and only
    // the signal thread below sees these signals.
    let signals = block_signals();
    let cipherdir = args
        .cipherdir
        .canonicalize()
        .with_context(|| format!("backing directory {}", args.cipherdir.display()))?;
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", args.mountpoint.display()))?;
    event.set(Field::Cipherdir, cipherdir.to_string_lossy());
    event.set(Field::Mountpoint, mountpoint.to_string_lossy());
    check_mountpoint(&mountpoint)?;
    let cfg_path = opts.kms_config.as_deref().unwrap_or(config_path);
    let cfg = crate::kmsconfig::load_kms_config(cfg_path)?;
    let header = fsheader::read_header(&cipherdir)?;
    // Not authenticated yet: replaced by the header's own once unlocked.
    event.uuid(&header.unverified().uuid);
    // What this host recorded at create (or was told with -o kcv=); a
    // header from another registered filesystem is refused before the KMS
    // is even asked.
    let expected = Expected::load(
        &crate::kmsconfig::registry_path(cfg_path),
        &cipherdir,
        &header.unverified().uuid,
        opts.kcv,
    )?;
    let timeout = args
        .kms_timeout
        .or(opts.kms_timeout)
        .unwrap_or(DEFAULT_KMS_TIMEOUT);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let access = crate::slotkms::KmsAccess::new(&cfg).context("KMS client configuration")?;
    let keys = unlock_with_retry(
        &rt,
        &access,
        &cipherdir,
        header,
        Duration::from_secs(timeout),
        event,
    )?;
    // A valid MAC only proves the header carries a key its writer knew:
    // check that it is this filesystem's key before serving anything.
    let verdict = expected.check_key(&cipherdir, &keys)?;
    let checked = mount_checks::check_root_names(&cipherdir, &keys)?;
    let mut ready = ready;
    if let KeyVerdict::Unpinned(warning) = verdict {
        warn!("{warning}");
        if let Some(r) = ready.as_deref_mut() {
            r.warn(&warning);
        }
    }
    info!(
        "{}: the {checked} root directory names decrypt",
        cipherdir.display()
    );
    let settings = MountSettings {
        read_only: opts.read_only,
        allow_other: opts.allow_other,
        extra: opts.kernel.clone(),
        threads: FUSE_THREADS,
        no_writeback: opts.no_writeback,
        uring: opts.uring,
        shared_storage: opts.shared_storage,
        posix_acl: opts.posix_acl(),
    };
    let session =
        kmsfs_fuse::spawn_mount(&cipherdir, &mountpoint, keys, &settings).with_context(|| {
            format!(
                "mounting {} on {}",
                cipherdir.display(),
                mountpoint.display()
            )
        })?;
    // The first access waits for the kernel's INIT: once it answers, the
    // filesystem is usable.
    std::fs::metadata(&mountpoint)
        .with_context(|| format!("the new mount at {} does not answer", mountpoint.display()))?;
    // Without it the kernel reads a FUSE file 128 KiB at a time. Only
    // speed depends on it, so a failure (no /sys) is logged; a regular
    // user's mount cannot write /sys and does not try.
    if session.is_user_mount() {
        info!("mounted through fusermount3 (not root): readahead left at the kernel's default");
    } else if let Err(e) = session.set_readahead(kmsfs_fuse::READAHEAD_KB) {
        info!("readahead left at the kernel's default: {e}");
    }
    info!(
        "mounted {} on {}",
        cipherdir.display(),
        mountpoint.display()
    );
    // For point-in-time snapshots of this mount; removed when `serve` returns.
    let _control =
        match crate::control::server::start(&cipherdir, &mountpoint, session.write_gate()) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(
                    "no control socket, so `kmsfs snapshot create` cannot snapshot this \
                     mount: {e:#}"
                );
                None
            }
        };
    // Before the parent returns, so the record is there when `kmsfs
    // mount` has exited.
    event.ok();
    if let Some(r) = ready {
        r.ok();
    }
    // Token renewal until unmount, then revocation of this mount's login.
    let kms = crate::kms_session::KmsSession::start(rt, access);
    let mp = mountpoint.clone();
    std::thread::spawn(move || {
        let sig = wait_signal(&signals);
        info!("signal {sig}: unmounting {}", mp.display());
        if let Err(e) = umount(&mp, true) {
            warn!("unmount after signal failed: {e:#}");
        }
    });
    let served = session.join().context("FUSE session");
    kms.stop();
    event.for_op(Op::Umount).finish(&served);
    served?;
    info!("unmounted {}; keys zeroized", mountpoint.display());
    Ok(())
}

/// Asks the KMS to unwrap the key, retrying unreachable or sealed servers
/// until `timeout` has passed, as a boot-time mount must.
fn unlock_with_retry(
    rt: &tokio::runtime::Runtime,
    access: &crate::slotkms::KmsAccess,
    cipherdir: &Path,
    header: kmsfs_core::header::UnverifiedHeader,
    timeout: Duration,
    event: &mut Event,
) -> anyhow::Result<FsKeys> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(500);
    loop {
        match rt.block_on(fsheader::unlock(access, cipherdir, header.clone())) {
            Ok(u) => {
                event.uuid(&u.header.uuid);
                if let Some(s) = u.header.slots.get(u.slot) {
                    event.slot(u.slot, s);
                }
                return Ok(u.keys);
            }
            Err(e) if e.is_retryable() && Instant::now() + delay < deadline => {
                warn!("KMS not available yet, retrying in {delay:?}: {e}");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                let hint = if e.is_retryable() {
                    format!(" (gave up after the KMS timeout of {}s)", timeout.as_secs())
                } else {
                    String::new()
                };
                return Err(anyhow!(e)).with_context(|| {
                    format!(
                        "cannot unlock {} through the KMS{hint}",
                        cipherdir.display()
                    )
                });
            }
        }
    }
}

fn check_mountpoint(mp: &Path) -> anyhow::Result<()> {
    let md = std::fs::metadata(mp).with_context(|| format!("mountpoint {}", mp.display()))?;
    if !md.is_dir() {
        bail!("mountpoint {} is not a directory", mp.display());
    }
    if let Some(parent) = mp.parent() {
        let pmd = std::fs::metadata(parent)?;
        if pmd.dev() != md.dev() {
            bail!("{} is already a mount point", mp.display());
        }
    }
    Ok(())
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is an initialised signal set blocked in every thread.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// The mount still has files open (or a working directory) in it.
#[derive(Debug)]
struct Busy(PathBuf);

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is busy (files are open there)", self.0.display())
    }
}

impl std::error::Error for Busy {}

fn umount(mp: &Path, lazy: bool) -> anyhow::Result<()> {
    let c = CString::new(mp.as_os_str().as_bytes()).context("mountpoint path")?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            // Not root: a regular user's mount is unmounted by the user
            // who mounted it, through the setuid fusermount3.
            return kmsfs_fuse::fusermount_unmount(mp, lazy).map_err(|fe| match fe.kind() {
                std::io::ErrorKind::NotFound => anyhow!("{} is not mounted", mp.display()),
                std::io::ErrorKind::ResourceBusy => anyhow!(Busy(mp.to_path_buf())),
                _ => anyhow!(
                    "unmounting {}: {e}, and fusermount3 -u (for a mount of the calling \
                     user) said: {fe}",
                    mp.display()
                ),
            });
        }
        return Err(match e.raw_os_error() {
            Some(libc::EBUSY) => anyhow!(Busy(mp.to_path_buf())),
            Some(libc::EINVAL) => anyhow!("{} is not mounted", mp.display()),
            _ => anyhow!(e).context(format!("unmounting {}", mp.display())),
        });
    }
    Ok(())
}

/// How long `kmsfs umount` keeps trying a mount that is busy. A process
/// that has just closed its last file there, or has just exited, can hold
/// the mount for a moment longer (a child forked before its `exec` closed
/// the inherited descriptors, a dying process's files not yet put), and
/// an operator's `umount` right after their program ends must not fail
/// for that. Files that stay open still fail, after this long.
pub(crate) const BUSY_GRACE: Duration = Duration::from_secs(3);

/// Runs `op` again while it fails with an error `busy` recognises, for up
/// to [`BUSY_GRACE`]; returns its last result (still busy after that).
pub(crate) fn while_busy<T, E>(
    mut op: impl FnMut() -> Result<T, E>,
    busy: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let deadline = Instant::now() + BUSY_GRACE;
    loop {
        match op() {
            Err(e) if busy(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// Runs `kmsfs umount`. A failure is recorded as an audit event here;
/// success by the daemon, which sees every unmount (umount(8) and
/// `fusermount3 -u` too).
pub fn run_umount(args: UmountArgs) -> anyhow::Result<()> {
    let result = umount_now(&args);
    if let Err(e) = &result {
        let mp =
            crate::commands::absolute(&args.mountpoint).unwrap_or_else(|_| args.mountpoint.clone());
        let mut event = Event::new(Op::Umount);
        event.set(Field::Mountpoint, mp.to_string_lossy()).fail(e);
    }
    result
}

fn umount_now(args: &UmountArgs) -> anyhow::Result<()> {
    let mp = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", args.mountpoint.display()))?;
    match while_busy(|| umount(&mp, false), |e| e.is::<Busy>()) {
        Err(e) if e.is::<Busy>() => bail!(
            "{e}: close them (`fuser -vm {}` lists the processes that hold \
             them) and run `kmsfs umount` again",
            mp.display()
        ),
        r => r,
    }
}

/// Runs as `mount.kmsfs CIPHERDIR MOUNTPOINT [-sfnv] [-o OPTIONS]`, the
/// way mount(8) calls filesystem helpers.
pub fn run_mount_helper(args: Vec<OsString>) -> anyhow::Result<()> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut fake = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        match s.as_str() {
            "-o" => options.push(
                it.next()
                    .ok_or_else(|| anyhow!("-o needs a value"))?
                    .to_string_lossy()
                    .into_owned(),
            ),
            "-t" | "-N" => {
                it.next();
            }
            "-f" => fake = true,
            "-s" | "-n" | "-v" => {}
            _ if s.starts_with("-o") => options.push(s[2..].to_string()),
            _ if s.starts_with('-') => bail!("mount.kmsfs: unknown flag {s}"),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [cipherdir, mountpoint]: [PathBuf; 2] = positional
        .try_into()
        .map_err(|_| anyhow!("usage: mount.kmsfs CIPHERDIR MOUNTPOINT [-o OPTIONS]"))?;
    if let Some(options) = crate::remount::requested(&options) {
        let opts = parse_options(&options)?;
        if fake {
            return Ok(());
        }
        return crate::remount::run(&mountpoint, &opts);
    }
    // Validate options before anything else, even for a fake mount.
    parse_options(&options)?;
    if fake {
        return Ok(());
    }
    let config = std::env::var_os("KMSFS_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    run_mount(
        &config,
        MountArgs {
            cipherdir,
            mountpoint,
            options,
            foreground: false,
            kms_timeout: None,
            ready_fd: None,
        },
    )
}
