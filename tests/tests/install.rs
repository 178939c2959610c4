//! `scripts/install` and `scripts/uninstall` into a temporary `--destdir`:
//! every file lands where distributions look for it, the man pages render
//! without warnings, the shells accept the completions, systemd accepts the
//! example units, and uninstall removes exactly what install put there.
//!
//! The scripts install the debug binary the other tests use
//! (`--binary`), so the suite does not build a release binary.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kmsfs_e2e::cli::kmsfs_bin;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .expect("tests/ has a parent")
}

fn script(name: &str, args: &[&str]) -> Output {
    let out = Command::new(workspace_root().join("scripts").join(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{name}: {e}"));
    out
}

fn ok(name: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "scripts/{name} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Every file, link and directory under `root`, as paths relative to it
/// (directories with a trailing `/`).
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let e = e.expect("dir entry");
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                out.insert(format!("{rel}/"));
                walk(root, &p, out);
            } else {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// `man -l` renders `page` with macro warnings on; returns the text.
fn render_man(page: &Path) -> String {
    let out = Command::new("man")
        .args(["--warnings", "-E", "UTF-8", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .expect("run man");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "man -l {} ({}): {stderr}",
        page.display(),
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn install_places_every_file_and_uninstall_removes_exactly_those() {
    assert!(
        have("man"),
        "man is missing: scripts/setup installs man-db (apt-get install man-db)"
    );
    let bin = kmsfs_bin();
    let bin_arg = bin.to_string_lossy().into_owned();
    let dest = tempfile::tempdir().expect("tempdir");
    let d = dest.path();
    // Somebody else's file in a directory install also uses: uninstall must keep it.
    std::fs::create_dir_all(d.join("usr/local/bin")).expect("mkdir");
    std::fs::write(d.join("usr/local/bin/other-tool"), b"#!/bin/sh\n").expect("write");
    let before = tree(d);
    let dest_arg = d.to_string_lossy().into_owned();
    let args = ["--destdir", dest_arg.as_str(), "--binary", bin_arg.as_str()];

    ok("install", script("install", &args));
    let first = tree(d);
    // Idempotent: a second run changes nothing and still succeeds.
    ok("install", script("install", &args));
    assert_eq!(tree(d), first, "a second install changed the tree");

    let p = |rel: &str| d.join(rel);
    let installed = std::fs::read(p("usr/local/bin/kmsfs")).expect("installed binary");
    assert_eq!(installed, std::fs::read(&bin).expect("built binary"));
    let link = std::fs::read_link(p("sbin/mount.kmsfs")).expect("/sbin/mount.kmsfs link");
    assert_eq!(link, Path::new("/usr/local/bin/kmsfs"));
    let link = std::fs::read_link(p("sbin/mount.fuse.kmsfs")).expect("remount helper link");
    assert_eq!(link, Path::new("/usr/local/bin/kmsfs"));

    // Man pages: the three the issue names, plus one per subcommand.
    let man = "usr/local/share/man";
    for (page, must_say) in [
        ("man8/kmsfs.8", "kmsfs-mount(8)"),
        ("man8/kmsfs-mount.8", "--kms-timeout"),
        ("man8/kmsfs-kms-renew.8", "kmsfs-kms-renew"),
        ("man8/mount.kmsfs.8", "kms_timeout=SECONDS"),
        ("man5/kms.toml.5", "token_file"),
    ] {
        let text = render_man(&p(&format!("{man}/{page}")));
        assert!(
            text.contains(must_say),
            "{page} does not say {must_say}:\n{text}"
        );
    }
    let pages: Vec<PathBuf> = ["man5", "man8"]
        .iter()
        .flat_map(|s| std::fs::read_dir(p(&format!("{man}/{s}"))).expect("man dir"))
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(pages.len() > 10, "only {} man pages", pages.len());
    for page in &pages {
        render_man(page);
    }
    // The hidden generator is not in the pages or the help.
    assert!(!p(&format!("{man}/man8/kmsfs-generate.8")).exists());

    // Completions: bash must parse and register a completion for kmsfs.
    let bash = p("usr/local/share/bash-completion/completions/kmsfs");
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"bash -n "$1" && source "$1" && complete -p kmsfs"#)
        .arg("bash")
        .arg(&bash)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "bash rejects {}: {}",
        bash.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let zsh = p("usr/local/share/zsh/site-functions/_kmsfs");
    let fish = p("usr/local/share/fish/vendor_completions.d/kmsfs.fish");
    for (shell, file) in [("zsh", &zsh), ("fish", &fish)] {
        assert!(file.is_file(), "{} missing", file.display());
        if have(shell) {
            let out = Command::new(shell)
                .arg("-n")
                .arg(file)
                .output()
                .expect("run shell");
            assert!(
                out.status.success(),
                "{shell} -n {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            eprintln!(
                "note: {shell} is not installed; {} not syntax-checked",
                file.display()
            );
        }
    }

    // Example units, with the prefix's paths filled in.
    let examples = p("usr/local/share/doc/kmsfs/examples");
    let service = std::fs::read_to_string(examples.join("kmsfs-renew.service")).expect("service");
    assert!(
        service.contains("ExecStart=/usr/local/bin/kmsfs kms renew"),
        "{service}"
    );
    let mount = std::fs::read_to_string(examples.join("mnt-plain.mount")).expect("mount unit");
    for line in [
        "Wants=network-online.target",
        "After=network-online.target",
        "Type=kmsfs",
        "Options=_netdev,",
    ] {
        assert!(mount.contains(line), "mount unit lacks {line}");
    }
    for name in [
        "mnt-plain.mount",
        "kmsfs-renew.service",
        "kmsfs-renew.timer",
    ] {
        let text = std::fs::read_to_string(examples.join(name)).expect("unit");
        assert!(!text.contains('@'), "{name} has an unfilled placeholder");
    }
    verify_units(d, &examples);

    ok(
        "uninstall",
        script("uninstall", &["--destdir", dest_arg.as_str()]),
    );
    assert_eq!(tree(d), before, "uninstall left or removed something");
    // Nothing installed any more: a second uninstall says so and fails.
    let again = script("uninstall", &["--destdir", dest_arg.as_str()]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("install-manifest not found"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

/// `systemd-analyze verify` on the example units, when systemd is here.
/// It checks that ExecStart's program exists and that the `man:` pages in
/// Documentation= open, so the copies verified point at the destdir's
/// binary and `MANPATH` at its pages; any warning (an unknown key, say)
/// fails the test.
fn verify_units(destdir: &Path, examples: &Path) {
    if !have("systemd-analyze") {
        eprintln!("note: systemd-analyze is not installed; example units not verified");
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let bin = destdir.join("usr/local/bin/kmsfs");
    let mut units = Vec::new();
    for name in [
        "mnt-plain.mount",
        "kmsfs-renew.service",
        "kmsfs-renew.timer",
    ] {
        let text = std::fs::read_to_string(examples.join(name)).expect("unit");
        let text = text.replace("/usr/local/bin/kmsfs", &bin.to_string_lossy());
        let path = work.path().join(name);
        std::fs::write(&path, text).expect("write unit");
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .env("MANPATH", destdir.join("usr/local/share/man"))
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .current_dir(work.path())
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}): {stderr}",
        out.status
    );
}

#[test]
fn install_and_uninstall_honour_the_prefix_and_refuse_bad_arguments() {
    let bin = kmsfs_bin();
    let bin_arg = bin.to_string_lossy().into_owned();
    let dest = tempfile::tempdir().expect("tempdir");
    let d = dest.path();
    let dest_arg = d.to_string_lossy().into_owned();
    let with_prefix = [
        "--prefix",
        "/opt/kmsfs",
        "--destdir",
        dest_arg.as_str(),
        "--binary",
        bin_arg.as_str(),
    ];
    ok("install", script("install", &with_prefix));
    assert!(d.join("opt/kmsfs/bin/kmsfs").is_file());
    assert_eq!(
        std::fs::read_link(d.join("sbin/mount.kmsfs")).expect("link"),
        Path::new("/opt/kmsfs/bin/kmsfs")
    );
    let service =
        std::fs::read_to_string(d.join("opt/kmsfs/share/doc/kmsfs/examples/kmsfs-renew.service"))
            .expect("service");
    assert!(service.contains("ExecStart=/opt/kmsfs/bin/kmsfs kms renew"));
    // The default prefix has no manifest here: nothing to remove.
    assert!(!script("uninstall", &["--destdir", dest_arg.as_str()])
        .status
        .success());
    ok(
        "uninstall",
        script(
            "uninstall",
            &["--prefix", "/opt/kmsfs", "--destdir", dest_arg.as_str()],
        ),
    );
    assert!(tree(d).is_empty(), "left behind: {:?}", tree(d));

    // Bad input: one clear error each, nothing written.
    for (args, says) in [
        (vec!["--prefix", "relative/dir"], "absolute path"),
        (vec!["--bogus"], "unknown argument '--bogus'"),
        (
            vec![
                "--destdir",
                dest_arg.as_str(),
                "--binary",
                "/nonexistent/kmsfs",
            ],
            "/nonexistent/kmsfs is not an executable file",
        ),
    ] {
        let out = script("install", &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(tree(d).is_empty(), "a refused install wrote {:?}", tree(d));
}
