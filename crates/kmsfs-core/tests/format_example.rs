//! The worked example in docs/format.md, byte for byte. If this test fails,
//! the format changed and the document must change with it.

mod common;

use common::MemFile;
use kmsfs_core::contents::{encode_file_header, encode_tiny_file_header, FileContents};
use kmsfs_core::header::{Header, KeySlot, KmipSlot, SlotKms, UnverifiedHeader, VaultSlot};
use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_core::names::{encrypt_name, EncryptedName};
use kmsfs_core::secret::SecretBytes;
use sha2::{Digest, Sha256};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn example_keys() -> FsKeys {
    let master: Vec<u8> = (0u8..32).collect();
    let master = MasterKey::from_secret(SecretBytes::new(master)).unwrap();
    FsKeys::derive(&master, &EXAMPLE_UUID)
}

const EXAMPLE_UUID: [u8; 16] = [
    0x6b, 0x6d, 0x73, 0x66, 0x73, 0x2d, 0x40, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
];

const EXAMPLE_HEADER: &str = include_str!("format_example_header.hex");

#[test]
fn header_worked_example() {
    let keys = example_keys();
    let h = Header {
        features: 0,
        uuid: EXAMPLE_UUID,
        created: 1_795_000_000,
        slots: vec![
            KeySlot {
                label: "primary".into(),
                created: 1_795_000_000,
                kms: SlotKms::Vault(VaultSlot {
                    addresses: vec!["https://kms-1.example:8200".into()],
                    transit_path: "transit".into(),
                    namespace: None,
                    key_name: "kmsfs".into(),
                    key_version: 1,
                    uses_context: false,
                    wrapped_key: "vault:v1:QUJDRA==".into(),
                }),
            },
            KeySlot {
                label: "escrow".into(),
                created: 1_795_000_600,
                kms: SlotKms::Kmip(KmipSlot {
                    addresses: vec!["kmip.example:5696".into()],
                    key_id: "7f3c".into(),
                    wrapped: "kmip:AAEC".into(),
                }),
            },
        ],
    };
    let bytes = h.encode(&keys).unwrap();
    println!("{}", hex(&bytes));
    assert_eq!(hex(&bytes), EXAMPLE_HEADER.trim());
    UnverifiedHeader::parse(&bytes)
        .unwrap()
        .verify(&keys)
        .unwrap();
}

#[test]
fn name_worked_example() {
    let keys = example_keys();
    let enc = encrypt_name(&keys, &[0u8; 16], b"hello.txt").unwrap();
    println!("{enc:?}");
    assert_eq!(
        enc,
        EncryptedName::Short(include_str!("format_example_name.txt").trim().into())
    );
}

#[test]
fn contents_worked_example() {
    // A file with a fixed nonce (normally random): header, then the 20-byte
    // plaintext as one ciphertext-stolen unit.
    let keys = example_keys();
    let nonce = [0xaau8; 16];
    let f = MemFile(std::cell::RefCell::new(encode_file_header(&nonce).to_vec()));
    let mut fc = FileContents::open(&keys, &f, 32).unwrap();
    fc.write_at(&keys, &f, 0, b"Hello, kmsfs world!\n").unwrap();
    let stored = f.0.borrow().clone();
    println!("{}", hex(&stored));
    assert_eq!(hex(&stored), include_str!("format_example_file.hex").trim());
}

/// The documented ciphertext of a line of the example: `label hex`.
fn documented(label: &str) -> String {
    include_str!("format_example_units.txt")
        .lines()
        .find_map(|l| l.split_once(' ').filter(|(k, _)| *k == label))
        .map(|(_, h)| h.trim().to_string())
        .unwrap_or_else(|| panic!("no line {label} in format_example_units.txt"))
}

#[test]
fn contents_unit_grid_worked_example() {
    // 4100 bytes, byte i = i mod 251: unit 0 is plaintext [0, 4064) at
    // backing [32, 4096), unit 1 is the 36 bytes [4064, 4100) at backing
    // [4096, 4132), ciphertext-stolen.
    let keys = example_keys();
    let nonce = [0xaau8; 16];
    let f = MemFile(std::cell::RefCell::new(encode_file_header(&nonce).to_vec()));
    let mut fc = FileContents::open(&keys, &f, 32).unwrap();
    let plain: Vec<u8> = (0..4100u32).map(|i| (i % 251) as u8).collect();
    fc.write_at(&keys, &f, 0, &plain).unwrap();
    let stored = f.0.borrow().clone();
    assert_eq!(stored.len(), 4132);
    let unit0_head = hex(&stored[32..64]);
    let unit1 = hex(&stored[4096..]);
    let sum = hex(&Sha256::digest(&stored));
    println!("unit0-head {unit0_head}\nunit1 {unit1}\nsha256 {sum}");
    assert_eq!(unit0_head, documented("unit0-head"));
    assert_eq!(unit1, documented("unit1"));
    assert_eq!(sum, documented("sha256"));
    // Unit 1 alone is an XTS unit numbered 1 under the file key.
    let cipher = keys.file_cipher(&nonce).unwrap();
    let mut u1 = stored[4096..].to_vec();
    cipher.decrypt_unit(&mut u1, 1).unwrap();
    assert_eq!(u1, &plain[4064..]);
}

#[test]
fn tiny_file_worked_example() {
    // "hi!\n" under nonce bb…bb: a tiny header (flag 1, length 4), then the
    // plaintext XOR the keystream block.
    let keys = example_keys();
    let nonce = [0xbbu8; 16];
    let header = encode_tiny_file_header(&nonce, 4);
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(&unhex(&documented("tiny-ct")));
    println!("tiny {}", hex(&bytes));
    assert_eq!(hex(&bytes), documented("tiny"));
    // A longer backing file (a shrink cut short) reads the same 4 bytes.
    bytes.extend_from_slice(&[0x5a; 40]);
    let f = MemFile(std::cell::RefCell::new(bytes));
    let fc = FileContents::open(&keys, &f, 76).unwrap();
    assert_eq!(fc.size(), 4);
    let mut out = [0u8; 8];
    assert_eq!(fc.read_at(&f, 0, &mut out).unwrap(), 4);
    assert_eq!(&out[..4], b"hi!\n");
    // Opening truncates the stale bytes (the backing file is writable).
    assert_eq!(f.0.borrow().len(), 36);
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn docs_show_the_checked_vectors() {
    // docs/format.md prints the vectors the tests above check; keep them equal.
    let doc: String = include_str!("../../../docs/format.md")
        .split_whitespace()
        .collect();
    let header = include_str!("format_example_header.hex").trim();
    assert_eq!(
        documented_header(),
        header,
        "the annotated header in docs/format.md section 7"
    );
    let file = include_str!("format_example_file.hex").trim();
    assert!(doc.contains(&file[64..]), "20-byte example ciphertext");
    for label in ["unit0-head", "unit1", "sha256", "tiny-ct"] {
        assert!(
            doc.contains(&documented(label)),
            "{label} missing from docs/format.md"
        );
    }
    let tiny = documented("tiny");
    assert!(doc.contains(&tiny[32..]), "tiny nonce + ciphertext");
}

/// The worked header as docs/format.md prints it: in the first code block
/// of section 7, each line is hex groups, two spaces, then a comment.
fn documented_header() -> String {
    let doc = include_str!("../../../docs/format.md");
    let section = doc
        .split("## 7. Worked example")
        .nth(1)
        .expect("section 7 in docs/format.md");
    let block = section
        .split("```")
        .nth(1)
        .expect("a code block in section 7");
    block
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (hexpart, _comment) = l.split_once("  ").expect("hex, two spaces, comment");
            let groups: String = hexpart.split(' ').collect();
            assert!(
                groups.bytes().all(|b| b.is_ascii_hexdigit()),
                "not hex: {hexpart:?}"
            );
            groups
        })
        .collect()
}
