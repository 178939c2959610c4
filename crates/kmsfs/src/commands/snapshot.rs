//! `kmsfs snapshot`: snapshots of a backing directory to an object store
//! (S3 or a directory), and restores from them on any host that reaches
//! the KMS. The work is in the `kmsfs-snapshot` crate; this module adds the
//! KMS (unlock, to authenticate manifests), the lock against a mount, and
//! the output.

use std::fs::File;
use std::io::IsTerminal as _;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use kmsfs_core::header::UnverifiedHeader;
use kmsfs_snapshot::{NoProgress, Progress, S3Options, Store, Target};
use serde_json::json;

use crate::audit::{Event, Field, Op};
use crate::commands::{absolute, kms_access, print_json, uuid_string};
use crate::control::client::Control;
use crate::fsheader::{read_header_at, unlock, Unlocked};
use crate::keycheck::KeyCheck;
use crate::kmsconfig::{load_kms_config, registry_path};
use crate::live_capture;
use crate::registry::{Entry as RegistryEntry, Registry};

/// Uploads or downloads in flight at once.
const CONCURRENCY: usize = 8;

/// Arguments of `kmsfs snapshot`.
#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

/// Options every subcommand takes.
#[derive(Debug, clap::Args)]
pub struct StoreOpts {
    /// S3 endpoint URL (overrides AWS_ENDPOINT_URL); credentials come from
    /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the region from AWS_REGION.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The `kmsfs snapshot` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a filesystem to TARGET (s3://BUCKET[/PREFIX] or a
    /// directory); prints the snapshot id. A mounted filesystem is captured
    /// at one instant through its daemon's control socket (root only).
    Create {
        /// The backing (encrypted) directory.
        cipherdir: PathBuf,
        /// s3://BUCKET[/PREFIX], file:///DIR or /DIR.
        target: String,
        /// A label stored with the snapshot (in the clear).
        #[arg(long)]
        label: Option<String>,
        /// Read and hash every file, even those the unchanged-file cache
        /// shows as unchanged since the last snapshot to TARGET.
        #[arg(long)]
        full: bool,
        /// Mounted filesystems: the longest the daemon holds writes for
        /// the capture before resuming them by itself (the snapshot then
        /// fails).
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        freeze_timeout: u64,
        /// Endpoint and output options.
        #[command(flatten)]
        opts: StoreOpts,
    },
    /// List the snapshots in TARGET.
    List {
        /// s3://BUCKET[/PREFIX], file:///DIR or /DIR.
        target: String,
        /// Endpoint and output options.
        #[command(flatten)]
        opts: StoreOpts,
    },
    /// Restore SNAPSHOT from TARGET into NEWDIR (new or empty), verifying
    /// the manifest with the KMS and every object against it.
    Restore {
        /// s3://BUCKET[/PREFIX], file:///DIR or /DIR.
        target: String,
        /// The snapshot id (see `kmsfs snapshot list`).
        snapshot: String,
        /// The new backing directory.
        newdir: PathBuf,
        /// Endpoint and output options.
        #[command(flatten)]
        opts: StoreOpts,
    },
    /// After a KMS key rotation: rewrap the keys SNAPSHOT (or --all) in
    /// TARGET carries with the newest key version, or another key; one
    /// line per key slot.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["snapshot", "all"])))]
    Rewrap {
        /// s3://BUCKET[/PREFIX], file:///DIR or /DIR.
        target: String,
        /// The snapshot id.
        snapshot: Option<String>,
        /// Every snapshot in TARGET.
        #[arg(long, conflicts_with = "snapshot")]
        all: bool,
        /// Move to this key instead of the newest version of the current one.
        #[arg(long, value_name = "NAME")]
        new_key: Option<String>,
        /// Rewrap only this slot (label or index).
        #[arg(long, value_name = "LABEL|INDEX")]
        slot: Option<String>,
        /// Endpoint and output options.
        #[command(flatten)]
        opts: StoreOpts,
    },
    /// Delete SNAPSHOT from TARGET, and the objects no other snapshot uses.
    Delete {
        /// s3://BUCKET[/PREFIX], file:///DIR or /DIR.
        target: String,
        /// The snapshot id.
        snapshot: String,
        /// Endpoint and output options.
        #[command(flatten)]
        opts: StoreOpts,
    },
}

impl SnapshotArgs {
    /// True for the subcommands that unwrap a master key.
    pub fn holds_secrets(&self) -> bool {
        matches!(
            self.command,
            SnapshotCommand::Create { .. }
                | SnapshotCommand::Restore { .. }
                | SnapshotCommand::Rewrap { .. }
        )
    }
}

/// Runs `kmsfs snapshot ...`.
pub fn run_snapshot(config_path: &Path, args: SnapshotArgs) -> anyhow::Result<()> {
    // Uploads hash and copy: two workers use both cores of a small host
    // without starving a mount daemon beside it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match args.command {
        SnapshotCommand::Create {
            cipherdir,
            target,
            label,
            full,
            freeze_timeout,
            opts,
        } => {
            let mut event = Event::new(Op::SnapshotCreate);
            event
                .cipherdir(&cipherdir)
                .set(Field::SnapshotTarget, target.clone());
            let result = rt.block_on(run_create(
                config_path,
                &cipherdir,
                &target,
                label,
                full,
                Duration::from_secs(freeze_timeout),
                &opts,
                &mut event,
            ));
            event.finish(&result);
            result
        }
        SnapshotCommand::List { target, opts } => rt.block_on(run_list(&target, &opts)),
        SnapshotCommand::Restore {
            target,
            snapshot,
            newdir,
            opts,
        } => {
            let mut event = Event::new(Op::SnapshotRestore);
            event
                .cipherdir(&newdir)
                .set(Field::SnapshotTarget, target.clone())
                .set(Field::SnapshotId, snapshot.clone());
            let result = rt.block_on(run_restore(
                config_path,
                &target,
                &snapshot,
                &newdir,
                &opts,
                &mut event,
            ));
            event.finish(&result);
            result
        }
        SnapshotCommand::Delete {
            target,
            snapshot,
            opts,
        } => {
            let mut event = Event::new(Op::SnapshotDelete);
            event
                .set(Field::SnapshotTarget, target.clone())
                .set(Field::SnapshotId, snapshot.clone());
            let result = rt.block_on(run_delete(&target, &snapshot, &opts, &mut event));
            event.finish(&result);
            result
        }
        SnapshotCommand::Rewrap {
            target,
            snapshot,
            all: _,
            new_key,
            slot,
            opts,
        } => rt.block_on(crate::commands::snapshot_rewrap::run_snapshot_rewrap(
            config_path,
            crate::commands::snapshot_rewrap::RewrapRequest {
                target: &target,
                snapshot: snapshot.as_deref(),
                new_key: new_key.as_deref(),
                slot: slot.as_deref(),
            },
            &opts,
        )),
    }
}

/// Opens TARGET with the endpoint options.
pub(crate) fn open_store(
    target: &str,
    opts: &StoreOpts,
    create: bool,
) -> anyhow::Result<Arc<Store>> {
    let t = Target::parse(target)?;
    let s3 = S3Options {
        endpoint: opts.s3_endpoint.clone(),
    };
    Ok(Arc::new(Store::open(&t, &s3, create)?))
}

/// Where a snapshot reads from.
enum Source {
    /// Not mounted: the lock a mount daemon takes on the backing root
    /// (`flock` exclusive, see kmsfs-fuse `KmsFs::new`); while it is held
    /// no mount can start.
    Unmounted(File),
    /// Mounted: a session with the daemon's control socket.
    Mounted(Control),
}

/// Takes the backing root's lock, or, if a daemon holds it, connects to
/// that daemon's control socket.
fn open_source(cipherdir: &Path) -> anyhow::Result<Source> {
    let dir =
        File::open(cipherdir).with_context(|| format!("cannot open {}", cipherdir.display()))?;
    // A daemon that was just unmounted may take a moment to exit and drop
    // the lock (`kmsfs umount && kmsfs snapshot create` in a script): wait
    // a little before calling the filesystem mounted.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: `dir` is an open descriptor for the duration of the call.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Source::Unmounted(dir));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("cannot lock {}", cipherdir.display()));
        }
        if let Some(ctl) = Control::connect(cipherdir)? {
            return Ok(Source::Mounted(ctl));
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{} is mounted (a kmsfs daemon holds its lock) but no daemon answers on its \
                 control socket in {} (a daemon from an older kmsfs, or one not running as \
                 root): unmount it and take the snapshot, or remount it with this kmsfs",
                cipherdir.display(),
                kmsfs_control_dir()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// How long `snapshot create` waits for a mount daemon's lock to go (or
/// its control socket to answer).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn kmsfs_control_dir() -> &'static str {
    crate::control::RUN_DIR
}

#[allow(clippy::too_many_arguments)] // the subcommand's options, one by one
async fn run_create(
    config_path: &Path,
    cipherdir: &Path,
    target: &str,
    label: Option<String>,
    full: bool,
    freeze_timeout: Duration,
    opts: &StoreOpts,
    event: &mut Event,
) -> anyhow::Result<()> {
    let cipherdir = absolute(cipherdir)?;
    let source = open_source(&cipherdir)?;
    let dir =
        File::open(&cipherdir).with_context(|| format!("cannot open {}", cipherdir.display()))?;
    let (header_bytes, hdr) = read_header_at(dir.as_fd(), &cipherdir)?;
    let store = open_store(target, opts, true)?;
    event.set(Field::SnapshotTarget, store.display());
    let cfg = load_kms_config(config_path)?;
    let kms = kms_access(&cfg)?;
    // Unlocking authenticates the header that goes into the snapshot and
    // gives the key its manifest is authenticated with.
    let Unlocked {
        header, keys, slot, ..
    } = unlock(&kms, &cipherdir, hdr).await?;
    let fs_uuid = uuid_string(&header.uuid);
    event.uuid(&header.uuid);
    if let Some(s) = header.slots.get(slot) {
        event.slot(slot, s);
    }
    // A mounted filesystem is read from a capture of one instant; the
    // upload then runs with writes going on.
    // The lock (unmounted) is held until the snapshot is published.
    let mut source = Some(source);
    let mut attempts = 0;
    let (_lock, capture) = loop {
        let src = match source.take() {
            Some(s) => s,
            None => open_source(&cipherdir)?,
        };
        match src {
            Source::Unmounted(lock) => break (Some(lock), None),
            Source::Mounted(mut ctl) => {
                match live_capture::capture(&cipherdir, &mut ctl, freeze_timeout) {
                    Ok(c) => break (None, Some(c)),
                    // A daemon that was just unmounted still answers for a
                    // moment, then goes: look again (lock or socket).
                    Err(_) if ctl.gone_before_freeze() && attempts < 3 => {
                        attempts += 1;
                        drop(ctl);
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("cannot capture {}", cipherdir.display()))
                    }
                }
            }
        }
    };
    let read_from = match &capture {
        Some(c) => c.tree.clone(),
        None => cipherdir.clone(),
    };
    let progress = progress(opts.json);
    let cache = crate::snapshot_targets::cache_path(config_path, &fs_uuid, store.display());
    let stats = kmsfs_snapshot::create(
        store.clone(),
        kmsfs_snapshot::CreateRequest {
            cipherdir: &read_from,
            header: &header_bytes,
            fs_uuid: &fs_uuid,
            manifest_key: keys.snapshot_manifest_key(),
            label,
            concurrency: CONCURRENCY,
            // A capture's staging copies are new files each time: the
            // cache could never match them, so it is left as it is.
            cache: capture.is_none().then_some(cache.as_path()),
            full,
        },
        progress,
    )
    .await
    .with_context(|| {
        format!(
            "snapshot of {} to {target} failed; nothing was published (a rerun uploads only what is missing)",
            cipherdir.display()
        )
    })?;
    event.set(Field::SnapshotId, stats.id.clone());
    crate::snapshot_targets::remember_quietly(
        config_path,
        target,
        opts.s3_endpoint.as_deref(),
        Some(&fs_uuid),
    );
    if opts.json {
        let mut v = serde_json::to_value(&stats).context("cannot encode JSON")?;
        v["target"] = json!(store.display());
        v["fs_uuid"] = json!(fs_uuid);
        v["mounted"] = json!(capture.is_some());
        if let Some(c) = &capture {
            v["write_pause_ms"] = json!(c.stats.write_pause_ms);
            v["capture"] = serde_json::to_value(&c.stats).context("cannot encode JSON")?;
        }
        return print_json(&v);
    }
    if let Some(c) = &capture {
        crate::info_eprintln!(
            "kmsfs: snapshot: captured while mounted; writes were held for {:.1} ms",
            c.stats.write_pause_ms
        );
    }
    crate::info_println!("{}", stats.id);
    Ok(())
}

async fn run_list(target: &str, opts: &StoreOpts) -> anyhow::Result<()> {
    let store = open_store(target, opts, false)?;
    let snaps = kmsfs_snapshot::list(&store).await?;
    if opts.json {
        return print_json(&serde_json::to_value(&snaps).context("cannot encode JSON")?);
    }
    if snaps.is_empty() {
        println!("no snapshots in {}", store.display());
        return Ok(());
    }
    println!("{:<30} {:<21} {:<37} label", "id", "created", "filesystem");
    for s in snaps {
        match s.error {
            Some(e) => println!("{:<30} {e}", s.id),
            None => println!(
                "{:<30} {:<21} {:<37} {}",
                s.id,
                s.created.unwrap_or_default(),
                s.fs_uuid.unwrap_or_default(),
                s.label.unwrap_or_default()
            ),
        }
    }
    Ok(())
}

async fn run_restore(
    config_path: &Path,
    target: &str,
    snapshot: &str,
    newdir: &Path,
    opts: &StoreOpts,
    event: &mut Event,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    let newdir = absolute(newdir)?;
    let store = open_store(target, opts, false)?;
    event.set(Field::SnapshotTarget, store.display());
    // Checked before anything is fetched, and again by the restore.
    check_destination(&newdir)?;
    let cfg = load_kms_config(config_path)?;
    let kms = kms_access(&cfg)?;
    let manifest = kmsfs_snapshot::fetch_manifest(&store, snapshot).await?;
    let header_bytes = base64::engine::general_purpose::STANDARD
        .decode(&manifest.head.header)
        .map_err(|e| anyhow::anyhow!("{target}: snapshot {snapshot}: header is not base64: {e}"))?;
    let hdr = UnverifiedHeader::parse(&header_bytes)
        .map_err(|e| anyhow::anyhow!("{target}: snapshot {snapshot}: header: {e}"))?;
    let Unlocked {
        header, keys, slot, ..
    } = match unlock(&kms, &newdir, hdr).await {
        Ok(u) => u,
        Err(e) => {
            // A snapshot keeps the wrapping it was taken with: after a
            // rotation and a raise of min_decryption_version it needs a
            // `snapshot rewrap`, which the KMS's refusal does not say.
            let text = e.to_string();
            let hint = if text.contains("min_decryption_version") {
                format!(
                    "; this snapshot was not rewrapped after the key was rotated: lower the key's \
                     min_decryption_version, run `kmsfs snapshot rewrap {target} {snapshot}`, \
                     then raise it again"
                )
            } else {
                String::new()
            };
            anyhow::bail!("cannot unlock the header of snapshot {snapshot}: {text}{hint}");
        }
    };
    let fs_uuid = uuid_string(&header.uuid);
    event.uuid(&header.uuid);
    if let Some(s) = header.slots.get(slot) {
        event.slot(slot, s);
    }
    if !fs_uuid.eq_ignore_ascii_case(&manifest.head.fs_uuid) {
        anyhow::bail!(
            "{target}: snapshot {snapshot}: the manifest names filesystem {} but carries the header of {fs_uuid}",
            manifest.head.fs_uuid
        );
    }
    let verified = manifest
        .verify(keys.snapshot_manifest_key())
        .map_err(|e| anyhow::anyhow!("{target}: snapshot {snapshot}: {e}"))?;
    let stats = kmsfs_snapshot::restore(
        store.clone(),
        verified,
        &newdir,
        CONCURRENCY,
        progress(opts.json),
    )
    .await
    .with_context(|| {
        format!(
            "restore of {snapshot} into {} failed; the directory is incomplete (it has no \
             kmsfs.header, so it cannot be mounted): remove it before trying again",
            newdir.display()
        )
    })?;
    // The restored filesystem is this host's now: register it with the key
    // check value of the key the KMS just unwrapped (so `kmsfs list`,
    // `rewrap --all` know it and a mount here refuses a replaced header).
    let reg_path = registry_path(config_path);
    let kcv = KeyCheck::of(&keys);
    let registered = Registry::load(&reg_path).and_then(|mut reg| {
        reg.add(RegistryEntry {
            path: newdir.clone(),
            uuid: fs_uuid.clone(),
            kcv: Some(kcv),
        });
        reg.save(&reg_path)
    });
    if let Err(e) = registered {
        eprintln!(
            "kmsfs: warning: restored but not registered in {}: {e:#} (mount with -o kcv={kcv})",
            reg_path.display()
        );
    }
    if opts.json {
        let mut v = serde_json::to_value(&stats).context("cannot encode JSON")?;
        v["path"] = json!(newdir);
        v["fs_uuid"] = json!(fs_uuid);
        return print_json(&v);
    }
    crate::info_println!(
        "restored {snapshot} into {} ({} files, {} bytes, filesystem {fs_uuid})",
        newdir.display(),
        stats.files,
        stats.bytes
    );
    Ok(())
}

/// NEWDIR must be missing or an empty directory (nothing is created yet).
fn check_destination(newdir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(newdir) {
        Ok(mut it) => {
            if it.next().is_some() {
                anyhow::bail!(
                    "{} is not empty: restore into a new or empty directory",
                    newdir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot use {}", newdir.display())),
    }
}

async fn run_delete(
    target: &str,
    snapshot: &str,
    opts: &StoreOpts,
    event: &mut Event,
) -> anyhow::Result<()> {
    let store = open_store(target, opts, false)?;
    event.set(Field::SnapshotTarget, store.display());
    let stats = kmsfs_snapshot::delete(&store, snapshot).await?;
    if opts.json {
        return print_json(&serde_json::to_value(&stats).context("cannot encode JSON")?);
    }
    crate::info_println!(
        "deleted {snapshot}: {} objects removed, {} kept for other snapshots",
        stats.objects_deleted,
        stats.objects_kept
    );
    Ok(())
}

/// A bar on a terminal; plain lines on stderr otherwise (none with
/// `--json`, whose stdout is for machines but whose stderr may be a log);
/// nothing with `--quiet`.
fn progress(json: bool) -> Arc<dyn Progress> {
    if crate::output::quiet() {
        Arc::new(NoProgress)
    } else if std::io::stderr().is_terminal() {
        Arc::new(Bar::default())
    } else if json {
        Arc::new(NoProgress)
    } else {
        Arc::new(Lines::default())
    }
}

#[derive(Default)]
struct Bar(Mutex<Option<indicatif::ProgressBar>>);

impl Progress for Bar {
    fn phase(&self, name: &str, total: Option<u64>) {
        let b = match total {
            Some(t) => indicatif::ProgressBar::new(t),
            None => indicatif::ProgressBar::new_spinner(),
        };
        let tpl = if total.is_some() {
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}"
        } else {
            "{msg} {spinner} {bytes} {bytes_per_sec}"
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(tpl) {
            b.set_style(style);
        }
        b.set_message(name.to_string());
        if let Ok(mut g) = self.0.lock() {
            *g = Some(b);
        }
    }
    fn inc(&self, bytes: u64) {
        if let Ok(g) = self.0.lock() {
            if let Some(b) = g.as_ref() {
                b.inc(bytes);
            }
        }
    }
    fn done(&self) {
        if let Ok(mut g) = self.0.lock() {
            if let Some(b) = g.take() {
                b.finish();
            }
        }
    }
}

#[derive(Default)]
struct Lines(Mutex<(String, u64)>);

impl Progress for Lines {
    fn phase(&self, name: &str, _total: Option<u64>) {
        eprintln!("kmsfs: snapshot: {name}");
        if let Ok(mut g) = self.0.lock() {
            *g = (name.to_string(), 0);
        }
    }
    fn inc(&self, bytes: u64) {
        if let Ok(mut g) = self.0.lock() {
            g.1 += bytes;
        }
    }
    fn done(&self) {
        if let Ok(g) = self.0.lock() {
            eprintln!("kmsfs: snapshot: {}: done, {} bytes", g.0, g.1);
        }
    }
}
