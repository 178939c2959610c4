//! Certificate expiry dates, for `kms check` (a KMIP server refuses an
//! expired client certificate, and kmsfs refuses an expired server one).
//!
//! Only the X.509 validity field is read: a minimal DER walk of
//! `Certificate → TBSCertificate → [version], serial, signature, issuer,
//! validity → notAfter`. Trust decisions are never based on it; rustls
//! verifies certificates for the connection itself.

use std::path::Path;

use super::conn::read_certs;
use crate::error::KmsError;

/// One DER element: (tag, contents, rest of the input).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A UTCTime (0x17) or GeneralizedTime (0x18) as Unix seconds.
fn parse_time(tag: u8, text: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    if !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |i: usize| -> Option<i64> { rest[i..i + 2].parse().ok() };
    let (mo, d, h, mi, se) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// The notAfter of one DER certificate, in Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (0x30, cert, _) = element(der)? else {
        return None;
    };
    let (0x30, tbs, _) = element(cert)? else {
        return None;
    };
    let mut rest = tbs;
    let (tag, _, r) = element(rest)?;
    // [0] EXPLICIT version is optional.
    rest = if tag == 0xA0 { r } else { rest };
    // serialNumber, signature, issuer.
    for want in [0x02, 0x30, 0x30] {
        let (tag, _, r) = element(rest)?;
        if tag != want {
            return None;
        }
        rest = r;
    }
    let (0x30, validity, _) = element(rest)? else {
        return None;
    };
    let (_, _, after) = element(validity)?;
    let (tag, text, _) = element(after)?;
    parse_time(tag, text)
}

/// The notAfter (Unix seconds) of every certificate in a PEM file.
pub fn expiry_dates(path: &Path, what: &str) -> Result<Vec<i64>, KmsError> {
    read_certs(path, what)?
        .iter()
        .map(|c| {
            not_after(c.as_ref()).ok_or_else(|| KmsError::Tls {
                detail: format!(
                    "{}: cannot read the expiry date of the {what}",
                    path.display()
                ),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(parse_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(0x18, b"20261128120000Z"), Some(1_795_867_200));
        assert_eq!(parse_time(0x17, b"261128120000"), None);
        assert_eq!(parse_time(0x17, b"261328120000Z"), None);
        assert_eq!(parse_time(0x18, b"2026112812000Z"), None);
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(not_after(&[]), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xFF]), None);
        assert_eq!(not_after(&[0x30, 0x03, 0x02, 0x01, 0x01]), None);
    }
}
