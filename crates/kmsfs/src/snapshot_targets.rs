//! The snapshot targets this host has used: `snapshot-targets.toml` beside
//! the KMS configuration (and the registry), so that `kmsfs kms check` can
//! look at the key versions of every snapshot they hold.
//!
//! ```toml
//! [[target]]
//! target = "s3://backups/host1"
//! s3_endpoint = "https://s3.example:9000"   # only when --s3-endpoint was given
//! filesystems = ["6b6d7366-732d-4000-8000-000000000001"]
//! ```
//!
//! `snapshot create` and `snapshot rewrap` add their target. The
//! unchanged-file caches of `snapshot create` live beside it, in
//! `snapshot-cache/` ([`cache_path`]). The file holds
//! no secret (S3 credentials stay in the environment); it is written
//! atomically with mode 0600. Two commands updating it at once may lose
//! one's addition, which the next run of that command puts back.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// File name of the list, in the configuration's directory.
pub const TARGETS_FILE_NAME: &str = "snapshot-targets.toml";

/// One target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownTarget {
    /// The target as written on the command line.
    pub target: String,
    /// `--s3-endpoint`, when it was given (else `AWS_ENDPOINT_URL` applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// UUIDs of the filesystems snapshotted there from this host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filesystems: Vec<String>,
}

/// The file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownTargets {
    /// Targets, in the order first used.
    #[serde(default, rename = "target")]
    pub targets: Vec<KnownTarget>,
}

/// `<dir of config_path>/snapshot-targets.toml`.
pub fn targets_path(config_path: &Path) -> PathBuf {
    match config_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(TARGETS_FILE_NAME),
        _ => PathBuf::from(TARGETS_FILE_NAME),
    }
}

/// Directory of the unchanged-file caches of `snapshot create`, beside
/// the configuration.
pub const CACHE_DIR_NAME: &str = "snapshot-cache";

/// The unchanged-file cache of filesystem `fs_uuid` for `target`
/// ([`kmsfs_snapshot::unchanged`]).
pub fn cache_path(config_path: &Path, fs_uuid: &str, target: &str) -> PathBuf {
    let dir = match config_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(CACHE_DIR_NAME),
        _ => PathBuf::from(CACHE_DIR_NAME),
    };
    dir.join(kmsfs_snapshot::unchanged::cache_file_name(fs_uuid, target))
}

impl KnownTargets {
    /// Reads the list at `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        };
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}; fix or delete the file (snapshot create writes it again)",
                path.display(),
                e.message().trim_end()
            )
        })
    }

    /// Writes the list atomically (mode 0600).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        let text = toml::to_string_pretty(self).context("cannot serialize the target list")?;
        kmsfs_keystore::write_atomic(path, text.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Adds `target` (updating its endpoint) and `fs_uuid` to it; true when
    /// anything changed.
    pub fn add(&mut self, target: &str, s3_endpoint: Option<&str>, fs_uuid: Option<&str>) -> bool {
        let (i, added) = match self.targets.iter().position(|t| t.target == target) {
            Some(i) => (i, false),
            None => {
                self.targets.push(KnownTarget {
                    target: target.to_string(),
                    s3_endpoint: None,
                    filesystems: Vec::new(),
                });
                (self.targets.len() - 1, true)
            }
        };
        let before = self.targets[i].clone();
        let t = &mut self.targets[i];
        if let Some(ep) = s3_endpoint {
            t.s3_endpoint = Some(ep.to_string());
        }
        if let Some(u) = fs_uuid {
            if !t.filesystems.iter().any(|f| f.eq_ignore_ascii_case(u)) {
                t.filesystems.push(u.to_string());
            }
        }
        added || *t != before
    }
}

/// Records a target used by a snapshot command; a failure is a warning on
/// stderr (the snapshot itself is what matters).
pub fn remember_quietly(
    config_path: &Path,
    target: &str,
    s3_endpoint: Option<&str>,
    fs_uuid: Option<&str>,
) {
    let path = targets_path(config_path);
    let r = KnownTargets::load(&path).and_then(|mut t| {
        if t.add(target, s3_endpoint, fs_uuid) {
            t.save(&path)?;
        }
        Ok(())
    });
    if let Err(e) = r {
        eprintln!("kmsfs: warning: target {target} not recorded for `kms check`: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_is_idempotent_and_round_trips() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = targets_path(&d.path().join("etc/kms.toml"));
        assert!(KnownTargets::load(&p).expect("missing").targets.is_empty());
        let mut t = KnownTargets::default();
        assert!(t.add("s3://b/x", None, Some("u1")));
        assert!(!t.add("s3://b/x", None, Some("U1")));
        assert!(t.add("s3://b/x", Some("http://e"), Some("u2")));
        assert!(t.add("/mnt/usb", None, None));
        t.save(&p).expect("save");
        let back = KnownTargets::load(&p).expect("load");
        assert_eq!(back, t);
        assert_eq!(back.targets[0].filesystems, vec!["u1", "u2"]);
        assert_eq!(back.targets[0].s3_endpoint.as_deref(), Some("http://e"));
        std::fs::write(&p, "[[target]]\nbogus = 1\n").expect("write");
        let e = KnownTargets::load(&p).expect_err("bad").to_string();
        assert!(e.contains(TARGETS_FILE_NAME), "{e}");
    }
}
