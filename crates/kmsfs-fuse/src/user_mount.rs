//! A regular user's mount, through the setuid `fusermount3`, as libfuse
//! does it: `fusermount3` opens `/dev/fuse`, mounts it and hands the
//! descriptor back over a socket (`_FUSE_COMMFD`, `SCM_RIGHTS`).
//!
//! fuser has this path too, but tries `/dev/fuse` itself first and gives
//! up on `EACCES` where the device is mode 0600, and its mount drops the
//! subtype. Here the caller gets the same descriptor it would get from
//! [`crate::kernel_mount::mount`], so the session starts the same way and
//! the kernel records type `fuse.kmsfs` (fusermount3 passes `subtype=`).

use fuser::MountOption;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// The environment variable naming the socket fusermount3 answers on.
const COMM_ENV: &str = "_FUSE_COMMFD";

/// The `-o` list fusermount3 understands for `options`.
fn fusermount_options(source: &Path, options: &[MountOption]) -> String {
    let mut out = vec![
        // fusermount3 does not accept a comma inside a value.
        format!("fsname={}", source.display().to_string().replace(',', "_")),
        format!("subtype={}", "kmsfs"),
    ];
    for o in options {
        let s = match o {
            MountOption::RO => "ro",
            MountOption::RW => "rw",
            MountOption::NoSuid => "nosuid",
            MountOption::Suid => "suid",
            MountOption::NoDev => "nodev",
            MountOption::Dev => "dev",
            MountOption::NoExec => "noexec",
            MountOption::Exec => "exec",
            MountOption::NoAtime => "noatime",
            MountOption::Atime => "atime",
            MountOption::Sync => "sync",
            MountOption::Async => "async",
            MountOption::DirSync => "dirsync",
            MountOption::DefaultPermissions => "default_permissions",
            MountOption::CUSTOM(s) => s.as_str(),
            MountOption::FSName(_) | MountOption::Subtype(_) | MountOption::AutoUnmount => continue,
        };
        out.push(s.to_string());
    }
    out.join(",")
}

/// Mounts `/dev/fuse` on `mountpoint` through `fusermount3` and returns
/// the connection's descriptor. `allow_other` needs `user_allow_other` in
/// /etc/fuse.conf (fusermount3 says so if it is missing).
pub fn mount(
    source: &Path,
    mountpoint: &Path,
    options: &[MountOption],
    allow_other: bool,
) -> io::Result<OwnedFd> {
    let (ours, theirs) = UnixStream::pair()?;
    let mut opts = fusermount_options(source, options);
    if allow_other {
        opts.push_str(",allow_other");
    }
    let child_fd = theirs.as_raw_fd();
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-o")
        .arg(opts)
        .arg("--")
        .arg(mountpoint)
        .env(COMM_ENV, child_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls fcntl, which is async-signal-safe, on
    // a descriptor that stays open until after the spawn.
    unsafe {
        cmd.pre_exec(move || {
            // The socket must survive the exec (std opens it close-on-exec).
            if libc::fcntl(child_fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("running fusermount3: {e}")))?;
    drop(theirs);
    let received = receive_fd(&ours);
    let out = child.wait_with_output()?;
    match received {
        Ok(fd) if out.status.success() => Ok(fd),
        _ => {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let msg = if msg.is_empty() {
                format!("fusermount3 failed ({})", out.status)
            } else {
                msg
            };
            Err(io::Error::new(io::ErrorKind::PermissionDenied, msg))
        }
    }
}

/// Receives one descriptor sent with `SCM_RIGHTS` on `sock`.
fn receive_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one descriptor's control message, 8-byte aligned.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` and `control`, which outlive the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR checks the length.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: `cmsg` is non-null (checked first) and lies inside `control`.
    let rights = !cmsg.is_null()
        && unsafe {
            (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS
        };
    if !rights {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "fusermount3 sent no descriptor",
        ));
    }
    // SAFETY: an SCM_RIGHTS message carries at least one int; read it
    // unaligned from the control buffer.
    let raw = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>()) };
    // SAFETY: the kernel installed `raw` in this process for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_for_fusermount() {
        let s = fusermount_options(
            Path::new("/srv/a,b"),
            &[
                MountOption::RW,
                MountOption::NoSuid,
                MountOption::NoDev,
                MountOption::DefaultPermissions,
                MountOption::AutoUnmount,
            ],
        );
        assert_eq!(
            s,
            "fsname=/srv/a_b,subtype=kmsfs,rw,nosuid,nodev,default_permissions"
        );
    }
}
