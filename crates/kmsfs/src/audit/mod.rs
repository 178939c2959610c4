//! Audit events: one structured record for every create, mount, umount,
//! rewrap (per key slot), slot add/remove and snapshot
//! create/restore/delete/rewrap, whether it succeeded or failed.
//!
//! Each record names the operation, the filesystem (its UUID from the
//! header, the backing directory), the KMS key (name and version, or a
//! KMIP Unique Identifier) and the result. Never a key, a wrapped key, a
//! token or any other secret: the fields are set only from the names
//! below, from paths, identifiers and error messages (which kmsfs already
//! prints, so they hold no secret either).
//!
//! Where records go ([`Sink`]): to journald through its native protocol
//! ([`journal`]) when its socket exists and the process runs under
//! systemd (`JOURNAL_STREAM` or `INVOCATION_ID` set) or is the mount
//! daemon (no terminal); otherwise one line through kmsfs's log (target
//! `kmsfs::audit`, level info: the daemon's syslog, a command's stderr with
//! `KMSFS_LOG=info`). `KMSFS_JOURNAL_SOCKET` names another socket (tests).
//! Failing to log never fails the operation; it is said once.

pub mod journal;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use kmsfs_core::header::{KeySlot, SlotKms};

/// The environment variable naming the journal socket instead of
/// [`journal::DEFAULT_SOCKET`].
pub const SOCKET_ENV: &str = "KMSFS_JOURNAL_SOCKET";

/// The `SYSLOG_IDENTIFIER` of every record (`journalctl -t kmsfs`).
pub const IDENTIFIER: &str = "kmsfs";

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `kmsfs create`.
    Create,
    /// A mount (by the daemon that serves it).
    Mount,
    /// An unmount (by the daemon when its mount ends; by `kmsfs umount`
    /// when unmounting fails).
    Umount,
    /// One key slot of `kmsfs rewrap`.
    Rewrap,
    /// `kmsfs slot add`.
    SlotAdd,
    /// `kmsfs slot remove`.
    SlotRemove,
    /// `kmsfs snapshot create`.
    SnapshotCreate,
    /// `kmsfs snapshot restore`.
    SnapshotRestore,
    /// `kmsfs snapshot delete`.
    SnapshotDelete,
    /// One key slot of one snapshot in `kmsfs snapshot rewrap`.
    SnapshotRewrap,
}

impl Op {
    /// The `OPERATION` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Mount => "mount",
            Op::Umount => "umount",
            Op::Rewrap => "rewrap",
            Op::SlotAdd => "slot-add",
            Op::SlotRemove => "slot-remove",
            Op::SnapshotCreate => "snapshot-create",
            Op::SnapshotRestore => "snapshot-restore",
            Op::SnapshotDelete => "snapshot-delete",
            Op::SnapshotRewrap => "snapshot-rewrap",
        }
    }
}

/// The fields a record may carry besides `OPERATION`, `RESULT`, `MESSAGE`,
/// `PRIORITY` and `SYSLOG_IDENTIFIER`. A fixed list, so that nothing but
/// these ever reaches the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The filesystem UUID from its header.
    FsUuid,
    /// The backing directory.
    Cipherdir,
    /// The mountpoint.
    Mountpoint,
    /// The `-o` options of a mount.
    MountOptions,
    /// `vault` or `kmip`.
    KmsType,
    /// The Transit key name, or the KMIP key's Unique Identifier.
    KmsKeyName,
    /// The Transit key version (none for KMIP).
    KmsKeyVersion,
    /// A rewrap's key name before.
    OldKmsKeyName,
    /// A rewrap's key version before.
    OldKmsKeyVersion,
    /// The KMS addresses a slot records.
    KmsAddresses,
    /// The key slot's index in the header.
    Slot,
    /// The key slot's label.
    SlotLabel,
    /// A snapshot's id.
    SnapshotId,
    /// A snapshot target (`s3://BUCKET/PREFIX` or a directory).
    SnapshotTarget,
    /// A rewrap slot's outcome: `rewrapped`, `unchanged`, `not-reached`,
    /// `failed`.
    Outcome,
}

impl Field {
    /// The journal field name.
    pub fn name(self) -> &'static str {
        match self {
            Field::FsUuid => "FS_UUID",
            Field::Cipherdir => "CIPHERDIR",
            Field::Mountpoint => "MOUNTPOINT",
            Field::MountOptions => "MOUNT_OPTIONS",
            Field::KmsType => "KMS_TYPE",
            Field::KmsKeyName => "KMS_KEY_NAME",
            Field::KmsKeyVersion => "KMS_KEY_VERSION",
            Field::OldKmsKeyName => "OLD_KMS_KEY_NAME",
            Field::OldKmsKeyVersion => "OLD_KMS_KEY_VERSION",
            Field::KmsAddresses => "KMS_ADDRESSES",
            Field::Slot => "KMS_SLOT",
            Field::SlotLabel => "KMS_SLOT_LABEL",
            Field::SnapshotId => "SNAPSHOT_ID",
            Field::SnapshotTarget => "SNAPSHOT_TARGET",
            Field::Outcome => "OUTCOME",
        }
    }
}

/// syslog priorities used (`PRIORITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// 3: the operation failed.
    Error = 3,
    /// 4: left undone, not failed (a rewrap slot another KMS holds).
    Warning = 4,
    /// 6: done.
    Info = 6,
}

/// One record, filled in as the operation learns its fields and sent once
/// by [`Event::ok`], [`Event::fail`], [`Event::finish`] or [`Event::emit`].
#[derive(Debug, Clone)]
pub struct Event {
    op: Op,
    fields: Vec<(Field, String)>,
    sent: bool,
}

impl Event {
    /// A record of `op` with no fields yet.
    pub fn new(op: Op) -> Event {
        Event {
            op,
            fields: Vec::new(),
            sent: false,
        }
    }

    /// A record of `op` with this one's fields (not yet sent).
    pub fn for_op(&self, op: Op) -> Event {
        Event {
            op,
            fields: self.fields.clone(),
            sent: false,
        }
    }

    /// Sets (or replaces) a field.
    pub fn set(&mut self, field: Field, value: impl Into<String>) -> &mut Event {
        let value = value.into();
        match self.fields.iter_mut().find(|(f, _)| *f == field) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((field, value)),
        }
        self
    }

    /// A field's value, if set.
    pub fn get(&self, field: Field) -> Option<&str> {
        self.fields
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, v)| v.as_str())
    }

    /// Removes a field.
    pub fn unset(&mut self, field: Field) -> &mut Event {
        self.fields.retain(|(f, _)| *f != field);
        self
    }

    /// Sets `CIPHERDIR`, made absolute where it can be.
    pub fn cipherdir(&mut self, dir: &Path) -> &mut Event {
        let abs = crate::commands::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        self.set(Field::Cipherdir, abs.to_string_lossy())
    }

    /// Sets `FS_UUID`.
    pub fn uuid(&mut self, uuid: &[u8; 16]) -> &mut Event {
        self.set(Field::FsUuid, crate::commands::uuid_string(uuid))
    }

    /// Sets the key slot fields: index, label, KMS type, key name and
    /// version (Transit) or Unique Identifier (KMIP). Never the wrapped key.
    pub fn slot(&mut self, index: usize, slot: &KeySlot) -> &mut Event {
        self.set(Field::Slot, index.to_string());
        self.set(Field::SlotLabel, slot.label.clone());
        self.set(Field::KmsType, slot.kms_type().as_str());
        self.set(Field::KmsAddresses, slot.addresses().join(","));
        self.key(&slot.kms)
    }

    /// Sets `KMS_KEY_NAME` and `KMS_KEY_VERSION` from a slot's KMS part.
    pub fn key(&mut self, kms: &SlotKms) -> &mut Event {
        match kms {
            SlotKms::Vault(v) => {
                self.set(Field::KmsKeyName, v.key_name.clone());
                self.set(Field::KmsKeyVersion, v.key_version.to_string())
            }
            SlotKms::Kmip(k) => {
                self.set(Field::KmsKeyName, k.key_id.clone());
                self.unset(Field::KmsKeyVersion)
            }
        }
    }

    /// Sends the record with `RESULT=ok`.
    pub fn ok(&mut self) {
        self.emit("ok", Priority::Info);
    }

    /// Sends the record with the error (and its causes) as `RESULT`.
    pub fn fail(&mut self, e: &anyhow::Error) {
        self.emit(&format!("{e:#}"), Priority::Error);
    }

    /// Sends the record for `result`: ok or the error.
    pub fn finish<T>(&mut self, result: &anyhow::Result<T>) {
        match result {
            Ok(_) => self.ok(),
            Err(e) => self.fail(e),
        }
    }

    /// True once the record was sent.
    pub fn is_sent(&self) -> bool {
        self.sent
    }

    /// Sends the record with `result` as `RESULT`, once (later calls do
    /// nothing).
    pub fn emit(&mut self, result: &str, priority: Priority) {
        if self.sent {
            return;
        }
        self.sent = true;
        let message = self.message(result);
        let mut fields: Vec<(&str, String)> = vec![
            ("MESSAGE", message.clone()),
            ("PRIORITY", (priority as u8).to_string()),
            ("SYSLOG_IDENTIFIER", IDENTIFIER.to_string()),
            ("OPERATION", self.op.as_str().to_string()),
        ];
        fields.extend(self.fields.iter().map(|(f, v)| (f.name(), v.clone())));
        fields.push(("RESULT", result.to_string()));
        match sink() {
            Sink::Journal(path) => {
                let pairs: Vec<(&str, &str)> =
                    fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
                if let Err(e) = journal::send(path, &journal::encode(&pairs)) {
                    warn_once(path, &e);
                    log_line(&message, &fields);
                }
            }
            Sink::Log => log_line(&message, &fields),
        }
    }

    /// `MESSAGE`: the operation, what it was done to, and the result.
    fn message(&self, result: &str) -> String {
        let mut m = format!("kmsfs {}", self.op.as_str().replacen('-', " ", 1));
        if let Some(id) = self.get(Field::SnapshotId) {
            m.push_str(&format!(" snapshot {id}"));
        }
        if let Some(t) = self.get(Field::SnapshotTarget) {
            m.push_str(&format!(" in {t}"));
        }
        if let Some(d) = self.get(Field::Cipherdir) {
            m.push_str(&format!(" {d}"));
        }
        if let Some(mp) = self.get(Field::Mountpoint) {
            m.push_str(&format!(" on {mp}"));
        }
        let mut about = Vec::new();
        if let Some(u) = self.get(Field::FsUuid) {
            about.push(format!("filesystem {u}"));
        }
        if let Some(l) = self.get(Field::SlotLabel) {
            about.push(format!("slot '{l}'"));
        }
        if let (Some(k), Some(v)) = (
            self.get(Field::OldKmsKeyName),
            self.get(Field::OldKmsKeyVersion),
        ) {
            about.push(format!("from key '{k}' v{v}"));
        }
        match (self.get(Field::KmsKeyName), self.get(Field::KmsKeyVersion)) {
            (Some(k), Some(v)) => about.push(format!("key '{k}' v{v}")),
            (Some(k), None) => about.push(format!("key '{k}'")),
            _ => {}
        }
        if !about.is_empty() {
            m.push_str(&format!(" ({})", about.join(", ")));
        }
        m.push_str(": ");
        m.push_str(result);
        m
    }
}

/// Where records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// journald's native socket at this path.
    Journal(PathBuf),
    /// One line through kmsfs's log (`tracing`, target `kmsfs::audit`).
    Log,
}

static SINK: OnceLock<Sink> = OnceLock::new();
static DAEMON: AtomicBool = AtomicBool::new(false);
static WARNED: AtomicBool = AtomicBool::new(false);

/// Marks this process as the mount daemon (no terminal): records go to
/// the journal whenever its socket exists. Call before the first record.
pub fn set_daemon() {
    DAEMON.store(true, Ordering::Relaxed);
}

/// The sink for this process, decided on the first record.
pub fn sink() -> &'static Sink {
    SINK.get_or_init(|| {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        choose_sink(
            env(SOCKET_ENV).map(PathBuf::from),
            env("JOURNAL_STREAM").is_some() || env("INVOCATION_ID").is_some(),
            DAEMON.load(Ordering::Relaxed),
        )
    })
}

/// The journal at `socket` (or the default) when it exists and the process
/// runs under systemd or is the daemon; else the log.
fn choose_sink(socket: Option<PathBuf>, under_systemd: bool, daemon: bool) -> Sink {
    let path = socket.unwrap_or_else(|| PathBuf::from(journal::DEFAULT_SOCKET));
    if (under_systemd || daemon) && path.exists() {
        Sink::Journal(path)
    } else {
        Sink::Log
    }
}

fn warn_once(path: &Path, e: &std::io::Error) {
    if WARNED.swap(true, Ordering::Relaxed) {
        return;
    }
    let msg = format!(
        "cannot send audit events to the journal at {}: {e}; they go to kmsfs's log instead \
         (the operation itself is not affected)",
        path.display()
    );
    if DAEMON.load(Ordering::Relaxed) {
        tracing::warn!("{msg}");
    } else {
        eprintln!("kmsfs: warning: {msg}");
    }
}

/// The record as one log line: the message, then every field.
fn log_line(message: &str, fields: &[(&str, String)]) {
    let rest: Vec<String> = fields
        .iter()
        .filter(|(k, _)| !matches!(*k, "MESSAGE" | "PRIORITY" | "SYSLOG_IDENTIFIER"))
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    let message = message.replace('\n', "; ");
    tracing::info!(target: "kmsfs::audit", "{message} [{}]", rest.join(" "));
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_FIELDS: [Field; 15] = [
        Field::FsUuid,
        Field::Cipherdir,
        Field::Mountpoint,
        Field::MountOptions,
        Field::KmsType,
        Field::KmsKeyName,
        Field::KmsKeyVersion,
        Field::OldKmsKeyName,
        Field::OldKmsKeyVersion,
        Field::KmsAddresses,
        Field::Slot,
        Field::SlotLabel,
        Field::SnapshotId,
        Field::SnapshotTarget,
        Field::Outcome,
    ];

    #[test]
    fn every_field_name_is_one_journald_accepts() {
        for f in ALL_FIELDS {
            assert!(journal::valid_name(f.name()), "{f:?}");
        }
        for n in [
            "MESSAGE",
            "PRIORITY",
            "SYSLOG_IDENTIFIER",
            "OPERATION",
            "RESULT",
        ] {
            assert!(journal::valid_name(n), "{n}");
        }
    }

    #[test]
    fn the_journal_is_used_under_systemd_or_by_the_daemon_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s");
        std::fs::write(&sock, b"").expect("stand-in socket");
        let j = Sink::Journal(sock.clone());
        assert_eq!(choose_sink(Some(sock.clone()), true, false), j);
        assert_eq!(choose_sink(Some(sock.clone()), false, true), j);
        assert_eq!(choose_sink(Some(sock.clone()), false, false), Sink::Log);
        let missing = dir.path().join("missing");
        assert_eq!(choose_sink(Some(missing), true, true), Sink::Log);
    }

    #[test]
    fn the_message_names_what_was_done() {
        let mut e = Event::new(Op::Rewrap);
        e.set(Field::Cipherdir, "/srv/x")
            .set(Field::FsUuid, "u")
            .set(Field::SlotLabel, "primary")
            .set(Field::OldKmsKeyName, "k")
            .set(Field::OldKmsKeyVersion, "1")
            .set(Field::KmsKeyName, "k")
            .set(Field::KmsKeyVersion, "2");
        assert_eq!(
            e.message("ok"),
            "kmsfs rewrap /srv/x (filesystem u, slot 'primary', from key 'k' v1, key 'k' v2): ok"
        );
        let mut s = Event::new(Op::SnapshotCreate);
        s.set(Field::SnapshotTarget, "s3://b")
            .set(Field::SnapshotId, "i");
        assert_eq!(
            s.message("ok"),
            "kmsfs snapshot create snapshot i in s3://b: ok"
        );
    }

    #[test]
    fn set_replaces_and_a_record_is_sent_once() {
        // Never the journal of the host running the unit tests.
        let _ = SINK.set(Sink::Log);
        let mut e = Event::new(Op::Create);
        e.set(Field::KmsKeyName, "a").set(Field::KmsKeyName, "b");
        assert_eq!(e.fields, vec![(Field::KmsKeyName, "b".to_string())]);
        assert!(!e.is_sent());
        e.ok();
        assert!(e.is_sent());
        let again = e.for_op(Op::Mount);
        assert!(!again.is_sent());
    }
}
