//! Test suites no one here wrote, run against a real kmsfs mount:
//! pjdfstest (POSIX semantics), fsx (data integrity under random
//! operations) and stress-ng's filesystem stressors. `scripts/setup`
//! installs them; results are recorded in docs/compat.md.

use kmsfs_core::keys::MasterKey;
use kmsfs_e2e::fuse::{fresh_cipherdir, MountGuard};
use kmsfs_fuse::MountSettings;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Mounted {
    _tmp: tempfile::TempDir,
    guard: Option<MountGuard>,
    plain: PathBuf,
}

fn mount(allow_other: bool) -> Mounted {
    mount_with(MountSettings {
        allow_other,
        // As `kmsfs mount` does: ACLs with allow_other.
        posix_acl: allow_other,
        threads: 4,
        ..Default::default()
    })
}

fn mount_with(settings: MountSettings) -> Mounted {
    let tmp = tempfile::tempdir().unwrap();
    let cipher = tmp.path().join("cipher");
    let plain = tmp.path().join("plain");
    fs::create_dir(&cipher).unwrap();
    fs::create_dir(&plain).unwrap();
    fresh_cipherdir(&cipher).unwrap();
    // The suites run as other users, who must reach the temp dir.
    fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let guard = MountGuard::mount_with(&cipher, &plain, &MasterKey::generate().unwrap(), &settings)
        .unwrap();
    Mounted {
        _tmp: tmp,
        guard: Some(guard),
        plain,
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(g) = self.guard.take() {
            let _ = g.unmount();
        }
    }
}

fn tool(name: &str) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = Path::new(&home).join(".cargo/bin").join(name);
    if p.exists() {
        p
    } else {
        PathBuf::from(name)
    }
}

/// Counts from pjdfstest's last line, "Summary: F failed, S skipped, P
/// passed, E expected failures, T total", and its FAILED lines.
struct PjdResult {
    failed: usize,
    skipped: usize,
    passed: usize,
    failures: Vec<String>,
    summary: String,
}

/// Runs pjdfstest with `conf` in `work` (and `secondary` for EXDEV) on the
/// tests whose names contain one of `patterns` (all when empty).
fn run_pjdfstest(conf: &Path, work: &Path, secondary: &Path, patterns: &[&str]) -> PjdResult {
    let out = Command::new(tool("pjdfstest"))
        .arg("-c")
        .arg(conf)
        .arg("-p")
        .arg(work)
        .arg("-s")
        .arg(secondary)
        .args(patterns)
        .output()
        .expect("pjdfstest is installed by scripts/setup");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| {
            panic!(
                "no summary from pjdfstest:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string();
    let count = |what: &str| -> usize {
        summary
            .trim_start_matches("Summary: ")
            .split(", ")
            .find(|part| part.ends_with(what))
            .and_then(|part| part.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no '{what}' count in {summary}"))
    };
    PjdResult {
        failed: count("failed"),
        skipped: count("skipped"),
        passed: count("passed"),
        failures: stdout
            .lines()
            .filter(|l| l.contains("FAILED") || l.contains("Err"))
            .map(str::to_string)
            .collect(),
        summary,
    }
}

#[test]
fn pjdfstest_passes() {
    let m = mount(true);
    let features = "[features]\nposix_fallocate = {}\nrename_ctime = {}\nutimensat = {}\n\
                    utime_now = {}\n\n";
    let auth = "[dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"]]\n";
    let conf = m._tmp.path().join("pjdfstest.toml");
    fs::write(&conf, format!("{features}{auth}")).unwrap();
    // The EROFS tests remount the filesystem read-only and back with
    // `mount -o remount,ro`, which runs kmsfs's remount helper.
    let remount_conf = m._tmp.path().join("pjdfstest-remount.toml");
    fs::write(
        &remount_conf,
        format!("{features}[settings]\nallow_remount = true\n\n{auth}"),
    )
    .unwrap();
    let _helper = kmsfs_e2e::cli::RemountHelper::install();
    let work = m.plain.join("pjd");
    fs::create_dir(&work).unwrap();
    fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    // A directory on another filesystem (the temporary directory's), for
    // the EXDEV tests of rename and link.
    let secondary = m._tmp.path().join("secondary");
    fs::create_dir(&secondary).unwrap();
    fs::set_permissions(
        &secondary,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    // Everything but the EROFS tests (skipped without allow_remount)...
    let all = run_pjdfstest(&conf, &work, &secondary, &[]);
    println!("pjdfstest {}", all.summary);
    println!("{}", all.failures.join("\n"));
    assert_eq!(
        all.failed,
        0,
        "pjdfstest: {}\n{}",
        all.summary,
        all.failures.join("\n")
    );
    // ...then those in a process of their own: run after the others in one
    // process, 6 of them find the mount busy (pjdfstest still has a file
    // open for writing from an earlier test), on ext4 itself as well.
    let erofs = run_pjdfstest(&remount_conf, &work, &secondary, &["erofs"]);
    println!("pjdfstest erofs {}", erofs.summary);
    assert_eq!(
        (erofs.failed, erofs.skipped, erofs.passed),
        (0, 0, 13),
        "pjdfstest erofs: {}\n{}",
        erofs.summary,
        erofs.failures.join("\n")
    );
    // Only link::emlink stays skipped (FUSE reports no LINK_MAX).
    assert_eq!(all.skipped, 13 + 1, "pjdfstest: {}", all.summary);
    println!("pjdfstest: {} passed in all", all.passed + erofs.passed);
}

#[test]
fn fsx_fifty_thousand_operations() {
    run_fsx(mount(false));
}

/// The same run on a `shared_storage` mount: no writeback cache, no
/// attribute or entry caching.
#[test]
fn fsx_fifty_thousand_operations_shared_storage() {
    run_fsx(mount_with(MountSettings {
        threads: 4,
        shared_storage: true,
        ..Default::default()
    }));
}

fn run_fsx(m: Mounted) {
    let artifacts = m._tmp.path().join("fsx-artifacts");
    fs::create_dir(&artifacts).unwrap();
    let out = Command::new(tool("fsx"))
        .args(["-N", "50000", "-S", "20261128", "-P"])
        .arg(&artifacts)
        .arg(m.plain.join("fsx-file"))
        .output()
        .expect("fsx is installed by scripts/setup");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("fsx: {}", text.lines().last().unwrap_or(""));
    assert!(out.status.success(), "fsx failed:\n{text}");
    assert!(text.contains("A-OK"), "fsx did not report A-OK:\n{text}");
}

#[test]
fn stress_ng_file_stressors_verify() {
    let m = mount(false);
    let work = m.plain.join("stress");
    fs::create_dir(&work).unwrap();
    let out = Command::new("stress-ng")
        .args([
            "--hdd",
            "2",
            "--hdd-bytes",
            "8M",
            "--dir",
            "2",
            "--rename",
            "2",
            "--link",
            "2",
            "--symlink",
            "2",
            "--fallocate",
            "2",
            "--fallocate-bytes",
            "8M",
            "--verify",
            "--timeout",
            "20s",
            "--metrics-brief",
            "--temp-path",
        ])
        .arg(&work)
        .output()
        .expect("stress-ng is installed by scripts/setup");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "stress-ng failed:\n{text}");
    assert!(
        !text.contains("verify failed") && !text.contains("fail:"),
        "{text}"
    );
}
