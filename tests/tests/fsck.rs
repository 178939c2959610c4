//! `kmsfs fsck` end to end: a real OpenBao dev server, the real binary, a
//! tree filled through a real FUSE mount, then copies of its backing
//! directory each damaged one way and checked.

use kmsfs_e2e::cli::{CliEnv, Run};
use kmsfs_e2e::fuse::{daemon_pids, is_mounted, CliMountGuard, Rng};
use serde_json::Value;
use std::ffi::CString;
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Exit codes of fsck(8).
const CLEAN: i32 = 0;
const CORRECTED: i32 = 1;
const LEFT: i32 = 4;
const OPERATIONAL: i32 = 8;

/// A file name whose encoding is longer than 255 bytes (a hashed long name).
fn long(c: char) -> String {
    std::iter::repeat_n(c, 200).collect()
}

/// The plaintext tree: every regular file has a distinct size, so its
/// backing file is found by its length (backing = header + plaintext).
const TINY: &[u8] = b"hello";
const MID_LEN: usize = 5000;
/// Several 1 MiB read chunks, and not a multiple of the data unit.
const BIG_LEN: usize = 3 * 1024 * 1024 + 7;
const DEEP_LEN: usize = 4096;
const LONG_L_LEN: usize = 777;
const LONG_M_LEN: usize = 1234;
const INNER_LEN: usize = 100;

struct Env {
    cli: CliEnv,
    /// The filled, unmounted backing directory that copies are made from.
    pristine: PathBuf,
    copies: u32,
}

impl Env {
    async fn new() -> Env {
        let cli = CliEnv::new().await;
        let pristine = cli.path("pristine");
        let mut env = Env {
            cli,
            pristine,
            copies: 0,
        };
        env.fill().await;
        env
    }

    /// Creates the filesystem and fills it through a real mount.
    async fn fill(&mut self) {
        let plain = self.cli.path("plain");
        fs::create_dir(&plain).unwrap();
        self.cli
            .kmsfs
            .run_async(&["create", self.pristine.to_str().unwrap()])
            .await
            .ok();
        let _guard = CliMountGuard(plain.clone());
        self.cli
            .kmsfs
            .run_async(&[
                "mount",
                self.pristine.to_str().unwrap(),
                plain.to_str().unwrap(),
            ])
            .await
            .ok();
        assert!(is_mounted(&plain));
        let mut rng = Rng::new(8);
        let write = |p: PathBuf, data: &[u8]| {
            let mut f = fs::File::create(p).unwrap();
            f.write_all(data).unwrap();
            f.sync_all().unwrap();
        };
        write(plain.join("tiny.txt"), TINY);
        write(plain.join("empty"), b"");
        write(plain.join("mid.bin"), &rng.bytes(MID_LEN));
        write(plain.join("big.bin"), &rng.bytes(BIG_LEN));
        for (n, v) in [("user.note", "kept"), ("user.other", "also kept")] {
            let st = Command::new("setfattr")
                .args(["-n", n, "-v", v])
                .arg(plain.join("mid.bin"))
                .status()
                .unwrap();
            assert!(st.success(), "setfattr");
        }
        mkfifo(&plain.join("fifo"));
        let sub = plain.join("sub");
        fs::create_dir_all(sub.join("deeper")).unwrap();
        write(sub.join("deeper/deep.bin"), &rng.bytes(DEEP_LEN));
        write(sub.join(long('L')), &rng.bytes(LONG_L_LEN));
        write(sub.join(long('M')), &rng.bytes(LONG_M_LEN));
        std::os::unix::fs::symlink("../tiny.txt", sub.join("link")).unwrap();
        fs::create_dir(sub.join(long('D'))).unwrap();
        write(sub.join(long('D')).join("inner"), &rng.bytes(INNER_LEN));
        assert_eq!(fs::read(sub.join("link")).unwrap(), TINY);
        self.cli
            .kmsfs
            .run_async(&["umount", plain.to_str().unwrap()])
            .await
            .ok();
        // The daemon has flushed everything once it has exited.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !daemon_pids(&plain).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(daemon_pids(&plain).is_empty(), "daemon still running");
    }

    /// A fresh copy of the filled backing directory (modes, FIFOs, symlinks kept).
    fn copy(&mut self) -> PathBuf {
        self.copies += 1;
        let dst = self.cli.path(&format!("copy{}", self.copies));
        let st = Command::new("cp")
            .arg("-a")
            .arg(&self.pristine)
            .arg(&dst)
            .status()
            .unwrap();
        assert!(st.success(), "cp -a failed");
        dst
    }

    /// Runs `kmsfs fsck DIR EXTRA...` with a guard against a hang.
    async fn fsck(&self, dir: &Path, extra: &[&str]) -> Run {
        let mut args = vec!["fsck", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        tokio::time::timeout(Duration::from_secs(300), self.cli.kmsfs.run_async(&args))
            .await
            .expect("kmsfs fsck hung")
    }

    /// Runs `fsck --json`, checks the exit code and that the JSON document
    /// agrees with it, and returns the document.
    async fn fsck_json(&self, dir: &Path, extra: &[&str], code: i32) -> Value {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let run = self.fsck(dir, &args).await;
        assert_eq!(
            run.code, code,
            "stdout:\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        );
        let v = run.json();
        assert_eq!(v["exit_code"], code, "{v:#}");
        let problems = v["problems"].as_array().expect("problems");
        assert_eq!(v["counts"]["problems"], problems.len(), "{v:#}");
        let repaired = problems.iter().filter(|p| p["repaired"] == true).count();
        assert_eq!(v["counts"]["repaired"], repaired, "{v:#}");
        assert_eq!(v["counts"]["left"], problems.len() - repaired, "{v:#}");
        v
    }
}

/// The backing attribute names of `p`.
fn xattr_names(p: &Path) -> Vec<String> {
    let out = Command::new("getfattr")
        .args(["-d", "-m", "-", "--absolute-names"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(n, _)| n.to_string()))
        .collect()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let (c, n) = (
        CString::new(p.as_os_str().as_bytes()).unwrap(),
        CString::new(name).unwrap(),
    );
    // SAFETY: valid C strings and a value valid for its length.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(r, 0, "mkfifo {p:?}");
}

/// The backing entries of `dir`, without kmsfs's own files.
fn entries(dir: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            (p, m)
        })
        .filter(|(p, _)| {
            let n = p.file_name().unwrap().to_str().unwrap();
            !n.starts_with("kmsfs.") || (n.starts_with("kmsfs.longname.") && !n.ends_with(".name"))
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The backing file holding `plain_len` plaintext bytes in `dir`.
fn file_of_len(dir: &Path, plain_len: usize) -> PathBuf {
    let want = kmsfs_core::contents::FILE_HEADER_LEN + plain_len as u64;
    let found: Vec<_> = entries(dir)
        .into_iter()
        .filter(|(_, m)| m.is_file() && m.len() == want)
        .collect();
    assert_eq!(found.len(), 1, "one file of {want} bytes in {dir:?}");
    found[0].0.clone()
}

/// The one subdirectory of `dir` whose name is (not) a hashed long name.
fn subdir(dir: &Path, long_name: bool) -> PathBuf {
    let found: Vec<_> = entries(dir)
        .into_iter()
        .filter(|(p, m)| {
            m.is_dir()
                && p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("kmsfs.longname.")
                    == long_name
        })
        .collect();
    assert_eq!(found.len(), 1, "one such directory in {dir:?}");
    found[0].0.clone()
}

fn sidecar(entry: &Path) -> PathBuf {
    let mut s = entry.as_os_str().to_owned();
    s.push(".name");
    PathBuf::from(s)
}

/// The backing paths of the sample tree in the backing directory `c`.
struct Tree {
    sub: PathBuf,
    deeper: PathBuf,
    long_dir: PathBuf,
    mid: PathBuf,
    big: PathBuf,
    long_l: PathBuf,
    long_m: PathBuf,
    link: PathBuf,
    inner: PathBuf,
}

fn tree(c: &Path) -> Tree {
    let sub = subdir(c, false);
    let link: Vec<_> = entries(&sub)
        .into_iter()
        .filter(|(_, m)| m.file_type().is_symlink())
        .collect();
    assert_eq!(link.len(), 1);
    let long_dir = subdir(&sub, true);
    Tree {
        deeper: subdir(&sub, false),
        mid: file_of_len(c, MID_LEN),
        big: file_of_len(c, BIG_LEN),
        long_l: file_of_len(&sub, LONG_L_LEN),
        long_m: file_of_len(&sub, LONG_M_LEN),
        link: link[0].0.clone(),
        inner: file_of_len(&long_dir, INNER_LEN),
        long_dir,
        sub,
    }
}

/// The problems of `kind` in a JSON report.
fn of_kind<'a>(v: &'a Value, kind: &str) -> Vec<&'a Value> {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == kind)
        .collect()
}

/// Asserts the report holds exactly one problem, of `kind`, at `backing`,
/// with plaintext path `plain` (`None`: unknown), and returns it.
fn only<'a>(v: &'a Value, kind: &str, backing: &Path, plain: Option<&str>) -> &'a Value {
    let all = v["problems"].as_array().unwrap();
    assert_eq!(all.len(), 1, "exactly one problem expected: {v:#}");
    let p = &all[0];
    assert_eq!(p["kind"], kind, "{v:#}");
    assert_eq!(p["backing_path"], backing.to_str().unwrap(), "{v:#}");
    match plain {
        Some(s) => assert_eq!(p["plaintext_path"], s, "{v:#}"),
        None => assert!(p["plaintext_path"].is_null(), "{v:#}"),
    }
    assert_eq!(p["repaired"], false, "{v:#}");
    p
}

fn flip_byte(p: &Path, off: u64) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], off).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn fsck_reports_each_kind_of_damage_by_path() {
    let mut env = Env::new().await;
    let long_l = format!("/sub/{}", long('L'));
    let inner = format!("/sub/{}/inner", long('D'));

    // Clean: exit 0, every byte of every file read, text and JSON agree.
    let c = env.copy();
    let v = env.fsck_json(&c, &[], CLEAN).await;
    assert_eq!(v["counts"]["problems"], 0, "{v:#}");
    assert_eq!(v["counts"]["directories"], 4, "{v:#}");
    assert_eq!(v["counts"]["files"], 8, "{v:#}");
    assert_eq!(v["counts"]["symlinks"], 1, "{v:#}");
    assert_eq!(v["counts"]["special"], 1, "{v:#}");
    let total = TINY.len() + MID_LEN + BIG_LEN + DEEP_LEN + LONG_L_LEN + LONG_M_LEN + INNER_LEN;
    assert_eq!(v["counts"]["bytes"], total, "{v:#}");
    let text = env.fsck(&c, &[]).await;
    assert_eq!(text.code, CLEAN, "{}{}", text.stdout, text.stderr);
    assert!(text.stdout.contains("clean"), "{}", text.stdout);
    assert!(
        text.stdout.contains(&format!("{total} bytes")),
        "{}",
        text.stdout
    );

    // Orphan sidecar: 4; --repair removes it (1); then clean (0).
    let c = env.copy();
    let t = tree(&c);
    fs::remove_file(&t.long_l).unwrap();
    let side = sidecar(&t.long_l);
    let v = env.fsck_json(&c, &[], LEFT).await;
    only(&v, "orphan_sidecar", &side, None);
    assert!(side.exists(), "a check without --repair changed the store");
    let v = env.fsck_json(&c, &["--repair"], CORRECTED).await;
    assert_eq!(of_kind(&v, "orphan_sidecar").len(), 1, "{v:#}");
    assert_eq!(v["problems"][0]["repaired"], true, "{v:#}");
    assert!(!side.exists(), "--repair left the orphan sidecar");
    env.fsck_json(&c, &[], CLEAN).await;
    // The text form says the same.
    fs::write(&side, b"x").unwrap();
    let run = env.fsck(&c, &["--repair"]).await;
    assert_eq!(run.code, CORRECTED, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("orphan_sidecar"), "{}", run.stdout);
    assert!(
        run.stdout.contains(side.to_str().unwrap()),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("repaired"), "{}", run.stdout);

    // Missing sidecar: the entry it named is reported.
    let c = env.copy();
    let t = tree(&c);
    fs::remove_file(sidecar(&t.long_l)).unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    let p = only(&v, "missing_sidecar", &t.long_l, None);
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains(sidecar(&t.long_l).to_str().unwrap()),
        "{detail}"
    );
    // --repair does not invent a name.
    env.fsck_json(&c, &["--repair"], LEFT).await;
    assert!(t.long_l.exists());

    // Two sidecars swapped: both are refused, by path.
    let c = env.copy();
    let t = tree(&c);
    let (sl, sm) = (sidecar(&t.long_l), sidecar(&t.long_m));
    let tmp = c.join("swap");
    fs::rename(&sl, &tmp).unwrap();
    fs::rename(&sm, &sl).unwrap();
    fs::rename(&tmp, &sm).unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    let bad = of_kind(&v, "bad_sidecar");
    assert_eq!(bad.len(), 2, "{v:#}");
    assert_eq!(v["counts"]["problems"], 2, "{v:#}");
    let mut paths: Vec<&str> = bad
        .iter()
        .map(|p| p["backing_path"].as_str().unwrap())
        .collect();
    paths.sort();
    let mut want = vec![sl.to_str().unwrap(), sm.to_str().unwrap()];
    want.sort();
    assert_eq!(paths, want, "{v:#}");

    // A corrupted short name.
    let c = env.copy();
    let t = tree(&c);
    let name = t.mid.file_name().unwrap().to_str().unwrap().to_string();
    let first = if name.starts_with('A') { "B" } else { "A" };
    let bad_name = c.join(format!("{first}{}", &name[1..]));
    fs::rename(&t.mid, &bad_name).unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    only(&v, "name", &bad_name, None);

    // An extended attribute's record moved under another attribute's
    // backing name: reported for the file, by both paths.
    let c = env.copy();
    let t = tree(&c);
    let names: Vec<String> = xattr_names(&t.mid)
        .into_iter()
        .filter(|n| n.starts_with("user.kmsfs.x."))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let other = Command::new("getfattr")
        .args(["--only-values", "-n", &names[1]])
        .arg(&t.mid)
        .output()
        .unwrap()
        .stdout;
    set_xattr(&t.mid, &names[0], &other);
    let v = env.fsck_json(&c, &[], LEFT).await;
    let p = only(&v, "xattr", &t.mid, Some("/mid.bin"));
    assert!(p["detail"].as_str().unwrap().contains(&names[0]), "{v:#}");

    // A deleted directory IV: the directory's plaintext path is known.
    let c = env.copy();
    let t = tree(&c);
    fs::remove_file(t.sub.join("kmsfs.diriv")).unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    let p = only(&v, "dir_iv", &t.sub.join("kmsfs.diriv"), Some("/sub"));
    assert!(p["detail"].as_str().unwrap().contains("missing"), "{v:#}");

    // A truncated directory IV.
    let c = env.copy();
    let t = tree(&c);
    let iv = t.long_dir.join("kmsfs.diriv");
    fs::OpenOptions::new()
        .write(true)
        .open(&iv)
        .unwrap()
        .set_len(8)
        .unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    let p = only(&v, "dir_iv", &iv, Some(&format!("/sub/{}", long('D'))));
    assert!(p["detail"].as_str().unwrap().contains("8 bytes"), "{v:#}");

    // A FIFO in place of a subdirectory's IV: reported, not blocked on.
    let c = env.copy();
    let t = tree(&c);
    let iv = t.deeper.join("kmsfs.diriv");
    fs::remove_file(&iv).unwrap();
    mkfifo(&iv);
    let v = env.fsck_json(&c, &[], LEFT).await;
    let p = only(&v, "dir_iv", &iv, Some("/sub/deeper"));
    assert!(
        p["detail"].as_str().unwrap().contains("not a regular file"),
        "{v:#}"
    );
    // A symlink in place of it is not followed either.
    fs::remove_file(&iv).unwrap();
    std::os::unix::fs::symlink("../kmsfs.diriv", &iv).unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    let p = only(&v, "dir_iv", &iv, Some("/sub/deeper"));
    assert!(
        p["detail"].as_str().unwrap().contains("symbolic link"),
        "{v:#}"
    );

    // A file truncated to 10 bytes, shorter than its header.
    let c = env.copy();
    let t = tree(&c);
    fs::OpenOptions::new()
        .write(true)
        .open(&t.inner)
        .unwrap()
        .set_len(10)
        .unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    let p = only(&v, "file_header", &t.inner, Some(&inner));
    assert!(p["detail"].as_str().unwrap().contains("truncated"), "{v:#}");

    // A file header with bad magic (the damage is checked to break the
    // header as the core decodes it, whatever its layout).
    let c = env.copy();
    let t = tree(&c);
    flip_byte(&t.big, 0);
    let mut head = vec![0u8; kmsfs_core::contents::FILE_HEADER_LEN as usize];
    fs::File::open(&t.big)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert!(kmsfs_core::contents::decode_file_header(&head).is_err());
    let v = env.fsck_json(&c, &[], LEFT).await;
    let p = only(&v, "file_header", &t.big, Some("/big.bin"));
    assert!(p["detail"].as_str().unwrap().contains("magic"), "{v:#}");

    // A long-named file whose backing length changed under a header: a
    // plaintext path through a sidecar is reported.
    let c = env.copy();
    let t = tree(&c);
    fs::OpenOptions::new()
        .write(true)
        .open(&t.long_l)
        .unwrap()
        .set_len(20)
        .unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    only(&v, "file_header", &t.long_l, Some(&long_l));

    // A changed symlink target.
    let c = env.copy();
    let t = tree(&c);
    let stored = fs::read_link(&t.link).unwrap();
    let mut s = stored.to_str().unwrap().to_string();
    let last = if s.ends_with('A') { "B" } else { "A" };
    s.replace_range(s.len() - 1.., last);
    fs::remove_file(&t.link).unwrap();
    std::os::unix::fs::symlink(&s, &t.link).unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    only(&v, "symlink", &t.link, Some("/sub/link"));

    // A symlink moved to another entry's name: its target is bound to the
    // old entry, so it is refused there.
    let c = env.copy();
    let t = tree(&c);
    // (Into the place of a long-named file, whose sidecar stays: the name
    // still decrypts, only the target does not.)
    let moved = t.long_l.clone();
    fs::remove_file(&moved).unwrap();
    fs::rename(&t.link, &moved).unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    let p = of_kind(&v, "symlink");
    assert_eq!(p.len(), 1, "{v:#}");
    assert_eq!(p[0]["backing_path"], moved.to_str().unwrap(), "{v:#}");

    // A temporary copy left by an interrupted symlink rename: reported,
    // removed by --repair, then clean.
    let c = env.copy();
    let t = tree(&c);
    let tmp = t.link.with_file_name("kmsfs.tmp.00112233aabbccdd");
    std::os::unix::fs::symlink(fs::read_link(&t.link).unwrap(), &tmp).unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    only(&v, "leftover_temp", &tmp, None);
    let v = env.fsck_json(&c, &["--repair"], CORRECTED).await;
    assert_eq!(of_kind(&v, "leftover_temp").len(), 1, "{v:#}");
    assert!(
        fs::symlink_metadata(&tmp).is_err(),
        "--repair left the temporary entry"
    );
    env.fsck_json(&c, &[], CLEAN).await;

    // A foreign file and several problems at once; the text report names
    // each problem's backing path, as the JSON does.
    let c = env.copy();
    let t = tree(&c);
    fs::write(c.join("notes.txt"), b"not kmsfs").unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&t.mid)
        .unwrap()
        .set_len(10)
        .unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    assert_eq!(v["counts"]["problems"], 2, "{v:#}");
    assert_eq!(
        of_kind(&v, "unexpected_entry")[0]["backing_path"],
        c.join("notes.txt").to_str().unwrap()
    );
    assert_eq!(of_kind(&v, "file_header")[0]["plaintext_path"], "/mid.bin");
    let run = env.fsck(&c, &[]).await;
    assert_eq!(run.code, LEFT);
    for p in v["problems"].as_array().unwrap() {
        let line = run
            .stdout
            .lines()
            .find(|l| l.contains(p["backing_path"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("no line for {p}: {}", run.stdout));
        assert!(line.starts_with(p["kind"].as_str().unwrap()), "{line}");
    }
    assert!(
        run.stdout.contains("2 problems, 0 repaired, 2 left"),
        "{}",
        run.stdout
    );

    // A planted tree nested deeper than the walker goes: reported, and the
    // check does not run out of stack or descriptors.
    let c = env.copy();
    let deep: PathBuf = std::iter::repeat_n("a", 1001).collect();
    fs::create_dir_all(c.join(&deep)).unwrap();
    let v = env.fsck_json(&c, &[], LEFT).await;
    let io = of_kind(&v, "io");
    assert_eq!(io.len(), 1, "{v:#}");
    assert!(
        io[0]["detail"]
            .as_str()
            .unwrap()
            .contains("deeper than 1000"),
        "{v:#}"
    );
    // Only the top name can be tried: below it there is no IV to decrypt with.
    assert_eq!(of_kind(&v, "name").len(), 1, "{v:#}");
    assert_eq!(
        of_kind(&v, "dir_iv").len(),
        1000,
        "one missing IV per level walked"
    );

    // The pristine tree was never touched.
    env.fsck_json(&env.pristine.clone(), &[], CLEAN).await;

    // A tampered header: the check cannot run (8), with a clear message.
    let c = env.copy();
    let hdr = c.join("kmsfs.header");
    let len = fs::metadata(&hdr).unwrap().len();
    flip_byte(&hdr, len / 2);
    let run = env.fsck(&c, &[]).await;
    assert_eq!(run.code, OPERATIONAL, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains(hdr.to_str().unwrap()), "{}", run.stderr);
    assert!(run.stderr.contains("backup"), "{}", run.stderr);
    let run = env.fsck(&c, &["--json"]).await;
    assert_eq!(run.code, OPERATIONAL, "{}{}", run.stdout, run.stderr);
    let v = run.json();
    assert_eq!(v["exit_code"], OPERATIONAL, "{v:#}");
    assert!(
        v["error"].as_str().unwrap().contains(hdr.to_str().unwrap()),
        "{v:#}"
    );
    assert!(v.get("problems").is_none(), "{v:#}");

    // A FIFO in place of the header is refused, not blocked on.
    fs::remove_file(&hdr).unwrap();
    mkfifo(&hdr);
    let run = env.fsck(&c, &[]).await;
    assert_eq!(run.code, OPERATIONAL, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("not a regular file"), "{}", run.stderr);

    // KMS down: the check cannot run.
    let c = env.copy();
    drop(env.cli.server.take());
    let run = env.fsck(&c, &[]).await;
    assert_eq!(run.code, OPERATIONAL, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("unreachable"), "{}", run.stderr);
    assert!(!run.stdout.contains("clean"), "{}", run.stdout);
}
