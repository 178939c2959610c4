//! Process hardening for every command that holds a key or a KMS token.
//!
//! A master key, or a token that can unwrap one, must not leave the process
//! through a core dump, `/proc/PID/mem`, or ptrace by another user. So before
//! such a command reads any secret it makes itself non-dumpable
//! (`PR_SET_DUMPABLE 0`: no core dump, `/proc/PID/*` owned by root, no
//! ptrace without CAP_SYS_PTRACE) and sets `RLIMIT_CORE` to 0 (for core
//! handlers that ignore the dumpable flag). The long-running mount daemon
//! also locks all its memory and raises its open-file limit.

use anyhow::Context as _;
use tracing::warn;

/// Makes this process non-dumpable with a core size limit of 0.
///
/// Called first thing by `create`, `rewrap`, `unlock-check`, `kms` and
/// `mount`: a process that cannot be made non-dumpable refuses to go on.
pub fn harden_process() -> anyhow::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes plain integer arguments and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot make the process non-dumpable (prctl PR_SET_DUMPABLE)");
    }
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid rlimit that outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot disable core dumps (setrlimit RLIMIT_CORE 0)");
    }
    Ok(())
}

/// [`harden_process`], plus what the mount daemon needs: all memory locked
/// as it is touched (the per-file key schedules live on the ordinary heap)
/// and one descriptor per known inode.
pub fn harden_daemon() -> anyhow::Result<()> {
    harden_process()?;
    match memlock_limit() {
        Some(limit) if !has_ipc_lock() => {
            // A regular user: locking everything would either fail now or,
            // worse, succeed and make a later allocation fail once the
            // heap outgrows the limit. Only the key arena is locked, as far
            // as the limit reaches (it warns itself if it does not).
            warn!(
                "running without CAP_IPC_LOCK (RLIMIT_MEMLOCK {} KiB): the master key and \
                 subkeys are held in locked memory, but per-file key schedules on the heap \
                 may be swapped; raise the limit and run as root to lock all memory",
                limit / 1024
            );
        }
        _ => {
            // SAFETY: mlockall takes flags only.
            if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) }
                != 0
            {
                warn!(
                    "mlockall failed ({}); keys outside the locked key arena may be swapped",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `nofile` is a valid, writable rlimit for the duration of both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) == 0 {
            nofile.rlim_cur = nofile.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &nofile);
        }
    }
    Ok(())
}

/// `RLIMIT_MEMLOCK` in bytes, or `None` when unlimited.
fn memlock_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Some(0);
    }
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// Whether this process may lock memory beyond `RLIMIT_MEMLOCK`
/// (`CAP_IPC_LOCK` in its effective set, read from /proc/self/status).
fn has_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs in a forked child so the test process itself stays dumpable.
    #[test]
    fn hardened_process_is_not_dumpable_and_has_no_core_limit() {
        // SAFETY: the child only makes async-signal-safe calls (prctl,
        // setrlimit, getrlimit) before `_exit`; `harden_process` allocates
        // only on its error path, which is reported through the exit code.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = match harden_process() {
                Err(_) => 10,
                Ok(()) => {
                    let mut lim = libc::rlimit {
                        rlim_cur: 1,
                        rlim_max: 1,
                    };
                    // SAFETY: plain queries into a local struct.
                    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
                    // SAFETY: as above.
                    let got = unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) };
                    if dumpable != 0 {
                        11
                    } else if got != 0 || lim.rlim_cur != 0 || lim.rlim_max != 0 {
                        12
                    } else {
                        0
                    }
                }
            };
            // SAFETY: terminate the forked child without running the test
            // harness's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child died: {status}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "10: error, 11: dumpable, 12: core limit"
        );
    }
}
