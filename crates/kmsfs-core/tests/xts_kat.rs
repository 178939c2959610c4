//! Known-answer tests for AES-256-XTS: IEEE 1619-2007 vector 10, and
//! OpenSSL's AES-256-XTS on 4096-byte and ciphertext-stealing units.

use kmsfs_core::xts::{Xts256, XtsError};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn key64(k: &[u8]) -> [u8; 64] {
    k.try_into().unwrap()
}

/// IEEE 1619-2007 annex B, vector 10: XTS-AES-256, data unit 0xff, 512 bytes.
#[test]
fn ieee1619_vector_10() {
    let key = hex(
        "2718281828459045235360287471352662497757247093699959574966967627
         3141592653589793238462643383279502884197169399375105820974944592",
    );
    let pt: Vec<u8> = (0..512).map(|i| (i % 256) as u8).collect();
    let ct = hex(
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b
         5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd
         5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0
         c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca
         2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0
         b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f
         93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec
         583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a
         84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1
         505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae
         9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29
         a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac
         6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f
         645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385
         1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa
         773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
    );
    let xts = Xts256::new(&key64(&key)).unwrap();
    let mut buf = pt.clone();
    xts.encrypt_unit(&mut buf, 0xff).unwrap();
    assert_eq!(to_hex(&buf), to_hex(&ct));
    xts.decrypt_unit(&mut buf, 0xff).unwrap();
    assert_eq!(buf, pt);
}

/// Encrypts `data` as one XTS data unit with OpenSSL's libcrypto.
///
/// `openssl enc` refuses XTS ("XTS ciphers not supported") in OpenSSL 3.0,
/// so the reference is the same EVP implementation called through the
/// `openssl` crate: one `EVP_CipherUpdate` is one data unit.
fn openssl_xts(key: &[u8], unit: u128, data: &[u8]) -> Vec<u8> {
    openssl::symm::encrypt(
        openssl::symm::Cipher::aes_256_xts(),
        key,
        Some(&unit.to_le_bytes()),
        data,
    )
    .unwrap()
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn matches_openssl_on_4096_byte_unit_and_stealing_lengths() {
    let key = pattern(64, 7);
    let xts = Xts256::new(&key64(&key)).unwrap();
    // A full data unit, then lengths that exercise ciphertext stealing,
    // including the 4096+r merged final unit the contents layer produces.
    for (len, unit) in [
        (4096usize, 0u128),
        (4096, 0x1234_5678_9abc),
        (17, 3),
        (31, 9),
        (4095, 1),
        (4097, 2),
        (4111, 77),
        (16, 5),
    ] {
        let pt = pattern(len, len as u32);
        let want = openssl_xts(&key, unit, &pt);
        let mut buf = pt.clone();
        xts.encrypt_unit(&mut buf, unit).unwrap();
        assert_eq!(to_hex(&buf), to_hex(&want), "len {len} unit {unit}");
        xts.decrypt_unit(&mut buf, unit).unwrap();
        assert_eq!(buf, pt, "decrypt len {len}");
    }
}

#[test]
fn refuses_short_units_and_weak_keys() {
    let xts = Xts256::new(&key64(&pattern(64, 1))).unwrap();
    let mut short = [0u8; 15];
    assert_eq!(
        xts.encrypt_unit(&mut short, 0),
        Err(XtsError::UnitTooShort(15))
    );
    assert_eq!(xts.decrypt_unit(&mut [], 0), Err(XtsError::UnitTooShort(0)));
    let mut weak = [0x42u8; 64];
    weak[0] = 1;
    weak[32] = 1;
    assert!(matches!(Xts256::new(&weak), Err(XtsError::WeakKey)));
}

mod crypter {
    //! The libcrypto path ([`Xts256::crypter`]) against the batched `aes`
    //! code it replaces on whole units, which the known answers above pin.
    use super::*;
    use proptest::prelude::*;

    fn key() -> [u8; 64] {
        let mut k = [0u8; 64];
        for (i, b) in k.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        k
    }

    proptest! {
        #[test]
        fn whole_units_match_the_reference(
            data in proptest::collection::vec(any::<u8>(), 16..=4096),
            unit in any::<u128>(),
        ) {
            let xts = Xts256::new(&key()).unwrap();
            let mut reference = data.clone();
            xts.encrypt_unit(&mut reference, unit).unwrap();
            let mut fast = data.clone();
            xts.crypter(true).unit(&mut fast, unit).unwrap();
            prop_assert_eq!(&fast, &reference);
            xts.crypter(false).unit(&mut fast, unit).unwrap();
            prop_assert_eq!(fast, data);
        }

        #[test]
        fn block_runs_match_the_reference(
            blocks in prop_oneof![1usize..=256, 64usize..=254],
            // 1..=4: a run a few blocks into its unit goes through
            // libcrypto behind filler blocks (a 4 KiB page starts at 2).
            first in prop_oneof![Just(0u64), 1u64..=4, 0u64..256],
            unit in any::<u64>(),
            encrypt in any::<bool>(),
        ) {
            let xts = Xts256::new(&key()).unwrap();
            let data: Vec<u8> = (0..blocks * 16).map(|i| (i * 7 + 3) as u8).collect();
            let mut reference = data.clone();
            let mut fast = data.clone();
            let mut c = xts.crypter(encrypt);
            // One crypter serves many units in a row (a context reused with a new IV).
            for u in 0..3u128 {
                let unit = u128::from(unit) + u;
                if encrypt {
                    xts.encrypt_blocks(&mut reference, unit, first).unwrap();
                } else {
                    xts.decrypt_blocks(&mut reference, unit, first).unwrap();
                }
                c.blocks(&mut fast, unit, first).unwrap();
                prop_assert_eq!(&fast, &reference);
            }
        }
    }

    /// Crypters hand their libcrypto context back to the key when dropped;
    /// a context reused by another crypter, another thread or the other
    /// direction's turn still gives the reference answer.
    #[test]
    fn reused_contexts_match_the_reference_across_threads() {
        let xts = Xts256::new(&key()).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u128 {
                let xts = &xts;
                s.spawn(move || {
                    for i in 0..200u128 {
                        let unit = t * 1_000 + i;
                        let data: Vec<u8> =
                            (0..4096).map(|j| (j as u128 * 3 + unit) as u8).collect();
                        let mut reference = data.clone();
                        xts.encrypt_unit(&mut reference, unit).unwrap();
                        let mut fast = data.clone();
                        xts.crypter(true).unit(&mut fast, unit).unwrap();
                        assert_eq!(fast, reference);
                        let mut page = reference[32..].to_vec();
                        xts.crypter(false).blocks(&mut page, unit, 2).unwrap();
                        assert_eq!(page, &data[32..]);
                    }
                });
            }
        });
    }

    #[test]
    fn crypter_refuses_short_units_and_clones_work() {
        let xts = Xts256::new(&key()).unwrap();
        let mut c = xts.crypter(true);
        assert_eq!(c.unit(&mut [0u8; 15], 1), Err(XtsError::UnitTooShort(15)));
        drop(c);
        let twin = xts.clone();
        drop(xts);
        let mut a = [5u8; 4096];
        let mut b = a;
        twin.encrypt_unit(&mut a, 9).unwrap();
        twin.crypter(true).unit(&mut b, 9).unwrap();
        assert_eq!(a, b);
    }
}
