//! `kmsfs list`: the registered filesystems.

use std::path::Path;

use serde_json::json;

use crate::commands::{print_json, uuid_string};
use crate::fsheader::read_header;
use crate::kmsconfig::registry_path;
use crate::registry::Registry;

/// Arguments of `kmsfs list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What a registered path holds now.
pub fn entry_status(path: &Path, uuid: &str) -> (bool, String) {
    match read_header(path) {
        Ok(h) => {
            let found = uuid_string(&h.unverified().uuid);
            if found == uuid {
                (true, "ok".into())
            } else {
                (false, format!("holds another filesystem ({found})"))
            }
        }
        Err(e) => (false, format!("{e:#}")),
    }
}

/// Prints the registry, checking each path (without the KMS).
pub fn run_list(config_path: &Path, args: ListArgs) -> anyhow::Result<()> {
    let reg_path = registry_path(config_path);
    let reg = Registry::load(&reg_path)?;
    let rows: Vec<_> = reg
        .filesystems
        .iter()
        .map(|e| {
            let (present, status) = entry_status(&e.path, &e.uuid);
            (e, present, status)
        })
        .collect();
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(e, present, status)| {
                json!({"path": e.path, "uuid": e.uuid, "present": present, "status": status})
            })
            .collect();
        return print_json(&json!(v));
    }
    if rows.is_empty() {
        println!("no registered filesystems ({})", reg_path.display());
        return Ok(());
    }
    for (e, _, status) in rows {
        println!("{}  {}  {}", e.uuid, e.path.display(), status);
    }
    Ok(())
}
