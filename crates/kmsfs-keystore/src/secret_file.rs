//! Reading small secrets (tokens, AppRole secret ids, private keys) from files.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kmsfs_core::secret::SecretBytes;
use zeroize::Zeroizing;

use crate::error::{KmsError, Result};

/// Largest secret file accepted; tokens and secret ids are far smaller.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a secret from `path` into locked memory.
///
/// Refuses a file that is missing, empty (after trimming), larger than 64 KiB,
/// or readable by other users (`mode & 0o004`), with an error naming the file
/// (and, for the last case, suggesting `chmod 600`). Trailing whitespace
/// (the newline editors add) is trimmed when `trim` is set; use `trim = false`
/// for PEM keys.
pub fn read_secret_file(path: &Path, trim: bool) -> Result<SecretBytes> {
    let err = |detail: String| KmsError::SecretFile {
        path: path.to_path_buf(),
        detail,
    };
    let mut file = fs::File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => err("file not found".into()),
        io::ErrorKind::PermissionDenied => err("permission denied reading the file".into()),
        _ => err(format!("cannot open: {e}")),
    })?;
    let meta = file
        .metadata()
        .map_err(|e| err(format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(err(format!(
            "refusing to use a secret file readable by all users (mode {:o}); run `chmod 600 {}`",
            mode & 0o777,
            path.display()
        )));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(err(format!(
            "file is too large for a secret ({} bytes)",
            meta.len()
        )));
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    (&mut file)
        .take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    let mut end = buf.len();
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
