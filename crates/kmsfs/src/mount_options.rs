//! Parsing of `-o` mount options, from the command line or /etc/fstab.

use anyhow::{bail, Context};
use kmsfs::keycheck::KeyCheck;
use kmsfs_fuse::MountOption;
use std::path::PathBuf;

/// What a list of `-o` options asks for.
#[derive(Debug, Default, Clone)]
pub struct ParsedOptions {
    /// `ro`.
    pub read_only: bool,
    /// `allow_other`.
    pub allow_other: bool,
    /// Kernel flags passed through (`nosuid`, `nodev`, `noexec`, ...).
    pub kernel: Vec<MountOption>,
    /// `kms_timeout=SECONDS`.
    pub kms_timeout: Option<u64>,
    /// `kms_config=PATH`: the KMS configuration for this mount (fstab).
    pub kms_config: Option<PathBuf>,
    /// `no_writeback`: no kernel writeback cache (`writeback` turns it back on).
    pub no_writeback: bool,
    /// `kcv=HEX`: the key check value the unwrapped master key must have
    /// (for hosts that did not create the filesystem).
    pub kcv: Option<KeyCheck>,
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

/// Parses comma-separated option lists. Unknown options are an error that names them.
pub fn parse_options<S: AsRef<str>>(lists: &[S]) -> anyhow::Result<ParsedOptions> {
    let mut p = ParsedOptions::default();
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
                ("nosuid", None) => p.kernel.push(MountOption::NoSuid),
                ("suid", None) => p.kernel.push(MountOption::Suid),
                ("nodev", None) => p.kernel.push(MountOption::NoDev),
                ("dev", None) => p.kernel.push(MountOption::Dev),
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
                     noexec, noatime, sync, no_writeback, kms_timeout=SECONDS, kms_config=PATH, kcv=HEX, and mount(8)'s \
                     _netdev, nofail, auto, noauto, user, defaults, x-*)"
                ),
            }
        }
    }
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
    }

    #[test]
    fn several_lists_and_kernel_flags() {
        let p = parse_options(&["ro", "nosuid,nodev", "kms_config=/etc/kmsfs/other.toml"]).unwrap();
        assert!(p.read_only);
        assert_eq!(p.kernel, vec![MountOption::NoSuid, MountOption::NoDev]);
        assert_eq!(p.kms_config, Some(PathBuf::from("/etc/kmsfs/other.toml")));
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
