//! The worked example in docs/format.md, byte for byte. If this test fails,
//! the format changed and the document must change with it.

use kmsfs_core::contents::{Backing, FileContents};
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

struct Mem(std::cell::RefCell<Vec<u8>>);
impl Backing for Mem {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        let v = self.0.borrow();
        let off = (off as usize).min(v.len());
        let n = buf.len().min(v.len() - off);
        buf[..n].copy_from_slice(&v[off..off + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let mut v = self.0.borrow_mut();
        let end = off as usize + buf.len();
        if v.len() < end {
            v.resize(end, 0);
        }
        v[off as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.borrow_mut().resize(len as usize, 0);
        Ok(())
    }
}

#[test]
fn contents_worked_example() {
    // A file with a fixed nonce (normally random): header, then the 20-byte
    // plaintext as one ciphertext-stolen unit.
    let keys = example_keys();
    let nonce = [0xaau8; 16];
    let f = Mem(std::cell::RefCell::new(
        kmsfs_core::contents::encode_file_header(&nonce).to_vec(),
    ));
    let mut fc = FileContents::open(&keys, &f, 32).unwrap();
    fc.write_at(&keys, &f, 0, b"Hello, kmsfs world!\n").unwrap();
    let stored = f.0.borrow().clone();
    println!("{}", hex(&stored));
    assert_eq!(hex(&stored), include_str!("format_example_file.hex").trim());
}
