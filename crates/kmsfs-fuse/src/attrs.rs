//! Attribute conversion between backing `stat`s and FUSE attributes; pure.

use crate::sys::Time;
use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The FUSE file type of a `st_mode`.
pub fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFREG => FileType::RegularFile,
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        _ => FileType::BlockDevice,
    }
}

/// The FUSE file type of a `d_type`, or `None` for `DT_UNKNOWN` (the
/// backing filesystem does not say; the caller must `stat`).
pub fn dtype_file_type(dtype: u8) -> Option<FileType> {
    Some(match dtype {
        libc::DT_DIR => FileType::Directory,
        libc::DT_REG => FileType::RegularFile,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => return None,
    })
}

/// A `stat` timestamp as a `SystemTime`, before 1970 included.
pub fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    let ns = nsecs.clamp(0, 999_999_999) as u32;
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, ns)
    } else {
        // -1.25 s is stored as secs = -2, nsecs = 750_000_000.
        UNIX_EPOCH - Duration::new(secs.unsigned_abs(), 0) + Duration::new(0, ns)
    }
}

/// A `setattr` time as a `utimensat` argument.
pub fn utime(t: Option<TimeOrNow>) -> Time {
    match t {
        None => Time::Omit,
        Some(TimeOrNow::Now) => Time::Now,
        Some(TimeOrNow::SpecificTime(st)) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => Time::At(d.as_secs() as i64, i64::from(d.subsec_nanos())),
            Err(e) => {
                let d = e.duration();
                let (s, ns) = (d.as_secs() as i64, i64::from(d.subsec_nanos()));
                if ns == 0 {
                    Time::At(-s, 0)
                } else {
                    Time::At(-s - 1, 1_000_000_000 - ns)
                }
            }
        },
    }
}

/// The FUSE attributes of a backing entry `st` shown as inode `ino` with
/// plaintext size `size`.
pub fn file_attr(ino: u64, st: &libc::stat, size: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: system_time(st.st_ctime, st.st_ctime_nsec),
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_1970_survive_both_ways() {
        for (s, ns) in [
            (-2i64, 750_000_000i64),
            (-1, 0),
            (0, 5),
            (1_700_000_000, 123),
        ] {
            let t = system_time(s, ns);
            let Time::At(s2, ns2) = utime(Some(TimeOrNow::SpecificTime(t))) else {
                panic!("not a time");
            };
            assert_eq!((s2, ns2), (s, ns));
        }
        assert!(system_time(-86_400, 0) < UNIX_EPOCH);
    }

    #[test]
    fn types_match_modes_and_dtypes() {
        assert_eq!(file_type(libc::S_IFDIR | 0o755), FileType::Directory);
        assert_eq!(file_type(libc::S_IFLNK), FileType::Symlink);
        assert_eq!(file_type(libc::S_IFIFO), FileType::NamedPipe);
        assert_eq!(dtype_file_type(libc::DT_REG), Some(FileType::RegularFile));
        assert_eq!(dtype_file_type(libc::DT_UNKNOWN), None);
    }

    #[test]
    fn attributes_carry_mode_owner_and_given_size() {
        // SAFETY: an all-zero stat is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_mode = libc::S_IFREG | 0o4755;
        st.st_uid = 7;
        st.st_size = 4096 + 32;
        let a = file_attr(42, &st, 4096);
        assert_eq!(
            (a.ino, a.size, a.perm, a.uid),
            (INodeNo(42), 4096, 0o4755, 7)
        );
        assert_eq!(a.kind, FileType::RegularFile);
    }
}
