//! Key slot encoding (format v3): round trip of arbitrary slot sets, strict
//! parsing of the typed fields, every truncation refused, and a slot
//! removed without the key caught by the MAC.

use kmsfs_core::header::*;
use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_core::slots::validate_label;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const UUID: [u8; 16] = *b"0123456789abcdef";

fn keys() -> FsKeys {
    FsKeys::derive(&MasterKey::generate().unwrap(), &UUID)
}

fn vault(label: &str) -> KeySlot {
    KeySlot {
        label: label.into(),
        created: 1_800_000_000,
        kms: SlotKms::Vault(VaultSlot {
            addresses: vec!["https://a:8200".into(), "https://b:8200".into()],
            transit_path: "transit".into(),
            namespace: Some("team-a".into()),
            key_name: "kmsfs".into(),
            key_version: 3,
            uses_context: true,
            wrapped_key: "vault:v3:AAAA".into(),
        }),
    }
}

fn header(slots: Vec<KeySlot>) -> Header {
    Header {
        features: 0,
        uuid: UUID,
        created: 1_800_000_000,
        slots,
    }
}

/// Builds header bytes around raw slot bytes with a correct length field
/// and checksum (what a forger without the key can do) and a zero MAC.
fn raw_header(nslots: u8, slot_bytes: &[u8]) -> Vec<u8> {
    let mut out = header(vec![vault("x")]).encode(&keys()).unwrap()[..52].to_vec();
    out[48] = nslots;
    out.extend_from_slice(slot_bytes);
    let total = (out.len() + 64) as u16;
    out[10..12].copy_from_slice(&total.to_le_bytes());
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out.extend_from_slice(&[0u8; 32]);
    out
}

/// Raw slot bytes: type, flags, label, created, then (tag, value) fields.
fn raw_slot(kms: u8, flags: u8, label: &str, fields: &[(u8, &[u8])]) -> Vec<u8> {
    let mut s = vec![kms, flags, label.len() as u8];
    s.extend_from_slice(label.as_bytes());
    s.extend_from_slice(&1_800_000_000i64.to_le_bytes());
    s.push(fields.len() as u8);
    for (t, v) in fields {
        s.push(*t);
        s.extend_from_slice(&(v.len() as u16).to_le_bytes());
        s.extend_from_slice(v);
    }
    s
}

const V1: [u8; 4] = 1u32.to_le_bytes();

fn vault_fields() -> Vec<(u8, &'static [u8])> {
    vec![
        (1, b"https://a:8200"),
        (2, b"kmsfs"),
        (3, &V1),
        (4, b"transit"),
        (6, b"vault:v1:AAAA"),
    ]
}

fn parse_err(bytes: &[u8]) -> HeaderError {
    match UnverifiedHeader::parse(bytes) {
        Ok(h) => panic!("accepted: {:?}", h.unverified()),
        Err(e) => e,
    }
}

#[test]
fn raw_builder_matches_the_encoder() {
    // The raw builder itself is right: a well-formed raw slot parses.
    let bytes = raw_header(1, &raw_slot(1, 0, "primary", &vault_fields()));
    let h = UnverifiedHeader::parse(&bytes).unwrap();
    let slot = &h.unverified().slots[0];
    assert_eq!(slot.label, "primary");
    let v = slot.vault().unwrap();
    assert_eq!(
        (v.key_name.as_str(), v.key_version, v.namespace.as_deref()),
        ("kmsfs", 1, None)
    );
}

#[test]
fn strict_parsing_refuses_each_deviation() {
    let base = vault_fields();
    type Fields = Vec<(u8, &'static [u8])>;
    let with = |f: &dyn Fn(&mut Fields)| {
        let mut v = base.clone();
        f(&mut v);
        raw_header(1, &raw_slot(1, 0, "primary", &v))
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown tag", with(&|v| v.push((8, b"x")))),
        ("tag zero", with(&|v| v.insert(0, (0, b"x")))),
        ("repeated key name", with(&|v| v.insert(2, (2, b"other")))),
        ("out of order", with(&|v| v.swap(1, 2))),
        ("missing key name", with(&|v| v.retain(|f| f.0 != 2))),
        ("missing version", with(&|v| v.retain(|f| f.0 != 3))),
        ("missing transit path", with(&|v| v.retain(|f| f.0 != 4))),
        ("missing wrapped key", with(&|v| v.retain(|f| f.0 != 6))),
        ("missing address", with(&|v| v.retain(|f| f.0 != 1))),
        (
            "repeated address",
            with(&|v| v.insert(0, (1, b"https://a:8200"))),
        ),
        ("KMIP field in Vault slot", with(&|v| v.push((7, b"id")))),
        ("3-byte version", with(&|v| v[2] = (3, &[1, 0, 0]))),
        ("empty value", with(&|v| v[1] = (2, b""))),
        ("control character", with(&|v| v[1] = (2, b"km\x1b[2Jsfs"))),
        ("not UTF-8", with(&|v| v[1] = (2, b"k\xffs"))),
        (
            "flags on KMIP slot",
            raw_header(
                1,
                &raw_slot(2, 1, "k", &[(1, b"h:1"), (6, b"w"), (7, b"id")]),
            ),
        ),
        (
            "Vault field in KMIP slot",
            raw_header(
                1,
                &raw_slot(2, 0, "k", &[(1, b"h:1"), (2, b"n"), (6, b"w"), (7, b"id")]),
            ),
        ),
        (
            "KMIP slot without key id",
            raw_header(1, &raw_slot(2, 0, "k", &[(1, b"h:1"), (6, b"w")])),
        ),
        (
            "unknown KMS type",
            raw_header(1, &raw_slot(3, 0, "primary", &base)),
        ),
        (
            "unknown flag",
            raw_header(1, &raw_slot(1, 2, "primary", &base)),
        ),
        (
            "all-digit label",
            raw_header(1, &raw_slot(1, 0, "12", &base)),
        ),
        (
            "label with space",
            raw_header(1, &raw_slot(1, 0, "a b", &base)),
        ),
        ("empty label", raw_header(1, &raw_slot(1, 0, "", &base))),
        ("duplicate label", {
            let mut two = raw_slot(1, 0, "dr", &base);
            two.extend(raw_slot(1, 0, "dr", &base));
            raw_header(2, &two)
        }),
        (
            "more slots than present",
            raw_header(2, &raw_slot(1, 0, "a", &base)),
        ),
        ("trailing bytes", {
            let mut s = raw_slot(1, 0, "a", &base);
            s.push(0);
            raw_header(1, &s)
        }),
        ("zero slots", raw_header(0, &[])),
        ("nine slots", {
            let mut s = Vec::new();
            for i in 0..9 {
                s.extend(raw_slot(1, 0, &format!("s{i}"), &base));
            }
            raw_header(9, &s)
        }),
    ];
    for (what, bytes) in cases {
        let e = parse_err(&bytes);
        println!("{what}: {e}");
        assert!(
            matches!(
                e,
                HeaderError::Malformed(_)
                    | HeaderError::Unsupported { .. }
                    | HeaderError::DuplicateLabel(_)
            ),
            "{what}: {e:?}"
        );
    }
}

#[test]
fn every_truncation_of_the_slots_is_refused() {
    // Cutting the slot area anywhere, with length and checksum fixed up,
    // never parses: each field's length is checked against what is left.
    let h = header(vec![
        vault("primary"),
        KeySlot {
            label: "escrow".into(),
            created: 5,
            kms: SlotKms::Kmip(KmipSlot {
                addresses: vec!["kmip:5696".into()],
                key_id: "id-1".into(),
                wrapped: "blob".into(),
            }),
        },
    ]);
    let bytes = h.encode(&keys()).unwrap();
    let slots = &bytes[52..bytes.len() - 64];
    for cut in 0..slots.len() {
        let e = parse_err(&raw_header(2, &slots[..cut]));
        assert!(
            matches!(e, HeaderError::Malformed(_)),
            "cut at {cut}: {e:?}"
        );
    }
    assert!(UnverifiedHeader::parse(&raw_header(2, slots)).is_ok());
}

#[test]
fn a_slot_removed_without_the_key_fails_authentication() {
    let k = keys();
    let mut dr = vault("dr");
    if let SlotKms::Vault(v) = &mut dr.kms {
        v.key_name = "dr-key".into();
    }
    let h = header(vec![vault("primary"), dr]);
    let bytes = h.encode(&k).unwrap();
    // The second slot's bytes, as encoded for a header holding it alone.
    let one = header(vec![vault("primary")]).encode(&k).unwrap();
    let first_slot = &one[52..one.len() - 64];
    // Drop slot 1, fix the count, the length and the checksum.
    let forged = raw_header(1, first_slot);
    assert_ne!(forged[..forged.len() - 64], bytes[..bytes.len() - 64]);
    let parsed = UnverifiedHeader::parse(&forged).unwrap();
    assert_eq!(parsed.unverified().slots.len(), 1);
    // The MAC is not the forger's to compute: keep the original one.
    let mut with_mac = forged.clone();
    let n = with_mac.len();
    with_mac[n - 32..].copy_from_slice(&bytes[bytes.len() - 32..]);
    let e = UnverifiedHeader::parse(&with_mac)
        .unwrap()
        .verify(&k)
        .unwrap_err();
    assert_eq!(e, HeaderError::BadMac);
}

#[test]
fn encoder_refuses_what_the_parser_would() {
    let k = keys();
    let mut bad = vault("primary");
    bad.label = "7".into();
    assert!(header(vec![bad]).encode(&k).is_err());
    assert!(matches!(
        header(vec![vault("a"), vault("a")]).encode(&k),
        Err(HeaderError::DuplicateLabel(_))
    ));
    let mut no_addr = vault("a");
    if let SlotKms::Vault(v) = &mut no_addr.kms {
        v.addresses.clear();
    }
    assert!(header(vec![no_addr]).encode(&k).is_err());
    let mut ctl = vault("a");
    if let SlotKms::Vault(v) = &mut ctl.kms {
        v.key_name = "a\nb".into();
    }
    assert!(header(vec![ctl]).encode(&k).is_err());
    assert!(validate_label("dr-site.2").is_ok());
    assert!(validate_label("-x").is_err());
    assert!(validate_label(&"a".repeat(65)).is_err());
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9:/._ é-]{{1,{max}}}")).unwrap()
}

fn label() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9._-]{0,20}"
}

fn slot() -> impl Strategy<Value = KeySlot> {
    let vault = (
        prop::collection::btree_set(text(40), 1..4),
        text(20),
        proptest::option::of(text(20)),
        text(30),
        any::<u32>(),
        any::<bool>(),
        text(200),
    )
        .prop_map(|(a, t, ns, k, ver, ctx, w)| {
            SlotKms::Vault(VaultSlot {
                addresses: a.into_iter().collect(),
                transit_path: t,
                namespace: ns,
                key_name: k,
                key_version: ver,
                uses_context: ctx,
                wrapped_key: w,
            })
        });
    let kmip = (
        prop::collection::btree_set(text(40), 1..4),
        text(40),
        text(300),
    )
        .prop_map(|(a, id, w)| {
            SlotKms::Kmip(KmipSlot {
                addresses: a.into_iter().collect(),
                key_id: id,
                wrapped: w,
            })
        });
    (label(), any::<i64>(), prop_oneof![vault, kmip]).prop_map(|(label, created, kms)| KeySlot {
        label,
        created,
        kms,
    })
}

proptest! {
    #[test]
    fn arbitrary_slot_sets_round_trip(slots in prop::collection::vec(slot(), 1..=8)) {
        let mut slots = slots;
        // Labels are unique in a header.
        for (i, s) in slots.iter_mut().enumerate() {
            s.label = format!("{}-{i}", s.label);
        }
        let h = header(slots);
        let k = keys();
        let bytes = h.encode(&k).unwrap();
        let parsed = UnverifiedHeader::parse(&bytes).unwrap();
        prop_assert_eq!(parsed.unverified(), &h);
        let verified = parsed.verify(&k).unwrap();
        // Canonical: the parsed header encodes to the same bytes.
        prop_assert_eq!(verified.encode(&k).unwrap(), bytes);
    }

    #[test]
    fn any_single_byte_change_in_a_slot_is_caught(
        s in slot(), pos in any::<prop::sample::Index>(), delta in 1u8..=255,
    ) {
        let h = header(vec![s]);
        let k = keys();
        let bytes = h.encode(&k).unwrap();
        let slot_area = 52..bytes.len() - 64;
        let i = slot_area.start + pos.index(slot_area.len());
        let mut t = bytes[..bytes.len() - 64].to_vec();
        t[i] ^= delta;
        // A forger recomputes the checksum and keeps the MAC.
        let sum = Sha256::digest(&t);
        t.extend_from_slice(&sum);
        t.extend_from_slice(&bytes[bytes.len() - 32..]);
        let accepted = UnverifiedHeader::parse(&t).and_then(|u| u.verify(&k));
        prop_assert!(accepted.is_err());
    }
}
