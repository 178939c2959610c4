//! `kmsfs kms set|show|check` for a KMIP server.

use std::path::Path;

use anyhow::Context as _;
use kmsfs_core::secret::SecretBytes;
use kmsfs_keystore::kmip::{cert, CipherMode, KeyState};
use kmsfs_keystore::{KmipCipher, KmipClient, KmsConfig, KmsError};
use serde_json::json;

use super::{abs_opt, Checks, SetArgs, Status};
use crate::commands::{print_json, runtime};
use crate::fsheader::{read_header, unwrap_slot};
use crate::kmsconfig::registry_path;
use crate::kmsconfig::ConfigSource;
use crate::registry::Registry;
use crate::slotkms::{self, KmsAccess, Reach};
use crate::timefmt::{now_secs, rfc3339_utc};
use kmsfs_core::keys::FsKeys;

/// Certificates expiring within this many days are a WARN in `kms check`.
const EXPIRY_WARN_DAYS: i64 = 30;

/// Usage mask bits Encrypt and Decrypt.
const ENCRYPT_DECRYPT: i32 = 0x4 | 0x8;

/// Operation enumeration values of Encrypt and Decrypt.
const OP_ENCRYPT: u32 = 31;
const OP_DECRYPT: u32 = 32;

/// The configuration `kms set kmip` would save, refusing Vault-only options.
fn config_from_args(a: &SetArgs) -> anyhow::Result<KmsConfig> {
    let vault_only = [
        ("--token-file", a.token_file.is_some()),
        ("--role-id", a.role_id.is_some()),
        ("--secret-id-file", a.secret_id_file.is_some()),
        ("--namespace", a.namespace.is_some()),
        ("--transit-path", a.transit_path != "transit"),
        ("--allow-insecure-http", a.allow_insecure_http),
        ("--auth-path", a.auth_path.is_some()),
        ("--cert-auth", a.cert_auth),
        ("--cert-role", a.cert_role.is_some()),
    ];
    if let Some((flag, _)) = vault_only.iter().find(|(_, given)| *given) {
        anyhow::bail!(
            "{flag} is a Vault option; a KMIP server authenticates kmsfs by its client certificate \
             (--client-cert, --client-key)"
        );
    }
    let need = |v: &Option<std::path::PathBuf>, flag: &str| -> anyhow::Result<std::path::PathBuf> {
        match abs_opt(v)? {
            Some(p) => Ok(p),
            None => anyhow::bail!(
                "{flag} FILE is required for KMIP: mutual TLS is how the server authenticates kmsfs"
            ),
        }
    };
    let addresses: Vec<String> = a
        .addresses
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let mut cfg = KmsConfig::new_kmip(
        addresses,
        a.key_name.clone(),
        need(&a.ca_cert, "--ca-cert")?,
        need(&a.client_cert, "--client-cert")?,
        need(&a.client_key, "--client-key")?,
    );
    cfg.timeout_secs = a.timeout;
    cfg.cipher = match a.cipher.as_deref() {
        None => None,
        Some("auto") => Some(KmipCipher::Auto),
        Some("gcm") => Some(KmipCipher::Gcm),
        Some("cbc") => Some(KmipCipher::Cbc),
        Some(other) => anyhow::bail!("--cipher {other}: use auto, gcm or cbc"),
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("invalid KMIP settings: {e}"))?;
    Ok(cfg)
}

/// Wraps and unwraps random bytes (with a context) and compares them.
async fn probe(client: &KmipClient) -> Result<CipherMode, KmsError> {
    let plain = SecretBytes::random(32).map_err(|e| KmsError::Protocol {
        path: "probe".into(),
        detail: format!("random number generator failed: {e}"),
    })?;
    let ctx = b"kmsfs probe";
    let w = client.wrap(&plain, Some(ctx)).await?;
    let back = client
        .unwrap(&w.key_id, &w.blob, w.uses_context.then_some(&ctx[..]))
        .await?;
    if back != plain {
        return Err(KmsError::Protocol {
            path: "Decrypt".into(),
            detail: "probe: the unwrapped bytes differ from the wrapped ones".into(),
        });
    }
    Ok(w.mode)
}

fn mode_name(m: CipherMode) -> &'static str {
    match m {
        CipherMode::Gcm => "AES-GCM",
        CipherMode::Cbc => "AES-CBC/PKCS#5",
    }
}

/// `kms set kmip`: build, verify (unless --skip-kms-test), save.
pub(super) fn run_set(config_path: &Path, a: &SetArgs) -> anyhow::Result<()> {
    let cfg = config_from_args(a)?;
    // Reads the certificates and the client key (refusing a readable key).
    let client = KmipClient::new(&cfg).context("cannot set up the KMIP client")?;
    if !a.skip_kms_test {
        let rt = runtime()?;
        let (status, mode) = rt
            .block_on(async {
                let st = client.status().await?;
                let mode = probe(&client).await?;
                Ok::<_, KmsError>((st, mode))
            })
            .with_context(|| {
                format!(
                    "KMS check failed for KMIP key '{}' at {}; configuration NOT saved \
                     (fix the problem, or pass --skip-kms-test to save anyway)",
                    cfg.key_name,
                    cfg.addresses.join(", ")
                )
            })?;
        crate::info_eprintln!(
            "verified: KMIP key '{}' (Unique Identifier {}) wraps and unwraps at {} (KMIP {}, {})",
            cfg.key_name,
            status.key.uid,
            status.address,
            status.version,
            mode_name(mode)
        );
    }
    super::unlockable::guard_registered(config_path, &cfg, a.force, !a.skip_kms_test)?;
    if let Some(dir) = config_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    cfg.save(config_path)?;
    super::report_saved(config_path, &cfg, a)
}

/// `kms show` of a KMIP configuration (paths only; no key material).
pub(super) fn show(cfg: &KmsConfig, source: &ConfigSource, as_json: bool) -> anyhow::Result<()> {
    let cipher = cfg.cipher.unwrap_or_default().as_str();
    if as_json {
        let (kind, path) = match source {
            ConfigSource::File(p) => ("file", Some(p.clone())),
            ConfigSource::Environment => ("environment", None),
        };
        let table = cfg.to_table()?;
        return print_json(&json!({
            "source": kind,
            "config_path": path,
            "config": table,
        }));
    }
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(none)".into())
    };
    println!("source:        {source}");
    println!("type:          kmip");
    println!("addresses:     {}", cfg.addresses.join(", "));
    println!("key:           {}", cfg.key_name);
    println!("ca cert:       {}", path(&cfg.ca_cert));
    println!(
        "client cert:   {} (key {})",
        path(&cfg.client_cert),
        path(&cfg.client_key)
    );
    println!("cipher:        {cipher}");
    println!(
        "timeout:       {} s per operation, all addresses",
        cfg.timeout_secs
    );
    Ok(())
}

/// Expiry of the certificates in `path`: FAIL when expired, WARN within
/// 30 days, OK otherwise.
fn expiry_check(c: &mut Checks, name: &str, what: &str, path: &Path) {
    let dates = match cert::expiry_dates(path, what) {
        Ok(d) => d,
        Err(e) => {
            c.add(Status::Fail, name, e.to_string());
            return;
        }
    };
    let now = now_secs();
    let Some(&first) = dates.iter().min() else {
        return;
    };
    let days = (first - now).div_euclid(86_400);
    let when = rfc3339_utc(first);
    if first <= now {
        c.add(
            Status::Fail,
            name,
            format!("{what} {} expired at {when}; replace it", path.display()),
        );
    } else if days < EXPIRY_WARN_DAYS {
        c.add(
            Status::Warn,
            name,
            format!(
                "{what} {} expires at {when} (in {days} day(s)); renew it before then",
                path.display()
            ),
        );
    } else {
        c.add(
            Status::Ok,
            name,
            format!("{what} {} valid until {when}", path.display()),
        );
    }
}

/// Every `kms check` item of a KMIP configuration; `config_path` locates
/// the registry of filesystems whose KMIP slots are tried.
pub(super) fn checks(cfg: &KmsConfig, config_path: &Path, c: &mut Checks) {
    if cfg.addresses.len() == 1 {
        c.add(
            Status::Warn,
            "ha",
            format!(
                "single KMIP address {}: no failover if it is down; list every server of the cluster",
                cfg.addresses[0]
            ),
        );
    } else {
        c.add(
            Status::Ok,
            "ha",
            format!("{} addresses configured", cfg.addresses.len()),
        );
    }
    if let Some(p) = &cfg.ca_cert {
        expiry_check(c, "ca-cert", "CA certificate", p);
    }
    if let Some(p) = &cfg.client_cert {
        expiry_check(c, "client-cert", "client certificate", p);
    }
    let client = match KmipClient::new(cfg) {
        Ok(cl) => cl,
        Err(e) => {
            c.add(Status::Fail, "credentials", e.to_string());
            return;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            c.add(Status::Fail, "runtime", format!("{e:#}"));
            return;
        }
    };
    rt.block_on(async {
        let st = match client.status().await {
            Ok(st) => st,
            Err(e @ (KmsError::KmipKeyNotFound { .. } | KmsError::Config { .. })) => {
                c.add(Status::Fail, "key", e.to_string());
                return;
            }
            Err(e) => {
                c.add(Status::Fail, "reachable", e.to_string());
                return;
            }
        };
        c.add(
            Status::Ok,
            "reachable",
            format!(
                "KMIP server at {} answers (KMIP {}{})",
                st.address,
                st.version,
                st.vendor
                    .as_deref()
                    .map(|v| format!(", {v}"))
                    .unwrap_or_default()
            ),
        );
        if st.supports(OP_ENCRYPT) && st.supports(OP_DECRYPT) {
            c.add(Status::Ok, "operations", "Encrypt and Decrypt supported");
        } else {
            c.add(
                Status::Fail,
                "operations",
                "the server does not list Encrypt and Decrypt in Query",
            );
        }
        let k = &st.key;
        match k.state {
            Some(KeyState::Active) => c.add(
                Status::Ok,
                "key",
                format!(
                    "key '{}' (Unique Identifier {}) is Active{}",
                    cfg.key_name,
                    k.uid,
                    match (k.algorithm, k.length) {
                        (Some(3), Some(bits)) => format!(", AES-{bits}"),
                        _ => String::new(),
                    }
                ),
            ),
            Some(s) => c.add(
                Status::Fail,
                "key",
                format!(
                    "key '{}' (Unique Identifier {}) is {s}, not Active: it cannot wrap or unwrap",
                    cfg.key_name, k.uid
                ),
            ),
            None => c.add(
                Status::Warn,
                "key",
                format!("the server did not report the state of key {}", k.uid),
            ),
        }
        match k.usage_mask {
            Some(m) if m & ENCRYPT_DECRYPT == ENCRYPT_DECRYPT => c.add(
                Status::Ok,
                "key-usage",
                format!("usage mask 0x{m:x} allows Encrypt and Decrypt"),
            ),
            Some(m) => c.add(
                Status::Fail,
                "key-usage",
                format!("usage mask 0x{m:x} does not allow both Encrypt and Decrypt"),
            ),
            None => c.add(
                Status::Warn,
                "key-usage",
                "the server did not report the key's usage mask",
            ),
        }
        if k.algorithm.is_some_and(|a| a != 3) || k.length.is_some_and(|l| l != 256) {
            c.add(
                Status::Warn,
                "key-type",
                format!(
                    "key {} is not AES-256 (algorithm {:?}, length {:?})",
                    k.uid, k.algorithm, k.length
                ),
            );
        }
        if k.state == Some(KeyState::Active) {
            match probe(&client).await {
                Ok(mode) => c.add(
                    Status::Ok,
                    "probe",
                    format!(
                        "wrap and unwrap of random bytes succeeded ({})",
                        mode_name(mode)
                    ),
                ),
                Err(e) => c.add(Status::Fail, "probe", e.to_string()),
            }
        }
        filesystem_checks(cfg, config_path, c).await;
    });
}

/// Per registered filesystem, per KMIP slot this configuration reaches:
/// does the server unwrap it to a key under which the header
/// authenticates? (One Decrypt per slot: cheap.) A slot that cannot be
/// opened is a FAIL when it is the filesystem's only slot, else a WARN.
async fn filesystem_checks(cfg: &KmsConfig, config_path: &Path, c: &mut Checks) {
    let reg_path = registry_path(config_path);
    let reg = match Registry::load(&reg_path) {
        Ok(r) => r,
        Err(e) => {
            c.add(Status::Warn, "registry", format!("{e:#}"));
            return;
        }
    };
    if reg.is_empty() {
        return;
    }
    let access = match KmsAccess::new(cfg) {
        Ok(a) => a,
        Err(e) => {
            c.add(Status::Fail, "credentials", e.to_string());
            return;
        }
    };
    for e in &reg.filesystems {
        let hdr = match read_header(&e.path) {
            Ok(h) => h,
            Err(err) => {
                c.add(Status::Warn, "filesystem", format!("{err:#}"));
                continue;
            }
        };
        let dir = e.path.display();
        let uuid = hdr.unverified().uuid;
        let slots = hdr.unverified().slots.clone();
        for (i, slot) in slots.iter().enumerate() {
            let name = format!("{dir}: {}", slotkms::describe(i, slot));
            if slotkms::reach(cfg, slot) == Reach::OtherType {
                c.add(
                    Status::Ok,
                    "filesystem",
                    format!("{name}: not this KMS: check it with that KMS's configuration"),
                );
                continue;
            }
            let failure = match unwrap_slot(&access, slot, &uuid).await {
                Ok(master) => {
                    let keys = FsKeys::derive(&master, &uuid);
                    match hdr.clone().verify(&keys) {
                        Ok(_) => {
                            c.add(Status::Ok, "filesystem", format!("{name}: opens"));
                            continue;
                        }
                        Err(err) => format!("the header does not authenticate with its key: {err}"),
                    }
                }
                Err(f) => f.to_string(),
            };
            let (status, rest) = if slots.len() == 1 {
                (
                    Status::Fail,
                    " (its only slot: the filesystem cannot be unlocked)",
                )
            } else {
                (Status::Warn, "")
            };
            c.add(
                status,
                "filesystem",
                format!("{name}: CANNOT be opened{rest}: {failure}"),
            );
        }
    }
}
