//! `mount -o remount,...` of a kmsfs mount: mount(8) runs the helper
//! (`mount.fuse.kmsfs`, the type in /proc/mounts) with the mount's current
//! options plus the changes and `remount`. Only the generic flags change
//! (`ro`/`rw`, `noexec`, `noatime`, `sync`, ...), in place, through
//! mount(2); the daemon, its keys and its open files stay. What the daemon
//! fixed at mount time (`allow_other`, `acl`, `no_writeback`, `uring`,
//! `shared_storage`, the KMS options) stays as it was: mount(8) repeats
//! fstab's options on a remount, so they are accepted and left alone.

use crate::mount_options::ParsedOptions;
use anyhow::{bail, Context};
use kmsfs_fuse::MountOption;
use std::path::Path;

/// Options the kernel shows for every FUSE mount, or sets by default, that
/// mount(8) passes back on a remount and that cannot change: dropped.
fn fixed_at_mount(opt: &str) -> bool {
    matches!(
        opt,
        "relatime" | "norelatime" | "strictatime" | "nodiratime" | "diratime" | "lazytime"
    ) || [
        "user_id=",
        "group_id=",
        "rootmode=",
        "blksize=",
        "max_read=",
        "fd=",
    ]
    .iter()
    .any(|p| opt.starts_with(p))
}

/// The option lists without `remount` and the FUSE mount-time options, if
/// `remount` is among them; `None` for an ordinary mount.
pub fn requested(lists: &[String]) -> Option<Vec<String>> {
    let tokens = || lists.iter().flat_map(|l| l.split(',')).map(str::trim);
    if !tokens().any(|t| t == "remount") {
        return None;
    }
    let kept: Vec<&str> = tokens()
        .filter(|t| !t.is_empty() && *t != "remount" && !fixed_at_mount(t))
        .collect();
    Some(vec![kept.join(",")])
}

/// Whether `mountpoint` is where a `fuse.kmsfs` filesystem is mounted
/// (per /proc/self/mounts, whose fields escape space, tab, newline and
/// backslash as octal).
fn is_kmsfs_mount(mountpoint: &Path) -> anyhow::Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let want = mountpoint.to_string_lossy();
    Ok(mounts.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() > 2 && f[2] == kmsfs_fuse::kernel_mount::FS_TYPE && unescape(f[1]) == want
    }))
}

fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Remounts the kmsfs mount at `mountpoint` with the generic flags of
/// `opts` (`nosuid,nodev` stay unless `allow_suid_dev` lets them go, as at
/// mount time).
pub fn run(mountpoint: &Path, opts: &ParsedOptions) -> anyhow::Result<()> {
    let mp = mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    if !is_kmsfs_mount(&mp)? {
        bail!(
            "{} is not a kmsfs mount: nothing to remount (mount it with `kmsfs mount` first)",
            mp.display()
        );
    }
    let mut flags = vec![if opts.read_only {
        MountOption::RO
    } else {
        MountOption::RW
    }];
    flags.extend(opts.kernel.iter().cloned());
    // Read-only is refused (EBUSY) while a file is open for writing; one
    // that was just closed can hold the mount a moment longer, so wait as
    // `kmsfs umount` does.
    let busy = |e: &std::io::Error| e.raw_os_error() == Some(libc::EBUSY);
    match crate::mount::while_busy(|| kmsfs_fuse::kernel_mount::remount(&mp, &flags), busy) {
        Err(e) if busy(&e) => bail!(
            "remounting {} read-only: files are open for writing there (`fuser -vm {}` \
             lists the processes); close them and remount again",
            mp.display(),
            mp.display()
        ),
        r => r.with_context(|| format!("remounting {}", mp.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remount_options_drop_what_fuse_fixed_at_mount() {
        let lists =
            vec!["ro,nosuid,nodev,noexec,relatime,remount,user_id=0,group_id=0".to_string()];
        assert_eq!(
            requested(&lists),
            Some(vec!["ro,nosuid,nodev,noexec".to_string()])
        );
        assert_eq!(requested(&["rw,noexec".to_string()]), None);
        // fstab's options come back on a remount and are accepted.
        let lists = vec![
            "remount,rw".to_string(),
            "kms_config=/etc/k.toml,_netdev".to_string(),
        ];
        let kept = requested(&lists).unwrap();
        let p = crate::mount_options::parse_options(&kept).unwrap();
        assert!(!p.read_only);
        assert_eq!(p.kernel, vec![MountOption::NoSuid, MountOption::NoDev]);
    }

    #[test]
    fn mount_table_fields_are_unescaped() {
        assert_eq!(unescape(r"/mnt/a\040b\134c"), "/mnt/a b\\c");
        assert_eq!(unescape(r"/plain\0"), r"/plain\0");
    }
}
