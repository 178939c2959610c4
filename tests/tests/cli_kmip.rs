//! `kmsfs kms set|show|check` with a KMIP server, through the binary,
//! against a real PyKMIP server (keys made with PyKMIP's own client).

use std::os::unix::fs::PermissionsExt;

use kmsfs_e2e::cli::Kmsfs;
use kmsfs_e2e::pykmip::PykmipServer;

fn set_args(server: &PykmipServer, key: &str) -> Vec<String> {
    vec![
        "kms".into(),
        "set".into(),
        "kmip".into(),
        server.addr(),
        key.into(),
        "--ca-cert".into(),
        server.pki.ca_cert.display().to_string(),
        "--client-cert".into(),
        server.client.cert.display().to_string(),
        "--client-key".into(),
        server.client.key.display().to_string(),
        "--timeout".into(),
        "5".into(),
    ]
}

#[test]
fn kms_set_show_check_with_kmip() {
    let mut server = PykmipServer::start().unwrap();
    let uid = server.create_key(Some("kmsfs-fs"), true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("etc/kms.toml");
    let k = Kmsfs::new(&config);

    let set = k.run(set_args(&server, "name:kmsfs-fs")).ok();
    assert!(set.stderr.contains("verified"), "{}", set.stderr);
    assert!(
        set.stderr.contains(&format!("Unique Identifier {uid}")),
        "{}",
        set.stderr
    );
    assert!(
        set.stderr.contains("KMIP 1.4") && set.stderr.contains("AES-GCM"),
        "{}",
        set.stderr
    );
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("type = \"kmip\"") && text.contains("name:kmsfs-fs"),
        "{text}"
    );
    assert!(
        !text.contains("auth") && !text.contains("transit"),
        "{text}"
    );

    let show = k.run(["kms", "show"]).ok();
    assert!(
        show.stdout.contains("type:          kmip"),
        "{}",
        show.stdout
    );
    assert!(show.stdout.contains(&server.addr()), "{}", show.stdout);
    let js = k.run(["kms", "show", "--json"]).ok().json();
    assert_eq!(js["config"]["type"], "kmip");
    assert_eq!(js["config"]["key_name"], "name:kmsfs-fs");

    let check = k.run(["kms", "check"]).ok();
    let out = &check.stdout;
    for want in [
        "OK   reachable",
        "KMIP 1.4",
        "OK   operations",
        "OK   key ",
        "is Active, AES-256",
        "OK   key-usage",
        "OK   probe",
        "AES-GCM",
        "OK   ca-cert",
        "OK   client-cert",
        "WARN ha",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let js = k.run(["kms", "check", "--json"]).ok().json();
    assert_eq!(js["ok"], true);
    assert_eq!(js["failures"], 0);

    // cipher cbc is saved and used.
    let mut args = set_args(&server, &uid);
    args.extend(["--cipher".into(), "cbc".into()]);
    let set = k.run(&args).ok();
    assert!(set.stderr.contains("AES-CBC"), "{}", set.stderr);
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .contains("cipher = \"cbc\""));

    // A deactivated key fails the check, and the server down fails it too.
    server.revoke(&uid, false).unwrap();
    let check = k.run(["kms", "check"]).failed();
    assert!(
        check.stdout.contains("FAIL key") && check.stdout.contains("Deactivated"),
        "{}",
        check.stdout
    );
    server.stop();
    let check = k.run(["kms", "check"]).failed();
    assert!(check.stdout.contains("FAIL reachable"), "{}", check.stdout);
}

#[test]
fn kms_check_warns_about_expiring_certificates() {
    let server = PykmipServer::start().unwrap();
    server.create_key(Some("k"), true).unwrap();
    // Same common name (objects belong to it), valid for 10 days only.
    let short = server.pki.issue_as("short", "kmsfs-client", 10).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let k = Kmsfs::new(dir.path().join("kms.toml"));
    let mut args = set_args(&server, "name:k");
    let i = args.iter().position(|a| a == "--client-cert").unwrap();
    args[i + 1] = short.cert.display().to_string();
    args[i + 3] = short.key.display().to_string();
    k.run(&args).ok();
    let check = k.run(["kms", "check"]).ok();
    assert!(
        check.stdout.contains("WARN client-cert"),
        "{}",
        check.stdout
    );
    assert!(
        check.stdout.contains("in 9 day(s)") || check.stdout.contains("in 10 day(s)"),
        "{}",
        check.stdout
    );
    assert!(check.stdout.contains("OK   ca-cert"), "{}", check.stdout);
}

#[test]
fn kms_set_kmip_refuses_bad_settings() {
    let server = PykmipServer::start().unwrap();
    let uid = server.create_key(None, false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kms.toml");
    let k = Kmsfs::new(&config);

    // A Pre-Active key: verification fails and nothing is saved.
    let r = k.run(set_args(&server, &uid)).failed();
    assert!(
        r.stderr.contains("NOT saved") && r.stderr.contains("Pre-Active"),
        "{}",
        r.stderr
    );
    assert!(!config.exists());

    // An unknown key.
    let r = k.run(set_args(&server, "name:nope")).failed();
    assert!(r.stderr.contains("not found"), "{}", r.stderr);

    // Vault options, a missing certificate, an http:// address.
    let mut a = set_args(&server, &uid);
    a.extend(["--token-file".into(), "/etc/tok".into()]);
    let r = k.run(&a).failed();
    assert!(
        r.stderr.contains("--token-file is a Vault option"),
        "{}",
        r.stderr
    );
    let mut a = set_args(&server, &uid);
    let i = a.iter().position(|x| x == "--ca-cert").unwrap();
    a.drain(i..i + 2);
    let r = k.run(&a).failed();
    assert!(
        r.stderr.contains("--ca-cert FILE is required"),
        "{}",
        r.stderr
    );
    let mut a = set_args(&server, &uid);
    a[3] = format!("https://{}", server.addr());
    let r = k.run(&a).failed();
    assert!(r.stderr.contains("HOST:PORT"), "{}", r.stderr);

    // A client key others can read.
    std::fs::set_permissions(&server.client.key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let r = k.run(set_args(&server, &uid)).failed();
    assert!(r.stderr.contains("chmod 600"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&server.client.key.display().to_string()),
        "{}",
        r.stderr
    );
    assert!(!config.exists());
}
