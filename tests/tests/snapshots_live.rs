//! `kmsfs snapshot create` of a MOUNTED filesystem that is being written
//! to: the snapshot is from one instant, the writers never see an error,
//! and the daemon's control socket never leaves the mount frozen (client
//! killed, timeout, second client, non-root peer). Real OpenBao, real
//! daemon, real FUSE mounts; the snapshot target is a directory.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kmsfs_e2e::cli::{CliEnv, Kmsfs, Run};
use kmsfs_e2e::fuse::{CliMountGuard, Rng};

/// Size of the file overwritten in place, one whole version per write.
const OW_LEN: usize = 64 * 1024;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

/// The contents of numbered file `n`: its length and every byte follow
/// from `n`, so a torn or mixed file shows.
fn pattern(n: u64) -> Vec<u8> {
    let len = 3000 + (n % 5) as usize * 9000 + n as usize;
    (0..len)
        .map(|i| ((n as usize * 131 + i * 7) % 251) as u8)
        .collect()
}

/// Where numbered file `n` lives: ten per directory, so directories are
/// made while snapshots run.
fn numbered(w: &Path, n: u64) -> PathBuf {
    w.join(format!("d{}", n / 10)).join(format!("f.{n}"))
}

/// Two writers on a mounted filesystem:
///
/// * numbered files, each written whole to `w/f.tmp`, closed, renamed to
///   `w/dK/f.N` (a new directory every ten), then `w/last` is replaced
///   (through `w/last.tmp` and a rename) with N;
/// * `ow`, overwritten in place with `O_DIRECT` (one request per write),
///   every 8-byte word holding the version number.
struct Writers {
    stop: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
    version: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Result<(), String>>>,
}

impl Writers {
    fn start(plain: &Path) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(0));
        let version = Arc::new(AtomicU64::new(0));
        let w = plain.join("w");
        fs::create_dir_all(&w).unwrap();
        let numbered_files = {
            let (stop, last, w) = (stop.clone(), last.clone(), w.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let step = || -> std::io::Result<()> {
                        if n % 10 == 0 {
                            fs::create_dir(w.join(format!("d{}", n / 10)))?;
                        }
                        fs::write(w.join("f.tmp"), pattern(n))?;
                        fs::rename(w.join("f.tmp"), numbered(&w, n))?;
                        fs::write(w.join("last.tmp"), n.to_string())?;
                        fs::rename(w.join("last.tmp"), w.join("last"))
                    };
                    step().map_err(|e| format!("numbered file {n}: {e}"))?;
                    last.store(n, Ordering::SeqCst);
                    n += 1;
                }
                Ok(())
            })
        };
        let overwrite = {
            let (stop, version) = (stop.clone(), version.clone());
            let path = plain.join("ow");
            std::thread::spawn(move || -> Result<(), String> {
                let f = fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                    .map_err(|e| format!("open ow: {e}"))?;
                // O_DIRECT wants an aligned buffer.
                let mut raw = vec![0u8; OW_LEN + 4096];
                let off = raw.as_ptr().align_offset(4096);
                let mut v = 1u64;
                while !stop.load(Ordering::SeqCst) {
                    let buf = &mut raw[off..off + OW_LEN];
                    for word in buf.chunks_mut(8) {
                        word.copy_from_slice(&v.to_le_bytes());
                    }
                    f.write_all_at(buf, 0)
                        .map_err(|e| format!("overwrite {v}: {e}"))?;
                    version.store(v, Ordering::SeqCst);
                    v += 1;
                }
                Ok(())
            })
        };
        Writers {
            stop,
            last,
            version,
            threads: vec![numbered_files, overwrite],
        }
    }

    /// Waits until both writers have gone `steps` further than now.
    fn progress(&self, steps: u64) {
        let (l0, v0) = (
            self.last.load(Ordering::SeqCst),
            self.version.load(Ordering::SeqCst),
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.last.load(Ordering::SeqCst) < l0 + steps
            || self.version.load(Ordering::SeqCst) < v0 + steps
        {
            assert!(
                self.threads.iter().all(|t| !t.is_finished()),
                "a writer stopped"
            );
            assert!(Instant::now() < deadline, "the writers made no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops both writers; every write they made succeeded.
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            if let Err(e) = t.join().expect("writer panicked") {
                panic!("a writer saw an error (writes must be held, not failed): {e}");
            }
        }
    }
}

/// Checks a restored tree against the writers' invariants; returns the
/// value of `last`.
fn check_one_instant(root: &Path, bulk: &[(String, Vec<u8>)]) -> u64 {
    for (name, data) in bulk {
        assert_eq!(&fs::read(root.join(name)).unwrap(), data, "{name}");
    }
    let w = root.join("w");
    let last: u64 = fs::read_to_string(w.join("last"))
        .expect("last")
        .parse()
        .expect("last is a whole number");
    // Every file up to `last` is there, whole; the one after may be (it is
    // renamed before `last` moves on); nothing later.
    let mut seen = BTreeSet::new();
    for d in fs::read_dir(&w).unwrap() {
        let d = d.unwrap();
        let name = d.file_name().into_string().unwrap();
        if matches!(name.as_str(), "last" | "last.tmp" | "f.tmp") {
            continue;
        }
        assert!(d.file_type().unwrap().is_dir(), "unexpected {name}");
        for f in fs::read_dir(d.path()).unwrap() {
            let f = f.unwrap();
            let fname = f.file_name().into_string().unwrap();
            let n: u64 = fname.strip_prefix("f.").unwrap().parse().unwrap();
            assert_eq!(d.path(), numbered(&w, n).parent().unwrap());
            assert!(
                n <= last + 1,
                "file {n} is newer than last = {last}: not one instant"
            );
            assert!(
                fs::read(f.path()).unwrap() == pattern(n),
                "file {n} is not whole"
            );
            seen.insert(n);
        }
    }
    for n in 0..=last {
        assert!(seen.contains(&n), "file {n} is missing (last = {last})");
    }
    // The in-place file holds one version, whole.
    let ow = fs::read(root.join("ow")).unwrap();
    assert_eq!(ow.len(), OW_LEN);
    let first = &ow[..8];
    assert!(ow.chunks(8).all(|w| w == first), "ow mixes two versions");
    last
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mounted_filesystem_being_written_is_snapshotted_at_one_instant() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("live").await;
    let _g = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &[]).await.ok();
    // Bulk for the pre-copy to chew on while the writers go on.
    let mut rng = Rng::new(5);
    let bulk: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("bulk{i}"), rng.bytes(3 * 1024 * 1024)))
        .collect();
    for (name, data) in &bulk {
        fs::write(plain.join(name), data).unwrap();
    }
    let writers = Writers::start(&plain);
    writers.progress(3);
    let target = env.path("store");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = env
            .kmsfs
            .run_async(&["snapshot", "create", s(&cipher), s(&target), "--json"])
            .await
            .ok()
            .json();
        assert_eq!(r["mounted"], true, "{r}");
        assert!(r["write_pause_ms"].as_f64().unwrap() >= 0.0, "{r}");
        assert!(r["capture"]["entries"].as_u64().unwrap() > 10, "{r}");
        ids.push(r["id"].as_str().unwrap().to_string());
        // Writes resumed after the thaw.
        writers.progress(2);
    }
    writers.stop();
    // No staging directory is left beside the backing directory.
    let leftovers: Vec<_> = fs::read_dir(cipher.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".kmsfs-snapshot."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let mut lasts = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let rc = env.path(&format!("r{i}-cipher"));
        let rp = env.path(&format!("r{i}-plain"));
        fs::create_dir_all(&rp).unwrap();
        env.kmsfs
            .run_async(&["snapshot", "restore", s(&target), id, s(&rc)])
            .await
            .ok();
        let _rg = CliMountGuard(rp.clone());
        env.mount(&rc, &rp, &[]).await.ok();
        lasts.push(check_one_instant(&rp, &bulk));
        env.kmsfs.run_async(&["umount", s(&rp)]).await.ok();
    }
    assert!(lasts[0] < lasts[1], "{lasts:?}");
}

/// A raw control-socket client in a separate process (so it can be
/// killed): sends each request, prints each answer, then stays connected
/// until killed.
const CLIENT: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT", e, flush=True)
    sys.exit(0)
f = s.makefile("rw")
for req in sys.argv[2:]:
    if req.startswith("sleep"):
        time.sleep(float(req[5:]))
        continue
    try:
        f.write(req + "\n")
        f.flush()
    except OSError:
        pass  # refused and hung up: its answer is still there to read
    print(f.readline().strip() or "EOF", flush=True)
print("DONE", flush=True)
time.sleep(3600)
"#;

struct Client {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Client {
    /// Runs the client as root, or through `setpriv` as `nobody` keeping
    /// only `CAP_DAC_OVERRIDE` (so it reaches the socket, and the daemon's
    /// own peer check is what refuses it).
    fn start(socket: &Path, requests: &[&str], as_nobody: bool) -> Client {
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=+dac_override",
                "--ambient-caps=+dac_override",
                "/usr/bin/python3",
            ]);
            c
        } else {
            Command::new("/usr/bin/python3")
        };
        cmd.arg("-c").arg(CLIENT).arg(socket).args(requests);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Client { child, lines }
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .expect("an answer from the control client")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `kmsfs ARGS`, again while the daemon still answers `busy`: a
/// killed client's session ends when the daemon sees it gone, a moment
/// after the kill.
async fn run_when_idle(k: &Kmsfs, args: &[&str]) -> Run {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = k.run_async(args).await;
        if !r.stderr.contains("busy: another snapshot") || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn socket_of(cipher: &Path) -> PathBuf {
    let md = fs::metadata(cipher).unwrap();
    PathBuf::from(format!("/run/kmsfs/ctl-{:x}-{}.sock", md.dev(), md.ino()))
}

/// Creates `path` on a thread; the receiver gets the result when done.
fn create_in_background(path: PathBuf) -> mpsc::Receiver<std::io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fs::write(&path, b"held, not failed"));
    });
    rx
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_socket_never_leaves_a_mount_frozen() {
    let env = CliEnv::new().await;
    let (cipher, plain) = env.create("ctl").await;
    let _g = CliMountGuard(plain.clone());
    env.mount(&cipher, &plain, &[]).await.ok();
    fs::create_dir_all(plain.join("ro")).unwrap();
    fs::create_dir_all(plain.join("w")).unwrap();
    fs::write(plain.join("ro/existing"), b"readable while frozen").unwrap();
    let sock = socket_of(&cipher);
    let md = fs::metadata(&sock).expect("the daemon's control socket");
    assert_eq!(md.mode() & 0o777, 0o600);
    assert_eq!(md.uid(), 0);
    let target = env.path("store");

    // A client freezes, then is killed: the mount thaws.
    let client = Client::start(&sock, &["FREEZE 600000"], false);
    assert!(client.line().starts_with("FROZEN "));
    let held = create_in_background(plain.join("w/one"));
    // Held, not failed ...
    assert!(held.recv_timeout(Duration::from_millis(300)).is_err());
    // ... while reads go on.
    assert_eq!(
        fs::read(plain.join("ro/existing")).unwrap(),
        b"readable while frozen"
    );
    // A second snapshot is refused while the first holds the session.
    let r = env
        .kmsfs
        .run_async(&["snapshot", "create", s(&cipher), s(&target)])
        .await
        .failed();
    assert!(r.stderr.contains("busy"), "{}", r.stderr);
    drop(client); // SIGKILL
    held.recv_timeout(Duration::from_secs(60))
        .expect("the write resumes once the client is killed")
        .expect("the held write succeeds");

    // A client that freezes and hangs: the daemon thaws after the timeout,
    // and a late THAW learns that the capture is not from one instant.
    let client = Client::start(&sock, &["FREEZE 500", "sleep1.5", "THAW"], false);
    assert!(client.line().starts_with("FROZEN "));
    create_in_background(plain.join("w/two"))
        .recv_timeout(Duration::from_secs(60))
        .expect("the write resumes after the freeze timeout")
        .unwrap();
    let late = client.line();
    assert!(late.starts_with("ERR the freeze timed out"), "{late}");
    drop(client);

    // The same through the CLI: a capture longer than --freeze-timeout
    // fails and publishes nothing.
    let r = run_when_idle(
        &env.kmsfs,
        &[
            "snapshot",
            "create",
            s(&cipher),
            s(&target),
            "--freeze-timeout",
            "0",
        ],
    )
    .await
    .failed();
    assert!(r.stderr.contains("freeze timed out"), "{}", r.stderr);
    let list = env
        .kmsfs
        .run_async(&["snapshot", "list", s(&target), "--json"])
        .await
        .ok()
        .json();
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    // A peer that is not root is refused by the daemon's own check.
    let nobody = Client::start(&sock, &["FREEZE 600000"], true);
    let answer = nobody.line();
    assert!(
        answer.starts_with("ERR permission denied"),
        "not refused: {answer}"
    );
    create_in_background(plain.join("w/three"))
        .recv_timeout(Duration::from_secs(60))
        .expect("not frozen by a refused peer")
        .unwrap();
    drop(nobody);

    // After all that, a snapshot of the mount works.
    let r = run_when_idle(
        &env.kmsfs,
        &["snapshot", "create", s(&cipher), s(&target), "--json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(r["mounted"], true, "{r}");
    // The daemon removes its socket when it exits.
    env.kmsfs.run_async(&["umount", s(&plain)]).await.ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sock.exists() {
        assert!(Instant::now() < deadline, "socket left after unmount");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Unmounted, the snapshot takes today's path.
    let r = env
        .kmsfs
        .run_async(&["snapshot", "create", s(&cipher), s(&target), "--json"])
        .await
        .ok()
        .json();
    assert_eq!(r["mounted"], false, "{r}");
}
