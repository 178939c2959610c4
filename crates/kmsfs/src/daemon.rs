//! Running the mount as a daemon: a re-executed child that reports back
//! over a pipe once the mount is live, and syslog logging.
//!
//! Forking a process that already runs threads (tokio, FUSE) is unsafe, so
//! `kmsfs mount` re-executes itself in the foreground mode with the write
//! end of a pipe. The child writes `OK` once the filesystem answers, or
//! `ERR <message>`; the parent prints the message and exits accordingly.
//! Before either, `WARN <message>` lines are printed by the parent as
//! warnings (the daemon's own stderr goes nowhere).

use anyhow::{bail, Context};
use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// Starts `exe args... --ready-fd N` detached from the terminal and waits
/// for its verdict.
pub fn spawn_and_wait(args: Vec<OsString>) -> anyhow::Result<()> {
    let (read_end, write_end) = pipe()?;
    let exe = std::env::current_exe().context("locating the kmsfs executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .arg("--foreground")
        .arg("--ready-fd")
        .arg(write_raw(&write_end).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no Rust state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    drop(write_end);
    let mut reader = BufReader::new(File::from(read_end));
    let mut line = String::new();
    loop {
        line.clear();
        reader
            .read_line(&mut line)
            .context("waiting for the mount daemon")?;
        match line.trim_end().strip_prefix("WARN ") {
            Some(msg) => eprintln!("kmsfs: warning: {msg}"),
            None => break,
        }
    }
    let line = line.trim_end();
    if line == "OK" {
        return Ok(());
    }
    if let Some(msg) = line.strip_prefix("ERR ") {
        let _ = child.wait();
        bail!("{msg}");
    }
    let status = child.wait().context("waiting for the mount daemon")?;
    bail!("the mount daemon exited before mounting ({status}); see the system log")
}

/// The child's side of the pipe: report success or failure exactly once.
pub struct ReadyPipe(Option<File>);

impl ReadyPipe {
    /// Adopts the inherited descriptor `fd` (from `--ready-fd`).
    pub fn from_fd(fd: i32) -> anyhow::Result<Self> {
        // SAFETY: fcntl only checks the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            bail!("--ready-fd {fd} is not an open descriptor");
        }
        // SAFETY: the parent handed this descriptor to us alone.
        let f = unsafe { File::from_raw_fd(fd) };
        Ok(ReadyPipe(Some(f)))
    }

    /// Tells the parent the mount is live.
    pub fn ok(&mut self) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(b"OK\n");
        }
    }

    /// Passes a warning to the parent, which prints it (any number of
    /// times, before [`ReadyPipe::ok`] or [`ReadyPipe::fail`]).
    pub fn warn(&mut self, msg: &str) {
        if let Some(f) = self.0.as_mut() {
            let one_line = msg.replace('\n', "; ");
            let _ = writeln!(f, "WARN {one_line}");
        }
    }

    /// Tells the parent why mounting failed.
    pub fn fail(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let one_line = msg.replace('\n', "; ");
            let _ = writeln!(f, "ERR {one_line}");
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // The read end stays in the parent only.
    // SAFETY: fds[0] is a descriptor we just created.
    unsafe { libc::fcntl(fds[0], libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: both descriptors are fresh and owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn write_raw(fd: &OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// A `Write` that sends each line to syslog (journald picks it up).
pub struct SyslogWriter;

impl SyslogWriter {
    /// Opens the syslog connection under the identity `kmsfs`.
    pub fn init() {
        static IDENT: &std::ffi::CStr = c"kmsfs";
        // SAFETY: IDENT is a static C string, as openlog requires.
        unsafe { libc::openlog(IDENT.as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    }
}

impl Write for SyslogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Ok(c) = CString::new(line.replace('\0', "")) {
                // SAFETY: constant format string with one C string argument.
                unsafe { libc::syslog(libc::LOG_NOTICE, c"%s".as_ptr(), c.as_ptr()) };
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
