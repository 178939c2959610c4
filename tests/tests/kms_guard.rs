//! `kms check` FAILs a registered filesystem the configuration cannot
//! unlock; `kms set` refuses such a configuration unless `--force`; with
//! `--json`, errors are one JSON object too (issue 10). Real OpenBao dev
//! server, real binary.

use std::path::Path;

use kmsfs_e2e::bao::{write_token_file, BaoServer};
use kmsfs_e2e::cli::{CliEnv, Run};
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The messages of the `unlock` checks, with their status.
fn unlock_lines(r: &Run) -> Vec<String> {
    r.stdout
        .lines()
        .filter(|l| l.contains(" unlock "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configuration_that_locks_filesystems_out_is_refused_and_failed() {
    let env = CliEnv::new().await;
    let server = env.server.as_ref().expect("server");
    let addr = server.addr().to_string();
    let (cipher, _) = env.create("a").await;

    // Today's configuration opens it: an OK unlock line.
    let r = env.kmsfs.run_async(&["kms", "check"]).await.ok();
    let lines = unlock_lines(&r);
    assert_eq!(lines.len(), 1, "{}", r.stdout);
    assert!(
        lines[0].starts_with("OK") && lines[0].contains(s(&cipher)),
        "{lines:?}"
    );

    // A token that may use only another key cannot unwrap its slot.
    server.create_key("other", false).await.expect("key");
    server
        .put_policy("other", &BaoServer::transit_policy("other"))
        .await
        .expect("policy");
    let t = server.create_token(&["other"], "1h").await.expect("token");
    let other_tf = write_token_file(env.dir.path(), "token-other", &t).expect("token file");
    let set_other = |force: bool| {
        let mut args = vec![
            "kms",
            "set",
            "vault",
            addr.as_str(),
            "other",
            "--token-file",
            s(&other_tf),
        ];
        if force {
            args.push("--force");
        }
        let k = env.kmsfs.clone();
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        async move {
            tokio::task::spawn_blocking(move || k.run(&args))
                .await
                .expect("run")
        }
    };
    let r = set_other(false).await.failed();
    assert!(
        r.stderr.contains("refusing to replace")
            && r.stderr.contains(s(&cipher))
            && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
    let shown = env
        .kmsfs
        .run_async(&["kms", "show", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(shown["config"]["key_name"], "kmsfs", "{shown}");

    // --force saves it, saying what it breaks; `kms check` then FAILs the
    // filesystem, and with --json the error is JSON on stderr.
    let r = set_other(true).await.ok();
    assert!(r.stderr.contains("saving anyway"), "{}", r.stderr);
    let r = env.kmsfs.run_async(&["kms", "check"]).await.failed();
    let lines = unlock_lines(&r);
    assert!(
        lines.len() == 1
            && lines[0].starts_with("FAIL")
            && lines[0].contains(s(&cipher))
            && lines[0].contains("CANNOT be unlocked"),
        "{}",
        r.stdout
    );
    let r = env
        .kmsfs
        .run_async(&["kms", "check", "--json"])
        .await
        .failed();
    assert_eq!(r.json()["ok"], false);
    let err: Value = serde_json::from_str(r.stderr.trim())
        .unwrap_or_else(|e| panic!("stderr is not one JSON object ({e}): {}", r.stderr));
    assert!(
        err["error"]
            .as_str()
            .is_some_and(|m| m.contains("KMS check failed")),
        "{err}"
    );
    assert!(err["causes"].is_array(), "{err}");

    // The original configuration opens it again: accepted without --force.
    env.kmsfs
        .run_async(&[
            "kms",
            "set",
            "vault",
            &addr,
            "kmsfs",
            "--token-file",
            s(&env.token_file),
        ])
        .await
        .ok();
}

/// Errors of commands given --json are one JSON object on stderr (stdout
/// stays for the command's own JSON), with the chain of causes; usage
/// errors too. Without --json they stay text.
#[tokio::test(flavor = "multi_thread")]
async fn errors_of_json_commands_are_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = kmsfs_e2e::cli::Kmsfs::new(dir.path().join("kms.toml"));
    let missing = dir.path().join("missing");
    let r = k.run(["info", s(&missing), "--json"]).failed();
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let v: Value = serde_json::from_str(r.stderr.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.stderr));
    let all = format!("{} {}", v["error"], v["causes"]);
    assert!(all.contains(s(&missing)), "{v}");
    let r = k
        .run(["slot", "list", "--json", "--no-such-option"])
        .failed();
    let v: Value = serde_json::from_str(r.stderr.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.stderr));
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|m| m.contains("--no-such-option")),
        "{v}"
    );
    let r = k.run(["info", s(&missing)]).failed();
    assert!(r.stderr.starts_with("kmsfs: error: "), "{}", r.stderr);
}
