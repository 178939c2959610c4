//! The client side of the control socket (`kmsfs snapshot create` of a
//! mounted filesystem).

use std::collections::HashSet;
use std::io::{BufRead as _, BufReader, ErrorKind, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};

use super::socket_path;

/// How long the client waits for any answer: a freeze drains for at most
/// 10 seconds after a `syncfs` that may take a while on a slow store.
const ANSWER: Duration = Duration::from_secs(120);

/// A session with a mount daemon. Dropping it closes the connection, which
/// thaws the mount if it is frozen.
pub struct Control {
    reader: BufReader<UnixStream>,
    out: UnixStream,
    path: PathBuf,
    /// The connection broke (EOF or an I/O error).
    lost: bool,
    /// A freeze was granted.
    froze: bool,
}

impl Control {
    /// Connects to the daemon serving `cipherdir`. `Ok(None)` when no
    /// daemon listens there: no socket, or one left by a daemon that died.
    pub fn connect(cipherdir: &Path) -> anyhow::Result<Option<Control>> {
        let md = std::fs::metadata(cipherdir)
            .with_context(|| format!("cannot stat {}", cipherdir.display()))?;
        let path = socket_path(&md);
        let conn = match UnixStream::connect(&path) {
            Ok(c) => c,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                return Ok(None)
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot connect to the mount daemon's control socket {} \
                         (it accepts root only)",
                        path.display()
                    )
                })
            }
        };
        conn.set_read_timeout(Some(ANSWER))?;
        let out = conn.try_clone()?;
        Ok(Some(Control {
            reader: BufReader::new(conn),
            out,
            path,
            lost: false,
            froze: false,
        }))
    }

    fn request(&mut self, req: &str, expect: &str) -> anyhow::Result<String> {
        let ctx = || format!("control socket {}: {req}", self.path.display());
        let sent = writeln!(self.out, "{req}");
        // A daemon that refuses the session (busy, not root) answers and
        // hangs up at once: its answer says more than a broken pipe.
        let mut line = String::new();
        let n = match (sent, self.reader.read_line(&mut line)) {
            (_, Ok(n)) if n > 0 => n,
            (Err(e), _) | (Ok(()), Err(e)) => {
                self.lost = true;
                return Err(e).with_context(ctx);
            }
            (Ok(()), Ok(_)) => 0,
        };
        if n == 0 {
            self.lost = true;
            bail!("{}: the mount daemon closed the connection", ctx());
        }
        let line = line.trim_end();
        if let Some(msg) = line.strip_prefix("ERR ") {
            bail!("the mount daemon refused {req}: {msg}");
        }
        match line.strip_prefix(expect) {
            Some(rest) => Ok(rest.trim_start().to_string()),
            None => Err(anyhow!("{}: unexpected answer {line:?}", ctx())),
        }
    }

    /// Whether the daemon went away before granting a freeze: it was
    /// exiting (just unmounted), and the filesystem is about to be
    /// unmounted in the lock's sense too.
    pub fn gone_before_freeze(&self) -> bool {
        self.lost && !self.froze
    }

    /// Starts recording which files' contents change.
    pub fn track(&mut self) -> anyhow::Result<()> {
        self.request("TRACK", "OK").map(drop)
    }

    /// Flushes the mount and holds its modifying requests; the daemon
    /// thaws by itself after `timeout`. Returns how long the requests in
    /// flight took to finish.
    pub fn freeze(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let rest = self.request(&format!("FREEZE {}", timeout.as_millis()), "FROZEN")?;
        self.froze = true;
        micros(&rest)
    }

    /// The backing inode numbers whose contents changed since `track`.
    pub fn changed(&mut self) -> anyhow::Result<HashSet<u64>> {
        let rest = self.request("CHANGED", "CHANGED")?;
        rest.split_whitespace()
            .map(|w| {
                w.parse::<u64>()
                    .map_err(|_| anyhow!("bad inode number {w:?}"))
            })
            .collect()
    }

    /// Lets writes resume; returns how long they were held. Fails if the
    /// daemon had already thawed (the freeze timed out).
    pub fn thaw(&mut self) -> anyhow::Result<Duration> {
        let rest = self.request("THAW", "THAWED")?;
        micros(&rest)
    }
}

fn micros(s: &str) -> anyhow::Result<Duration> {
    s.parse::<u64>()
        .map(Duration::from_micros)
        .map_err(|_| anyhow!("bad duration {s:?} from the mount daemon"))
}
