//! KMIP request and response messages for the operations kmsfs uses:
//! Discover Versions, Query, Locate, Get Attributes, Encrypt and Decrypt.
//!
//! Requests are built as [`Item`] trees and encoded into locked memory
//! ([`encode_request`]); responses are decoded from locked memory and
//! checked strictly ([`parse_response`]): one batch item, the operation we
//! asked for, and a result status.

use kmsfs_core::secret::SecretBytes;

use super::ttlv::{self, Item, Tag, TtlvError, Value};

/// A KMIP protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProtocolVersion {
    /// Major version (1 for every version kmsfs speaks).
    pub major: i32,
    /// Minor version.
    pub minor: i32,
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl ProtocolVersion {
    /// KMIP 1.2: the first version with Encrypt and Decrypt.
    pub const V1_2: ProtocolVersion = ProtocolVersion { major: 1, minor: 2 };
    /// KMIP 1.3.
    pub const V1_3: ProtocolVersion = ProtocolVersion { major: 1, minor: 3 };
    /// KMIP 1.4: the first version with authenticated encryption (GCM tag
    /// and additional data in Encrypt and Decrypt).
    pub const V1_4: ProtocolVersion = ProtocolVersion { major: 1, minor: 4 };

    /// The versions kmsfs offers in Discover Versions, preferred first.
    pub const OFFERED: [ProtocolVersion; 3] = [Self::V1_4, Self::V1_3, Self::V1_2];

    fn item(self) -> Item<'static> {
        Item::structure(
            Tag::PROTOCOL_VERSION,
            vec![
                Item::int(Tag::PROTOCOL_VERSION_MAJOR, self.major),
                Item::int(Tag::PROTOCOL_VERSION_MINOR, self.minor),
            ],
        )
    }

    fn parse(item: &Item<'_>) -> Result<Self, TtlvError> {
        Ok(ProtocolVersion {
            major: item.get(Tag::PROTOCOL_VERSION_MAJOR)?.as_int()?,
            minor: item.get(Tag::PROTOCOL_VERSION_MINOR)?.as_int()?,
        })
    }
}

/// KMIP operations (enumeration values of the Operation tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Operation {
    Locate = 8,
    GetAttributes = 11,
    Query = 24,
    DiscoverVersions = 30,
    Encrypt = 31,
    Decrypt = 32,
}

impl Operation {
    /// The operation's name in the specification.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Locate => "Locate",
            Operation::GetAttributes => "Get Attributes",
            Operation::Query => "Query",
            Operation::DiscoverVersions => "Discover Versions",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
        }
    }
}

/// Enumeration and mask values used in requests and replies.
pub mod values {
    /// Object Type: Symmetric Key.
    pub const OBJECT_SYMMETRIC_KEY: u32 = 2;
    /// Cryptographic Algorithm: AES.
    pub const ALG_AES: u32 = 3;
    /// Block Cipher Mode: CBC.
    pub const MODE_CBC: u32 = 1;
    /// Block Cipher Mode: GCM.
    pub const MODE_GCM: u32 = 9;
    /// Padding Method: PKCS5.
    pub const PAD_PKCS5: u32 = 3;
    /// Name Type: Uninterpreted Text String.
    pub const NAME_TYPE_TEXT: u32 = 1;
    /// Query Function: Query Operations.
    pub const QUERY_OPERATIONS: u32 = 1;
    /// Query Function: Query Server Information.
    pub const QUERY_SERVER_INFORMATION: u32 = 3;
    /// Cryptographic Usage Mask bit: Encrypt.
    pub const USAGE_ENCRYPT: i32 = 0x4;
    /// Cryptographic Usage Mask bit: Decrypt.
    pub const USAGE_DECRYPT: i32 = 0x8;
    /// Result Status: Success.
    pub const STATUS_SUCCESS: u32 = 0;
}

/// A KMIP object state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Created, not yet activated: cannot encrypt or decrypt.
    PreActive,
    /// Usable.
    Active,
    /// Past its use: may no longer encrypt (servers differ on decrypt).
    Deactivated,
    /// Revoked as compromised.
    Compromised,
    /// Key material gone.
    Destroyed,
    /// Destroyed after compromise.
    DestroyedCompromised,
    /// A value this build does not know.
    Other(u32),
}

impl KeyState {
    /// From the State enumeration.
    pub fn from_enum(v: u32) -> Self {
        match v {
            1 => KeyState::PreActive,
            2 => KeyState::Active,
            3 => KeyState::Deactivated,
            4 => KeyState::Compromised,
            5 => KeyState::Destroyed,
            6 => KeyState::DestroyedCompromised,
            o => KeyState::Other(o),
        }
    }
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyState::PreActive => f.write_str("Pre-Active"),
            KeyState::Active => f.write_str("Active"),
            KeyState::Deactivated => f.write_str("Deactivated"),
            KeyState::Compromised => f.write_str("Compromised"),
            KeyState::Destroyed => f.write_str("Destroyed"),
            KeyState::DestroyedCompromised => f.write_str("Destroyed Compromised"),
            KeyState::Other(v) => write!(f, "unknown state {v}"),
        }
    }
}

/// The name of a Result Reason value, for error messages.
pub fn result_reason_name(v: u32) -> &'static str {
    match v {
        0x01 => "Item Not Found",
        0x02 => "Response Too Large",
        0x03 => "Authentication Not Successful",
        0x04 => "Invalid Message",
        0x05 => "Operation Not Supported",
        0x06 => "Missing Data",
        0x07 => "Invalid Field",
        0x08 => "Feature Not Supported",
        0x09 => "Operation Canceled By Requester",
        0x0A => "Cryptographic Failure",
        0x0B => "Illegal Operation",
        0x0C => "Permission Denied",
        0x0D => "Object Archived",
        0x0E => "Index Out of Bounds",
        0x0F => "Application Namespace Not Supported",
        0x10 => "Key Format Type Not Supported",
        0x11 => "Key Compression Type Not Supported",
        0x12 => "Encoding Option Error",
        0x13 => "Key Value Not Present",
        0x14 => "Attestation Required",
        0x15 => "Attestation Failed",
        0x100 => "General Failure",
        _ => "unknown reason",
    }
}

/// Result Reason values kmsfs reacts to.
pub mod reasons {
    /// Item Not Found.
    pub const ITEM_NOT_FOUND: u32 = 0x01;
    /// Authentication Not Successful.
    pub const AUTHENTICATION_NOT_SUCCESSFUL: u32 = 0x03;
    /// Operation Not Supported.
    pub const OPERATION_NOT_SUPPORTED: u32 = 0x05;
    /// Invalid Field.
    pub const INVALID_FIELD: u32 = 0x07;
    /// Feature Not Supported.
    pub const FEATURE_NOT_SUPPORTED: u32 = 0x08;
    /// Cryptographic Failure.
    pub const CRYPTOGRAPHIC_FAILURE: u32 = 0x0A;
    /// Permission Denied.
    pub const PERMISSION_DENIED: u32 = 0x0C;
}

/// A request: one batch item.
pub struct Request<'a> {
    /// Protocol version in the header.
    pub version: ProtocolVersion,
    /// The operation.
    pub operation: Operation,
    /// The Request Payload's children.
    pub payload: Vec<Item<'a>>,
}

/// Encodes a request message into locked memory (it may carry a key).
pub fn encode_request(req: &Request<'_>) -> Result<SecretBytes, TtlvError> {
    let message = Item::structure(
        Tag::REQUEST_MESSAGE,
        vec![
            Item::structure(
                Tag::REQUEST_HEADER,
                vec![req.version.item(), Item::int(Tag::BATCH_COUNT, 1)],
            ),
            Item::structure(
                Tag::BATCH_ITEM,
                vec![
                    Item::enumeration(Tag::OPERATION, req.operation as u32),
                    Item {
                        tag: Tag::REQUEST_PAYLOAD,
                        // The payload borrows; cloning the Vec copies only
                        // slices and small values, never the bytes.
                        value: Value::Structure(req.payload.clone()),
                    },
                ],
            ),
        ],
    );
    let mut out = SecretBytes::zeroed(message.encoded_len());
    ttlv::encode(&message, out.expose_mut())?;
    Ok(out)
}

/// The outcome of one batch item.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// Success, with the response payload (an empty structure if absent).
    Success(Item<'a>),
    /// The server refused or failed.
    Failure {
        /// Result Status (1 Operation Failed, 2 Pending, 3 Undone).
        status: u32,
        /// Result Reason, if given.
        reason: Option<u32>,
        /// Result Message, if given.
        message: Option<String>,
    },
}

/// A decoded response.
#[derive(Debug)]
pub struct Response<'a> {
    /// Protocol version of the response header.
    pub version: ProtocolVersion,
    /// The single batch item's outcome.
    pub outcome: Outcome<'a>,
}

/// Decodes and checks a response to `operation`.
pub fn parse_response(buf: &[u8], operation: Operation) -> Result<Response<'_>, TtlvError> {
    let msg = ttlv::decode(buf)?;
    if msg.tag != Tag::RESPONSE_MESSAGE {
        return Err(TtlvError::Malformed {
            offset: 0,
            detail: format!("expected a Response Message, got item {}", msg.tag),
        });
    }
    let header = msg.get(Tag::RESPONSE_HEADER)?;
    let version = ProtocolVersion::parse(header.get(Tag::PROTOCOL_VERSION)?)?;
    let count = header.get(Tag::BATCH_COUNT)?.as_int()?;
    let items: Vec<&Item<'_>> = msg.find_all(Tag::BATCH_ITEM).collect();
    if count != 1 || items.len() != 1 {
        return Err(TtlvError::Malformed {
            offset: 0,
            detail: format!(
                "expected one batch item, got batch count {count} and {} items",
                items.len()
            ),
        });
    }
    let item = items[0];
    // The operation is optional in a failed reply (the server may not have
    // understood the request), required and equal to ours otherwise.
    let op = item.find(Tag::OPERATION).map(Item::as_enum).transpose()?;
    let status = item.get(Tag::RESULT_STATUS)?.as_enum()?;
    if status == values::STATUS_SUCCESS {
        match op {
            Some(o) if o == operation as u32 => {}
            other => {
                return Err(TtlvError::Malformed {
                    offset: 0,
                    detail: format!(
                        "reply is for operation {other:?}, not {} ({})",
                        operation.name(),
                        operation as u32
                    ),
                })
            }
        }
        let payload = item
            .find(Tag::RESPONSE_PAYLOAD)
            .cloned()
            .unwrap_or_else(|| Item::structure(Tag::RESPONSE_PAYLOAD, vec![]));
        payload.children()?;
        return Ok(Response {
            version,
            outcome: Outcome::Success(payload),
        });
    }
    let reason = item
        .find(Tag::RESULT_REASON)
        .map(Item::as_enum)
        .transpose()?;
    let message = item
        .find(Tag::RESULT_MESSAGE)
        .map(Item::as_text)
        .transpose()?
        .map(str::to_string);
    Ok(Response {
        version,
        outcome: Outcome::Failure {
            status,
            reason,
            message,
        },
    })
}

/// Discover Versions request payload: the versions we offer.
pub fn discover_versions_payload() -> Vec<Item<'static>> {
    ProtocolVersion::OFFERED.iter().map(|v| v.item()).collect()
}

/// The versions a Discover Versions reply lists, in the server's order.
pub fn parse_discover_versions(payload: &Item<'_>) -> Result<Vec<ProtocolVersion>, TtlvError> {
    payload
        .find_all(Tag::PROTOCOL_VERSION)
        .map(ProtocolVersion::parse)
        .collect()
}

/// Query request payload: operations and server information.
pub fn query_payload() -> Vec<Item<'static>> {
    vec![
        Item::enumeration(Tag::QUERY_FUNCTION, values::QUERY_OPERATIONS),
        Item::enumeration(Tag::QUERY_FUNCTION, values::QUERY_SERVER_INFORMATION),
    ]
}

/// What a Query reply says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryReply {
    /// Operation enumeration values the server supports.
    pub operations: Vec<u32>,
    /// Vendor Identification, if given.
    pub vendor: Option<String>,
}

/// Parses a Query reply.
pub fn parse_query(payload: &Item<'_>) -> Result<QueryReply, TtlvError> {
    Ok(QueryReply {
        operations: payload
            .find_all(Tag::OPERATION)
            .map(Item::as_enum)
            .collect::<Result<_, _>>()?,
        vendor: payload
            .find(Tag::VENDOR_IDENTIFICATION)
            .map(Item::as_text)
            .transpose()?
            .map(str::to_string),
    })
}

/// Locate request payload: symmetric keys whose Name is `name`, at most
/// two (two means the name is ambiguous).
pub fn locate_by_name_payload(name: &str) -> Vec<Item<'_>> {
    vec![
        Item::int(Tag::MAXIMUM_ITEMS, 2),
        Item::structure(
            Tag::ATTRIBUTE,
            vec![
                Item::text(Tag::ATTRIBUTE_NAME, "Object Type"),
                Item::enumeration(Tag::ATTRIBUTE_VALUE, values::OBJECT_SYMMETRIC_KEY),
            ],
        ),
        Item::structure(
            Tag::ATTRIBUTE,
            vec![
                Item::text(Tag::ATTRIBUTE_NAME, "Name"),
                Item::structure(
                    Tag::ATTRIBUTE_VALUE,
                    vec![
                        Item::text(Tag::NAME_VALUE, name),
                        Item::enumeration(Tag::NAME_TYPE, values::NAME_TYPE_TEXT),
                    ],
                ),
            ],
        ),
    ]
}

/// The unique identifiers of a Locate reply.
pub fn parse_locate(payload: &Item<'_>) -> Result<Vec<String>, TtlvError> {
    payload
        .find_all(Tag::UNIQUE_IDENTIFIER)
        .map(|i| i.as_text().map(str::to_string))
        .collect()
}

/// The attributes kmsfs reads.
pub const KEY_ATTRIBUTES: [&str; 4] = [
    "State",
    "Cryptographic Usage Mask",
    "Cryptographic Algorithm",
    "Cryptographic Length",
];

/// Get Attributes request payload.
pub fn get_attributes_payload(uid: &str) -> Vec<Item<'_>> {
    let mut p = vec![Item::text(Tag::UNIQUE_IDENTIFIER, uid)];
    p.extend(
        KEY_ATTRIBUTES
            .iter()
            .map(|n| Item::text(Tag::ATTRIBUTE_NAME, n)),
    );
    p
}

/// What Get Attributes says about a key (absent attributes are `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAttributes {
    /// The key's unique identifier.
    pub uid: String,
    /// Its state.
    pub state: Option<KeyState>,
    /// Its Cryptographic Usage Mask.
    pub usage_mask: Option<i32>,
    /// Its Cryptographic Algorithm enumeration value (3 = AES).
    pub algorithm: Option<u32>,
    /// Its length in bits.
    pub length: Option<i32>,
}

/// Parses a Get Attributes reply.
pub fn parse_get_attributes(payload: &Item<'_>) -> Result<KeyAttributes, TtlvError> {
    let mut out = KeyAttributes {
        uid: payload.get(Tag::UNIQUE_IDENTIFIER)?.as_text()?.to_string(),
        state: None,
        usage_mask: None,
        algorithm: None,
        length: None,
    };
    for attr in payload.find_all(Tag::ATTRIBUTE) {
        let name = attr.get(Tag::ATTRIBUTE_NAME)?.as_text()?;
        let value = attr.get(Tag::ATTRIBUTE_VALUE)?;
        match name {
            "State" => out.state = Some(KeyState::from_enum(value.as_enum()?)),
            "Cryptographic Usage Mask" => out.usage_mask = Some(value.as_int()?),
            "Cryptographic Algorithm" => out.algorithm = Some(value.as_enum()?),
            "Cryptographic Length" => out.length = Some(value.as_int()?),
            _ => {}
        }
    }
    Ok(out)
}

/// How a key is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// AES-GCM with a 16-byte tag (KMIP 1.4).
    Gcm,
    /// AES-CBC with PKCS#5 padding.
    Cbc,
}

impl CipherMode {
    /// The mode's name in blobs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            CipherMode::Gcm => "gcm",
            CipherMode::Cbc => "cbc",
        }
    }
}

/// GCM tag length in bytes; the full tag, never truncated.
pub const GCM_TAG_LEN: usize = 16;

fn crypto_params(mode: CipherMode, random_iv: bool) -> Item<'static> {
    // The specification's field order, which strict servers (PyKMIP)
    // require: Block Cipher Mode, Padding Method, ..., Cryptographic
    // Algorithm, Random IV, IV Length, Tag Length.
    let mut p = Vec::new();
    match mode {
        CipherMode::Gcm => p.push(Item::enumeration(Tag::BLOCK_CIPHER_MODE, values::MODE_GCM)),
        CipherMode::Cbc => {
            p.push(Item::enumeration(Tag::BLOCK_CIPHER_MODE, values::MODE_CBC));
            p.push(Item::enumeration(Tag::PADDING_METHOD, values::PAD_PKCS5));
        }
    }
    p.push(Item::enumeration(
        Tag::CRYPTOGRAPHIC_ALGORITHM,
        values::ALG_AES,
    ));
    if random_iv {
        p.push(Item::boolean(Tag::RANDOM_IV, true));
    }
    if mode == CipherMode::Gcm {
        p.push(Item::int(Tag::TAG_LENGTH, GCM_TAG_LEN as i32));
    }
    Item::structure(Tag::CRYPTOGRAPHIC_PARAMETERS, p)
}

/// Encrypt request payload: the server picks a random IV and returns it.
pub fn encrypt_payload<'a>(
    uid: &'a str,
    mode: CipherMode,
    plaintext: &'a [u8],
    aad: Option<&'a [u8]>,
) -> Vec<Item<'a>> {
    let mut p = vec![
        Item::text(Tag::UNIQUE_IDENTIFIER, uid),
        crypto_params(mode, true),
        Item::bytes(Tag::DATA, plaintext),
    ];
    if let Some(a) = aad {
        p.push(Item::bytes(
            Tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA,
            a,
        ));
    }
    p
}

/// What an Encrypt reply carries.
#[derive(Debug)]
pub struct EncryptReply<'a> {
    /// The ciphertext.
    pub data: &'a [u8],
    /// The IV the server chose.
    pub iv: Option<&'a [u8]>,
    /// The GCM tag.
    pub tag: Option<&'a [u8]>,
}

/// Parses an Encrypt reply.
pub fn parse_encrypt<'a>(payload: &Item<'a>) -> Result<EncryptReply<'a>, TtlvError> {
    Ok(EncryptReply {
        data: payload.get(Tag::DATA)?.as_bytes()?,
        iv: payload
            .find(Tag::IV_COUNTER_NONCE)
            .map(Item::as_bytes)
            .transpose()?,
        tag: payload
            .find(Tag::AUTHENTICATED_ENCRYPTION_TAG)
            .map(Item::as_bytes)
            .transpose()?,
    })
}

/// Decrypt request payload.
pub fn decrypt_payload<'a>(
    uid: &'a str,
    mode: CipherMode,
    ciphertext: &'a [u8],
    iv: &'a [u8],
    aad: Option<&'a [u8]>,
    tag: Option<&'a [u8]>,
) -> Vec<Item<'a>> {
    let mut p = vec![
        Item::text(Tag::UNIQUE_IDENTIFIER, uid),
        crypto_params(mode, false),
        Item::bytes(Tag::DATA, ciphertext),
        Item::bytes(Tag::IV_COUNTER_NONCE, iv),
    ];
    if let Some(a) = aad {
        p.push(Item::bytes(
            Tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA,
            a,
        ));
    }
    if let Some(t) = tag {
        p.push(Item::bytes(Tag::AUTHENTICATED_ENCRYPTION_TAG, t));
    }
    p
}

/// The plaintext of a Decrypt reply (borrowed from the locked reply buffer).
pub fn parse_decrypt<'a>(payload: &Item<'a>) -> Result<&'a [u8], TtlvError> {
    payload.get(Tag::DATA)?.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(op: Operation, status: u32, payload: Option<Vec<Item<'_>>>) -> Vec<u8> {
        let mut bi = vec![
            Item::enumeration(Tag::OPERATION, op as u32),
            Item::enumeration(Tag::RESULT_STATUS, status),
        ];
        if status != 0 {
            bi.push(Item::enumeration(Tag::RESULT_REASON, 1));
            bi.push(Item::text(Tag::RESULT_MESSAGE, "no such object"));
        }
        if let Some(p) = payload {
            bi.push(Item::structure(Tag::RESPONSE_PAYLOAD, p));
        }
        let msg = Item::structure(
            Tag::RESPONSE_MESSAGE,
            vec![
                Item::structure(
                    Tag::RESPONSE_HEADER,
                    vec![
                        ProtocolVersion::V1_2.item(),
                        Item {
                            tag: Tag::TIME_STAMP,
                            value: Value::DateTime(1),
                        },
                        Item::int(Tag::BATCH_COUNT, 1),
                    ],
                ),
                Item::structure(Tag::BATCH_ITEM, bi),
            ],
        );
        let mut v = vec![0; msg.encoded_len()];
        ttlv::encode(&msg, &mut v).unwrap();
        v
    }

    #[test]
    fn request_layout() {
        let req = Request {
            version: ProtocolVersion::V1_2,
            operation: Operation::Encrypt,
            payload: encrypt_payload("7", CipherMode::Cbc, b"k", None),
        };
        let bytes = encode_request(&req).unwrap();
        let item = ttlv::decode(bytes.expose()).unwrap();
        assert_eq!(item.tag, Tag::REQUEST_MESSAGE);
        let bi = item.get(Tag::BATCH_ITEM).unwrap();
        assert_eq!(bi.get(Tag::OPERATION).unwrap().as_enum().unwrap(), 31);
        let p = bi.get(Tag::REQUEST_PAYLOAD).unwrap();
        let cp = p.get(Tag::CRYPTOGRAPHIC_PARAMETERS).unwrap();
        let tags: Vec<Tag> = cp.children().unwrap().iter().map(|i| i.tag).collect();
        assert_eq!(
            tags,
            vec![
                Tag::BLOCK_CIPHER_MODE,
                Tag::PADDING_METHOD,
                Tag::CRYPTOGRAPHIC_ALGORITHM,
                Tag::RANDOM_IV
            ]
        );
        assert_eq!(p.get(Tag::DATA).unwrap().as_bytes().unwrap(), b"k");
    }

    #[test]
    fn responses() {
        let ok = reply(
            Operation::Locate,
            0,
            Some(vec![Item::text(Tag::UNIQUE_IDENTIFIER, "42")]),
        );
        let r = parse_response(&ok, Operation::Locate).unwrap();
        let Outcome::Success(p) = r.outcome else {
            panic!("not a success")
        };
        assert_eq!(parse_locate(&p).unwrap(), vec!["42".to_string()]);
        assert_eq!(r.version, ProtocolVersion::V1_2);
        // A reply for another operation is refused.
        assert!(parse_response(&ok, Operation::Decrypt).is_err());
        let failed = reply(Operation::Locate, 1, None);
        let r = parse_response(&failed, Operation::Locate).unwrap();
        match r.outcome {
            Outcome::Failure {
                status,
                reason,
                message,
            } => {
                assert_eq!((status, reason), (1, Some(reasons::ITEM_NOT_FOUND)));
                assert_eq!(message.as_deref(), Some("no such object"));
            }
            Outcome::Success(_) => panic!("failure read as success"),
        }
    }
}
