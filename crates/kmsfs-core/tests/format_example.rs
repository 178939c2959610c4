//! The worked example in docs/format.md, byte for byte. If this test fails,
//! the format changed and the document must change with it.

mod common;

use common::MemFile;
use kmsfs_core::contents::FileContents;
use kmsfs_core::header::{Header, KeySlot, KmsType, UnverifiedHeader};
use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_core::names::{encrypt_name, EncryptedName};
use kmsfs_core::secret::SecretBytes;

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
        slots: vec![KeySlot {
            kms_type: KmsType::VaultTransit,
            uses_context: false,
            key_name: "kmsfs".into(),
            key_version: 1,
            wrapped_key: "vault:v1:QUJDRA==".into(),
        }],
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
    let f = MemFile(std::cell::RefCell::new(
        kmsfs_core::contents::encode_file_header(&nonce).to_vec(),
    ));
    let mut fc = FileContents::open(&keys, &f, 32).unwrap();
    fc.write_at(&keys, &f, 0, b"Hello, kmsfs world!\n").unwrap();
    let stored = f.0.borrow().clone();
    println!("{}", hex(&stored));
    assert_eq!(hex(&stored), include_str!("format_example_file.hex").trim());
}
