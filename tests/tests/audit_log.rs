//! Audit events, `--quiet` and `--json` (issue 11 §4), end to end: a real
//! OpenBao dev server, the real `kmsfs` binary, real FUSE mounts.
//!
//! This machine runs no journald. Each test binds a Unix datagram socket
//! of its own and points `KMSFS_JOURNAL_SOCKET` at it: the socket *is* the
//! receiving end of journald's native protocol, and [`parse`] reads what
//! arrives as strictly as the protocol allows (plain `NAME=value` fields
//! and the binary length-prefixed form). The tests check the fields of
//! every event, that failures are recorded too, and that no datagram
//! holds the master key, the KMS token or the wrapped key.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use kmsfs_core::header::{SlotKms, UnverifiedHeader};
use kmsfs_e2e::bao::{write_token_file, BaoServer};
use kmsfs_e2e::cli::{CliEnv, Kmsfs, Run};
use kmsfs_e2e::fuse::{is_mounted, CliMountGuard};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// How a field was encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `NAME=value\n`.
    Plain,
    /// `NAME\n`, 64-bit little-endian length, value, `\n`.
    Binary,
}

/// One journal entry as received.
#[derive(Debug, Clone)]
struct Entry {
    raw: Vec<u8>,
    fields: Vec<(String, String, Form)>,
}

impl Entry {
    /// The field's value; panics when it is missing or repeated.
    fn get(&self, name: &str) -> &str {
        let found: Vec<_> = self.fields.iter().filter(|f| f.0 == name).collect();
        assert_eq!(found.len(), 1, "{name} in {:?}", self.fields);
        &found[0].1
    }

    fn has(&self, name: &str) -> bool {
        self.fields.iter().any(|f| f.0 == name)
    }

    fn form(&self, name: &str) -> Form {
        self.fields
            .iter()
            .find(|f| f.0 == name)
            .map(|f| f.2)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.fields))
    }
}

/// A field name journald accepts from a client.
fn valid_name(n: &[u8]) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n[0] != b'_'
        && !n[0].is_ascii_digit()
        && n.iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
}

/// Parses one datagram of journald's native protocol, refusing anything
/// the protocol does not allow (and values that are not UTF-8, which
/// kmsfs never sends).
fn parse(d: &[u8]) -> Result<Entry, String> {
    let mut fields = Vec::new();
    let mut i = 0;
    while i < d.len() {
        let rest = &d[i..];
        let end = rest
            .iter()
            .position(|&b| b == b'=' || b == b'\n')
            .ok_or_else(|| format!("field at {i} has neither '=' nor a newline"))?;
        let name = &rest[..end];
        if !valid_name(name) {
            return Err(format!(
                "invalid field name {:?}",
                String::from_utf8_lossy(name)
            ));
        }
        let (value, form, next) = if rest[end] == b'=' {
            let start = i + end + 1;
            let nl = d[start..]
                .iter()
                .position(|&b| b == b'\n')
                .ok_or("plain field not terminated by a newline")?;
            (&d[start..start + nl], Form::Plain, start + nl + 1)
        } else {
            let len_at = i + end + 1;
            let len_bytes: [u8; 8] = d
                .get(len_at..len_at + 8)
                .ok_or("binary field: length cut short")?
                .try_into()
                .map_err(|_| "binary field: length")?;
            let len = usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|e| e.to_string())?;
            let start = len_at + 8;
            let stop = start
                .checked_add(len)
                .ok_or("binary field: length overflows")?;
            if d.get(stop) != Some(&b'\n') {
                return Err("binary field: value not followed by a newline".into());
            }
            (&d[start..stop], Form::Binary, stop + 1)
        };
        let value = String::from_utf8(value.to_vec()).map_err(|e| e.to_string())?;
        fields.push((String::from_utf8_lossy(name).into_owned(), value, form));
        i = next;
    }
    if fields.is_empty() {
        return Err("empty datagram".into());
    }
    Ok(Entry {
        raw: d.to_vec(),
        fields,
    })
}

#[test]
fn the_parser_is_strict() {
    let mut bin = b"A=1\nB\n".to_vec();
    bin.extend_from_slice(&3u64.to_le_bytes());
    bin.extend_from_slice(b"x\ny\n");
    let e = parse(&bin).expect("valid");
    assert_eq!(e.get("A"), "1");
    assert_eq!(e.get("B"), "x\ny");
    assert_eq!(e.form("B"), Form::Binary);
    for bad in [
        &b"A=1"[..],
        b"a=1\n",
        b"_A=1\n",
        b"A\n\x05\0\0\0\0\0\0\0ab\n",
        b"A\n\x01\0\0\0\0\0\0\0ab",
        b"",
    ] {
        assert!(parse(bad).is_err(), "{bad:?}");
    }
}

/// The receiving end: a datagram socket in a temporary directory.
struct Journal {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<Entry>,
}

impl Journal {
    fn bind(path: PathBuf) -> Journal {
        let sock = UnixDatagram::bind(&path).expect("bind the journal socket");
        Journal {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    fn receive(&mut self, block: Option<Duration>) -> Option<Entry> {
        let mut buf = vec![0u8; 256 * 1024];
        self.sock.set_nonblocking(block.is_none()).expect("mode");
        if let Some(t) = block {
            self.sock.set_read_timeout(Some(t)).expect("timeout");
        }
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let e = parse(&buf[..n]).unwrap_or_else(|why| {
                    panic!("not the native protocol ({why}): {:?}", &buf[..n])
                });
                self.seen.push(e.clone());
                Some(e)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// Everything already sent. A command sends its events before it
    /// exits, so after it has exited this is all of them.
    fn drain(&mut self) -> Vec<Entry> {
        std::iter::from_fn(|| self.receive(None)).collect()
    }

    /// The one entry a command that has exited sent.
    fn one(&mut self, op: &str) -> Entry {
        let mut got = self.drain();
        assert_eq!(got.len(), 1, "expected one {op} event: {got:?}");
        let e = got.remove(0);
        assert_eq!(e.get("OPERATION"), op, "{e:?}");
        e
    }

    /// Waits (at most `bound`) for an event a daemon sends on its own.
    fn wait_for(&mut self, op: &str, bound: Duration) -> Entry {
        let deadline = Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {op} event within {bound:?}");
            if let Some(e) = self.receive(Some(left.min(Duration::from_secs(1)))) {
                if e.get("OPERATION") == op {
                    return e;
                }
                panic!("expected a {op} event, got {e:?}");
            }
        }
    }
}

/// The runner with the journal socket and `INVOCATION_ID` (as systemd
/// sets it for a unit's processes).
fn under_systemd(k: &Kmsfs, journal: &Journal) -> Kmsfs {
    k.clone()
        .with_env("KMSFS_JOURNAL_SOCKET", s(&journal.path))
        .with_env("INVOCATION_ID", "6f1b2c0d9e8a4b7c8d9e0f1a2b3c4d5e")
}

fn assert_common(e: &Entry, op: &str) {
    assert_eq!(e.get("OPERATION"), op, "{e:?}");
    assert_eq!(e.get("SYSLOG_IDENTIFIER"), "kmsfs");
    assert!(e.has("MESSAGE"), "{e:?}");
    if e.get("RESULT") == "ok" {
        assert_eq!(e.get("PRIORITY"), "6", "{e:?}");
    } else {
        assert_eq!(e.get("PRIORITY"), "3", "{e:?}");
    }
}

fn wrapped_key(cipher: &Path, slot: usize) -> String {
    let h = UnverifiedHeader::parse(&fs::read(cipher.join("kmsfs.header")).expect("header"))
        .expect("parse header");
    match &h.unverified().slots[slot].kms {
        SlotKms::Vault(v) => v.wrapped_key.clone(),
        SlotKms::Kmip(_) => panic!("a vault slot"),
    }
}

/// Every form in which the secrets could leak: the master key (raw,
/// base64, hex), the tokens, the wrapped keys (whole and their base64
/// part). `wrapped` pairs a Transit key name with a ciphertext.
async fn secrets(
    server: &BaoServer,
    wrapped: &[(&str, String)],
    tokens: &[String],
) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = tokens.iter().map(|t| t.as_bytes().to_vec()).collect();
    for (key, w) in wrapped {
        let v = server
            .api(
                "POST",
                &format!("transit/decrypt/{key}"),
                Some(serde_json::json!({ "ciphertext": w })),
            )
            .await
            .expect("decrypt the wrapped key");
        let b64 = v["data"]["plaintext"]
            .as_str()
            .expect("plaintext")
            .to_string();
        let master = base64::engine::general_purpose::STANDARD
            .decode(&b64)
            .expect("base64");
        assert_eq!(master.len(), 32, "a 256-bit master key");
        let hex: String = master.iter().map(|b| format!("{b:02x}")).collect();
        out.push(master);
        out.push(b64.into_bytes());
        out.push(hex.into_bytes());
        out.push(w.as_bytes().to_vec());
        out.push(
            w.rsplit(':')
                .next()
                .expect("ciphertext")
                .as_bytes()
                .to_vec(),
        );
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_sends_a_journal_entry_with_its_fields_and_no_secret() {
    let mut env = CliEnv::new().await;
    let mut journal = Journal::bind(env.path("journal.sock"));
    let k = under_systemd(&env.kmsfs, &journal);
    let token = fs::read_to_string(&env.token_file).expect("token");
    let token = token.trim().to_string();

    // create
    let cipher = env.path("main-cipher");
    let plain = env.path("main-plain");
    fs::create_dir_all(&plain).expect("mountpoint");
    let uuid = k
        .run_async(&["create", s(&cipher)])
        .await
        .ok()
        .stdout
        .trim()
        .to_string();
    let cipher = cipher.canonicalize().expect("cipher");
    let plain = plain.canonicalize().expect("plain");
    let e = journal.one("create");
    assert_common(&e, "create");
    assert_eq!(e.get("RESULT"), "ok");
    assert_eq!(e.get("FS_UUID"), uuid);
    assert_eq!(e.get("CIPHERDIR"), s(&cipher));
    assert_eq!(e.get("KMS_TYPE"), "vault");
    assert_eq!(e.get("KMS_KEY_NAME"), "kmsfs");
    assert_eq!(e.get("KMS_KEY_VERSION"), "1");
    assert_eq!(e.get("KMS_SLOT"), "0");
    assert_eq!(e.get("KMS_SLOT_LABEL"), "primary");
    assert!(e.get("MESSAGE").contains(s(&cipher)), "{e:?}");
    let wrapped_v1 = wrapped_key(&cipher, 0);

    // mount: sent by the daemon before `kmsfs mount` returns
    let _guard = CliMountGuard(plain.clone());
    k.run_async(&["mount", s(&cipher), s(&plain), "-o", "noatime"])
        .await
        .ok();
    assert!(is_mounted(&plain));
    let e = journal.one("mount");
    assert_common(&e, "mount");
    assert_eq!(e.get("RESULT"), "ok");
    assert_eq!(e.get("FS_UUID"), uuid);
    assert_eq!(e.get("CIPHERDIR"), s(&cipher));
    assert_eq!(e.get("MOUNTPOINT"), s(&plain));
    assert_eq!(e.get("MOUNT_OPTIONS"), "noatime");
    assert_eq!(e.get("KMS_KEY_NAME"), "kmsfs");
    assert_eq!(e.get("KMS_KEY_VERSION"), "1");
    fs::write(plain.join("f"), b"audited").expect("write through the mount");

    // umount: sent by the daemon when its mount ends
    k.run_async(&["umount", s(&plain)]).await.ok();
    let e = journal.wait_for("umount", Duration::from_secs(30));
    assert_common(&e, "umount");
    assert_eq!(e.get("RESULT"), "ok");
    assert_eq!(e.get("FS_UUID"), uuid);
    assert_eq!(e.get("MOUNTPOINT"), s(&plain));
    assert!(journal.drain().is_empty());

    // rewrap, after a rotation: one event per slot, old and new versions
    let server = env.server.as_ref().expect("server");
    server.rotate_key("kmsfs").await.expect("rotate");
    k.run_async(&["rewrap", s(&cipher)]).await.ok();
    let e = journal.one("rewrap");
    assert_common(&e, "rewrap");
    assert_eq!(e.get("RESULT"), "ok");
    assert_eq!(e.get("OUTCOME"), "rewrapped");
    assert_eq!(e.get("FS_UUID"), uuid);
    assert_eq!(e.get("CIPHERDIR"), s(&cipher));
    assert_eq!(e.get("KMS_SLOT_LABEL"), "primary");
    assert_eq!(e.get("OLD_KMS_KEY_NAME"), "kmsfs");
    assert_eq!(e.get("OLD_KMS_KEY_VERSION"), "1");
    assert_eq!(e.get("KMS_KEY_NAME"), "kmsfs");
    assert_eq!(e.get("KMS_KEY_VERSION"), "2");
    let wrapped_v2 = wrapped_key(&cipher, 0);
    assert_ne!(wrapped_v1, wrapped_v2);

    // snapshot create to a directory target
    let store = env.path("store");
    let target = format!("file://{}", s(&store));
    let id = k
        .run_async(&["snapshot", "create", s(&cipher), &target])
        .await
        .ok()
        .stdout
        .trim()
        .to_string();
    let e = journal.one("snapshot-create");
    assert_common(&e, "snapshot-create");
    assert_eq!(e.get("RESULT"), "ok");
    assert_eq!(e.get("SNAPSHOT_ID"), id);
    assert_eq!(e.get("FS_UUID"), uuid);
    assert_eq!(e.get("CIPHERDIR"), s(&cipher));
    assert_eq!(e.get("KMS_KEY_VERSION"), "2");
    assert!(e.get("SNAPSHOT_TARGET").contains(s(&store)), "{e:?}");

    // snapshot restore and delete
    let restored = env.path("restored-cipher");
    k.run_async(&["snapshot", "restore", &target, &id, s(&restored)])
        .await
        .ok();
    let e = journal.one("snapshot-restore");
    assert_common(&e, "snapshot-restore");
    assert_eq!(e.get("RESULT"), "ok");
    assert_eq!(e.get("SNAPSHOT_ID"), id);
    assert_eq!(e.get("FS_UUID"), uuid);
    assert_eq!(e.get("CIPHERDIR"), s(&restored));
    k.run_async(&["snapshot", "delete", &target, &id])
        .await
        .ok();
    let e = journal.one("snapshot-delete");
    assert_common(&e, "snapshot-delete");
    assert_eq!(e.get("SNAPSHOT_ID"), id);

    // slot add and remove (a second key with its own token)
    let dr = dr_config(&env).await;
    k.run_async(&[
        "slot",
        "add",
        s(&cipher),
        "--kms-config",
        s(&dr),
        "--label",
        "dr",
    ])
    .await
    .ok();
    let e = journal.one("slot-add");
    assert_common(&e, "slot-add");
    assert_eq!(e.get("RESULT"), "ok");
    assert_eq!(e.get("FS_UUID"), uuid);
    assert_eq!(e.get("KMS_SLOT"), "1");
    assert_eq!(e.get("KMS_SLOT_LABEL"), "dr");
    assert_eq!(e.get("KMS_KEY_NAME"), "dr");
    assert_eq!(e.get("KMS_KEY_VERSION"), "1");
    let wrapped_dr = wrapped_key(&cipher, 1);
    k.run_async(&["slot", "remove", s(&cipher), "dr"])
        .await
        .ok();
    let e = journal.one("slot-remove");
    assert_common(&e, "slot-remove");
    assert_eq!(e.get("KMS_SLOT_LABEL"), "dr");
    assert_eq!(e.get("FS_UUID"), uuid);

    // Failures are recorded too: a rewrap of a slot that does not exist,
    // a mount of a directory that is not a kmsfs filesystem (in the daemon,
    // before `kmsfs mount` reports the error).
    let run = k
        .run_async(&["rewrap", s(&cipher), "--slot", "nosuch"])
        .await
        .failed();
    let e = journal.one("rewrap");
    assert_common(&e, "rewrap");
    assert!(
        e.get("RESULT").contains("no key slot labelled 'nosuch'"),
        "{e:?}"
    );
    assert!(run.stdout.contains("nosuch"), "{run:?}");
    let not_fs = env.path("not-a-filesystem");
    fs::create_dir_all(&not_fs).expect("dir");
    k.run_async(&["mount", s(&not_fs), s(&plain)])
        .await
        .failed();
    assert!(!is_mounted(&plain));
    let e = journal.one("mount");
    assert_common(&e, "mount");
    assert!(e.get("RESULT").contains("not a kmsfs filesystem"), "{e:?}");
    assert_eq!(e.get("PRIORITY"), "3");
    // `kmsfs umount` records its own failures.
    k.run_async(&["umount", s(&plain)]).await.failed();
    let e = journal.one("umount");
    assert_common(&e, "umount");
    assert!(e.get("RESULT").contains("not mounted"), "{e:?}");
    assert_eq!(e.get("MOUNTPOINT"), s(&plain));

    // A value with a newline (here a directory name) takes the binary form.
    let odd = env.path("two\nlines-cipher");
    k.run_async(&["create", s(&odd)]).await.ok();
    let e = journal.one("create");
    assert_eq!(e.form("CIPHERDIR"), Form::Binary);
    assert_eq!(e.get("CIPHERDIR"), s(&odd));
    assert_eq!(e.form("OPERATION"), Form::Plain);

    // No secret in any datagram.
    let server = env.server.as_ref().expect("server");
    let dr_token = fs::read_to_string(env.path("dr/token")).expect("dr token");
    let needles = secrets(
        server,
        &[
            ("kmsfs", wrapped_v1),
            ("kmsfs", wrapped_v2),
            ("dr", wrapped_dr),
        ],
        &[token, dr_token.trim().to_string()],
    )
    .await;
    assert!(journal.seen.len() >= 13, "{}", journal.seen.len());
    for e in &journal.seen {
        for n in &needles {
            assert!(
                !contains(&e.raw, n),
                "a secret in a journal entry: {:?}",
                e.fields
            );
        }
    }
    drop(env.server.take());
}

#[tokio::test(flavor = "multi_thread")]
async fn outside_systemd_only_the_daemon_uses_the_journal_and_a_dead_journal_fails_nothing() {
    let env = CliEnv::new().await;
    let mut journal = Journal::bind(env.path("journal.sock"));
    // The socket exists but neither INVOCATION_ID nor JOURNAL_STREAM is set.
    let k = env
        .kmsfs
        .clone()
        .with_env("KMSFS_JOURNAL_SOCKET", s(&journal.path));
    let cipher = env.path("a-cipher");
    let plain = env.path("a-plain");
    fs::create_dir_all(&plain).expect("mountpoint");
    let run = k.run_async(&["create", s(&cipher)]).await.ok();
    assert!(journal.drain().is_empty(), "a command outside systemd");
    assert!(!run.stderr.contains("OPERATION="), "{}", run.stderr);
    // ... it goes to kmsfs's log, shown on stderr when asked for.
    let logged = env.path("logged-cipher");
    let run = k
        .clone()
        .with_env("KMSFS_LOG", "warn,kmsfs::audit=info")
        .run_async(&["create", s(&logged)])
        .await
        .ok();
    assert!(journal.drain().is_empty());
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("kmsfs::audit"))
        .unwrap_or_else(|| panic!("no audit line:\n{}", run.stderr));
    assert!(line.contains("OPERATION=\"create\""), "{line}");
    assert!(line.contains("RESULT=\"ok\""), "{line}");
    // The mount daemon has no terminal: it uses the journal.
    let _guard = CliMountGuard(plain.clone());
    k.run_async(&["mount", s(&cipher), s(&plain)]).await.ok();
    let e = journal.one("mount");
    assert_eq!(e.get("RESULT"), "ok");
    k.run_async(&["umount", s(&plain)]).await.ok();
    journal.wait_for("umount", Duration::from_secs(30));

    // A socket nobody listens on: the operations succeed, and the command
    // says so once, however many events it has.
    let dead = env.path("dead.sock");
    drop(UnixDatagram::bind(&dead).expect("bind"));
    let k = env
        .kmsfs
        .clone()
        .with_env("KMSFS_JOURNAL_SOCKET", s(&dead))
        .with_env("INVOCATION_ID", "6f1b2c0d9e8a4b7c8d9e0f1a2b3c4d5e");
    let b = env.path("b-cipher");
    let run = k.run_async(&["create", s(&b)]).await.ok();
    assert_eq!(
        run.stderr.matches("cannot send audit events").count(),
        1,
        "{}",
        run.stderr
    );
    let run = k.run_async(&["rewrap", "--all"]).await.ok();
    assert_eq!(run.stdout.lines().count(), 3, "{}", run.stdout);
    assert_eq!(
        run.stderr.matches("cannot send audit events").count(),
        1,
        "{}",
        run.stderr
    );
}

/// A second Transit key, `dr`, with its own token and configuration file
/// (for `slot add`).
async fn dr_config(env: &CliEnv) -> PathBuf {
    let server = env.server.as_ref().expect("server");
    server.create_key("dr", false).await.expect("key");
    server
        .put_policy("dr", &BaoServer::transit_policy("dr"))
        .await
        .expect("policy");
    let token = server.create_token(&["dr"], "1h").await.expect("token");
    let dir = env.path("dr");
    fs::create_dir_all(&dir).expect("dir");
    let tf = write_token_file(&dir, "token", &token).expect("token file");
    let cfg = dir.join("kms.toml");
    Kmsfs::new(&cfg)
        .run_async(&[
            "kms",
            "set",
            "vault",
            server.addr(),
            "dr",
            "--token-file",
            s(&tf),
        ])
        .await
        .ok();
    cfg
}

fn assert_silent(run: &Run) {
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "", "stdout under --quiet");
    assert_eq!(run.stderr, "", "stderr under --quiet");
}

#[tokio::test(flavor = "multi_thread")]
async fn quiet_prints_nothing_on_success_and_still_the_errors() {
    let env = CliEnv::new().await;
    let k = &env.kmsfs;
    let run = env.kms_set(&["--quiet"], &[]).await;
    assert_silent(&run);
    let cipher = env.path("q-cipher");
    assert_silent(&k.run_async(&["create", s(&cipher), "--quiet"]).await);
    assert!(cipher.join("kmsfs.header").is_file());
    env.server
        .as_ref()
        .expect("server")
        .rotate_key("kmsfs")
        .await
        .expect("rotate");
    assert_silent(&k.run_async(&["-q", "rewrap", s(&cipher)]).await);
    let dr = dr_config(&env).await;
    assert_silent(
        &k.run_async(&["slot", "add", s(&cipher), "--kms-config", s(&dr), "-q"])
            .await,
    );
    assert_silent(
        &k.run_async(&["slot", "remove", s(&cipher), "slot-1", "-q"])
            .await,
    );
    let store = env.path("store");
    assert_silent(
        &k.run_async(&["snapshot", "create", s(&cipher), s(&store), "--quiet"])
            .await,
    );
    let list = k
        .run_async(&["snapshot", "list", s(&store), "--json", "--quiet"])
        .await
        .ok()
        .json();
    let id = list[0]["id"].as_str().expect("id").to_string();
    let restored = env.path("restored");
    assert_silent(
        &k.run_async(&["snapshot", "restore", s(&store), &id, s(&restored), "-q"])
            .await,
    );
    assert_silent(
        &k.run_async(&["snapshot", "delete", s(&store), &id, "-q"])
            .await,
    );
    // A listing is what the command is for: --quiet keeps it.
    let info = k.run_async(&["info", s(&cipher), "--quiet"]).await.ok();
    assert!(info.stdout.contains("uuid:"), "{info:?}");

    // Errors are still printed: as text, and as JSON with --json.
    let run = k
        .run_async(&["create", s(&cipher), "--quiet"])
        .await
        .failed();
    assert!(
        run.stderr.contains("already holds a kmsfs filesystem"),
        "{run:?}"
    );
    let run = k
        .run_async(&["--quiet", "create", s(&cipher), "--json"])
        .await
        .failed();
    let v: serde_json::Value = serde_json::from_str(run.stderr.trim()).expect("JSON error");
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("already holds"),
        "{v}"
    );
    // A rewrap that fails shows its per-slot lines despite --quiet.
    let run = k
        .run_async(&["rewrap", s(&cipher), "--slot", "nosuch", "-q"])
        .await
        .failed();
    assert!(run.stdout.contains("FAILED"), "{run:?}");
    assert!(run.stderr.contains("rewrap failed"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_on_create_rewrap_slot_and_kms_set_and_unset() {
    let env = CliEnv::new().await;
    let k = &env.kmsfs;
    let addr = env.server.as_ref().expect("server").addr().to_string();
    let v = env.kms_set(&[], &["--json"]).await.ok().json();
    assert_eq!(v["saved"], s(&k.config));
    assert_eq!(v["type"], "vault");
    assert_eq!(v["key"], "kmsfs");
    assert_eq!(v["addresses"][0], addr.as_str());
    assert_eq!(v["tested"], true);

    let cipher = env.path("j-cipher");
    let c = k.run_async(&["create", s(&cipher), "--json"]).await.ok();
    assert_eq!(c.stderr, "", "the summary is in the JSON");
    let c = c.json();
    let info = k
        .run_async(&["info", s(&cipher), "--json"])
        .await
        .ok()
        .json();
    assert_eq!(c["uuid"], info["uuid"]);
    assert_eq!(c["path"], info["path"]);
    assert_eq!(c["key_check_value"], info["key_check_value"]);
    assert_eq!(c["key_check_value"].as_str().expect("kcv").len(), 32);
    assert_eq!(c["registered"], true);
    assert_eq!(c["slot"]["label"], "primary");
    assert_eq!(c["slot"]["key_name"], "kmsfs");
    assert_eq!(c["slot"]["key_version"], 1);
    assert!(c["slot"].get("wrapped_key").is_none(), "{c}");

    let r = k
        .run_async(&["rewrap", s(&cipher), "--json"])
        .await
        .ok()
        .json();
    assert_eq!(r[0]["path"], info["path"]);
    assert_eq!(r[0]["fs_uuid"], info["uuid"]);
    assert_eq!(r[0]["ok"], true);
    assert_eq!(r[0]["slots"][0]["outcome"], "unchanged");
    assert_eq!(r[0]["slots"][0]["key"], "kmsfs");
    assert_eq!(r[0]["slots"][0]["version"], 1);

    let dr = dr_config(&env).await;
    let a = k
        .run_async(&[
            "slot",
            "add",
            s(&cipher),
            "--kms-config",
            s(&dr),
            "--label",
            "dr",
            "--json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(a["uuid"], info["uuid"]);
    assert_eq!(a["added"]["index"], 1);
    assert_eq!(a["added"]["label"], "dr");
    assert_eq!(a["added"]["key_name"], "dr");

    let gone = k
        .run_async(&["slot", "remove", s(&cipher), "dr", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(gone["removed"]["label"], "dr");
    assert_eq!(gone["slots"].as_array().expect("slots").len(), 1);
    assert_eq!(gone["slots"][0]["label"], "primary");

    // Errors: one JSON object on stderr; rewrap still reports on stdout.
    let missing = env.path("missing-cipher");
    let run = k
        .run_async(&["rewrap", s(&missing), "--json"])
        .await
        .failed();
    let out = run.json();
    assert_eq!(out[0]["ok"], false);
    assert!(out[0]["error"]
        .as_str()
        .expect("error")
        .contains("not a kmsfs filesystem"));
    let err: serde_json::Value = serde_json::from_str(run.stderr.trim()).expect("JSON error");
    assert!(
        err["error"]
            .as_str()
            .expect("error")
            .contains("rewrap failed"),
        "{err}"
    );
    let run = k
        .run_async(&["slot", "remove", s(&cipher), "primary", "--json"])
        .await
        .failed();
    let err: serde_json::Value = serde_json::from_str(run.stderr.trim()).expect("JSON error");
    assert!(
        err["error"]
            .as_str()
            .expect("error")
            .contains("last key slot"),
        "{err}"
    );

    let u = k
        .run_async(&["kms", "unset", "--force", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(u["removed"], s(&k.config));
    assert!(!k.config.exists());
}
