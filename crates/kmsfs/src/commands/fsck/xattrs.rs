//! Extended attributes of a backing file or directory: each of kmsfs's
//! records (docs/format.md §8) must decrypt and authenticate for its entry.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use kmsfs_core::keys::FsKeys;
use kmsfs_core::xattr_crypto::{
    self as xc, BackingXattr, XattrId, BACKING_PART_MAX, MAX_PARTS, XATTR_ID_NAME,
};

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `lgetxattr`: `None` when there is no such attribute.
fn get(path: &CString, name: &str) -> io::Result<Option<Vec<u8>>> {
    let n = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = vec![0u8; BACKING_PART_MAX];
    // SAFETY: valid C strings; the buffer is valid for its length, the
    // largest value Linux stores.
    let r = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(r as usize);
    Ok(Some(buf))
}

/// `llistxattr`: every backing attribute name.
fn list(path: &CString) -> io::Result<Vec<String>> {
    // SAFETY: a valid C string; a null buffer of size 0 asks for the size.
    let size = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: the buffer is valid for its length.
    let got = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(got as usize);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// Checks the attributes of the backing entry at `backing`; returns one
/// line per problem. A store without extended attributes has none.
pub fn check(keys: &FsKeys, backing: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let path = match cpath(backing) {
        Ok(p) => p,
        Err(e) => return vec![format!("cannot name the entry: {e}")],
    };
    let names = match list(&path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return problems,
        Err(e) => return vec![format!("cannot list extended attributes: {e}")],
    };
    let entries: Vec<&str> = names
        .iter()
        .filter_map(|n| match xc::classify(n) {
            BackingXattr::Entry(base) => Some(base),
            _ => None,
        })
        .collect();
    if entries.is_empty() {
        return problems;
    }
    let id: XattrId = match get(&path, XATTR_ID_NAME) {
        Ok(Some(v)) => match v.as_slice().try_into() {
            Ok(id) => id,
            Err(_) => {
                return vec![format!(
                    "{XATTR_ID_NAME} is {} bytes, not 16: none of the entry's {} extended \
                     attributes can be read; restore the entry's attributes from a backup",
                    v.len(),
                    entries.len()
                )]
            }
        },
        Ok(None) => {
            return vec![format!(
                "{XATTR_ID_NAME} is missing: none of the entry's {} extended attributes can be \
                 read; restore the entry's attributes from a backup",
                entries.len()
            )]
        }
        Err(e) => return vec![format!("cannot read {XATTR_ID_NAME}: {e}")],
    };
    for base in entries {
        let mut record = match get(&path, base) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                problems.push(format!("cannot read extended attribute {base}: {e}"));
                continue;
            }
        };
        let mut last = record.len();
        for k in 1..MAX_PARTS {
            if last < BACKING_PART_MAX {
                break;
            }
            match get(&path, &xc::part_name(base, k)) {
                Ok(Some(part)) => {
                    last = part.len();
                    record.extend_from_slice(&part);
                }
                _ => break,
            }
        }
        if let Err(e) = xc::open(keys, &id, base, &record) {
            problems.push(format!(
                "extended attribute {base} does not decrypt: {e} (damaged, or moved here from \
                 another attribute or entry); it reads as EIO, set it again or restore it"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmsfs_core::keys::MasterKey;

    fn set(p: &Path, name: &str, value: &[u8]) {
        let (p, n) = (cpath(p).unwrap(), CString::new(name).unwrap());
        // SAFETY: valid C strings and a value valid for its length.
        let r = unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
    }

    #[test]
    fn sound_records_pass_and_moved_or_damaged_ones_are_named() {
        let keys = FsKeys::derive(&MasterKey::generate().unwrap(), &[9; 16]);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"").unwrap();
        assert!(check(&keys, &f).is_empty(), "no attributes at all");
        let id = xc::new_id().unwrap();
        set(&f, XATTR_ID_NAME, &id);
        let (a, ra) = xc::seal(&keys, &id, b"user.a", b"1").unwrap();
        let (b, rb) = xc::seal(&keys, &id, b"user.b", b"2").unwrap();
        set(&f, &a, &ra);
        set(&f, &b, &rb);
        set(&f, "user.foreign", b"not ours");
        assert!(check(&keys, &f).is_empty());
        // b's record under a's name.
        set(&f, &a, &rb);
        let problems = check(&keys, &f);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains(&a), "{problems:?}");
        // A damaged id spoils every record.
        set(&f, XATTR_ID_NAME, b"short");
        assert_eq!(check(&keys, &f).len(), 1);
        assert!(check(&keys, &f)[0].contains("not 16"));
    }
}
