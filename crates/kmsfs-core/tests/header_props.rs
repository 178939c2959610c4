//! Header encoding: round trip, tamper detection, refusal of the unknown.

use kmsfs_core::header::*;
use kmsfs_core::keys::{FsKeys, MasterKey};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

fn sample() -> Header {
    Header {
        features: 0,
        uuid: *b"0123456789abcdef",
        created: 1_790_000_000,
        slots: vec![vault_slot(
            "primary",
            "kmsfs",
            1,
            false,
            "vault:v1:AAAAbbbbCCCCddddEEEEffff",
        )],
    }
}

fn vault_slot(label: &str, key: &str, version: u32, ctx: bool, wrapped: &str) -> KeySlot {
    KeySlot {
        label: label.into(),
        created: 1_790_000_000,
        kms: SlotKms::Vault(VaultSlot {
            addresses: vec!["https://kms:8200".into()],
            transit_path: "transit".into(),
            namespace: None,
            key_name: key.into(),
            key_version: version,
            uses_context: ctx,
            wrapped_key: wrapped.into(),
        }),
    }
}

fn keys_for(h: &Header) -> FsKeys {
    FsKeys::derive(&MasterKey::generate().unwrap(), &h.uuid)
}

#[test]
fn round_trip_and_verify() {
    let h = sample();
    let k = keys_for(&h);
    let bytes = h.encode(&k).unwrap();
    let parsed = UnverifiedHeader::parse(&bytes).unwrap();
    assert_eq!(parsed.unverified(), &h);
    assert_eq!(parsed.verify(&k).unwrap(), h);
}

#[test]
fn a_different_key_fails_authentication() {
    let h = sample();
    let bytes = h.encode(&keys_for(&h)).unwrap();
    let other = keys_for(&h);
    let err = UnverifiedHeader::parse(&bytes)
        .unwrap()
        .verify(&other)
        .unwrap_err();
    assert_eq!(err, HeaderError::BadMac);
}

#[test]
fn every_single_byte_change_is_rejected() {
    let mut h = sample();
    h.slots
        .push(vault_slot("dr", "dr-key", 7, true, "vault:v7:ZZZZ"));
    h.slots.push(KeySlot {
        label: "escrow".into(),
        created: 1_790_000_100,
        kms: SlotKms::Kmip(KmipSlot {
            addresses: vec!["kmip-1:5696".into(), "kmip-2:5696".into()],
            key_id: "42".into(),
            wrapped: "opaque".into(),
        }),
    });
    let k = keys_for(&h);
    let bytes = h.encode(&k).unwrap();
    for i in 0..bytes.len() {
        for delta in [1u8, 0x80, 0xff] {
            let mut t = bytes.clone();
            t[i] ^= delta;
            let accepted = UnverifiedHeader::parse(&t).and_then(|u| u.verify(&k));
            assert!(accepted.is_err(), "byte {i} ^ {delta:#x} accepted");
        }
    }
    // Even with a recomputed checksum (a deliberate forger), the MAC catches it.
    let body_len = bytes.len() - 64;
    for i in 12..body_len {
        let mut t = bytes.clone();
        t[i] ^= 1;
        let sum = Sha256::digest(&t[..body_len]);
        t[body_len..body_len + 32].copy_from_slice(&sum);
        let accepted = UnverifiedHeader::parse(&t).and_then(|u| u.verify(&k));
        assert!(accepted.is_err(), "forged byte {i} accepted");
    }
}

/// Re-seals raw header bytes after editing, as a forger with the key could.
fn reseal(bytes: &mut [u8]) {
    let body_len = bytes.len() - 64;
    let sum = Sha256::digest(&bytes[..body_len]);
    bytes[body_len..body_len + 32].copy_from_slice(&sum);
}

#[test]
fn unknown_versions_and_features_are_refused() {
    let h = sample();
    let k = keys_for(&h);
    let bytes = h.encode(&k).unwrap();
    // Version 1 (the old unit grid), 2 (slots without identity) and a future 4.
    for version in [1u8, 2, 4] {
        let mut other = bytes.clone();
        other[8] = version;
        reseal(&mut other);
        assert_eq!(
            UnverifiedHeader::parse(&other).unwrap_err(),
            HeaderError::UnsupportedVersion(u16::from(version))
        );
    }
    let mut feat = bytes.clone();
    feat[12] = 0x04;
    reseal(&mut feat);
    assert_eq!(
        UnverifiedHeader::parse(&feat).unwrap_err(),
        HeaderError::UnknownFeatures(4)
    );
    let mut cipher = bytes.clone();
    cipher[44] = 9;
    reseal(&mut cipher);
    assert!(matches!(
        UnverifiedHeader::parse(&cipher).unwrap_err(),
        HeaderError::Unsupported {
            field: "contents cipher",
            value: 9
        }
    ));
}

#[test]
fn truncated_and_garbage_headers_name_the_problem() {
    let h = sample();
    let bytes = h.encode(&keys_for(&h)).unwrap();
    for len in 0..bytes.len() {
        let err = UnverifiedHeader::parse(&bytes[..len]).unwrap_err();
        assert!(
            matches!(
                err,
                HeaderError::Truncated(_) | HeaderError::LengthMismatch { .. }
            ),
            "len {len}: {err}"
        );
    }
    assert_eq!(
        UnverifiedHeader::parse(b"this is not a kmsfs header at all, just text....................................................").unwrap_err(),
        HeaderError::BadMagic
    );
}

proptest! {
    #[test]
    fn parsing_arbitrary_bytes_never_panics(raw in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = UnverifiedHeader::parse(&raw);
        let mut with_magic = HEADER_MAGIC.to_vec();
        with_magic.extend_from_slice(&raw);
        let _ = UnverifiedHeader::parse(&with_magic);
    }
}
