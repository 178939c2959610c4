//! journald's native protocol, client side: one datagram per entry on
//! the `AF_UNIX`/`SOCK_DGRAM` socket journald listens on
//! (`/run/systemd/journal/socket`).
//!
//! An entry is a list of fields. A field whose value holds no newline is
//! `NAME=value\n`; any other value is `NAME\n`, the value's length as a
//! 64-bit little-endian integer, the value, `\n`. Names are upper-case
//! ASCII letters, digits and `_`, not starting with `_` (those are the
//! fields journald adds itself) or a digit, at most 64 bytes.
//!
//! Entries too large for one datagram would have to go through a memfd;
//! audit events are a few hundred bytes and every value is capped at
//! [`MAX_VALUE`], so they never are.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

/// journald's native socket on a systemd host.
pub const DEFAULT_SOCKET: &str = "/run/systemd/journal/socket";

/// The longest value sent, in bytes (longer ones are cut at a character
/// boundary): keeps every entry far below the datagram size limit.
pub const MAX_VALUE: usize = 8192;

/// How long a send may block on a journald that is not reading: an audit
/// event must never hang the operation it records.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// True when `name` is a field name journald accepts from a client.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && !b[0].is_ascii_digit()
        && b[0] != b'_'
        && b.iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
}

/// `value` cut to at most [`MAX_VALUE`] bytes, at a character boundary.
fn capped(value: &str) -> &str {
    if value.len() <= MAX_VALUE {
        return value;
    }
    let mut end = MAX_VALUE;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// Encodes one entry. Fields with an invalid name are dropped (the names
/// are fixed in [`super::Field`], so this never happens outside a bug,
/// which the unit tests would catch).
pub fn encode(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        if !valid_name(name) {
            continue;
        }
        let value = capped(value);
        out.extend_from_slice(name.as_bytes());
        if value.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        } else {
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
        }
        out.push(b'\n');
    }
    out
}

/// Sends one encoded entry to the socket at `path`.
pub fn send(path: &Path, datagram: &[u8]) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    let sent = sock.send_to(datagram, path)?;
    if sent != datagram.len() {
        return Err(io::Error::other(format!(
            "journal entry cut short: {sent} of {} bytes sent",
            datagram.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_binary_fields() {
        let got = encode(&[("MESSAGE", "one line"), ("RESULT", "two\nlines")]);
        let mut want = b"MESSAGE=one line\nRESULT\n".to_vec();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(b"two\nlines\n");
        assert_eq!(got, want);
    }

    #[test]
    fn names_journald_would_refuse_are_dropped() {
        assert!(valid_name("FS_UUID"));
        assert!(valid_name("KMS_KEY_VERSION"));
        let long = "X".repeat(65);
        for bad in ["", "_PID", "1X", "lower", "A-B", "A=B", long.as_str()] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert_eq!(encode(&[("_PID", "1"), ("OK", "v")]), b"OK=v\n");
    }

    #[test]
    fn long_values_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_VALUE);
        let v = capped(&long);
        assert!(v.len() <= MAX_VALUE && v.len() > MAX_VALUE - 2);
        assert!(long.starts_with(v));
    }

    #[test]
    fn an_entry_reaches_a_datagram_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.sock");
        let rx = UnixDatagram::bind(&path).expect("bind");
        let entry = encode(&[("MESSAGE", "hello")]);
        send(&path, &entry).expect("send");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], entry.as_slice());
        // Nobody listening: an error, never a hang or a panic.
        drop(rx);
        assert!(send(&path, &entry).is_err());
    }
}
