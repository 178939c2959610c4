//! AES-256-XTS (IEEE 1619-2007) with ciphertext stealing, batched for speed.
//!
//! The reference construction encrypts one 16-byte block at a time, which
//! leaves AES-NI's pipeline mostly idle. Here the tweaks for a run of blocks
//! are computed first, XORed into the buffer, the whole run goes through
//! `aes`'s multi-block path (eight blocks in flight), and the tweaks are
//! XORed again. The output is byte-identical to the standard.
//!
//! Whole data units, the bulk of every read and write, go through
//! libcrypto's AES-256-XTS instead ([`UnitCrypter`]): its VAES code runs
//! about 1.5 times as fast as the `aes` crate on the project machine. The
//! code above stays for what libcrypto cannot do (blocks starting inside a
//! unit, the tweak PRF) and as the reference the two are tested against.

use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes256, Block};
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use std::sync::Mutex;

/// Blocks processed per batch: large enough to keep the pipeline full,
/// small enough that the tweak array stays in L1.
const BATCH: usize = 64;

/// GF(2^128) reduction constant for XTS (x^128 + x^7 + x^2 + x + 1).
const GF_128_FDBK: u128 = 0x87;

/// An AES-256-XTS key pair (data key and tweak key), expanded once.
pub struct Xts256 {
    data: Aes256,
    tweak: Aes256,
    evp: EvpTemplates,
}

/// libcrypto contexts keyed once, one per direction. A context carries the
/// state of one operation and is not shared between threads, so each run
/// of units works on a copy ([`Xts256::crypter`]); copying skips the key
/// expansion but still allocates, which costs more than a 4 KiB page's
/// decryption, so copies are kept for reuse in a small pool that dies with
/// the key. libcrypto wipes a context's key schedule when it frees it.
struct EvpTemplates {
    enc: CipherCtx,
    dec: CipherCtx,
    spare_enc: Mutex<Vec<CipherCtx>>,
    spare_dec: Mutex<Vec<CipherCtx>>,
}

/// Spare contexts kept per direction: one per FUSE worker thread and some.
const SPARE_CONTEXTS: usize = 8;

impl EvpTemplates {
    fn new(key: &[u8; 64]) -> Result<Self, XtsError> {
        let cipher = Cipher::aes_256_xts();
        let mut enc = CipherCtx::new().map_err(backend)?;
        enc.encrypt_init(Some(cipher), Some(key), None)
            .map_err(backend)?;
        let mut dec = CipherCtx::new().map_err(backend)?;
        dec.decrypt_init(Some(cipher), Some(key), None)
            .map_err(backend)?;
        Ok(EvpTemplates::from_pair(enc, dec))
    }

    fn from_pair(enc: CipherCtx, dec: CipherCtx) -> Self {
        EvpTemplates {
            enc,
            dec,
            spare_enc: Mutex::new(Vec::new()),
            spare_dec: Mutex::new(Vec::new()),
        }
    }

    fn duplicate(&self) -> Result<Self, XtsError> {
        let mut enc = CipherCtx::new().map_err(backend)?;
        enc.copy(&self.enc).map_err(backend)?;
        let mut dec = CipherCtx::new().map_err(backend)?;
        dec.copy(&self.dec).map_err(backend)?;
        Ok(EvpTemplates::from_pair(enc, dec))
    }

    fn spares(&self, encrypt: bool) -> std::sync::MutexGuard<'_, Vec<CipherCtx>> {
        // A poisoned pool holds contexts that are still whole (a context
        // is only pushed or popped under the lock).
        if encrypt {
            &self.spare_enc
        } else {
            &self.spare_dec
        }
        .lock()
        .unwrap_or_else(|e| e.into_inner())
    }
}

fn backend(e: openssl::error::ErrorStack) -> XtsError {
    // libcrypto's error strings name the function and reason, never data.
    XtsError::Backend(e.to_string())
}

impl Clone for Xts256 {
    fn clone(&self) -> Self {
        Xts256 {
            data: self.data.clone(),
            tweak: self.tweak.clone(),
            // Copying a keyed context only fails when libcrypto cannot
            // allocate, which aborts a Rust program as well.
            evp: self
                .evp
                .duplicate()
                .unwrap_or_else(|e| panic!("cannot copy an AES-XTS context: {e}")),
        }
    }
}

/// Why an XTS operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XtsError {
    /// XTS cannot process fewer than 16 bytes as a data unit.
    #[error("XTS data unit of {0} bytes is shorter than one 16-byte block")]
    UnitTooShort(usize),
    /// A run of whole blocks was asked for on a length that is not a multiple of 16.
    #[error("{0} bytes are not whole 16-byte blocks")]
    NotWholeBlocks(usize),
    /// A 64-byte key whose halves are equal, which IEEE 1619 forbids.
    #[error("XTS key halves are identical")]
    WeakKey,
    /// libcrypto refused an operation (its error text; never key material).
    #[error("AES-XTS in libcrypto failed: {0}")]
    Backend(String),
}

impl Xts256 {
    /// Expands a 64-byte XTS key: bytes 0..32 are the data key, 32..64 the tweak key.
    pub fn new(key: &[u8; 64]) -> Result<Self, XtsError> {
        let (k1, k2) = key.split_at(32);
        if k1 == k2 {
            return Err(XtsError::WeakKey);
        }
        Ok(Xts256 {
            data: Aes256::new(GenericArray::from_slice(k1)),
            tweak: Aes256::new(GenericArray::from_slice(k2)),
            evp: EvpTemplates::new(key)?,
        })
    }

    /// A crypter for a run of units in one direction: whole units go
    /// through libcrypto, byte-identical to [`Xts256::encrypt_unit`] and
    /// [`Xts256::decrypt_unit`]. The first unit long enough for libcrypto
    /// costs a context copy; reuse the crypter for every unit of a request.
    pub fn crypter(&self, encrypt: bool) -> UnitCrypter<'_> {
        UnitCrypter {
            xts: self,
            ctx: None,
            encrypt,
        }
    }

    fn evp_context(&self, encrypt: bool) -> Result<CipherCtx, XtsError> {
        if let Some(ctx) = self.evp.spares(encrypt).pop() {
            return Ok(ctx);
        }
        let mut ctx = CipherCtx::new().map_err(backend)?;
        ctx.copy(if encrypt {
            &self.evp.enc
        } else {
            &self.evp.dec
        })
        .map_err(backend)?;
        Ok(ctx)
    }

    /// Encrypts one data unit in place under the 128-bit unit number `unit`.
    pub fn encrypt_unit(&self, buf: &mut [u8], unit: u128) -> Result<(), XtsError> {
        let len = buf.len();
        if len < 16 {
            return Err(XtsError::UnitTooShort(len));
        }
        let tail = len % 16;
        let bulk_blocks = len / 16 - usize::from(tail != 0);
        let (bulk, rest) = buf.split_at_mut(bulk_blocks * 16);
        let next = self.process_bulk(bulk, self.initial_tweak(unit), true);
        if tail != 0 {
            // Ciphertext stealing: the last full block is encrypted under the
            // current tweak; its head becomes the short final block and its
            // tail pads the short plaintext, which is encrypted under the next.
            let (last_full, partial) = rest.split_at_mut(16);
            let mut cc = xor_block(last_full, next);
            self.data.encrypt_block(Block::from_mut_slice(&mut cc));
            let cc = xor_u128(&cc, next);
            let mut pp = [0u8; 16];
            pp[..tail].copy_from_slice(partial);
            pp[tail..].copy_from_slice(&cc[tail..]);
            partial.copy_from_slice(&cc[..tail]);
            let t2 = mul_alpha(next);
            let mut c = xor_block(&pp, t2);
            self.data.encrypt_block(Block::from_mut_slice(&mut c));
            last_full.copy_from_slice(&xor_u128(&c, t2));
        }
        Ok(())
    }

    /// Decrypts one data unit in place under the 128-bit unit number `unit`.
    pub fn decrypt_unit(&self, buf: &mut [u8], unit: u128) -> Result<(), XtsError> {
        let len = buf.len();
        if len < 16 {
            return Err(XtsError::UnitTooShort(len));
        }
        let tail = len % 16;
        let bulk_blocks = len / 16 - usize::from(tail != 0);
        let (bulk, rest) = buf.split_at_mut(bulk_blocks * 16);
        let next = self.process_bulk(bulk, self.initial_tweak(unit), false);
        if tail != 0 {
            let (last_full, partial) = rest.split_at_mut(16);
            let t2 = mul_alpha(next);
            let mut pp = xor_block(last_full, t2);
            self.data.decrypt_block(Block::from_mut_slice(&mut pp));
            let pp = xor_u128(&pp, t2);
            let mut cc = [0u8; 16];
            cc[..tail].copy_from_slice(partial);
            cc[tail..].copy_from_slice(&pp[tail..]);
            partial.copy_from_slice(&pp[..tail]);
            let mut p = xor_block(&cc, next);
            self.data.decrypt_block(Block::from_mut_slice(&mut p));
            last_full.copy_from_slice(&xor_u128(&p, next));
        }
        Ok(())
    }

    /// Encrypts whole blocks `first_block..` of data unit `unit` in place,
    /// leaving the rest of the unit as it is on disk. Valid under the same
    /// condition as [`Xts256::decrypt_blocks`].
    pub fn encrypt_blocks(
        &self,
        buf: &mut [u8],
        unit: u128,
        first_block: u64,
    ) -> Result<(), XtsError> {
        self.process_blocks(buf, unit, first_block, true)
    }

    /// Decrypts whole blocks `first_block..` of data unit `unit` in place,
    /// without the rest of the unit. Valid only for blocks that ciphertext
    /// stealing does not touch (every block of a unit whose length is a
    /// multiple of 16): XTS blocks are independent given their tweaks.
    pub fn decrypt_blocks(
        &self,
        buf: &mut [u8],
        unit: u128,
        first_block: u64,
    ) -> Result<(), XtsError> {
        self.process_blocks(buf, unit, first_block, false)
    }

    fn process_blocks(
        &self,
        buf: &mut [u8],
        unit: u128,
        first_block: u64,
        encrypt: bool,
    ) -> Result<(), XtsError> {
        if buf.len() % 16 != 0 {
            return Err(XtsError::NotWholeBlocks(buf.len()));
        }
        let mut t = self.initial_tweak(unit);
        for _ in 0..first_block {
            t = mul_alpha(t);
        }
        self.process_bulk(buf, t, encrypt);
        Ok(())
    }

    /// Encrypts the 16-byte block `input` with the tweak key. Used for the
    /// unit tweak and, by the contents layer, as a PRF on values no unit
    /// number can take.
    pub(crate) fn tweak_prf(&self, input: u128) -> [u8; 16] {
        let mut b = input.to_le_bytes();
        self.tweak.encrypt_block(Block::from_mut_slice(&mut b));
        b
    }

    fn initial_tweak(&self, unit: u128) -> u128 {
        u128::from_le_bytes(self.tweak_prf(unit))
    }

    /// Runs whole blocks through XTS; returns the tweak for the block after them.
    fn process_bulk(&self, bulk: &mut [u8], mut t: u128, encrypt: bool) -> u128 {
        let mut tweaks = [0u128; BATCH];
        for chunk in bulk.chunks_mut(BATCH * 16) {
            let n = chunk.len() / 16;
            for (i, block) in chunk.chunks_exact_mut(16).enumerate() {
                tweaks[i] = t;
                xor_in_place(block, t);
                t = mul_alpha(t);
            }
            let blocks = as_blocks(chunk);
            if encrypt {
                self.data.encrypt_blocks(blocks);
            } else {
                self.data.decrypt_blocks(blocks);
            }
            for (block, tw) in chunk.chunks_exact_mut(16).zip(&tweaks[..n]) {
                xor_in_place(block, *tw);
            }
        }
        t
    }
}

/// Encrypts or decrypts the units of one request (see [`Xts256::crypter`]).
pub struct UnitCrypter<'a> {
    xts: &'a Xts256,
    /// Copied from the keyed template on first use: a request that only
    /// touches a few blocks (a random 4 KiB read) never pays for it.
    ctx: Option<CipherCtx>,
    encrypt: bool,
}

/// Below this many bytes the batched `aes` code is faster than setting an
/// IV in a libcrypto context.
const LIBCRYPTO_MIN: usize = 256;

/// The most filler put before a run that starts inside its unit
/// ([`UnitCrypter::blocks`]): beyond a few blocks the filler's own
/// encryption costs more than libcrypto saves.
const MAX_FILLER: usize = 64;

/// The shortest run worth the filler and the copies.
const FILLED_MIN: usize = 1024;

/// The longest filled run: one data unit as the driver stores them (a
/// merged final unit is stolen and never takes this path).
const FILLED_MAX: usize = 4096;

impl Drop for UnitCrypter<'_> {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            let mut spares = self.xts.evp.spares(self.encrypt);
            if spares.len() < SPARE_CONTEXTS {
                spares.push(ctx);
            }
        }
    }
}

impl UnitCrypter<'_> {
    /// Processes one whole data unit in place under unit number `unit`.
    pub fn unit(&mut self, buf: &mut [u8], unit: u128) -> Result<(), XtsError> {
        let len = buf.len();
        if len < LIBCRYPTO_MIN {
            return if self.encrypt {
                self.xts.encrypt_unit(buf, unit)
            } else {
                self.xts.decrypt_unit(buf, unit)
            };
        }
        if self.ctx.is_none() {
            self.ctx = Some(self.xts.evp_context(self.encrypt)?);
        }
        let Some(ctx) = self.ctx.as_mut() else {
            return Err(XtsError::Backend("no AES-XTS context".into()));
        };
        // The IEEE 1619 data-unit number, little-endian, is the XTS IV.
        let iv = unit.to_le_bytes();
        if self.encrypt {
            ctx.encrypt_init(None, None, Some(&iv))
        } else {
            ctx.decrypt_init(None, None, Some(&iv))
        }
        .map_err(backend)?;
        let n = ctx.cipher_update_inplace(buf, len).map_err(backend)?;
        if n != len {
            return Err(XtsError::Backend(format!(
                "AES-XTS returned {n} of {len} bytes"
            )));
        }
        Ok(())
    }

    /// Processes whole blocks `first_block..` of unit `unit` in place, as
    /// [`Xts256::encrypt_blocks`] / [`Xts256::decrypt_blocks`] do. A run
    /// from the unit's first block is a unit of its own to XTS (no
    /// stealing: whole blocks), so libcrypto takes it; later starts need
    /// the tweak advanced, which only the batched code here can do.
    ///
    /// A run that starts a few blocks into its unit (a 4 KiB page starts
    /// two blocks into its unit: `docs/format.md`) still goes through
    /// libcrypto: XTS blocks depend only on their own tweak, so the run is
    /// put behind as many filler blocks, processed from block 0, and the
    /// filler's output dropped. That costs two copies of the run, less
    /// than the batched code's extra time per block.
    pub fn blocks(&mut self, buf: &mut [u8], unit: u128, first_block: u64) -> Result<(), XtsError> {
        if buf.is_empty() || buf.len() % 16 != 0 {
            return self
                .xts
                .process_blocks(buf, unit, first_block, self.encrypt);
        }
        if first_block == 0 {
            return self.unit(buf, unit);
        }
        let pad = usize::try_from(first_block)
            .ok()
            .and_then(|b| b.checked_mul(16))
            .filter(|&pad| pad <= MAX_FILLER && buf.len() >= FILLED_MIN)
            .filter(|&pad| pad + buf.len() <= FILLED_MAX);
        let Some(pad) = pad else {
            return self
                .xts
                .process_blocks(buf, unit, first_block, self.encrypt);
        };
        let mut run = [0u8; FILLED_MAX];
        let run = &mut run[..pad + buf.len()];
        run[pad..].copy_from_slice(buf);
        self.unit(run, unit)?;
        buf.copy_from_slice(&run[pad..]);
        Ok(())
    }
}

fn as_blocks(buf: &mut [u8]) -> &mut [Block] {
    debug_assert_eq!(buf.len() % 16, 0);
    // SAFETY: `Block` is `GenericArray<u8, U16>`, a `repr(transparent)`
    // wrapper of `[u8; 16]` with alignment 1, and the length is a multiple of
    // 16, so the slice reinterprets exactly the same bytes.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<Block>(), buf.len() / 16) }
}

#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    let carry = (t >> 127) as u8;
    (t << 1) ^ (GF_128_FDBK * u128::from(carry))
}

#[inline(always)]
fn xor_in_place(block: &mut [u8], t: u128) {
    let mut b = [0u8; 16];
    b.copy_from_slice(block);
    let v = u128::from_le_bytes(b) ^ t;
    block.copy_from_slice(&v.to_le_bytes());
}

fn xor_block(block: &[u8], t: u128) -> [u8; 16] {
    let mut b = [0u8; 16];
    b.copy_from_slice(block);
    (u128::from_le_bytes(b) ^ t).to_le_bytes()
}

fn xor_u128(block: &[u8; 16], t: u128) -> [u8; 16] {
    (u128::from_le_bytes(*block) ^ t).to_le_bytes()
}

impl std::fmt::Debug for Xts256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Xts256([REDACTED])")
    }
}
