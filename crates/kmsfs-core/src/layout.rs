//! The backing directory's own files: the filesystem header (read side),
//! directory IVs and long-name sidecars.
//!
//! Every writer (the FUSE driver, `kmsfs create`, the test harness) and every
//! reader (the driver, `kmsfs fsck`, mount-time checks) goes through this
//! module, so there is one way to name, open, check and persist them.
//!
//! The backing store is hostile input. Its files are opened relative to a
//! directory descriptor with `O_NOFOLLOW | O_NONBLOCK` and checked to be
//! regular files of the expected size on the opened descriptor (no
//! check-then-open race): a symlink planted in place of an IV makes the
//! open fail instead of reading another file, and a FIFO cannot block the
//! caller, because `O_NONBLOCK` opens it at once and the type check then
//! refuses it.
//!
//! Persistence policy: an IV or sidecar file is written and `fsync`ed before
//! the entry that needs it is created, so whenever that entry reaches the
//! disk its IV or sidecar is already there. Making the new directory entry
//! itself durable is the job of whoever makes the directory durable
//! (`fsync` on the directory, as for any file).

use crate::header::{HEADER_FILE_NAME, MAX_HEADER_LEN};
use crate::names::{long_name_for, EncryptedName, DIR_IV_LEN, LONGNAME_SUFFIX};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;

pub use crate::names::{DIR_IV_MODE, DIR_IV_NAME};

/// Mode of a long-name sidecar file: read-only, as it never changes.
pub const SIDECAR_MODE: u32 = 0o400;
/// Largest sidecar accepted: an encoded name of a 255-byte plaintext is
/// under 400 bytes, so anything bigger was not written by kmsfs.
const MAX_SIDECAR_LEN: u64 = 1024;

/// Prefix of a temporary entry (a symlink being re-created for a rename).
/// Encrypted names contain no `.`, so it never collides with one; an entry
/// left with this prefix by a crash holds nothing that is not also under
/// its old name, and `kmsfs fsck --repair` removes it.
pub const TEMP_PREFIX: &str = "kmsfs.tmp.";

/// A fresh temporary entry name: [`TEMP_PREFIX`] and 16 random hex digits.
pub fn temp_name() -> io::Result<String> {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(format!("{TEMP_PREFIX}{:016x}", u64::from_le_bytes(r)))
}

/// The name of the sidecar file of the hashed long name `hashed`.
pub fn sidecar_name(hashed: &str) -> String {
    format!("{hashed}{LONGNAME_SUFFIX}")
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn openat(dir: BorrowedFd<'_>, name: &str, flags: i32, mode: u32) -> io::Result<File> {
    let c = cstr(OsStr::new(name))?;
    let flags = flags | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    // SAFETY: `c` is a valid NUL-terminated string and `dir` a live
    // descriptor; on success the returned descriptor is owned by nobody else.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Opens `name` in `dir` for reading, refusing anything but a regular file
/// of at most `max_len` bytes; returns the file and its length.
fn open_regular(dir: BorrowedFd<'_>, name: &str, max_len: u64) -> io::Result<(File, u64)> {
    let f = openat(dir, name, libc::O_RDONLY, 0).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            invalid(format!("{name} is a symbolic link, not a kmsfs file"))
        } else {
            e
        }
    })?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(invalid(format!("{name} is not a regular file")));
    }
    if meta.size() > max_len {
        return Err(invalid(format!(
            "{name} is {} bytes, more than a kmsfs file of its kind holds",
            meta.size()
        )));
    }
    Ok((f, meta.size()))
}

/// Reads the directory IV of the backing directory `dir`.
///
/// The file must be a regular file of exactly 16 bytes; anything else is an
/// `InvalidData` error that names the file.
pub fn read_dir_iv(dir: BorrowedFd<'_>) -> io::Result<[u8; DIR_IV_LEN]> {
    let (mut f, len) = open_regular(dir, DIR_IV_NAME, DIR_IV_LEN as u64)?;
    if len != DIR_IV_LEN as u64 {
        return Err(invalid(format!(
            "{DIR_IV_NAME} is {len} bytes, a directory IV has {DIR_IV_LEN}"
        )));
    }
    let mut iv = [0u8; DIR_IV_LEN];
    f.read_exact(&mut iv)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {DIR_IV_NAME}: {e}")))?;
    Ok(iv)
}

/// Reads the filesystem header file of the backing directory `dir`: a
/// regular file of at most [`MAX_HEADER_LEN`] bytes, opened without
/// following a symlink or blocking on a FIFO planted in its place.
pub fn read_header_file(dir: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let (mut f, len) = open_regular(dir, HEADER_FILE_NAME, MAX_HEADER_LEN as u64)?;
    let mut bytes = Vec::with_capacity(len as usize);
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Creates the directory IV file of the new backing directory `dir` with a
/// fresh random IV, written and `fsync`ed; fails if one exists.
pub fn create_dir_iv(dir: BorrowedFd<'_>) -> io::Result<[u8; DIR_IV_LEN]> {
    let iv = crate::names::new_dir_iv()
        .map_err(|e| io::Error::other(format!("random directory IV: {e}")))?;
    write_new_file(dir, DIR_IV_NAME, &iv, DIR_IV_MODE)?;
    Ok(iv)
}

/// Puts back a directory IV (after an `rmdir` that failed half way).
pub fn restore_dir_iv(dir: BorrowedFd<'_>, iv: &[u8; DIR_IV_LEN]) -> io::Result<()> {
    write_new_file(dir, DIR_IV_NAME, iv, DIR_IV_MODE)
}

/// Writes a long name's sidecar before the entry it names is created.
/// Returns whether a new sidecar was written (an existing one with the same
/// name holds the same contents, since the name is its hash).
pub fn write_sidecar(dir: BorrowedFd<'_>, name: &EncryptedName) -> io::Result<bool> {
    let EncryptedName::Long { hashed, full } = name else {
        return Ok(false);
    };
    match write_new_file(dir, &sidecar_name(hashed), full.as_bytes(), SIDECAR_MODE) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads the full encoded name of the hashed long name `hashed`, checking
/// that it hashes back to `hashed` (a sidecar moved from another entry is
/// refused).
pub fn read_sidecar(dir: BorrowedFd<'_>, hashed: &str) -> io::Result<String> {
    let side = sidecar_name(hashed);
    let (f, _) = open_regular(dir, &side, MAX_SIDECAR_LEN)?;
    let mut full = String::new();
    f.take(MAX_SIDECAR_LEN)
        .read_to_string(&mut full)
        .map_err(|e| invalid(format!("{side}: {e}")))?;
    if long_name_for(&full) != hashed {
        return Err(invalid(format!(
            "{side} does not hold the name its file name is the hash of"
        )));
    }
    Ok(full)
}

/// Removes the sidecar of `name`, if it is a long name.
pub fn remove_sidecar(dir: BorrowedFd<'_>, name: &EncryptedName) -> io::Result<()> {
    let EncryptedName::Long { hashed, .. } = name else {
        return Ok(());
    };
    let c = cstr(OsStr::new(&sidecar_name(hashed)))?;
    // SAFETY: valid C string and live directory descriptor.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates `name` in `dir` (it must not exist), writes `data` and `fsync`s.
/// On a failed write the half-made file is removed again.
fn write_new_file(dir: BorrowedFd<'_>, name: &str, data: &[u8], mode: u32) -> io::Result<()> {
    let mut f = openat(
        dir,
        name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        mode,
    )?;
    let written = f.write_all(data).and_then(|()| f.sync_all());
    if let Err(e) = written {
        if let Ok(c) = cstr(OsStr::new(name)) {
            // SAFETY: valid C string and live directory descriptor.
            unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
        }
        return Err(io::Error::new(e.kind(), format!("writing {name}: {e}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::LONGNAME_PREFIX;
    use std::os::fd::AsFd;

    fn dir() -> (tempfile::TempDir, File) {
        let t = tempfile::tempdir().unwrap();
        let d = File::open(t.path()).unwrap();
        (t, d)
    }

    #[test]
    fn iv_round_trips_and_is_not_overwritten() {
        let (t, d) = dir();
        let iv = create_dir_iv(d.as_fd()).unwrap();
        assert_eq!(read_dir_iv(d.as_fd()).unwrap(), iv);
        let meta = std::fs::metadata(t.path().join(DIR_IV_NAME)).unwrap();
        assert_eq!(meta.mode() & 0o777, DIR_IV_MODE);
        let again = create_dir_iv(d.as_fd()).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(read_dir_iv(d.as_fd()).unwrap(), iv);
    }

    #[test]
    fn planted_fifo_symlink_or_wrong_size_iv_is_refused_without_blocking() {
        let (t, d) = dir();
        let p = t.path().join(DIR_IV_NAME);
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // A blocking open of a FIFO with no writer would hang this test.
        let e = read_dir_iv(d.as_fd()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_file(&p).unwrap();

        std::fs::write(t.path().join("other"), [7u8; 16]).unwrap();
        std::os::unix::fs::symlink("other", &p).unwrap();
        let e = read_dir_iv(d.as_fd()).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::remove_file(&p).unwrap();

        std::fs::write(&p, [1u8; 17]).unwrap();
        assert_eq!(
            read_dir_iv(d.as_fd()).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        std::fs::write(&p, [1u8; 15]).unwrap();
        assert_eq!(
            read_dir_iv(d.as_fd()).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn a_planted_header_fifo_or_symlink_is_refused_without_blocking() {
        let (t, d) = dir();
        let p = t.path().join(HEADER_FILE_NAME);
        assert_eq!(
            read_header_file(d.as_fd()).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        std::fs::write(&p, b"header bytes").unwrap();
        assert_eq!(read_header_file(d.as_fd()).unwrap(), b"header bytes");
        std::fs::remove_file(&p).unwrap();
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_header_file(d.as_fd()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &p).unwrap();
        assert!(read_header_file(d.as_fd()).is_err());
    }

    #[test]
    fn sidecars_are_written_once_checked_and_removed() {
        let (t, d) = dir();
        let full = "A".repeat(300);
        let hashed = long_name_for(&full);
        assert!(hashed.starts_with(LONGNAME_PREFIX));
        let name = EncryptedName::Long {
            hashed: hashed.clone(),
            full: full.clone(),
        };
        assert!(write_sidecar(d.as_fd(), &name).unwrap());
        assert!(!write_sidecar(d.as_fd(), &name).unwrap());
        assert_eq!(read_sidecar(d.as_fd(), &hashed).unwrap(), full);
        // A sidecar whose contents do not hash to its name is refused.
        let other = long_name_for(&"B".repeat(300));
        std::fs::copy(
            t.path().join(sidecar_name(&hashed)),
            t.path().join(sidecar_name(&other)),
        )
        .unwrap();
        assert!(read_sidecar(d.as_fd(), &other).is_err());
        remove_sidecar(d.as_fd(), &name).unwrap();
        assert!(read_sidecar(d.as_fd(), &hashed).is_err());
        // Short names have no sidecar.
        let short = EncryptedName::Short("abc".into());
        assert!(!write_sidecar(d.as_fd(), &short).unwrap());
        remove_sidecar(d.as_fd(), &short).unwrap();
    }
}
