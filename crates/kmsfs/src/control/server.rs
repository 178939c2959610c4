//! The daemon side of the control socket: accepts root peers, runs one
//! snapshot session at a time, and never leaves the mount frozen.

use std::io::{BufRead as _, BufReader, ErrorKind, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use kmsfs_fuse::{Frozen, WriteGate};
use tracing::{info, warn};

use super::{socket_path, MAX_FREEZE, RUN_DIR};

/// How long a freeze waits for the modifying requests in flight.
const DRAIN: Duration = Duration::from_secs(10);
/// How long a session may sit idle outside a freeze (a client that
/// connected and hung).
const IDLE: Duration = Duration::from_secs(3600);

/// The listening socket; removed when dropped (at the daemon's exit).
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What every session shares.
struct Shared {
    gate: Arc<WriteGate>,
    mountpoint: PathBuf,
    /// The peer pid of the open session, if any.
    busy: Mutex<Option<i32>>,
}

/// Opens the control socket of the mount of `cipherdir` at `mountpoint`
/// and serves it on a background thread. A socket left by a daemon that
/// died is replaced: the caller holds the backing directory's lock, so no
/// other daemon serves this filesystem.
pub fn start(
    cipherdir: &Path,
    mountpoint: &Path,
    gate: Arc<WriteGate>,
) -> anyhow::Result<ControlSocket> {
    let md = std::fs::metadata(cipherdir)
        .with_context(|| format!("backing directory {}", cipherdir.display()))?;
    let path = socket_path(&md);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(RUN_DIR)
        .with_context(|| format!("cannot create {RUN_DIR}"))?;
    let dir = std::fs::symlink_metadata(RUN_DIR).with_context(|| RUN_DIR.to_string())?;
    if !dir.is_dir() || dir.uid() != 0 || dir.mode() & 0o022 != 0 {
        bail!(
            "{RUN_DIR} must be a directory owned by root and writable by root only \
             (mode 0700); fix it or remove it"
        );
    }
    match std::fs::remove_file(&path) {
        Ok(()) => info!("removed a stale control socket {}", path.display()),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
    let sock = ControlSocket { path: path.clone() };
    // The directory already keeps others out; the mode says so too.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    let shared = Arc::new(Shared {
        gate,
        mountpoint: mountpoint.to_path_buf(),
        busy: Mutex::new(None),
    });
    std::thread::Builder::new()
        .name("kmsfs-control".into())
        .spawn(move || accept_loop(listener, shared))
        .context("cannot start the control thread")?;
    Ok(sock)
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!("control socket: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("kmsfs-control-session".into())
            .spawn(move || {
                if let Err(e) = session(conn, &shared) {
                    warn!("control socket: {e:#}");
                }
            });
        if let Err(e) = spawned {
            warn!("control socket: cannot start a session thread: {e}");
        }
    }
}

/// The peer's (pid, uid), from `SO_PEERCRED`.
fn peer(conn: &UnixStream) -> std::io::Result<(i32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.pid, cred.uid))
}

/// The open session: ending it (explicitly, or by dropping it however
/// the session ends) stops the change tracking, then clears the busy mark.
struct Claim<'a> {
    busy: &'a Mutex<Option<i32>>,
    gate: &'a WriteGate,
}

impl Claim<'_> {
    /// Ends the session. Called before a client-gone thaw, so a client
    /// that sees writes resume can start the next session at once.
    fn end(&self) {
        self.gate.track(false);
        if let Ok(mut b) = self.busy.lock() {
            *b = None;
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

fn session(conn: UnixStream, shared: &Shared) -> anyhow::Result<()> {
    let mut out = conn.try_clone().context("cloning the connection")?;
    let (pid, uid) = peer(&conn).context("SO_PEERCRED")?;
    if uid != 0 {
        let _ = writeln!(
            out,
            "ERR permission denied: only root may use the control socket of a kmsfs mount"
        );
        bail!("refused a connection from uid {uid} (pid {pid}): not root");
    }
    let gate = &*shared.gate;
    let claim = {
        let mut busy = shared
            .busy
            .lock()
            .map_err(|_| anyhow::anyhow!("session lock poisoned"))?;
        if let Some(other) = *busy {
            let _ = writeln!(
                out,
                "ERR busy: another snapshot (pid {other}) is using this mount's control \
                 socket; try again when it has finished"
            );
            return Ok(());
        }
        *busy = Some(pid);
        Claim {
            busy: &shared.busy,
            gate,
        }
    };
    serve(conn, &mut out, shared, &claim, pid)
}

fn serve(
    conn: UnixStream,
    out: &mut UnixStream,
    shared: &Shared,
    claim: &Claim<'_>,
    pid: i32,
) -> anyhow::Result<()> {
    let gate = claim.gate;
    let mut reader = BufReader::new(conn);
    let mut frozen: Option<(Frozen<'_>, Instant)> = None;
    let mut expired: Option<Duration> = None;
    let mut line = String::new();
    loop {
        let wait = match &frozen {
            Some((_, deadline)) => deadline.saturating_duration_since(Instant::now()),
            None => IDLE,
        };
        if wait.is_zero() {
            expired = Some(thaw(&mut frozen, pid, "the freeze timeout passed"));
            continue;
        }
        reader.get_ref().set_read_timeout(Some(wait))?;
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                claim.end();
                thaw(&mut frozen, pid, "the client went away");
                return Ok(());
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if frozen.is_some() {
                    expired = Some(thaw(&mut frozen, pid, "the freeze timeout passed"));
                    continue;
                }
                return Ok(());
            }
            Err(e) => {
                claim.end();
                thaw(&mut frozen, pid, "the connection failed");
                return Err(e).context("reading a request");
            }
        }
        let mut words = line.split_whitespace();
        let reply = match (words.next(), words.next()) {
            (Some("TRACK"), None) => {
                gate.track(true);
                "OK".to_string()
            }
            (Some("FREEZE"), Some(ms)) if frozen.is_none() => match ms.parse::<u64>() {
                Ok(ms) => {
                    let timeout = Duration::from_millis(ms).min(MAX_FREEZE);
                    sync_mount(&shared.mountpoint);
                    match gate.freeze(DRAIN) {
                        Ok(f) => {
                            let drain = f.since().elapsed();
                            info!(
                                "frozen for a snapshot (pid {pid}); drained in {} µs",
                                drain.as_micros()
                            );
                            frozen = Some((f, Instant::now() + timeout));
                            expired = None;
                            format!("FROZEN {}", drain.as_micros())
                        }
                        Err(e) => format!("ERR cannot freeze: {e}; writes continue"),
                    }
                }
                Err(_) => format!("ERR bad freeze timeout {ms:?}"),
            },
            (Some("FREEZE"), _) if frozen.is_some() => "ERR already frozen".to_string(),
            (Some("CHANGED"), None) => {
                let mut s = String::from("CHANGED");
                for ino in gate.changed() {
                    s.push(' ');
                    s.push_str(&ino.to_string());
                }
                s
            }
            (Some("THAW"), None) => match (frozen.is_some(), expired) {
                (true, _) => {
                    let held = thaw(&mut frozen, pid, "the snapshot asked");
                    format!("THAWED {}", held.as_micros())
                }
                (false, Some(held)) => format!(
                    "ERR the freeze timed out after {} ms and writes resumed before the \
                     capture finished",
                    held.as_millis()
                ),
                (false, None) => "ERR not frozen".to_string(),
            },
            _ => format!("ERR unknown request {:?}", line.trim_end()),
        };
        if let Err(e) = writeln!(out, "{reply}") {
            claim.end();
            thaw(&mut frozen, pid, "the client went away");
            return Err(e).context("writing a reply");
        }
    }
}

/// Opens the gate if it is closed; returns how long writes were held.
fn thaw(frozen: &mut Option<(Frozen<'_>, Instant)>, pid: i32, why: &str) -> Duration {
    match frozen.take() {
        Some((f, _)) => {
            let held = f.since().elapsed();
            drop(f);
            info!(
                "thawed (pid {pid}: {why}); writes were held for {} ms",
                held.as_millis()
            );
            held
        }
        None => Duration::ZERO,
    }
}

/// `syncfs` of the mount: the kernel's writeback cache sends what it holds
/// to this daemon before the gate closes. A failure only means the
/// snapshot may miss data nobody has flushed yet: it is logged.
fn sync_mount(mountpoint: &Path) {
    let f = match std::fs::File::open(mountpoint) {
        Ok(f) => f,
        Err(e) => {
            warn!("cannot open {} to flush it: {e}", mountpoint.display());
            return;
        }
    };
    // SAFETY: `f` is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } < 0 {
        warn!(
            "syncfs {}: {}",
            mountpoint.display(),
            std::io::Error::last_os_error()
        );
    }
}
