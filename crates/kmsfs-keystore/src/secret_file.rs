//! Reading small secrets (tokens, AppRole secret ids, private keys) and
//! the KMS configuration from files, refusing files others could read or
//! change.
//!
//! Whoever can write the configuration can point kmsfs at their own KMS and
//! capture the master key at the next `create`; whoever can read a token
//! can unwrap every key. So both are opened without following a symbolic
//! link and without blocking on a FIFO, and checked on the opened
//! descriptor (no window between check and use): a regular file, owned by
//! root or the calling user, and not writable (configuration) or not
//! readable or writable (secrets) by group or others.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use kmsfs_core::secret::SecretBytes;
use zeroize::Zeroizing;

use crate::error::{KmsError, Result};

/// Largest secret file accepted; tokens and secret ids are far smaller.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// What a protected file holds, which decides how private it must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileRole {
    /// The KMS configuration: others may read it, not change it.
    Config,
    /// A token, secret id or private key: for the owner's eyes only.
    Secret,
}

/// Opens `path` for reading after checking, on the opened descriptor, that
/// it is a regular file owned by root or the caller with a mode fit for
/// `role`. The error text (without the path, which callers add) says what
/// is wrong and the exact command that fixes it.
pub(crate) fn open_protected(
    path: &Path,
    role: FileRole,
) -> std::result::Result<(fs::File, fs::Metadata), String> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match (e.kind(), e.raw_os_error()) {
            (io::ErrorKind::NotFound, _) => "file not found".to_string(),
            (io::ErrorKind::PermissionDenied, _) => "permission denied reading the file".into(),
            (_, Some(libc::ELOOP)) => format!(
                "is a symbolic link, which kmsfs does not follow for its configuration and secret \
                 files; name the real file instead (`readlink -f {}` prints it)",
                shell_quote(path)
            ),
            _ => format!("cannot open: {e}"),
        })?;
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        let fix = if me == 0 {
            format!("chown root:root {}", shell_quote(path))
        } else {
            format!("chown {me} {}", shell_quote(path))
        };
        let whom = if me == 0 {
            "root".to_string()
        } else {
            format!("root or the calling user (uid {me})")
        };
        return Err(format!(
            "owned by uid {}, not by {whom}, so that user could change it; run `{fix}`",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    match role {
        FileRole::Config if mode & 0o022 != 0 => Err(format!(
            "writable by group or others (mode {mode:04o}), who could redirect kmsfs to another KMS; \
             run `chmod go-w {}`",
            shell_quote(path)
        )),
        FileRole::Secret if mode & 0o066 != 0 => Err(format!(
            "refusing to use a secret file readable or writable by group or others (mode {mode:04o}); \
             run `chmod 600 {}`",
            shell_quote(path)
        )),
        _ => Ok((file, meta)),
    }
}

/// `path` as one shell word: unchanged when it is plain, else single-quoted.
fn shell_quote(path: &Path) -> String {
    let s = path.to_string_lossy();
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@,=".contains(&b))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Reads a secret from `path` into locked memory.
///
/// Refuses a file that is missing, a symbolic link, not a regular file, not
/// owned by root or the caller, readable or writable by group or others,
/// empty (after trimming) or larger than 64 KiB, with an error naming the
/// file and, where there is one, the command that fixes it. Trailing
/// whitespace (the newline editors add) is trimmed when `trim` is set; use
/// `trim = false` for PEM keys.
pub fn read_secret_file(path: &Path, trim: bool) -> Result<SecretBytes> {
    let err = |detail: String| KmsError::SecretFile {
        path: path.to_path_buf(),
        detail,
    };
    let (mut file, meta) = open_protected(path, FileRole::Secret).map_err(err)?;
    if meta.len() > MAX_SECRET_FILE {
        return Err(err(format!(
            "file is too large for a secret ({} bytes)",
            meta.len()
        )));
    }
    // Sized up front (and capped) so the buffer never reallocates, which
    // would leave an unzeroized copy behind.
    let cap = (meta.len() + 1).min(MAX_SECRET_FILE + 1) as usize;
    let mut buf = Zeroizing::new(vec![0u8; cap]);
    let mut filled = 0;
    while filled < cap {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(format!("cannot read: {e}"))),
        }
    }
    if filled == cap {
        return Err(err("the file grew while being read; try again".into()));
    }
    let mut end = filled;
    if trim {
        while end > 0 && buf[end - 1].is_ascii_whitespace() {
            end -= 1;
        }
    }
    if buf[..end].iter().all(|b| b.is_ascii_whitespace()) {
        return Err(err("file is empty".into()));
    }
    Ok(SecretBytes::from_slice(&buf[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, data: &[u8], mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn trims_trailing_newline() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "t", b"s.abc\n", 0o600);
        assert_eq!(read_secret_file(&p, true).unwrap().expose(), b"s.abc");
    }

    #[test]
    fn refuses_world_readable_and_names_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "tok", b"s.secretvalue\n", 0o644);
        let e = read_secret_file(&p, true).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("chmod 600"), "{e}");
        assert!(!e.contains("secretvalue"), "{e}");
    }

    #[test]
    fn refuses_group_readable_symlink_and_fifo() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "tok", b"s.secretvalue\n", 0o640);
        let e = read_secret_file(&p, true).unwrap_err().to_string();
        assert!(e.contains("mode 0640") && e.contains("chmod 600"), "{e}");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(write(d.path(), "ok", b"s.x", 0o600), &link).unwrap();
        let e = read_secret_file(&link, true).unwrap_err().to_string();
        assert!(
            e.contains("symbolic link") && e.contains("readlink -f"),
            "{e}"
        );
        assert!(e.contains(&link.display().to_string()), "{e}");
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Would block forever without O_NONBLOCK.
        let e = read_secret_file(&fifo, true).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn refuses_a_file_owned_by_another_user() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return; // only root can hand a file to another uid
        }
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "tok", b"s.abc\n", 0o600);
        std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        let e = read_secret_file(&p, true).unwrap_err().to_string();
        assert!(
            e.contains("uid 65534") && e.contains("chown root:root"),
            "{e}"
        );
        let e = open_protected(&p, FileRole::Config).unwrap_err();
        assert!(e.contains("uid 65534"), "{e}");
    }

    #[test]
    fn config_role_allows_reading_by_others_but_not_writing() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "kms.toml", b"x", 0o644);
        assert!(open_protected(&p, FileRole::Config).is_ok());
        let p = write(d.path(), "kms2.toml", b"x", 0o666);
        let e = open_protected(&p, FileRole::Config).unwrap_err();
        assert!(e.contains("mode 0666") && e.contains("chmod go-w"), "{e}");
        let q = write(d.path(), "it's here", b"x", 0o620);
        let e = open_protected(&q, FileRole::Config).unwrap_err();
        assert!(e.contains("chmod go-w '"), "{e}");
        assert!(e.contains("it'\\''s here'"), "{e}");
    }

    #[test]
    fn missing_and_empty() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("absent");
        let e = read_secret_file(&missing, true).unwrap_err().to_string();
        assert!(e.contains("absent") && e.contains("not found"), "{e}");
        let p = write(d.path(), "empty", b"\n\n", 0o600);
        let e = read_secret_file(&p, true).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }
}
