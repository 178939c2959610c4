//! The backing entries' own extended attributes: what a snapshot carries
//! of them and how a restore puts them back.
//!
//! kmsfs keeps a file's extended attributes and POSIX ACLs encrypted and
//! authenticated in the backing entry's `user.kmsfs.id` and
//! `user.kmsfs.x.*` attributes (docs/format.md section 8). A snapshot
//! carries exactly those, byte for byte, in the manifest entry; nothing
//! else in the backing store's attributes is kmsfs's, so nothing else is
//! read. Only regular files and directories can hold `user.` attributes
//! (Linux refuses them on symlinks and special files), so only those are
//! read. Every call works on the path itself: `l*xattr`, never following a
//! symlink.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// Prefix of every backing attribute a snapshot carries.
pub const CARRIED_PREFIX: &str = "user.kmsfs.";
/// Largest value of one backing attribute (Linux `XATTR_SIZE_MAX`).
pub const MAX_VALUE_LEN: usize = 65536;
/// Longest backing attribute name (Linux `XATTR_NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// One backing attribute: its name and raw value.
pub type Xattr = (String, Vec<u8>);

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// The `user.kmsfs.*` attributes of the entry at `path` (not following a
/// symlink), sorted by name. A filesystem without extended attributes has
/// none. A name under the prefix that is not UTF-8 is not kmsfs's (its
/// names are ASCII): it is left out, with a warning.
pub fn read(path: &Path) -> io::Result<Vec<Xattr>> {
    let p = cpath(path)?;
    let mut list = Vec::new();
    loop {
        // SAFETY: a valid C string; a null buffer of size 0 asks for the size.
        let size = match check(unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) }) {
            Ok(s) => s,
            Err(e) if unsupported(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        if size == 0 {
            return Ok(Vec::new());
        }
        list.resize(size, 0u8);
        // SAFETY: a valid C string; the buffer is valid for `size` bytes.
        match check(unsafe { libc::llistxattr(p.as_ptr(), list.as_mut_ptr().cast(), size) }) {
            Ok(got) => {
                list.truncate(got);
                break;
            }
            // Grew between the two calls: ask again.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    let mut out = Vec::new();
    for raw in list.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if !raw.starts_with(CARRIED_PREFIX.as_bytes()) {
            continue;
        }
        let Ok(name) = std::str::from_utf8(raw) else {
            tracing::warn!(
                "{}: backing attribute {:?} is not a kmsfs name (not UTF-8): not carried",
                path.display(),
                String::from_utf8_lossy(raw)
            );
            continue;
        };
        if let Some(value) = get(&p, name)? {
            out.push((name.to_string(), value));
        }
    }
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The value of `name` on `p`, `None` when it went away since the listing.
fn get(p: &CString, name: &str) -> io::Result<Option<Vec<u8>>> {
    let n = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: valid C strings; a null buffer of size 0 asks for the size.
        let size = match check(unsafe {
            libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0)
        }) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; size];
        // SAFETY: valid C strings; the buffer is valid for `size` bytes.
        match check(unsafe {
            libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size)
        }) {
            Ok(got) => {
                buf.truncate(got);
                return Ok(Some(buf));
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Why [`write`] failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The filesystem holding the entry has no (user) extended attributes.
    #[error("the filesystem has no user extended attributes")]
    Unsupported,
    /// No room for them (`ENOSPC`, `E2BIG`): a full filesystem, or one that
    /// keeps little per inode (ext4: one 4 KiB block).
    #[error("no room for the extended attributes")]
    NoRoom,
    /// Any other error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Sets every attribute in `xattrs` on the entry at `path` (not following
/// a symlink), creating or replacing each.
pub fn write(path: &Path, xattrs: &[Xattr]) -> Result<(), WriteError> {
    if xattrs.is_empty() {
        return Ok(());
    }
    let p = cpath(path).map_err(WriteError::Io)?;
    for (name, value) in xattrs {
        let n = CString::new(name.as_str())
            .map_err(|_| WriteError::Io(io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: valid C strings; the value is valid for its length.
        let r = unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => WriteError::Unsupported,
                Some(libc::ENOSPC | libc::E2BIG) => WriteError::NoRoom,
                _ => WriteError::Io(e),
            });
        }
    }
    Ok(())
}

/// Checks one manifest attribute and decodes its value: the name must be
/// under [`CARRIED_PREFIX`], at most 255 bytes, without NUL; the value
/// base64 of at most 64 KiB.
pub fn decode(name: &str, value_b64: &str) -> Result<Xattr, String> {
    use base64::Engine as _;
    let rest = name.strip_prefix(CARRIED_PREFIX).unwrap_or("");
    if rest.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
        return Err(format!(
            "extended attribute {name:?} is not a kmsfs backing attribute (user.kmsfs.*)"
        ));
    }
    let value = base64::engine::general_purpose::STANDARD
        .decode(value_b64)
        .map_err(|e| format!("extended attribute {name:?}: value is not base64: {e}"))?;
    if value.len() > MAX_VALUE_LEN {
        return Err(format!(
            "extended attribute {name:?}: value of {} bytes is over the 64 KiB limit",
            value.len()
        ));
    }
    Ok((name.to_string(), value))
}

/// The manifest form of `xattrs`: names with base64 values.
pub fn encode(xattrs: Vec<Xattr>) -> Vec<(String, String)> {
    use base64::Engine as _;
    xattrs
        .into_iter()
        .map(|(n, v)| (n, base64::engine::general_purpose::STANDARD.encode(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_is_strict() {
        assert_eq!(
            decode("user.kmsfs.id", "AAE=").unwrap(),
            ("user.kmsfs.id".to_string(), vec![0, 1])
        );
        for bad in [
            "user.other",
            "user.kmsfs.",
            "trusted.kmsfs.id",
            "security.selinux",
        ] {
            assert!(decode(bad, "AA==").unwrap_err().contains("not a kmsfs"));
        }
        let long = format!("user.kmsfs.x.{}", "a".repeat(250));
        assert!(decode(&long, "AA==").is_err());
        assert!(decode("user.kmsfs.id", "not base64!").is_err());
        use base64::Engine as _;
        let max = base64::engine::general_purpose::STANDARD.encode(vec![7u8; MAX_VALUE_LEN]);
        assert!(decode("user.kmsfs.x.a", &max).is_ok());
        let over = base64::engine::general_purpose::STANDARD.encode(vec![7u8; MAX_VALUE_LEN + 1]);
        assert!(decode("user.kmsfs.x.a", &over)
            .unwrap_err()
            .contains("64 KiB"));
    }

    #[test]
    fn read_takes_only_kmsfs_attributes_and_write_puts_them_back() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let set = [
            ("user.kmsfs.x.b".to_string(), vec![1u8; 1000]),
            ("user.kmsfs.id".to_string(), vec![2u8; 16]),
            ("user.other".to_string(), b"not ours".to_vec()),
        ];
        match write(&a, &set) {
            Err(WriteError::Unsupported) => return, // no user xattrs here
            r => r.unwrap_or_else(|e| panic!("{e:?}")),
        }
        let got = read(&a).unwrap();
        assert_eq!(got, vec![set[1].clone(), set[0].clone()]);
        let b = d.path().join("b");
        std::fs::create_dir(&b).unwrap();
        write(&b, &got).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(read(&b).unwrap(), got);
        // A symlink is never followed.
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&a, &l).unwrap();
        assert!(read(&l).unwrap().is_empty());
    }
}
