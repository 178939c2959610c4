//! The registry of filesystems created on this host: `registry.toml` beside
//! the KMS configuration file.
//!
//! ```toml
//! [[filesystem]]
//! path = "/srv/secret"
//! uuid = "6b6d7366-732d-4000-8000-000000000001"
//! kcv = "7c2db665185fbea28f8bf15d867e7f75"
//! ```
//!
//! `kmsfs create` adds an entry, `kmsfs list`, `kmsfs rewrap --all` and
//! `kmsfs kms check` read it, `kmsfs mount` checks the header's UUID and
//! the unwrapped key's check value (`kcv`) against it, `kmsfs kms unset` refuses to run while it has
//! entries. A missing registry is an empty one. The file holds no secret;
//! it is written atomically with mode 0600 like the configuration.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::keycheck::KeyCheck;

/// File name of the registry, in the configuration's directory.
pub const REGISTRY_FILE_NAME: &str = "registry.toml";

/// One registered filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Absolute path of the backing directory.
    pub path: PathBuf,
    /// Filesystem UUID, hyphenated.
    pub uuid: String,
    /// Key check value of the master key, recorded at create (absent in
    /// entries written before kmsfs recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kcv: Option<KeyCheck>,
}

/// The registry contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Registered filesystems, in creation order.
    #[serde(default, rename = "filesystem")]
    pub filesystems: Vec<Entry>,
}

impl Registry {
    /// Reads the registry at `path`; a missing file is an empty registry.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        };
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| {
                    format!(
                        ", line {}",
                        text[..s.start.min(text.len())].matches('\n').count() + 1
                    )
                })
                .unwrap_or_default();
            anyhow::anyhow!("{}{line}: {}", path.display(), e.message().trim_end())
        })
    }

    /// Writes the registry atomically (mode 0600), creating its directory
    /// if needed.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        let text = toml::to_string_pretty(self).context("cannot serialize the registry")?;
        kmsfs_keystore::write_atomic(path, text.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Adds (or replaces, for the same path) an entry.
    pub fn add(&mut self, entry: Entry) {
        self.filesystems.retain(|e| e.path != entry.path);
        self.filesystems.push(entry);
    }

    /// The entry for the backing directory `path` (absolute, canonical).
    pub fn by_path(&self, path: &Path) -> Option<&Entry> {
        self.filesystems.iter().find(|e| e.path == path)
    }

    /// The entry for the filesystem `uuid` (hyphenated), wherever it is now.
    pub fn by_uuid(&self, uuid: &str) -> Option<&Entry> {
        self.filesystems
            .iter()
            .find(|e| e.uuid.eq_ignore_ascii_case(uuid))
    }

    /// True when no filesystem is registered.
    pub fn is_empty(&self) -> bool {
        self.filesystems.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_is_empty_and_round_trips() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("sub/registry.toml");
        assert!(Registry::load(&p).expect("load").is_empty());
        let mut r = Registry::default();
        r.add(Entry {
            path: "/a".into(),
            uuid: "u1".into(),
            kcv: None,
        });
        r.add(Entry {
            path: "/b".into(),
            uuid: "u2".into(),
            kcv: Some("000102030405060708090a0b0c0d0e0f".parse().expect("kcv")),
        });
        r.add(Entry {
            path: "/a".into(),
            uuid: "u3".into(),
            kcv: None,
        });
        r.save(&p).expect("save");
        let back = Registry::load(&p).expect("load");
        assert_eq!(back, r);
        assert_eq!(back.filesystems.len(), 2);
        assert_eq!(
            back.by_path(Path::new("/a")).map(|e| e.uuid.as_str()),
            Some("u3")
        );
        assert_eq!(
            back.by_uuid("U2")
                .and_then(|e| e.kcv)
                .map(|k| k.to_string()),
            Some("000102030405060708090a0b0c0d0e0f".into())
        );
        assert!(back.by_path(Path::new("/c")).is_none());
        // Entries written before the key check value existed still load.
        std::fs::write(&p, "[[filesystem]]\npath = \"/x\"\nuuid = \"u\"\n").expect("write");
        assert_eq!(
            Registry::load(&p).expect("old entry").filesystems[0].kcv,
            None
        );
    }

    #[test]
    fn malformed_key_check_names_file_and_line() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("registry.toml");
        std::fs::write(
            &p,
            "[[filesystem]]\npath = \"/x\"\nuuid = \"u\"\nkcv = \"abc\"\n",
        )
        .expect("write");
        let e = Registry::load(&p).expect_err("bad kcv").to_string();
        assert!(
            e.contains("registry.toml") && e.contains("line 4") && e.contains("hex digits"),
            "{e}"
        );
    }

    #[test]
    fn malformed_names_file_and_line() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("registry.toml");
        std::fs::write(&p, "[[filesystem]]\npath = /x\n").expect("write");
        let e = Registry::load(&p).expect_err("malformed").to_string();
        assert!(e.contains("registry.toml") && e.contains("line 2"), "{e}");
    }
}
