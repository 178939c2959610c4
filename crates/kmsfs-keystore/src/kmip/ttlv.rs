//! KMIP's binary encoding, TTLV (Tag, Type, Length, Value), as far as
//! kmsfs needs it (KMIP 1.x specification, section 9.1).
//!
//! Every item is a 3-byte tag, a 1-byte type, a 4-byte big-endian length
//! and a value padded with zeros to a multiple of 8 bytes. Decoding is
//! strict: lengths must match the type, padding must be zero, a structure
//! must be consumed exactly, booleans are 0 or 1, text is UTF-8, and
//! nesting is bounded. Decoded byte and text strings borrow from the input,
//! so a response held in locked memory is never copied into ordinary heap
//! memory by the decoder; encoding writes into a buffer sized in advance
//! (see [`encode`]) for the same reason.

use std::fmt;

/// Deepest structure nesting accepted (real messages use 5 or 6 levels).
const MAX_DEPTH: usize = 16;

/// Length of an item's header (tag, type, length).
pub const HEADER_LEN: usize = 8;

/// A KMIP tag (the `0x42xxxx` values of the specification).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Tag(pub u32);

/// The tags kmsfs sends or reads.
#[allow(missing_docs)]
impl Tag {
    pub const ATTRIBUTE: Tag = Tag(0x42_0008);
    pub const ATTRIBUTE_NAME: Tag = Tag(0x42_000A);
    pub const ATTRIBUTE_VALUE: Tag = Tag(0x42_000B);
    pub const BATCH_COUNT: Tag = Tag(0x42_000D);
    pub const BATCH_ITEM: Tag = Tag(0x42_000F);
    pub const BLOCK_CIPHER_MODE: Tag = Tag(0x42_0011);
    pub const CRYPTOGRAPHIC_ALGORITHM: Tag = Tag(0x42_0028);
    pub const CRYPTOGRAPHIC_LENGTH: Tag = Tag(0x42_002A);
    pub const CRYPTOGRAPHIC_PARAMETERS: Tag = Tag(0x42_002B);
    pub const CRYPTOGRAPHIC_USAGE_MASK: Tag = Tag(0x42_002C);
    pub const IV_COUNTER_NONCE: Tag = Tag(0x42_003D);
    pub const MAXIMUM_ITEMS: Tag = Tag(0x42_004F);
    pub const MAXIMUM_RESPONSE_SIZE: Tag = Tag(0x42_0050);
    pub const NAME: Tag = Tag(0x42_0053);
    pub const NAME_TYPE: Tag = Tag(0x42_0054);
    pub const NAME_VALUE: Tag = Tag(0x42_0055);
    pub const OBJECT_TYPE: Tag = Tag(0x42_0057);
    pub const OPERATION: Tag = Tag(0x42_005C);
    pub const PADDING_METHOD: Tag = Tag(0x42_005F);
    pub const PROTOCOL_VERSION: Tag = Tag(0x42_0069);
    pub const PROTOCOL_VERSION_MAJOR: Tag = Tag(0x42_006A);
    pub const PROTOCOL_VERSION_MINOR: Tag = Tag(0x42_006B);
    pub const QUERY_FUNCTION: Tag = Tag(0x42_0074);
    pub const REQUEST_HEADER: Tag = Tag(0x42_0077);
    pub const REQUEST_MESSAGE: Tag = Tag(0x42_0078);
    pub const REQUEST_PAYLOAD: Tag = Tag(0x42_0079);
    pub const RESPONSE_HEADER: Tag = Tag(0x42_007A);
    pub const RESPONSE_MESSAGE: Tag = Tag(0x42_007B);
    pub const RESPONSE_PAYLOAD: Tag = Tag(0x42_007C);
    pub const RESULT_MESSAGE: Tag = Tag(0x42_007D);
    pub const RESULT_REASON: Tag = Tag(0x42_007E);
    pub const RESULT_STATUS: Tag = Tag(0x42_007F);
    pub const SERVER_INFORMATION: Tag = Tag(0x42_0088);
    pub const STATE: Tag = Tag(0x42_008D);
    pub const TIME_STAMP: Tag = Tag(0x42_0092);
    pub const UNIQUE_IDENTIFIER: Tag = Tag(0x42_0094);
    pub const VENDOR_IDENTIFICATION: Tag = Tag(0x42_009D);
    pub const DATA: Tag = Tag(0x42_00C2);
    pub const RANDOM_IV: Tag = Tag(0x42_00C5);
    pub const IV_LENGTH: Tag = Tag(0x42_00CD);
    pub const TAG_LENGTH: Tag = Tag(0x42_00CE);
    pub const AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA: Tag = Tag(0x42_00FE);
    pub const AUTHENTICATED_ENCRYPTION_TAG: Tag = Tag(0x42_00FF);
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:06X}", self.0)
    }
}

/// A TTLV value. Strings borrow from the buffer they were decoded from (or
/// from the caller's data when encoding).
#[derive(Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// Type 0x01: an ordered list of items.
    Structure(Vec<Item<'a>>),
    /// Type 0x02: a signed 32-bit integer (also bit masks).
    Integer(i32),
    /// Type 0x03: a signed 64-bit integer.
    LongInteger(i64),
    /// Type 0x04: a big-endian two's complement integer, kept as bytes.
    BigInteger(&'a [u8]),
    /// Type 0x05: an enumeration value.
    Enumeration(u32),
    /// Type 0x06: a boolean.
    Boolean(bool),
    /// Type 0x07: UTF-8 text.
    Text(&'a str),
    /// Type 0x08: bytes.
    Bytes(&'a [u8]),
    /// Type 0x09: seconds since the Unix epoch.
    DateTime(i64),
    /// Type 0x0A: a duration in seconds.
    Interval(u32),
}

// Byte strings may be keys: Debug prints their length only.
impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Structure(items) => f.debug_list().entries(items).finish(),
            Value::Integer(v) => write!(f, "Integer({v})"),
            Value::LongInteger(v) => write!(f, "LongInteger({v})"),
            Value::BigInteger(b) => write!(f, "BigInteger({} bytes)", b.len()),
            Value::Enumeration(v) => write!(f, "Enumeration({v})"),
            Value::Boolean(v) => write!(f, "Boolean({v})"),
            Value::Text(s) => write!(f, "Text({s:?})"),
            Value::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Value::DateTime(v) => write!(f, "DateTime({v})"),
            Value::Interval(v) => write!(f, "Interval({v})"),
        }
    }
}

impl Value<'_> {
    fn type_code(&self) -> u8 {
        match self {
            Value::Structure(_) => 0x01,
            Value::Integer(_) => 0x02,
            Value::LongInteger(_) => 0x03,
            Value::BigInteger(_) => 0x04,
            Value::Enumeration(_) => 0x05,
            Value::Boolean(_) => 0x06,
            Value::Text(_) => 0x07,
            Value::Bytes(_) => 0x08,
            Value::DateTime(_) => 0x09,
            Value::Interval(_) => 0x0A,
        }
    }

    /// Length of the value without padding (what the length field says).
    fn value_len(&self) -> usize {
        match self {
            Value::Structure(items) => items.iter().map(Item::encoded_len).sum(),
            Value::Integer(_) | Value::Enumeration(_) | Value::Interval(_) => 4,
            Value::LongInteger(_) | Value::Boolean(_) | Value::DateTime(_) => 8,
            Value::BigInteger(b) | Value::Bytes(b) => b.len(),
            Value::Text(s) => s.len(),
        }
    }
}

/// One tagged value.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Item<'a> {
    /// What the value means.
    pub tag: Tag,
    /// The value.
    pub value: Value<'a>,
}

/// Shorthand constructors, used to build requests.
#[allow(missing_docs)]
impl<'a> Item<'a> {
    pub fn structure(tag: Tag, items: Vec<Item<'a>>) -> Self {
        Item {
            tag,
            value: Value::Structure(items),
        }
    }
    pub fn int(tag: Tag, v: i32) -> Self {
        Item {
            tag,
            value: Value::Integer(v),
        }
    }
    pub fn enumeration(tag: Tag, v: u32) -> Self {
        Item {
            tag,
            value: Value::Enumeration(v),
        }
    }
    pub fn boolean(tag: Tag, v: bool) -> Self {
        Item {
            tag,
            value: Value::Boolean(v),
        }
    }
    pub fn text(tag: Tag, v: &'a str) -> Self {
        Item {
            tag,
            value: Value::Text(v),
        }
    }
    pub fn bytes(tag: Tag, v: &'a [u8]) -> Self {
        Item {
            tag,
            value: Value::Bytes(v),
        }
    }
}

/// `n` rounded up to a multiple of 8.
fn padded(n: usize) -> usize {
    n.div_ceil(8) * 8
}

impl<'a> Item<'a> {
    /// Bytes this item takes when encoded (header, value, padding).
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + padded(self.value.value_len())
    }

    /// The children of a structure, or an error naming the tag.
    pub fn children(&self) -> Result<&[Item<'a>], TtlvError> {
        match &self.value {
            Value::Structure(items) => Ok(items),
            _ => Err(TtlvError::WrongType {
                tag: self.tag,
                expected: "Structure",
            }),
        }
    }

    /// The first child with `tag`, if any.
    pub fn find(&self, tag: Tag) -> Option<&Item<'a>> {
        self.children().ok()?.iter().find(|i| i.tag == tag)
    }

    /// Every child with `tag`.
    pub fn find_all(&self, tag: Tag) -> impl Iterator<Item = &Item<'a>> {
        self.children()
            .unwrap_or(&[])
            .iter()
            .filter(move |i| i.tag == tag)
    }

    /// The first child with `tag`, or [`TtlvError::Missing`].
    pub fn get(&self, tag: Tag) -> Result<&Item<'a>, TtlvError> {
        self.find(tag).ok_or(TtlvError::Missing {
            tag,
            parent: self.tag,
        })
    }

    /// This item's value as an enumeration.
    pub fn as_enum(&self) -> Result<u32, TtlvError> {
        match self.value {
            Value::Enumeration(v) => Ok(v),
            _ => Err(self.wrong("Enumeration")),
        }
    }

    /// This item's value as an integer.
    pub fn as_int(&self) -> Result<i32, TtlvError> {
        match self.value {
            Value::Integer(v) => Ok(v),
            _ => Err(self.wrong("Integer")),
        }
    }

    /// This item's value as text.
    pub fn as_text(&self) -> Result<&'a str, TtlvError> {
        match self.value {
            Value::Text(v) => Ok(v),
            _ => Err(self.wrong("Text String")),
        }
    }

    /// This item's value as bytes.
    pub fn as_bytes(&self) -> Result<&'a [u8], TtlvError> {
        match self.value {
            Value::Bytes(v) => Ok(v),
            _ => Err(self.wrong("Byte String")),
        }
    }

    fn wrong(&self, expected: &'static str) -> TtlvError {
        TtlvError::WrongType {
            tag: self.tag,
            expected,
        }
    }
}

/// Why a TTLV buffer could not be decoded (or a decoded one was not what
/// was expected).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlvError {
    /// The buffer ends inside an item.
    #[error("truncated TTLV at byte {offset}")]
    Truncated {
        /// Where the item starts.
        offset: usize,
    },
    /// Something other than a well-formed item.
    #[error("malformed TTLV at byte {offset}: {detail}")]
    Malformed {
        /// Where the item starts.
        offset: usize,
        /// What is wrong.
        detail: String,
    },
    /// An item had another type than the message format requires.
    #[error("KMIP item {tag} is not a {expected}")]
    WrongType {
        /// The item's tag.
        tag: Tag,
        /// The type it should have.
        expected: &'static str,
    },
    /// A required item is missing.
    #[error("KMIP item {tag} is missing from {parent}")]
    Missing {
        /// The missing tag.
        tag: Tag,
        /// Where it should have been.
        parent: Tag,
    },
}

/// Writes `item` into `out`, which must be exactly
/// [`Item::encoded_len`] bytes long (callers size a locked buffer first, so
/// nothing is ever reallocated). Padding bytes are left as they are, so
/// `out` must start zeroed.
pub fn encode(item: &Item<'_>, out: &mut [u8]) -> Result<(), TtlvError> {
    if out.len() != item.encoded_len() {
        return Err(TtlvError::Malformed {
            offset: 0,
            detail: format!(
                "output buffer of {} bytes for an item of {}",
                out.len(),
                item.encoded_len()
            ),
        });
    }
    let end = encode_at(item, out, 0)?;
    debug_assert_eq!(end, out.len());
    Ok(())
}

fn encode_at(item: &Item<'_>, out: &mut [u8], at: usize) -> Result<usize, TtlvError> {
    let len = item.value.value_len();
    let len32 = u32::try_from(len).map_err(|_| TtlvError::Malformed {
        offset: at,
        detail: "value longer than 4 GiB".into(),
    })?;
    if item.tag.0 > 0xFF_FFFF {
        return Err(TtlvError::Malformed {
            offset: at,
            detail: format!("tag {} does not fit in 3 bytes", item.tag),
        });
    }
    out[at..at + 3].copy_from_slice(&item.tag.0.to_be_bytes()[1..]);
    out[at + 3] = item.value.type_code();
    out[at + 4..at + 8].copy_from_slice(&len32.to_be_bytes());
    let v = at + HEADER_LEN;
    match &item.value {
        Value::Structure(items) => {
            let mut p = v;
            for child in items {
                p = encode_at(child, out, p)?;
            }
        }
        Value::Integer(x) => out[v..v + 4].copy_from_slice(&x.to_be_bytes()),
        Value::Enumeration(x) | Value::Interval(x) => {
            out[v..v + 4].copy_from_slice(&x.to_be_bytes())
        }
        Value::LongInteger(x) | Value::DateTime(x) => {
            out[v..v + 8].copy_from_slice(&x.to_be_bytes())
        }
        Value::Boolean(b) => out[v..v + 8].copy_from_slice(&u64::from(*b).to_be_bytes()),
        Value::Text(s) => out[v..v + s.len()].copy_from_slice(s.as_bytes()),
        Value::BigInteger(b) | Value::Bytes(b) => out[v..v + b.len()].copy_from_slice(b),
    }
    Ok(v + padded(len))
}

/// The total length of the item whose 8-byte header is `header`, or an
/// error when it is not the start of a structure (what every KMIP message
/// is) or exceeds `max`.
pub fn message_len(header: &[u8; HEADER_LEN], max: usize) -> Result<usize, TtlvError> {
    if header[3] != 0x01 {
        return Err(TtlvError::Malformed {
            offset: 0,
            detail: format!(
                "a KMIP message starts with a structure, not type 0x{:02X} (not a KMIP server?)",
                header[3]
            ),
        });
    }
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len % 8 != 0 {
        return Err(TtlvError::Malformed {
            offset: 0,
            detail: format!("structure length {len} is not a multiple of 8"),
        });
    }
    if len > max {
        return Err(TtlvError::Malformed {
            offset: 0,
            detail: format!("message of {len} bytes exceeds the limit of {max}"),
        });
    }
    Ok(HEADER_LEN + len)
}

/// Decodes exactly one item spanning all of `buf`.
pub fn decode(buf: &[u8]) -> Result<Item<'_>, TtlvError> {
    let (item, end) = decode_at(buf, 0, 0)?;
    if end != buf.len() {
        return Err(TtlvError::Malformed {
            offset: end,
            detail: format!("{} trailing bytes after the message", buf.len() - end),
        });
    }
    Ok(item)
}

fn decode_at(buf: &[u8], at: usize, depth: usize) -> Result<(Item<'_>, usize), TtlvError> {
    let bad = |detail: String| TtlvError::Malformed { offset: at, detail };
    if depth > MAX_DEPTH {
        return Err(bad(format!("structures nested deeper than {MAX_DEPTH}")));
    }
    let header = buf
        .get(at..at + HEADER_LEN)
        .ok_or(TtlvError::Truncated { offset: at })?;
    let tag = Tag(u32::from_be_bytes([0, header[0], header[1], header[2]]));
    // 0x42xxxx are the specification's tags, 0x54xxxx extensions.
    if header[0] != 0x42 && header[0] != 0x54 {
        return Err(bad(format!(
            "tag {tag} is neither a KMIP nor an extension tag"
        )));
    }
    let ty = header[3];
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let v = at + HEADER_LEN;
    let end = v
        .checked_add(padded(len))
        .ok_or(TtlvError::Truncated { offset: at })?;
    let body = buf.get(v..end).ok_or(TtlvError::Truncated { offset: at })?;
    let (value_bytes, padding) = body.split_at(len);
    if padding.iter().any(|&b| b != 0) {
        return Err(bad(format!("non-zero padding after item {tag}")));
    }
    let fixed = |want: usize| -> Result<(), TtlvError> {
        if len == want {
            Ok(())
        } else {
            Err(TtlvError::Malformed {
                offset: at,
                detail: format!("item {tag} of type 0x{ty:02X} has length {len}, not {want}"),
            })
        }
    };
    let be4 = |b: &[u8]| [b[0], b[1], b[2], b[3]];
    let be8 = |b: &[u8]| [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
    let value = match ty {
        0x01 => {
            if len % 8 != 0 {
                return Err(bad(format!(
                    "structure {tag} has length {len}, not a multiple of 8"
                )));
            }
            let mut items = Vec::new();
            let mut p = v;
            while p < v + len {
                let (child, next) = decode_at(&buf[..v + len], p, depth + 1)?;
                items.push(child);
                p = next;
            }
            Value::Structure(items)
        }
        0x02 => {
            fixed(4)?;
            Value::Integer(i32::from_be_bytes(be4(value_bytes)))
        }
        0x03 => {
            fixed(8)?;
            Value::LongInteger(i64::from_be_bytes(be8(value_bytes)))
        }
        0x04 => {
            if len % 8 != 0 {
                return Err(bad(format!(
                    "big integer {tag} has length {len}, not a multiple of 8"
                )));
            }
            Value::BigInteger(value_bytes)
        }
        0x05 => {
            fixed(4)?;
            Value::Enumeration(u32::from_be_bytes(be4(value_bytes)))
        }
        0x06 => {
            fixed(8)?;
            match u64::from_be_bytes(be8(value_bytes)) {
                0 => Value::Boolean(false),
                1 => Value::Boolean(true),
                other => return Err(bad(format!("boolean {tag} has value {other}"))),
            }
        }
        0x07 => Value::Text(
            std::str::from_utf8(value_bytes)
                .map_err(|_| bad(format!("text {tag} is not UTF-8")))?,
        ),
        0x08 => Value::Bytes(value_bytes),
        0x09 => {
            fixed(8)?;
            Value::DateTime(i64::from_be_bytes(be8(value_bytes)))
        }
        0x0A => {
            fixed(4)?;
            Value::Interval(u32::from_be_bytes(be4(value_bytes)))
        }
        other => return Err(bad(format!("unknown item type 0x{other:02X} for {tag}"))),
    };
    Ok((Item { tag, value }, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_vec(item: &Item<'_>) -> Vec<u8> {
        let mut out = vec![0u8; item.encoded_len()];
        encode(item, &mut out).unwrap();
        out
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The examples of KMIP 1.2 section 9.1.2 (tag 0x420020), byte for byte.
    #[test]
    fn specification_examples() {
        let t = Tag(0x42_0020);
        let cases: Vec<(Item<'_>, &str)> = vec![
            (
                Item::int(t, 8),
                "42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00",
            ),
            (
                Item {
                    tag: t,
                    value: Value::LongInteger(123_456_789_000_000_000),
                },
                "42 00 20 | 03 | 00 00 00 08 | 01 B6 9B 4B A5 74 92 00",
            ),
            (
                Item::enumeration(t, 255),
                "42 00 20 | 05 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",
            ),
            (
                Item::boolean(t, true),
                "42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 01",
            ),
            (
                Item::text(t, "Hello World"),
                "42 00 20 | 07 | 00 00 00 0B | 48 65 6C 6C 6F 20 57 6F 72 6C 64 00 00 00 00 00",
            ),
            (
                Item::bytes(t, &[1, 2, 3]),
                "42 00 20 | 08 | 00 00 00 03 | 01 02 03 00 00 00 00 00",
            ),
            (
                Item {
                    tag: t,
                    value: Value::DateTime(0x47DA_67F8),
                },
                "42 00 20 | 09 | 00 00 00 08 | 00 00 00 00 47 DA 67 F8",
            ),
            (
                Item {
                    tag: t,
                    value: Value::Interval(864_000),
                },
                "42 00 20 | 0A | 00 00 00 04 | 00 0D 2F 00 00 00 00 00",
            ),
            (
                Item::structure(
                    t,
                    vec![
                        Item::enumeration(Tag(0x42_0004), 254),
                        Item::int(Tag(0x42_0005), 255),
                    ],
                ),
                "42 00 20 | 01 | 00 00 00 20 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00 |
                 42 00 05 | 02 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",
            ),
        ];
        for (item, want) in cases {
            let want = hex(&want.replace('|', ""));
            assert_eq!(to_vec(&item), want, "{item:?}");
            assert_eq!(decode(&want).unwrap(), item);
        }
    }

    #[test]
    fn strict_decoding() {
        let good = to_vec(&Item::structure(
            Tag::REQUEST_MESSAGE,
            vec![Item::text(Tag::UNIQUE_IDENTIFIER, "1")],
        ));
        assert!(decode(&good).is_ok());
        // Every truncation is refused.
        for n in 0..good.len() {
            assert!(decode(&good[..n]).is_err(), "prefix of {n} bytes decoded");
        }
        // Trailing bytes.
        let mut long = good.clone();
        long.extend_from_slice(&[0; 8]);
        assert!(decode(&long).is_err());
        // Non-zero padding.
        let mut p = good.clone();
        *p.last_mut().unwrap() = 1;
        assert!(decode(&p).unwrap_err().to_string().contains("padding"));
        // Wrong fixed length.
        let mut i = to_vec(&Item::int(Tag::BATCH_COUNT, 1));
        i[7] = 8;
        assert!(decode(&i).is_err());
        // Boolean other than 0/1.
        let mut b = to_vec(&Item::boolean(Tag::RANDOM_IV, true));
        b[15] = 2;
        assert!(decode(&b).is_err());
        // Bad UTF-8.
        let mut s = to_vec(&Item::text(Tag::UNIQUE_IDENTIFIER, "ab"));
        s[8] = 0xFF;
        assert!(decode(&s).is_err());
        // Unknown type, foreign tag.
        let mut u = to_vec(&Item::int(Tag::BATCH_COUNT, 1));
        u[3] = 0x0B;
        assert!(decode(&u).is_err());
        let mut f = to_vec(&Item::int(Tag::BATCH_COUNT, 1));
        f[0] = 0x13;
        assert!(decode(&f).is_err());
        // A child running past its parent's end.
        let mut c = good.clone();
        c[15] = 0x20;
        assert!(decode(&c).is_err());
    }

    #[test]
    fn nesting_is_bounded() {
        let mut item = Item::int(Tag::BATCH_COUNT, 1);
        for _ in 0..MAX_DEPTH + 2 {
            item = Item::structure(Tag::BATCH_ITEM, vec![item]);
        }
        let bytes = to_vec(&item);
        assert!(decode(&bytes).unwrap_err().to_string().contains("nested"));
    }

    #[test]
    fn message_length_checks() {
        let m = to_vec(&Item::structure(Tag::RESPONSE_MESSAGE, vec![]));
        let h: [u8; 8] = m[..8].try_into().unwrap();
        assert_eq!(message_len(&h, 1024).unwrap(), 8);
        let mut big = h;
        big[4..8].copy_from_slice(&4096u32.to_be_bytes());
        assert!(message_len(&big, 1024).is_err());
        let http: [u8; 8] = *b"HTTP/1.1";
        assert!(message_len(&http, 1024)
            .unwrap_err()
            .to_string()
            .contains("not a KMIP server"));
    }

    #[test]
    fn debug_hides_bytes() {
        let s = format!("{:?}", Item::bytes(Tag::DATA, b"secret!"));
        assert!(!s.contains("secret") && s.contains("7 bytes"), "{s}");
    }
}
