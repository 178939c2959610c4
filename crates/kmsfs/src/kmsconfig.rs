//! Where the KMS configuration comes from: the file given by `--config`
//! (`KMSFS_CONFIG`, default `/etc/kmsfs/kms.toml`) or, when that file does
//! not exist, the usual Vault/OpenBao environment variables.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_keystore::KmsConfig;

/// The default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kmsfs/kms.toml";

/// Where a loaded configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// The TOML file at this path.
    File(PathBuf),
    /// `VAULT_ADDR` / `BAO_ADDR` and friends (the file did not exist).
    Environment,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "file {}", p.display()),
            ConfigSource::Environment => write!(
                f,
                "environment (VAULT_ADDR/BAO_ADDR, VAULT_TOKEN/BAO_TOKEN, KMSFS_TOKEN_FILE, KMSFS_KMS_KEY)"
            ),
        }
    }
}

/// Loads the KMS configuration: the file at `config_path` if it exists,
/// else [`KmsConfig::from_env`], else an error telling the operator to run
/// `kmsfs kms set`. Errors name the file (and line, for malformed TOML).
pub fn load_kms_config(config_path: &Path) -> anyhow::Result<KmsConfig> {
    load_kms_config_with_source(config_path).map(|(cfg, _)| cfg)
}

/// Like [`load_kms_config`], also saying where the configuration came from.
pub fn load_kms_config_with_source(
    config_path: &Path,
) -> anyhow::Result<(KmsConfig, ConfigSource)> {
    match std::fs::symlink_metadata(config_path) {
        Ok(_) => {
            let cfg = KmsConfig::load(config_path)?;
            Ok((cfg, ConfigSource::File(config_path.to_path_buf())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(cfg) = KmsConfig::from_env() {
                cfg.validate().context(
                    "invalid KMS configuration from the environment (VAULT_ADDR/BAO_ADDR)",
                )?;
                return Ok((cfg, ConfigSource::Environment));
            }
            anyhow::bail!(
                "no KMS configuration: {} does not exist and VAULT_ADDR/BAO_ADDR is not set; \
                 run `kmsfs kms set vault <ADDRESS> <KEY-NAME> --token-file FILE` \
                 (or pass --config / set KMSFS_CONFIG)",
                config_path.display()
            )
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot access {}: {e}",
            config_path.display()
        )),
    }
}

/// The registry file that sits beside the configuration file
/// (`<dir of config_path>/registry.toml`).
pub fn registry_path(config_path: &Path) -> PathBuf {
    match config_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(crate::registry::REGISTRY_FILE_NAME),
        _ => PathBuf::from(crate::registry::REGISTRY_FILE_NAME),
    }
}
