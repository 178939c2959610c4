//! The CA certificate `kms set` verified with, saved next to the
//! configuration.
//!
//! An operator often runs `kms set` with `VAULT_CACERT` in the shell, or a
//! `--ca-cert` in a home directory; a mount at boot has neither. So `kms
//! set` copies the CA file it used to `<config stem>-ca.pem` beside the
//! configuration (`/etc/kmsfs/kms-ca.pem` for `/etc/kmsfs/kms.toml`),
//! atomically, mode 0644 (a CA certificate is public), owned by the caller
//! (root for `/etc/kmsfs`), and the configuration names the copy.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_keystore::{write_atomic, KmsConfig};

use crate::commands::absolute;

/// Largest CA file accepted (a bundle of a few certificates is a few KiB).
const MAX_CA_FILE: u64 = 1024 * 1024;

/// The CA file a client built from `cfg` verifies with: `ca_cert`, else
/// `VAULT_CACERT` / `BAO_CACERT` (made absolute). `None`: the OS trust store.
pub(super) fn ca_in_use(cfg: &KmsConfig) -> Option<PathBuf> {
    cfg.ca_cert.clone().or_else(|| {
        ["VAULT_CACERT", "BAO_CACERT"]
            .iter()
            .filter_map(std::env::var_os)
            .find(|v| !v.is_empty())
            .map(PathBuf::from)
            .map(|p| absolute(&p).unwrap_or(p))
    })
}

/// Where the copy of the CA for the configuration at `config_path` goes.
pub(super) fn ca_copy_path(config_path: &Path) -> anyhow::Result<PathBuf> {
    let config = absolute(config_path)?;
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kms".into());
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(dir.join(format!("{stem}-ca.pem")))
}

/// Copies the PEM file `src` next to the configuration and returns the
/// copy's path (`src` itself when it already is that file).
pub(super) fn save_ca_copy(config_path: &Path, src: &Path) -> anyhow::Result<PathBuf> {
    let dest = ca_copy_path(config_path)?;
    let mut pem = Vec::new();
    std::fs::File::open(src)
        .with_context(|| format!("cannot read the CA certificate {}", src.display()))?
        .take(MAX_CA_FILE + 1)
        .read_to_end(&mut pem)
        .with_context(|| format!("cannot read the CA certificate {}", src.display()))?;
    if pem.len() as u64 > MAX_CA_FILE
        || !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----")
    {
        anyhow::bail!(
            "{} is not a PEM CA certificate (no BEGIN CERTIFICATE block, or larger than \
             {MAX_CA_FILE} bytes); give the CA that signed the KMS's certificate with --ca-cert",
            src.display()
        );
    }
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(src), std::fs::canonicalize(&dest)) {
        if a == b {
            return Ok(dest);
        }
    }
    write_atomic(&dest, &pem, 0o644)
        .with_context(|| format!("cannot write the CA copy {}", dest.display()))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_copy_sits_next_to_the_configuration_0644() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("my-ca.crt");
        std::fs::write(
            &src,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let cfg = d.path().join("etc/dr.toml");
        std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
        let copy = save_ca_copy(&cfg, &src).unwrap();
        assert_eq!(copy, d.path().join("etc/dr-ca.pem"));
        assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&src).unwrap());
        let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // Saving the copy again (kms set --ca-cert with the saved file) keeps it.
        assert_eq!(save_ca_copy(&cfg, &copy).unwrap(), copy);
        std::fs::write(&src, "not a certificate").unwrap();
        let e = save_ca_copy(&cfg, &src).unwrap_err().to_string();
        assert!(e.contains("my-ca.crt") && e.contains("--ca-cert"), "{e}");
    }
}
