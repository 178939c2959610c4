//! Name and symlink-target encryption properties.

use kmsfs_core::keys::{FsKeys, MasterKey};
use kmsfs_core::names::*;
use proptest::prelude::*;

fn keys() -> FsKeys {
    FsKeys::derive(&MasterKey::generate().unwrap(), &[3; 16])
}

fn round_trip(keys: &FsKeys, iv: &[u8; 16], name: &[u8]) {
    let enc = encrypt_name(keys, iv, name).unwrap();
    let full = match &enc {
        EncryptedName::Short(s) => {
            assert!(s.len() <= 255);
            assert_eq!(classify(s), BackingEntry::Encoded(s.as_str()));
            s.clone()
        }
        EncryptedName::Long { hashed, full } => {
            assert!(hashed.len() + LONGNAME_SUFFIX.len() <= 255);
            assert_eq!(classify(hashed), BackingEntry::LongName(hashed.as_str()));
            assert_eq!(&long_name_for(full), hashed);
            full.clone()
        }
    };
    // Filesystem-safe: no '/', no NUL, never '.' or '..'.
    assert!(enc.backing_name().bytes().all(|b| b != b'/' && b != 0));
    assert_eq!(decrypt_name(keys, iv, &full).unwrap(), name);
    // Deterministic for lookups.
    assert_eq!(encrypt_name(keys, iv, name).unwrap(), enc);
}

#[test]
fn one_and_255_byte_names_and_unicode() {
    let k = keys();
    let iv = [5u8; 16];
    round_trip(&k, &iv, b"a");
    round_trip(&k, &iv, &[b'x'; 255]);
    round_trip(&k, &iv, "héllo wörld ✓ 日本語 🦀".as_bytes());
    round_trip(&k, &iv, &[0xff, 0xfe, 0x80]); // not UTF-8: still a valid name
    let all: Vec<u8> = (1u8..=255).filter(|&b| b != b'/').collect();
    round_trip(&k, &iv, &all);
    assert!(matches!(
        encrypt_name(&k, &iv, &[b'x'; 161]).unwrap(),
        EncryptedName::Long { .. }
    ));
    assert!(matches!(
        encrypt_name(&k, &iv, &[b'x'; 160]).unwrap(),
        EncryptedName::Short(_)
    ));
}

#[test]
fn invalid_names_are_refused() {
    let k = keys();
    let iv = [0u8; 16];
    for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
        assert_eq!(
            encrypt_name(&k, &iv, bad),
            Err(NameError::Invalid),
            "{bad:?}"
        );
    }
    assert_eq!(encrypt_name(&k, &iv, &[b'x'; 256]), Err(NameError::TooLong));
}

#[test]
fn names_depend_on_the_directory() {
    let k = keys();
    let a = encrypt_name(&k, &[1; 16], b"report.pdf").unwrap();
    let b = encrypt_name(&k, &[2; 16], b"report.pdf").unwrap();
    assert_ne!(a, b);
    // Decrypting with the other directory's IV fails authentication.
    assert_eq!(
        decrypt_name(&k, &[2; 16], a.backing_name()),
        Err(NameError::Tampered)
    );
}

#[test]
fn bad_encodings_are_errors() {
    let k = keys();
    let iv = [0u8; 16];
    for bad in ["", "!!!!", "a", "AAAA", "kmsfs.diriv", &"A".repeat(2000)] {
        assert!(decrypt_name(&k, &iv, bad).is_err(), "{bad}");
    }
    let mut good = encrypt_name(&k, &iv, b"file")
        .unwrap()
        .backing_name()
        .to_string();
    let flipped = if good.ends_with('A') { 'B' } else { 'A' };
    good.pop();
    good.push(flipped);
    assert!(decrypt_name(&k, &iv, &good).is_err());
}

const IV_A: [u8; 16] = [7; 16];
const IV_B: [u8; 16] = [8; 16];

fn at<'a>(iv: &'a [u8; 16], name: &'a str) -> SymlinkBinding<'a> {
    SymlinkBinding {
        dir_iv: iv,
        backing_name: name.as_bytes(),
    }
}

#[test]
fn symlink_targets_are_randomised_and_authenticated() {
    let k = keys();
    let here = at(&IV_A, "entryA");
    let a = encrypt_symlink(&k, b"../target/file", here).unwrap();
    let b = encrypt_symlink(&k, b"../target/file", here).unwrap();
    assert_ne!(a, b);
    assert_eq!(
        decrypt_symlink(&k, a.as_bytes(), here).unwrap(),
        b"../target/file"
    );
    assert_eq!(symlink_target_len(a.len() as u64), Some(14));
    let long = vec![b'p'; MAX_SYMLINK_LEN];
    let enc = encrypt_symlink(&k, &long, here).unwrap();
    assert!(enc.len() <= 4095);
    assert_eq!(decrypt_symlink(&k, enc.as_bytes(), here).unwrap(), long);
    assert_eq!(
        symlink_target_len(enc.len() as u64),
        Some(MAX_SYMLINK_LEN as u64)
    );
    assert_eq!(
        encrypt_symlink(&k, &[b'p'; MAX_SYMLINK_LEN + 1], here),
        Err(NameError::TooLong)
    );
    let mut t = a.clone().into_bytes();
    t[20] = if t[20] == b'A' { b'B' } else { b'A' };
    assert!(decrypt_symlink(&k, &t, here).is_err());
    assert!(decrypt_symlink(&k, b"short", here).is_err());
}

#[test]
fn a_symlink_target_moved_to_another_entry_does_not_decrypt() {
    let k = keys();
    let stored = encrypt_symlink(&k, b"/etc/passwd", at(&IV_A, "entryA")).unwrap();
    // Another name in the same directory, and the same name in another one.
    for other in [at(&IV_A, "entryB"), at(&IV_B, "entryA")] {
        assert_eq!(
            decrypt_symlink(&k, stored.as_bytes(), other),
            Err(NameError::Tampered)
        );
    }
}

proptest! {
    #[test]
    fn symlink_length_is_known_without_decrypting(target in prop::collection::vec(1u8..=255, 1..=MAX_SYMLINK_LEN)) {
        let k = keys();
        let stored = encrypt_symlink(&k, &target, at(&IV_B, "n")).unwrap();
        prop_assert_eq!(symlink_target_len(stored.len() as u64), Some(target.len() as u64));
    }

    #[test]
    fn any_valid_name_round_trips(name in prop::collection::vec(1u8..=255, 1..=255), iv in any::<[u8; 16]>()) {
        let name: Vec<u8> = name.into_iter().map(|b| if b == b'/' { b'_' } else { b }).collect();
        prop_assume!(name != b"." && name != b"..");
        let k = keys();
        round_trip(&k, &iv, &name);
    }

    #[test]
    fn decoding_arbitrary_input_never_panics(s in ".{0,400}", raw in prop::collection::vec(any::<u8>(), 0..600)) {
        let k = keys();
        let _ = decrypt_name(&k, &[0; 16], &s);
        let _ = decrypt_symlink(&k, &raw, at(&IV_A, "x"));
        let _ = symlink_target_len(raw.len() as u64);
        let _ = classify(&s);
    }
}
