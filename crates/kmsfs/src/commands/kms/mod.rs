//! `kmsfs kms set|show|unset|check|renew`: the KMS configuration.
//!
//! Vault/OpenBao is handled here; KMIP in [`kmip`]; the CA copy `kms set`
//! saves in [`ca_file`]; token renewal in [`renew`].

mod ca_file;
mod kmip;
mod nodes;
mod renew;
mod snapshot_checks;
mod unlockable;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kmsfs_core::secret::SecretBytes;
use kmsfs_keystore::{read_secret_file, AuthConfig, KmsConfig, KmsError, KmsKind, VaultClient};
use serde_json::json;

use crate::commands::{absolute, client, print_json, runtime};
use crate::fsheader::read_header;
use crate::kmsconfig::{load_kms_config_with_source, registry_path, ConfigSource};
use crate::registry::Registry;
use crate::slotkms::{self, Reach};
use kmsfs_core::header::SlotKms;

/// Arguments of `kmsfs kms`.
#[derive(Debug, clap::Args)]
pub struct KmsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: KmsCommand,
}

/// `kmsfs kms` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KmsCommand {
    /// Configure the KMS (verified before it is saved).
    Set(Box<SetArgs>),
    /// Show the KMS configuration (never secrets).
    Show(ShowArgs),
    /// Remove the KMS configuration.
    Unset(UnsetArgs),
    /// Check the KMS: reachability, authentication, key, probe, best practices.
    Check(CheckArgs),
    /// Renew the configured token (for a systemd timer on hosts without mounts).
    Renew(renew::RenewArgs),
}

/// Arguments of `kmsfs kms set`.
#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// KMS type: `vault` (HashiCorp Vault / OpenBao Transit) or `kmip`.
    #[arg(value_name = "TYPE")]
    pub kms_type: String,
    /// Server address, or several comma-separated: for Vault
    /// `https://vault-1:8200,https://vault-2:8200`, for KMIP `HOST:PORT,HOST:PORT`.
    #[arg(value_name = "ADDRESS[,ADDRESS...]")]
    pub addresses: String,
    /// The key that wraps filesystem master keys: the Transit key name, or
    /// for KMIP the key's Unique Identifier or `name:NAME`.
    #[arg(value_name = "KEY")]
    pub key_name: String,
    /// File holding the token (mode 0600). Without it (and without AppRole)
    /// the token is taken from VAULT_TOKEN / BAO_TOKEN at run time.
    #[arg(long, value_name = "FILE", conflicts_with = "role_id")]
    pub token_file: Option<PathBuf>,
    /// AppRole role id (not secret); requires --secret-id-file.
    #[arg(long, value_name = "ID", requires = "secret_id_file")]
    pub role_id: Option<String>,
    /// File holding the AppRole secret id (mode 0600).
    #[arg(long, value_name = "FILE", requires = "role_id")]
    pub secret_id_file: Option<PathBuf>,
    /// Vault Enterprise / OpenBao namespace.
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Mount path of the Transit engine.
    #[arg(long, value_name = "PATH", default_value = "transit")]
    pub transit_path: String,
    /// Log in with the TLS client certificate (--client-cert / --client-key)
    /// through the cert auth method.
    #[arg(long, requires = "client_cert", conflicts_with_all = ["token_file", "role_id"])]
    pub cert_auth: bool,
    /// The cert auth role to log in as (`auth/cert/certs/NAME`).
    #[arg(long, value_name = "NAME", requires = "cert_auth")]
    pub cert_role: Option<String>,
    /// Mount path of the auth method (default `approle`, or `cert` with --cert-auth).
    #[arg(long, value_name = "PATH")]
    pub auth_path: Option<String>,
    /// PEM file of the CA that signed the server certificate (required for KMIP).
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --client-key).
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM client private key for mutual TLS (mode 0600).
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Deadline of each KMS request, in seconds: every address and every
    /// retry included.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub timeout: u64,
    /// KMIP only: cipher mode to wrap with: `auto` (AES-GCM with KMIP 1.4,
    /// else AES-CBC), `gcm` or `cbc`.
    #[arg(long, value_name = "MODE", value_parser = ["auto", "gcm", "cbc"])]
    pub cipher: Option<String>,
    /// Save without the test `kms set` runs against the KMS (log in, read
    /// the key, wrap and unwrap). TLS certificates are verified regardless.
    #[arg(long)]
    pub skip_kms_test: bool,
    /// Replaced by --skip-kms-test (the old name read like TLS skip-verify).
    #[arg(long, hide = true)]
    pub no_verify: bool,
    /// Vault only: accept a plain http:// address that is not loopback
    /// (the unwrapped master key then crosses the network unencrypted).
    #[arg(long)]
    pub allow_insecure_http: bool,
    /// Save even though registered filesystems cannot be unlocked with the
    /// new configuration.
    #[arg(long)]
    pub force: bool,
    /// Print JSON (what was saved where) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kmsfs kms show`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kmsfs kms unset`.
#[derive(Debug, clap::Args)]
pub struct UnsetArgs {
    /// Remove the configuration even though filesystems are registered.
    #[arg(long)]
    pub force: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kmsfs kms check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// A planned raise of a key's `min_decryption_version` (`KEY=VERSION`,
    /// repeatable): warn about every key slot it would cut off.
    #[arg(long, value_name = "KEY=VERSION")]
    pub planned_min_decryption_version: Vec<String>,
}

/// Runs a `kmsfs kms` subcommand.
pub fn run_kms(config_path: &Path, args: KmsArgs) -> anyhow::Result<()> {
    match args.command {
        KmsCommand::Set(a) => run_set(config_path, *a),
        KmsCommand::Show(a) => run_show(config_path, a),
        KmsCommand::Unset(a) => run_unset(config_path, a),
        KmsCommand::Check(a) => run_check(config_path, a),
        KmsCommand::Renew(a) => renew::run_renew(config_path, a),
    }
}

fn abs_opt(p: &Option<PathBuf>) -> anyhow::Result<Option<PathBuf>> {
    p.as_deref().map(absolute).transpose()
}

/// Builds the configuration `kms set` would save.
fn config_from_args(a: &SetArgs) -> anyhow::Result<KmsConfig> {
    if a.kms_type != "vault" {
        anyhow::bail!(
            "unsupported KMS type '{}': use 'vault' (HashiCorp Vault / OpenBao Transit) or 'kmip' (a KMIP server)",
            a.kms_type
        );
    }
    if a.cipher.is_some() {
        anyhow::bail!("--cipher is a KMIP option; a Vault KMS does not take it");
    }
    let addresses: Vec<String> = a
        .addresses
        .split(',')
        .map(|s| s.trim().trim_end_matches('/').to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let auth = match (&a.role_id, &a.secret_id_file) {
        (Some(role_id), Some(f)) => AuthConfig::AppRole {
            role_id: role_id.clone(),
            secret_id_file: absolute(f)?,
            path: a.auth_path.clone().unwrap_or_else(|| "approle".into()),
        },
        _ if a.cert_auth => AuthConfig::Cert {
            name: a.cert_role.clone(),
            path: a.auth_path.clone().unwrap_or_else(|| "cert".into()),
        },
        _ if a.auth_path.is_some() => {
            anyhow::bail!("--auth-path needs --role-id (AppRole) or --cert-auth")
        }
        _ => AuthConfig::Token {
            token_file: abs_opt(&a.token_file)?,
        },
    };
    let mut cfg = KmsConfig::new(addresses, a.key_name.clone(), auth);
    cfg.transit_path = a.transit_path.trim_matches('/').to_string();
    cfg.namespace = a.namespace.clone().filter(|n| !n.is_empty());
    cfg.ca_cert = abs_opt(&a.ca_cert)?;
    cfg.client_cert = abs_opt(&a.client_cert)?;
    cfg.client_key = abs_opt(&a.client_key)?;
    cfg.timeout_secs = a.timeout;
    cfg.allow_insecure_http = a.allow_insecure_http;
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("invalid KMS settings: {e}"))?;
    Ok(cfg)
}

/// Wraps and unwraps random bytes with `key` (and rewraps them); the
/// derivation context is random when the key is derived.
async fn probe(client: &VaultClient, key: &str, derived: bool) -> Result<(), KmsError> {
    let plain = SecretBytes::random(32).map_err(|e| KmsError::Protocol {
        path: "probe".into(),
        detail: format!("random number generator failed: {e}"),
    })?;
    let ctx_bytes = [0x6bu8; 16];
    let ctx = derived.then_some(&ctx_bytes[..]);
    let wrapped = client.wrap(key, &plain, ctx).await?;
    let back = client.unwrap(key, &wrapped.ciphertext, ctx).await?;
    let mismatch = |op: &str| KmsError::Protocol {
        path: format!("transit/{op}/{key}"),
        detail: "probe: the unwrapped bytes differ from the wrapped ones".into(),
    };
    if back != plain {
        return Err(mismatch("decrypt"));
    }
    let rewrapped = client.rewrap(key, &wrapped.ciphertext, ctx, None).await?;
    let back = client.unwrap(key, &rewrapped.ciphertext, ctx).await?;
    if back != plain {
        return Err(mismatch("rewrap"));
    }
    Ok(())
}

fn run_set(config_path: &Path, a: SetArgs) -> anyhow::Result<()> {
    if a.no_verify {
        anyhow::bail!(
            "--no-verify was renamed --skip-kms-test (it skips the test against the KMS, \
             never TLS certificate verification): use --skip-kms-test"
        );
    }
    if a.kms_type == "kmip" {
        return kmip::run_set(config_path, &a);
    }
    let mut cfg = config_from_args(&a)?;
    // The CA this command verifies with (--ca-cert, else VAULT_CACERT /
    // BAO_CACERT): saved next to the configuration, because a boot-time
    // mount has no VAULT_CACERT.
    // (Over plain http there is no certificate to verify: nothing saved.)
    let ca_source = cfg
        .addresses
        .iter()
        .any(|a| a.starts_with("https://"))
        .then(|| ca_file::ca_in_use(&cfg))
        .flatten();
    if let Some(src) = &ca_source {
        cfg.ca_cert = Some(src.clone());
    }
    if let AuthConfig::AppRole { secret_id_file, .. } = &cfg.auth {
        read_secret_file(secret_id_file, true)?;
    }
    // Reads the token file (refusing a world-readable one) and CA files.
    let client = client(&cfg)?;
    if !a.skip_kms_test {
        let rt = runtime()?;
        let key = cfg.key_name.clone();
        let info = rt
            .block_on(async {
                client.login().await?;
                let info = client.read_key(&key).await?;
                probe(&client, &key, info.derived).await?;
                Ok::<_, KmsError>(info)
            })
            .with_context(|| {
                format!(
                    "KMS check failed for key '{key}' at {}; configuration NOT saved \
                     (fix the problem, or pass --skip-kms-test to save anyway)",
                    cfg.addresses.join(", ")
                )
            })?;
        crate::info_eprintln!(
            "verified: key '{}' (latest version {}{}) wraps and unwraps at {}",
            info.name,
            info.latest_version,
            if info.derived { ", derived" } else { "" },
            cfg.addresses.join(", ")
        );
    }
    // The verifying client (and its login, revoked now) is done with.
    drop(client);
    unlockable::guard_registered(config_path, &cfg, a.force, !a.skip_kms_test)?;
    if let Some(dir) = config_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    if let Some(src) = &ca_source {
        let saved = ca_file::save_ca_copy(config_path, src)?;
        crate::info_eprintln!(
            "saved the CA certificate {} as {} (the configuration names the copy)",
            src.display(),
            saved.display()
        );
        cfg.ca_cert = Some(saved);
    }
    cfg.save(config_path)?;
    if matches!(cfg.auth, AuthConfig::Token { token_file: None }) {
        crate::info_eprintln!(
            "note: no --token-file: the token will be read from VAULT_TOKEN / BAO_TOKEN at run time"
        );
    }
    report_saved(config_path, &cfg, &a)
}

/// What `kms set` prints once the configuration is saved: one line, or
/// with `--json` the file, the KMS type, addresses and key, and whether
/// the KMS was tested (no secret: the configuration holds only paths).
pub(super) fn report_saved(config_path: &Path, cfg: &KmsConfig, a: &SetArgs) -> anyhow::Result<()> {
    if a.json {
        return print_json(&json!({
            "saved": absolute(config_path)?,
            "type": cfg.kind.as_str(),
            "addresses": cfg.addresses,
            "key": cfg.key_name,
            "tested": !a.skip_kms_test,
        }));
    }
    crate::info_println!("KMS configuration saved to {}", config_path.display());
    Ok(())
}

fn auth_description(auth: &AuthConfig) -> String {
    match auth {
        AuthConfig::Token {
            token_file: Some(p),
        } => format!("token from file {}", p.display()),
        AuthConfig::Token { token_file: None } => {
            "token from VAULT_TOKEN / BAO_TOKEN at run time".into()
        }
        AuthConfig::AppRole {
            role_id,
            secret_id_file,
            path,
        } => format!(
            "AppRole at auth/{path}, role id {role_id}, secret id from file {}",
            secret_id_file.display()
        ),
        AuthConfig::Cert { name, path } => format!(
            "TLS certificate login at auth/{path}{}",
            name.as_deref()
                .map(|n| format!(", role {n}"))
                .unwrap_or_default()
        ),
    }
}

fn run_show(config_path: &Path, a: ShowArgs) -> anyhow::Result<()> {
    let (cfg, source) = load_kms_config_with_source(config_path)?;
    if cfg.kind == KmsKind::Kmip {
        return kmip::show(&cfg, &source, a.json);
    }
    if a.json {
        // KmsConfig holds only paths, never a token or secret id.
        let (kind, path) = match &source {
            ConfigSource::File(p) => ("file", Some(p.clone())),
            ConfigSource::Environment => ("environment", None),
        };
        return print_json(&json!({
            "source": kind,
            "config_path": path,
            "config": cfg,
        }));
    }
    println!("source:        {source}");
    println!("type:          vault (Transit)");
    println!("addresses:     {}", cfg.addresses.join(", "));
    println!("key:           {}", cfg.key_name);
    println!("transit path:  {}", cfg.transit_path);
    if let Some(ns) = &cfg.namespace {
        println!("namespace:     {ns}");
    }
    println!("auth:          {}", auth_description(&cfg.auth));
    if let Some(p) = &cfg.ca_cert {
        println!("ca cert:       {}", p.display());
    }
    if let (Some(c), Some(k)) = (&cfg.client_cert, &cfg.client_key) {
        println!("client cert:   {} (key {})", c.display(), k.display());
    }
    println!(
        "timeout:       {} s, {} attempt(s)",
        cfg.timeout_secs, cfg.attempts
    );
    Ok(())
}

fn run_unset(config_path: &Path, a: UnsetArgs) -> anyhow::Result<()> {
    if !config_path.exists() {
        anyhow::bail!("no KMS configuration file at {}", config_path.display());
    }
    let reg_path = registry_path(config_path);
    let reg = Registry::load(&reg_path)?;
    if !reg.is_empty() && !a.force {
        let list: Vec<String> = reg
            .filesystems
            .iter()
            .map(|e| e.path.display().to_string())
            .collect();
        anyhow::bail!(
            "refusing to remove {}: {} registered filesystem(s) need it to be mounted ({}); \
             pass --force to remove it anyway",
            config_path.display(),
            list.len(),
            list.join(", ")
        );
    }
    std::fs::remove_file(config_path)
        .with_context(|| format!("cannot remove {}", config_path.display()))?;
    if a.json {
        return print_json(&json!({"removed": absolute(config_path)?}));
    }
    crate::info_println!("removed {}", config_path.display());
    Ok(())
}

/// The result of one `kms check` item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but against best practice or about to break.
    Warn,
    /// Broken.
    Fail,
}

/// One line of `kms check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// Short name of the check.
    pub check: String,
    /// Outcome.
    pub status: Status,
    /// Explanation.
    pub message: String,
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, status: Status, check: &str, message: impl Into<String>) {
        self.0.push(Check {
            check: check.into(),
            status,
            message: message.into(),
        });
    }
}

/// Runs every check and returns them (no printing).
pub fn collect_checks(config_path: &Path) -> Vec<Check> {
    collect_checks_with(config_path, &Plans::new())
}

/// [`collect_checks`], also warning about the slots that planned
/// `min_decryption_version` raises would cut off.
pub fn collect_checks_with(config_path: &Path, plans: &Plans) -> Vec<Check> {
    let mut c = Checks::default();
    let (cfg, source) = match load_kms_config_with_source(config_path) {
        Ok(x) => x,
        Err(e) => {
            c.add(Status::Fail, "config", format!("{e:#}"));
            return c.0;
        }
    };
    c.add(Status::Ok, "config", format!("from {source}"));
    if cfg.kind == KmsKind::Kmip {
        kmip::checks(&cfg, config_path, &mut c);
        return c.0;
    }
    for a in &cfg.addresses {
        if a.starts_with("http://") {
            c.add(
                Status::Warn,
                "tls",
                format!("{a} uses plain http: tokens and wrapped keys cross the network unencrypted; use https"),
            );
        }
    }
    if cfg.addresses.len() == 1 {
        c.add(
            Status::Warn,
            "ha",
            format!(
                "single KMS address {}: no failover if it is down; list every node of an HA cluster",
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
    let client = match client(&cfg) {
        Ok(cl) => cl,
        Err(e) => {
            c.add(Status::Fail, "credentials", format!("{e:#}"));
            return c.0;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            c.add(Status::Fail, "runtime", format!("{e:#}"));
            return c.0;
        }
    };
    rt.block_on(async_checks(&cfg, &client, config_path, plans, &mut c));
    c.0
}

async fn async_checks(
    cfg: &KmsConfig,
    client: &VaultClient,
    config_path: &Path,
    plans: &Plans,
    c: &mut Checks,
) {
    if !nodes::node_checks(client, c).await {
        return;
    }
    if let Err(e) = client.login().await {
        c.add(Status::Fail, "auth", e.to_string());
        return;
    }
    match client.token_info().await {
        Ok(t) => {
            let is_token = matches!(cfg.auth, AuthConfig::Token { .. });
            if t.ttl == 0 {
                c.add(Status::Ok, "token", "token does not expire");
            } else if is_token && t.ttl < 24 * 3600 {
                c.add(
                    Status::Warn,
                    "token",
                    format!(
                        "token expires in {} (at {}); new mounts and commands will fail after that \
                         (running mounts renew their own): run `kmsfs kms renew` (the example \
                         kmsfs-renew.timer does it every 6 hours), or use AppRole",
                        human_secs(t.ttl),
                        t.expire_time.as_deref().unwrap_or("?")
                    ),
                );
            } else {
                c.add(
                    Status::Ok,
                    "token",
                    format!("token valid for {}", human_secs(t.ttl)),
                );
            }
            if is_token && t.ttl > 0 && !t.renewable {
                c.add(
                    Status::Warn,
                    "token-renewable",
                    "token is not renewable: replace it before it expires",
                );
            }
        }
        Err(KmsError::TokenExpired { detail } | KmsError::PermissionDenied { detail }) => c.add(
            Status::Fail,
            "auth",
            format!("the KMS refused the token (invalid, expired or revoked?): {detail}"),
        ),
        Err(e) => c.add(
            Status::Warn,
            "token",
            format!("cannot look up the token: {e}"),
        ),
    }
    let info = match client.read_key(&cfg.key_name).await {
        Ok(i) => i,
        Err(e) => {
            c.add(Status::Fail, "key", e.to_string());
            return;
        }
    };
    c.add(
        Status::Ok,
        "key",
        format!(
            "key '{}' ({}), latest version {}, min_decryption_version {}{}",
            info.name,
            info.key_type,
            info.latest_version,
            info.min_decryption_version,
            if info.derived { ", derived" } else { "" }
        ),
    );
    if info.exportable {
        c.add(
            Status::Warn,
            "key-exportable",
            format!(
                "key '{}' is exportable: its material can leave the KMS",
                info.name
            ),
        );
    }
    if info.deletion_allowed {
        c.add(
            Status::Warn,
            "key-deletion",
            format!(
                "key '{}' has deletion_allowed: deleting it destroys every filesystem it wraps",
                info.name
            ),
        );
    }
    match probe(client, &cfg.key_name, info.derived).await {
        Ok(()) => c.add(
            Status::Ok,
            "probe",
            "wrap, unwrap and rewrap of random bytes succeeded",
        ),
        Err(e) => c.add(Status::Fail, "probe", e.to_string()),
    }
    filesystem_checks(cfg, client, config_path, plans, c).await;
    snapshot_checks::snapshot_checks(cfg, client, config_path, plans, c).await;
}

/// Planned `min_decryption_version` raises: key name to version.
pub type Plans = std::collections::BTreeMap<String, u32>;

/// Parses `--planned-min-decryption-version KEY=N` values.
pub fn parse_plans(values: &[String]) -> anyhow::Result<Plans> {
    let mut plans = Plans::new();
    for v in values {
        let parsed = v
            .split_once('=')
            .and_then(|(k, n)| Some((k.trim(), n.trim().parse::<u32>().ok()?)))
            .filter(|(k, n)| !k.is_empty() && *n > 0);
        let Some((k, n)) = parsed else {
            anyhow::bail!(
                "--planned-min-decryption-version {v:?}: expected KEY=VERSION, e.g. kmsfs=3"
            );
        };
        plans.insert(k.to_string(), n);
    }
    Ok(plans)
}

/// Per registered filesystem, per key slot on this KMS: can the slot still
/// be opened (its key version not below the key's `min_decryption_version`),
/// and would a planned raise cut it off? Slots of other KMSes are named and
/// left to a check with that KMS's configuration.
async fn filesystem_checks(
    cfg: &KmsConfig,
    client: &VaultClient,
    config_path: &Path,
    plans: &Plans,
    c: &mut Checks,
) {
    let reg_path = registry_path(config_path);
    let reg = match Registry::load(&reg_path) {
        Ok(r) => r,
        Err(e) => {
            c.add(Status::Warn, "registry", format!("{e:#}"));
            return;
        }
    };
    let access = match (reg.is_empty(), crate::slotkms::KmsAccess::new(cfg)) {
        (true, _) => None,
        (false, Ok(a)) => Some(a),
        (false, Err(e)) => {
            c.add(Status::Fail, "credentials", e.to_string());
            None
        }
    };
    let mut key_cache: std::collections::BTreeMap<String, Option<kmsfs_keystore::KeyInfo>> =
        Default::default();
    for e in &reg.filesystems {
        let hdr = match read_header(&e.path) {
            Ok(h) => h,
            Err(err) => {
                c.add(Status::Warn, "filesystem", format!("{err:#}"));
                continue;
            }
        };
        let slots = &hdr.unverified().slots;
        let dir = e.path.display();
        // Slots on this KMS: an address in common; failing that (the
        // configuration's addresses changed), the configured key's slots.
        let reach: Vec<Reach> = slots.iter().map(|s| slotkms::reach(cfg, s)).collect();
        let here = |r: &Reach| matches!(r, Reach::Exact | Reach::SameKms);
        let fallback = !reach.iter().any(here);
        let mine: Vec<usize> = (0..slots.len())
            .filter(|&i| here(&reach[i]) || (fallback && reach[i] == Reach::SameKey))
            .collect();
        for (i, slot) in slots.iter().enumerate() {
            let name = format!("{dir}: slot {i} '{}'", slot.label);
            let v = match (&slot.kms, mine.contains(&i)) {
                (SlotKms::Vault(v), true) => v,
                _ => {
                    c.add(
                        Status::Ok,
                        "filesystem",
                        format!(
                            "{name}: {} at {}, not this KMS: check it with that KMS's configuration",
                            slot.kms_type().as_str(),
                            slot.addresses().join(", ")
                        ),
                    );
                    continue;
                }
            };
            let others: Vec<String> = (0..slots.len())
                .filter(|&j| j != i)
                .map(|j| format!("{j} '{}'", slots[j].label))
                .collect();
            let rest = if others.is_empty() {
                " (its only slot: the filesystem is LOST until this is fixed)".to_string()
            } else {
                format!(" (other slots: {})", others.join(", "))
            };
            if !key_cache.contains_key(&v.key_name) {
                let k = client.read_key(&v.key_name).await.ok();
                key_cache.insert(v.key_name.clone(), k);
            }
            let Some(Some(info)) = key_cache.get(&v.key_name) else {
                c.add(
                    Status::Warn,
                    "filesystem",
                    format!("{name}: cannot read its KMS key '{}'", v.key_name),
                );
                continue;
            };
            let rewrap = format!("kmsfs rewrap {dir} --slot {}", slot.label);
            if v.key_version < info.min_decryption_version {
                c.add(
                    Status::Warn,
                    "filesystem",
                    format!(
                        "{name}: wrapped with key '{}' version {} but min_decryption_version is {}: this slot CANNOT be opened{rest}; lower min_decryption_version to {}, run `{rewrap}`, then raise it again",
                        v.key_name, v.key_version, info.min_decryption_version, v.key_version
                    ),
                );
                continue;
            }
            if let Some(&planned) = plans.get(&v.key_name) {
                if v.key_version < planned {
                    c.add(
                        Status::Warn,
                        "filesystem",
                        format!(
                            "{name}: wrapped with key '{}' version {}: the planned min_decryption_version {planned} would cut it off{rest}; run `{rewrap}` first",
                            v.key_name, v.key_version
                        ),
                    );
                    continue;
                }
            }
            if v.key_version < info.latest_version {
                c.add(
                    Status::Ok,
                    "filesystem",
                    format!(
                        "{name}: key '{}' version {} (latest {}; `{rewrap}` moves it)",
                        v.key_name, v.key_version, info.latest_version
                    ),
                );
            } else {
                c.add(
                    Status::Ok,
                    "filesystem",
                    format!("{name}: key '{}' version {}", v.key_name, v.key_version),
                );
            }
        }
        if let Some(access) = &access {
            unlockable::check_line(access, &e.path, c).await;
        }
    }
    for (key, n) in plans {
        match key_cache.get(key) {
            Some(Some(info)) if *n > info.latest_version => c.add(
                Status::Warn,
                "plan",
                format!(
                    "planned min_decryption_version {n} for key '{key}' is above its latest version {}",
                    info.latest_version
                ),
            ),
            _ => {}
        }
    }
}

fn human_secs(s: u64) -> String {
    if s >= 86_400 {
        format!("{}d{}h", s / 86_400, (s % 86_400) / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{}s", s / 60, s % 60)
    }
}

fn run_check(config_path: &Path, a: CheckArgs) -> anyhow::Result<()> {
    let plans = parse_plans(&a.planned_min_decryption_version)?;
    let checks = collect_checks_with(config_path, &plans);
    let fails = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warns = checks.iter().filter(|c| c.status == Status::Warn).count();
    if a.json {
        print_json(&json!({
            "ok": fails == 0,
            "failures": fails,
            "warnings": warns,
            "checks": checks,
        }))?;
    } else {
        for c in &checks {
            let s = match c.status {
                Status::Ok => "OK  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("{s} {:<16} {}", c.check, c.message);
        }
    }
    if fails > 0 {
        anyhow::bail!("KMS check failed: {fails} failure(s), {warns} warning(s)");
    }
    Ok(())
}
