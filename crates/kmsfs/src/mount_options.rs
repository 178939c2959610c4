//! Parsing of `-o` mount options, from the command line or /etc/fstab.

use crate::keycheck::KeyCheck;
use anyhow::{bail, Context};
use kmsfs_fuse::MountOption;
use std::path::PathBuf;

/// What a list of `-o` options asks for.
#[derive(Debug, Default, Clone)]
pub struct ParsedOptions {
    /// `ro`.
    pub read_only: bool,
    /// `allow_other`.
    pub allow_other: bool,
    /// Kernel flags passed through (`noexec`, `noatime`, ...), always with
    /// `nosuid` and `nodev` unless `allow_suid_dev` and `suid` / `dev` ask
    /// otherwise.
    pub kernel: Vec<MountOption>,
    /// `kms_timeout=SECONDS`.
    pub kms_timeout: Option<u64>,
    /// `kms_config=PATH`: the KMS configuration for this mount (fstab).
    pub kms_config: Option<PathBuf>,
    /// `no_writeback`: no kernel writeback cache (`writeback` turns it back on).
    pub no_writeback: bool,
    /// `uring`: serve requests over FUSE io_uring where the kernel offers
    /// it (`no_uring`, the default: /dev/fuse only).
    pub uring: bool,
    /// `shared_storage`: the backing directory is shared with other mounts
    /// (other hosts over NFS or CephFS); no caching, no writeback cache.
    pub shared_storage: bool,
    /// `acl` / `noacl`: store and enforce POSIX ACLs. Unset, ACLs are on
    /// exactly when `allow_other` is (see [`ParsedOptions::posix_acl`]).
    pub acl: Option<bool>,
    /// `kcv=HEX`: the key check value the unwrapped master key must have
    /// (for hosts that did not create the filesystem).
    pub kcv: Option<KeyCheck>,
}

impl ParsedOptions {
    /// Whether the mount stores and enforces POSIX ACLs: `acl` / `noacl`
    /// when given, else on exactly with `allow_other`. ACLs matter when
    /// other users come in, where the kernel must check permissions
    /// anyway; for one user they would cost a request per entry listed and
    /// per unlink (docs/compat.md).
    pub fn posix_acl(&self) -> bool {
        self.acl.unwrap_or(self.allow_other)
    }
}

/// Options mount(8), systemd and fstab conventions add that concern the
/// mount command itself rather than the filesystem: accepted and ignored.
fn is_mount8_option(opt: &str) -> bool {
    matches!(
        opt,
        "_netdev"
            | "nofail"
            | "auto"
            | "noauto"
            | "user"
            | "nouser"
            | "users"
            | "owner"
            | "group"
            | "defaults"
            | "rw"
            | "default_permissions"
            | "loud"
            | "silent"
    ) || opt.starts_with("x-")
        || opt.starts_with("comment=")
}

/// The opt-in that lets `suid` and `dev` through.
pub const ALLOW_SUID_DEV: &str = "allow_suid_dev";

/// Parses comma-separated option lists. Unknown options are an error that names them.
///
/// Mounts are `nosuid,nodev` by default, and `suid` or `dev` are refused
/// unless [`ALLOW_SUID_DEV`] is given too: file modes and device numbers
/// in the backing store are not authenticated, so whoever can write the
/// backing directory could otherwise plant a set-uid root program or a
/// device node that the mount would honour.
pub fn parse_options<S: AsRef<str>>(lists: &[S]) -> anyhow::Result<ParsedOptions> {
    let mut p = ParsedOptions::default();
    let mut suid = false;
    let mut dev = false;
    let mut allow_suid_dev = false;
    for list in lists {
        for opt in list
            .as_ref()
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
        {
            if is_mount8_option(opt) {
                continue;
            }
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            match (key, value) {
                ("ro", None) => p.read_only = true,
                ("allow_other", None) => p.allow_other = true,
                ("no_writeback", None) => p.no_writeback = true,
                ("writeback", None) => p.no_writeback = false,
                ("uring", None) => p.uring = true,
                ("no_uring", None) => p.uring = false,
                ("shared_storage", None) => p.shared_storage = true,
                ("acl", None) => p.acl = Some(true),
                ("noacl", None) => p.acl = Some(false),
                ("nosuid", None) => suid = false,
                ("suid", None) => suid = true,
                ("nodev", None) => dev = false,
                ("dev", None) => dev = true,
                (ALLOW_SUID_DEV, None) => allow_suid_dev = true,
                ("noexec", None) => p.kernel.push(MountOption::NoExec),
                ("exec", None) => p.kernel.push(MountOption::Exec),
                ("noatime", None) => p.kernel.push(MountOption::NoAtime),
                ("atime", None) => p.kernel.push(MountOption::Atime),
                ("sync", None) => p.kernel.push(MountOption::Sync),
                ("async", None) => p.kernel.push(MountOption::Async),
                ("dirsync", None) => p.kernel.push(MountOption::DirSync),
                ("kms_timeout", Some(v)) => {
                    p.kms_timeout = Some(
                        v.parse()
                            .with_context(|| format!("kms_timeout={v}: not a number of seconds"))?,
                    )
                }
                ("kms_config", Some(v)) if !v.is_empty() => p.kms_config = Some(PathBuf::from(v)),
                ("kcv", Some(v)) => {
                    p.kcv = Some(v.parse().map_err(|e: String| {
                        anyhow::anyhow!("mount option kcv={v}: {e}")
                    })?)
                }
                _ => bail!(
                    "unknown mount option '{opt}' (known: ro, rw, allow_other, nosuid, nodev, \
                     noexec, noatime, sync, no_writeback, uring, shared_storage, acl, noacl, kms_timeout=SECONDS, kms_config=PATH, \
                     kcv=HEX, allow_suid_dev, and mount(8)'s _netdev, nofail, auto, noauto, user, defaults, x-*)"
                ),
            }
        }
    }
    for (wanted, name) in [(suid, "suid"), (dev, "dev")] {
        if wanted && !allow_suid_dev {
            bail!(
                "mount option '{name}' refused: file modes and device numbers in the backing \
                 directory are not authenticated, so whoever can write it could plant a set-uid \
                 program or a device node; kmsfs mounts are nosuid,nodev. If you accept that \
                 risk, add '{ALLOW_SUID_DEV}' to the options"
            );
        }
    }
    p.kernel.push(if suid {
        MountOption::Suid
    } else {
        MountOption::NoSuid
    });
    p.kernel.push(if dev {
        MountOption::Dev
    } else {
        MountOption::NoDev
    });
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_options_are_accepted() {
        let p = parse_options(&[
            "rw,_netdev,nofail,allow_other,kms_timeout=300,x-systemd.automount,noauto,defaults",
        ])
        .unwrap();
        assert!(p.allow_other);
        assert!(!p.read_only);
        assert_eq!(p.kms_timeout, Some(300));
        assert!(!p.shared_storage);
        assert!(
            parse_options(&["rw,shared_storage"])
                .unwrap()
                .shared_storage
        );
    }

    #[test]
    fn uring_is_asked_for_and_last_one_wins() {
        let uring = |o: &str| parse_options(&[o]).unwrap().uring;
        assert!(!uring("rw"));
        assert!(uring("rw,uring"));
        assert!(!uring("uring,no_uring"));
        // Not a kernel mount option: it must not reach mount(2).
        assert_eq!(
            parse_options(&["rw,uring"]).unwrap().kernel,
            parse_options(&["rw"]).unwrap().kernel
        );
    }

    #[test]
    fn acls_follow_allow_other_unless_asked() {
        let acl = |o: &str| parse_options(&[o]).unwrap().posix_acl();
        assert!(!acl("rw"));
        assert!(acl("allow_other"));
        assert!(acl("acl"));
        assert!(!acl("allow_other,noacl"));
        assert!(acl("noacl,acl"));
    }

    #[test]
    fn several_lists_and_kernel_flags() {
        let p = parse_options(&["ro", "nosuid,nodev", "kms_config=/etc/kmsfs/other.toml"]).unwrap();
        assert!(p.read_only);
        assert_eq!(p.kernel, vec![MountOption::NoSuid, MountOption::NoDev]);
        assert_eq!(p.kms_config, Some(PathBuf::from("/etc/kmsfs/other.toml")));
    }

    #[test]
    fn nosuid_nodev_by_default() {
        let p = parse_options(&["rw,noexec"]).unwrap();
        assert_eq!(
            p.kernel,
            vec![MountOption::NoExec, MountOption::NoSuid, MountOption::NoDev]
        );
        let p = parse_options::<&str>(&[]).unwrap();
        assert_eq!(p.kernel, vec![MountOption::NoSuid, MountOption::NoDev]);
    }

    #[test]
    fn suid_and_dev_need_the_opt_in() {
        for opts in ["suid", "dev", "rw,dev,nosuid", "suid,nodev"] {
            let err = parse_options(&[opts]).unwrap_err().to_string();
            assert!(err.contains(ALLOW_SUID_DEV), "{opts}: {err}");
            assert!(err.contains("refused"), "{opts}: {err}");
        }
        // The opt-in may come before or after, in the same or another list.
        let p = parse_options(&["suid", "allow_suid_dev"]).unwrap();
        assert_eq!(p.kernel, vec![MountOption::Suid, MountOption::NoDev]);
        let p = parse_options(&["allow_suid_dev,dev,suid"]).unwrap();
        assert_eq!(p.kernel, vec![MountOption::Suid, MountOption::Dev]);
        // The opt-in alone changes nothing; a later `nosuid` wins.
        let p = parse_options(&["allow_suid_dev", "suid,nosuid"]).unwrap();
        assert_eq!(p.kernel, vec![MountOption::NoSuid, MountOption::NoDev]);
    }

    #[test]
    fn unknown_options_are_named() {
        let err = parse_options(&["rw,frobnicate"]).unwrap_err().to_string();
        assert!(err.contains("'frobnicate'"), "{err}");
        assert!(parse_options(&["kms_timeout=soon"]).is_err());
    }

    #[test]
    fn key_check_value_option() {
        let p = parse_options(&["ro,kcv=7C2DB665185FBEA28F8BF15D867E7F75"]).unwrap();
        assert_eq!(
            p.kcv.map(|k| k.to_string()).as_deref(),
            Some("7c2db665185fbea28f8bf15d867e7f75")
        );
        let err = parse_options(&["kcv=7c2d"]).unwrap_err().to_string();
        assert!(
            err.contains("kcv=7c2d") && err.contains("32 hex digits"),
            "{err}"
        );
        assert!(parse_options(&["kcv"]).is_err());
    }
}
