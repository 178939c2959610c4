//! `kmsfs kms renew`: renew the configured token once.
//!
//! Mount daemons renew the token themselves; this is for hosts without a
//! mount (an admin host that runs `create` and `rewrap`), from a systemd
//! timer. AppRole and cert logins are made afresh by every command and
//! revoked at its end, so there is nothing to renew for them.

use std::path::Path;

use anyhow::Context as _;
use kmsfs_keystore::{KmsKind, TokenInfo};
use serde_json::json;

use crate::commands::{client, print_json, runtime};
use crate::kmsconfig::load_kms_config;

/// Arguments of `kmsfs kms renew`.
#[derive(Debug, clap::Args)]
pub struct RenewArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `kmsfs kms renew`.
pub fn run_renew(config_path: &Path, a: RenewArgs) -> anyhow::Result<()> {
    let cfg = load_kms_config(config_path)?;
    if cfg.kind != KmsKind::Vault {
        anyhow::bail!(
            "kms renew renews a Vault / OpenBao token; the configured KMS is {} (nothing to renew)",
            cfg.kind.as_str()
        );
    }
    let client = client(&cfg)?;
    if client.credentials().logs_in() {
        return report(
            a.json,
            "nothing to renew: kmsfs logs in (AppRole / certificate) for each command and revokes the token at its end",
            json!({"renewed": false, "reason": "login per command"}),
        );
    }
    if matches!(client.credentials(), kmsfs_keystore::Credentials::Agent) {
        return report(
            a.json,
            "nothing to renew: the agent at VAULT_AGENT_ADDR renews its own token",
            json!({"renewed": false, "reason": "agent"}),
        );
    }
    let rt = runtime()?;
    let addrs = cfg.addresses.join(", ");
    let before: TokenInfo = rt
        .block_on(client.token_info())
        .with_context(|| format!("cannot look up the token at {addrs}"))?;
    if before.ttl == 0 {
        return report(
            a.json,
            "nothing to renew: the token does not expire",
            json!({"renewed": false, "reason": "no expiry", "ttl": 0}),
        );
    }
    if !before.renewable {
        anyhow::bail!(
            "the token is not renewable; it expires in {} s{}: replace it (or its file) with a renewable one",
            before.ttl,
            before
                .expire_time
                .as_deref()
                .map(|t| format!(" (at {t})"))
                .unwrap_or_default()
        );
    }
    let renewed = rt
        .block_on(client.renew_self())
        .with_context(|| format!("cannot renew the token at {addrs}"))?;
    let after = rt.block_on(client.token_info()).ok();
    let expire = after.as_ref().and_then(|t| t.expire_time.clone());
    report(
        a.json,
        &format!(
            "renewed: the token is valid for {} s{} (it had {} s left)",
            renewed.ttl,
            expire
                .as_deref()
                .map(|t| format!(", until {t}"))
                .unwrap_or_default(),
            before.ttl
        ),
        json!({
            "renewed": true,
            "ttl": renewed.ttl,
            "previous_ttl": before.ttl,
            "renewable": renewed.renewable,
            "expire_time": expire,
        }),
    )
}

fn report(as_json: bool, text: &str, value: serde_json::Value) -> anyhow::Result<()> {
    if as_json {
        print_json(&value)
    } else {
        crate::info_println!("{text}");
        Ok(())
    }
}
