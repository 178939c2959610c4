//! File contents: AES-256-XTS per 4096-byte data unit, exact sizes, holes.
//!
//! A backing file is a 32-byte file header followed by ciphertext of exactly
//! the plaintext's length, so a plaintext offset `p` lives at `32 + p`. An
//! empty backing file (no header at all) is an empty plaintext file.
//!
//! Data units: unit `i` covers plaintext `[4096·i, 4096·(i+1))` and is
//! encrypted with tweak `i`. The final unit is whatever remains; XTS's
//! ciphertext stealing handles any length of at least 16 bytes. A remainder
//! of 1..15 bytes cannot stand alone, so it is merged into the unit before it
//! (one unit of 4097..4111 bytes). A whole file shorter than 16 bytes is
//! "tiny": it is XORed with a keystream block and re-encrypted under a fresh
//! file nonce on every change, so no keystream is ever used twice.
//!
//! Holes: a unit whose stored ciphertext is all zero bytes reads as zeros.
//! Regions never written (sparse extension, truncate up) are left as zero
//! bytes, and every explicit write is encrypted.

use crate::keys::{FsKeys, KeyError, FILE_NONCE_LEN};
use crate::xts::Xts256;
use std::io;

/// Size of an XTS data unit in bytes.
pub const UNIT_SIZE: u64 = 4096;
/// Length of the header at the start of every non-empty backing file.
pub const FILE_HEADER_LEN: u64 = 32;
/// Files shorter than this are "tiny" and use the keystream scheme.
pub const TINY_LIMIT: u64 = 16;

const FILE_MAGIC: [u8; 4] = *b"kmsF";
const FILE_VERSION: u8 = 1;
/// The tweak-key input for a tiny file's keystream: no data unit can have
/// this number, since file offsets are below 2^64.
const TINY_KEYSTREAM_INPUT: u128 = u128::MAX;

/// Positional I/O on the backing (ciphertext) file.
pub trait Backing {
    /// Reads up to `buf.len()` bytes at `off`; returns the count, 0 at end of file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `off`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves space for `[off, off + len)` without changing the file's
    /// length, so that a full disk fails the write before any byte of
    /// existing data is replaced. The default reserves nothing.
    fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        let _ = (off, len);
        Ok(())
    }
}

impl Backing for std::fs::File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, off)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }
    fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on a descriptor this File owns.
        let r = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Filesystems without fallocate: nothing to reserve with.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
            _ => Err(e),
        }
    }
}

/// Why a contents operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContentsError {
    /// The backing file could not be read or written (ENOSPC and EIO included).
    #[error("backing file I/O: {0}")]
    Io(#[from] io::Error),
    /// The backing file's header is missing, truncated or from an unknown version.
    #[error("bad file header: {0}")]
    BadHeader(&'static str),
    /// The backing file is shorter than its own size implies (it changed underneath).
    #[error("short read: backing file ends at {at} bytes, expected {wanted}")]
    ShortRead {
        /// Offset where data ended.
        at: u64,
        /// Offset that was needed.
        wanted: u64,
    },
    /// A key could not be derived.
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl ContentsError {
    /// The errno a filesystem should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ContentsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

/// Plaintext size of a backing file of `backing_len` bytes.
pub fn plaintext_size(backing_len: u64) -> u64 {
    backing_len.saturating_sub(FILE_HEADER_LEN)
}

/// Encodes the 32-byte file header for `nonce`.
pub fn encode_file_header(nonce: &[u8; FILE_NONCE_LEN]) -> [u8; FILE_HEADER_LEN as usize] {
    let mut h = [0u8; FILE_HEADER_LEN as usize];
    h[..4].copy_from_slice(&FILE_MAGIC);
    h[4] = FILE_VERSION;
    h[16..].copy_from_slice(nonce);
    h
}

/// Decodes a file header, returning the file nonce.
pub fn decode_file_header(h: &[u8]) -> Result<[u8; FILE_NONCE_LEN], ContentsError> {
    if h.len() < FILE_HEADER_LEN as usize {
        return Err(ContentsError::BadHeader(
            "truncated (shorter than 32 bytes)",
        ));
    }
    if h[..4] != FILE_MAGIC {
        return Err(ContentsError::BadHeader("bad magic"));
    }
    if h[4] != FILE_VERSION {
        return Err(ContentsError::BadHeader("unknown file format version"));
    }
    if h[5..16].iter().any(|&b| b != 0) {
        return Err(ContentsError::BadHeader("reserved bytes are not zero"));
    }
    let mut nonce = [0u8; FILE_NONCE_LEN];
    nonce.copy_from_slice(&h[16..32]);
    Ok(nonce)
}

/// Start of the last data unit of a non-tiny file of `size` bytes.
fn last_unit_start(size: u64) -> u64 {
    debug_assert!(size >= TINY_LIMIT);
    let full = size / UNIT_SIZE;
    let rem = size % UNIT_SIZE;
    if rem == 0 || rem < TINY_LIMIT {
        // rem == 0: the last full unit. rem < 16: merged into the unit before.
        (full - 1) * UNIT_SIZE
    } else {
        full * UNIT_SIZE
    }
}

/// The data unit holding plaintext byte `pos` in a non-tiny file of `size`
/// bytes: `(start, end, index)`.
fn unit_bounds(size: u64, pos: u64) -> (u64, u64, u64) {
    let last = last_unit_start(size);
    let start = (pos / UNIT_SIZE * UNIT_SIZE).min(last);
    let end = if start == last {
        size
    } else {
        start + UNIT_SIZE
    };
    (start, end, start / UNIT_SIZE)
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// The open state of one encrypted file: its cipher and its plaintext size.
///
/// Callers serialise access per file (the FUSE driver holds one per inode
/// under a lock); reads take `&self`, changes `&mut self`.
#[derive(Debug)]
pub struct FileContents {
    cipher: Option<Xts256>,
    size: u64,
}

impl FileContents {
    /// Opens a backing file of `backing_len` bytes, reading its header.
    pub fn open<B: Backing>(
        keys: &FsKeys,
        backing: &B,
        backing_len: u64,
    ) -> Result<Self, ContentsError> {
        if backing_len == 0 {
            return Ok(FileContents {
                cipher: None,
                size: 0,
            });
        }
        let mut h = [0u8; FILE_HEADER_LEN as usize];
        let n = read_full(backing, &mut h, 0)?;
        if n < h.len() {
            return Err(ContentsError::BadHeader(
                "truncated (shorter than 32 bytes)",
            ));
        }
        let nonce = decode_file_header(&h)?;
        Ok(FileContents {
            cipher: Some(keys.file_cipher(&nonce)?),
            size: plaintext_size(backing_len),
        })
    }

    /// The plaintext size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads plaintext at `off` into `buf`; returns the count (short at end of file).
    pub fn read_at<B: Backing>(
        &self,
        backing: &B,
        off: u64,
        buf: &mut [u8],
    ) -> Result<usize, ContentsError> {
        if off >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let end = self.size.min(off.saturating_add(buf.len() as u64));
        let n = (end - off) as usize;
        let cipher = self
            .cipher
            .as_ref()
            .ok_or(ContentsError::BadHeader("non-empty file without a header"))?;
        if self.size < TINY_LIMIT {
            let mut ct = [0u8; TINY_LIMIT as usize];
            let len = self.size as usize;
            read_exact(backing, &mut ct[..len], FILE_HEADER_LEN)?;
            if !is_zero(&ct[..len]) {
                tiny_xor(cipher, &mut ct[..len]);
            }
            buf[..n].copy_from_slice(&ct[off as usize..end as usize]);
            return Ok(n);
        }
        let (first, _, _) = unit_bounds(self.size, off);
        let (_, last_end, _) = unit_bounds(self.size, end - 1);
        if first == off && last_end == end {
            // Whole units (the kernel's page-aligned reads): decrypt in the
            // caller's buffer, with no copy.
            self.decrypt_units(backing, cipher, first, &mut buf[..n])?;
            return Ok(n);
        }
        let mut ct = vec![0u8; (last_end - first) as usize];
        self.decrypt_units(backing, cipher, first, &mut ct)?;
        buf[..n].copy_from_slice(&ct[(off - first) as usize..(end - first) as usize]);
        Ok(n)
    }

    /// Reads and decrypts the whole units covering `[first, first + buf.len())`.
    fn decrypt_units<B: Backing>(
        &self,
        backing: &B,
        cipher: &Xts256,
        first: u64,
        buf: &mut [u8],
    ) -> Result<(), ContentsError> {
        read_exact(backing, buf, FILE_HEADER_LEN + first)?;
        let last_end = first + buf.len() as u64;
        let mut pos = first;
        while pos < last_end {
            let (s, e, idx) = unit_bounds(self.size, pos);
            let unit = &mut buf[(s - first) as usize..(e - first) as usize];
            if !is_zero(unit) {
                cipher
                    .decrypt_unit(unit, u128::from(idx))
                    .map_err(KeyError::from)?;
            }
            pos = e;
        }
        Ok(())
    }

    /// Writes `data` at plaintext offset `off`, growing the file if needed.
    ///
    /// Work is bounded by the data units `data` touches plus the old final
    /// unit when the size changes; a gap before `off` stays a hole.
    pub fn write_at<B: Backing>(
        &mut self,
        keys: &FsKeys,
        backing: &B,
        off: u64,
        data: &[u8],
    ) -> Result<(), ContentsError> {
        if data.is_empty() {
            return Ok(());
        }
        let end = off
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let new_size = self.size.max(end);
        if new_size < TINY_LIMIT {
            let mut plain = self.read_all_small(backing)?;
            plain.resize(new_size as usize, 0);
            plain[off as usize..end as usize].copy_from_slice(data);
            return self.write_tiny(keys, backing, &plain);
        }
        self.ensure_header(keys, backing)?;
        let mut ranges = Vec::with_capacity(2);
        if new_size != self.size && self.size > 0 {
            ranges.push(self.tail_range());
        }
        ranges.push((off, end));
        self.rewrite(backing, new_size, &ranges, Some((off, data)))?;
        self.size = new_size;
        Ok(())
    }

    /// Truncates or extends the plaintext to `new_size` bytes.
    pub fn set_len<B: Backing>(
        &mut self,
        keys: &FsKeys,
        backing: &B,
        new_size: u64,
    ) -> Result<(), ContentsError> {
        if new_size == self.size {
            return Ok(());
        }
        if new_size < TINY_LIMIT {
            let mut plain = if self.size < TINY_LIMIT {
                self.read_all_small(backing)?
            } else {
                let mut head = vec![0u8; new_size as usize];
                self.read_at(backing, 0, &mut head)?;
                head
            };
            plain.resize(new_size as usize, 0);
            return self.write_tiny(keys, backing, &plain);
        }
        if new_size < self.size {
            let start = last_unit_start(new_size);
            self.rewrite(backing, new_size, &[(start, new_size)], None)?;
        } else {
            self.ensure_header(keys, backing)?;
            if self.size > 0 {
                let tail = self.tail_range();
                self.rewrite(backing, new_size, &[tail], None)?;
            }
        }
        backing.set_len(FILE_HEADER_LEN + new_size)?;
        self.size = new_size;
        Ok(())
    }

    /// The plaintext range of the current final unit (or the whole tiny file).
    fn tail_range(&self) -> (u64, u64) {
        if self.size < TINY_LIMIT {
            (0, self.size)
        } else {
            (last_unit_start(self.size), self.size)
        }
    }

    /// Re-encrypts the units of the `new_size` layout that cover `ranges`,
    /// taking old plaintext from the current layout and overlaying `data`.
    fn rewrite<B: Backing>(
        &self,
        backing: &B,
        new_size: u64,
        ranges: &[(u64, u64)],
        data: Option<(u64, &[u8])>,
    ) -> Result<(), ContentsError> {
        let cipher = self
            .cipher
            .as_ref()
            .ok_or(ContentsError::BadHeader("file has no header"))?;
        let mut spans: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|(a, b)| a < b)
            .map(|&(a, b)| (unit_bounds(new_size, a).0, unit_bounds(new_size, b - 1).1))
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
        for (a, b) in spans {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        for (ua, ub) in merged {
            let mut buf = vec![0u8; (ub - ua) as usize];
            match data {
                Some((off, d)) if off < ub && off + d.len() as u64 > ua => {
                    let dend = off + d.len() as u64;
                    // Only the parts of the span the new data does not cover
                    // need the old plaintext.
                    if ua < off {
                        self.read_at(backing, ua, &mut buf[..(off - ua) as usize])?;
                    }
                    if dend < ub {
                        self.read_at(backing, dend, &mut buf[(dend - ua) as usize..])?;
                    }
                    let from = off.max(ua);
                    let to = dend.min(ub);
                    buf[(from - ua) as usize..(to - ua) as usize]
                        .copy_from_slice(&d[(from - off) as usize..(to - off) as usize]);
                }
                _ => {
                    self.read_at(backing, ua, &mut buf)?;
                }
            }
            let mut pos = ua;
            while pos < ub {
                let (s, e, idx) = unit_bounds(new_size, pos);
                cipher
                    .encrypt_unit(
                        &mut buf[(s - ua) as usize..(e - ua) as usize],
                        u128::from(idx),
                    )
                    .map_err(KeyError::from)?;
                pos = e;
            }
            // Only a span that grows the file can need new blocks next to
            // old data (the re-encrypted last unit): reserve them first.
            if ub > self.size {
                backing.allocate(FILE_HEADER_LEN + ua, ub - ua)?;
            }
            backing.write_all_at(&buf, FILE_HEADER_LEN + ua)?;
        }
        Ok(())
    }

    fn read_all_small<B: Backing>(&self, backing: &B) -> Result<Vec<u8>, ContentsError> {
        let mut plain = vec![0u8; self.size as usize];
        self.read_at(backing, 0, &mut plain)?;
        Ok(plain)
    }

    /// Writes a header with a fresh nonce if the file has none yet.
    fn ensure_header<B: Backing>(
        &mut self,
        keys: &FsKeys,
        backing: &B,
    ) -> Result<(), ContentsError> {
        if self.cipher.is_none() {
            let nonce = random_nonce()?;
            let cipher = keys.file_cipher(&nonce)?;
            backing.allocate(0, FILE_HEADER_LEN)?;
            backing.write_all_at(&encode_file_header(&nonce), 0)?;
            self.cipher = Some(cipher);
        }
        Ok(())
    }

    /// Replaces the whole file with the tiny (under 16 bytes) `plain`, under
    /// a fresh nonce so that no keystream ever encrypts two versions.
    fn write_tiny<B: Backing>(
        &mut self,
        keys: &FsKeys,
        backing: &B,
        plain: &[u8],
    ) -> Result<(), ContentsError> {
        debug_assert!((plain.len() as u64) < TINY_LIMIT);
        if plain.is_empty() {
            backing.set_len(0)?;
            self.cipher = None;
            self.size = 0;
            return Ok(());
        }
        let (nonce, cipher, ct) = loop {
            let nonce = random_nonce()?;
            let cipher = keys.file_cipher(&nonce)?;
            let mut ct = plain.to_vec();
            tiny_xor(&cipher, &mut ct);
            // All-zero ciphertext means "hole" and would read back as zeros.
            if !is_zero(&ct) || is_zero(plain) {
                break (nonce, cipher, ct);
            }
        };
        let mut out = Vec::with_capacity(FILE_HEADER_LEN as usize + ct.len());
        out.extend_from_slice(&encode_file_header(&nonce));
        out.extend_from_slice(&ct);
        backing.allocate(0, out.len() as u64)?;
        backing.write_all_at(&out, 0)?;
        if self.size > plain.len() as u64 || self.cipher.is_none() {
            backing.set_len(out.len() as u64)?;
        }
        self.cipher = Some(cipher);
        self.size = plain.len() as u64;
        Ok(())
    }
}

/// XORs a tiny file with its keystream (encryption and decryption alike;
/// the caller skips decryption of an all-zero hole).
fn tiny_xor(cipher: &Xts256, buf: &mut [u8]) {
    let ks = cipher.tweak_prf(TINY_KEYSTREAM_INPUT);
    for (b, k) in buf.iter_mut().zip(ks.iter()) {
        *b ^= k;
    }
}

fn random_nonce() -> Result<[u8; FILE_NONCE_LEN], ContentsError> {
    let mut nonce = [0u8; FILE_NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(KeyError::Random)?;
    Ok(nonce)
}

fn read_full<B: Backing>(backing: &B, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match backing.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn read_exact<B: Backing>(backing: &B, buf: &mut [u8], off: u64) -> Result<(), ContentsError> {
    let n = read_full(backing, buf, off)?;
    if n < buf.len() {
        return Err(ContentsError::ShortRead {
            at: off + n as u64,
            wanted: off + buf.len() as u64,
        });
    }
    Ok(())
}
