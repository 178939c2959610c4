//! Changing `kmsfs.header` safely: one writer at a time, a backup while it
//! is replaced, and nothing written that has not been proven to open.
//!
//! `rewrap`, `slot add` and `slot remove` all read the header, unlock it,
//! and write a new one. Two of them at once on one filesystem would lose
//! one's change (a DR slot that silently vanished is found out only in a
//! disaster), so each holds [`HeaderLock`] from the read to the write.
//! The mount daemon's own lock (an `flock` on the backing directory) is not
//! involved: a mounted filesystem never re-reads its header, and its master
//! key does not change, so header changes are safe while it is mounted.

use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

use anyhow::Context as _;
use kmsfs_core::header::{Header, UnverifiedHeader};
use kmsfs_core::keys::FsKeys;

use crate::fsheader::{
    header_path, read_header_bytes, write_header, HEADER_BACKUP_NAME, HEADER_MODE,
};

/// An exclusive `flock` on the current `kmsfs.header` inode, held until
/// dropped. Writers replace the file by rename while holding it, so a
/// waiter that then gets the lock on the old inode sees that it was
/// replaced and locks the new one instead.
#[derive(Debug)]
pub struct HeaderLock {
    _file: std::fs::File,
}

impl HeaderLock {
    /// Waits for and takes the lock on `cipherdir/kmsfs.header`.
    pub fn acquire(cipherdir: &Path) -> anyhow::Result<HeaderLock> {
        let path = header_path(cipherdir);
        let mut told = false;
        loop {
            // O_NOFOLLOW | O_NONBLOCK: a symlink or FIFO planted as the
            // header is refused here, not followed or waited on.
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    anyhow::bail!("not a kmsfs filesystem: {} not found", path.display())
                }
                Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
            };
            let md = file
                .metadata()
                .with_context(|| format!("cannot stat {}", path.display()))?;
            if !md.is_file() {
                anyhow::bail!("{} is not a regular file", path.display());
            }
            let fd = file.as_raw_fd();
            // SAFETY: `fd` is an open descriptor owned by `file` for this call.
            let rc = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()));
                }
                if !told {
                    eprintln!(
                        "kmsfs: waiting for another kmsfs command that is changing {}",
                        path.display()
                    );
                    told = true;
                }
                // SAFETY: as above; a blocking lock, released when `file` closes.
                if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("cannot lock {}", path.display()));
                }
            }
            // Still the file at the path (not replaced while we waited)?
            match std::fs::symlink_metadata(&path) {
                Ok(now) if now.ino() == md.ino() && now.dev() == md.dev() => {
                    return Ok(HeaderLock { _file: file })
                }
                _ => continue,
            }
        }
    }
}

/// Replaces the header of `dir` (whose current bytes are `old_bytes`, read
/// under `_lock`) with `new_header` sealed by `keys`. Before anything is
/// written the new bytes must parse and verify under `proof_keys` (keys
/// derived from a key the KMS just unwrapped) and round-trip; then the old
/// header goes to `kmsfs.header.bak`, the new one is renamed into place,
/// re-read and verified, and the backup removed. On a failed re-read the
/// old header is put back.
pub fn replace_header(
    _lock: &HeaderLock,
    dir: &Path,
    old_bytes: &[u8],
    new_header: &Header,
    keys: &FsKeys,
    proof_keys: &FsKeys,
) -> anyhow::Result<()> {
    let new_bytes = new_header
        .encode(keys)
        .with_context(|| format!("cannot encode the new header for {}", dir.display()))?;
    let verified = UnverifiedHeader::parse(&new_bytes)
        .and_then(|h| h.verify(proof_keys))
        .with_context(|| format!("the new header for {} does not verify", dir.display()))?;
    if &verified != new_header {
        anyhow::bail!("the new header for {} does not round-trip", dir.display());
    }

    let backup = dir.join(HEADER_BACKUP_NAME);
    kmsfs_keystore::write_atomic(&backup, old_bytes, HEADER_MODE)
        .with_context(|| format!("cannot write backup {}", backup.display()))?;
    write_header(dir, &new_bytes)?;
    let reread = read_header_bytes(dir).and_then(|(bytes, h)| {
        let h = h
            .verify(proof_keys)
            .map_err(|e| anyhow::anyhow!("{}: {e}", header_path(dir).display()))?;
        if bytes != new_bytes || &h != new_header {
            anyhow::bail!(
                "{} does not read back as written",
                header_path(dir).display()
            );
        }
        Ok(())
    });
    if let Err(e) = reread {
        // Put the previous (valid) header back.
        write_header(dir, old_bytes).with_context(|| {
            format!(
                "{e:#}; restoring the previous header also failed: it is in {}",
                backup.display()
            )
        })?;
        let _ = std::fs::remove_file(&backup);
        return Err(e.context(format!(
            "the new header for {} did not verify after writing; previous header restored",
            dir.display()
        )));
    }
    std::fs::remove_file(&backup).with_context(|| {
        format!(
            "the header was replaced but {} cannot be removed",
            backup.display()
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_waiting_writer_locks_the_replaced_header_not_the_old_one() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = header_path(d.path());
        std::fs::write(&path, b"old").expect("write");
        let first = HeaderLock::acquire(d.path()).expect("first lock");

        let (tx, rx) = mpsc::channel();
        let dir = d.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let lock = HeaderLock::acquire(&dir).expect("second lock");
            let ino = lock._file.metadata().expect("stat").ino();
            tx.send(ino).expect("send");
            // Hold it until the main thread has looked.
            std::thread::sleep(Duration::from_millis(50));
        });
        // While the first holder has it, the second does not get it.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());

        // The holder replaces the header by rename, then lets go.
        write_header(d.path(), b"new").expect("replace");
        let new_ino = std::fs::metadata(&path).expect("stat").ino();
        drop(first);
        let got = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("second lock");
        assert_eq!(got, new_ino, "the waiter must lock the new header");
        waiter.join().expect("join");
    }

    #[test]
    fn a_missing_or_planted_header_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let e = HeaderLock::acquire(d.path()).expect_err("no header");
        assert!(e.to_string().contains("not a kmsfs filesystem"), "{e}");
        std::os::unix::fs::symlink("/etc/passwd", header_path(d.path())).expect("symlink");
        assert!(HeaderLock::acquire(d.path()).is_err());
    }
}
