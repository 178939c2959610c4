//! File contents: AES-256-XTS per data unit, exact sizes, holes.
//!
//! A backing file is a 32-byte file header followed by ciphertext of exactly
//! the plaintext's length, so a plaintext offset `p` lives at `32 + p`. An
//! empty backing file (no header at all) is an empty plaintext file.
//!
//! Data units follow the page-aligned grid of [`crate::units`]; unit `i` is
//! encrypted with tweak `i`. XTS's ciphertext stealing handles a final unit
//! of any length of at least 16 bytes. A whole file shorter than 16 bytes is
//! "tiny": it is XORed with a keystream block and re-encrypted under a fresh
//! file nonce on every change, so no keystream is ever used twice; its
//! header records its length, so a tiny header on a longer backing file
//! (a shrink cut short) still reads as the tiny file.
//!
//! Holes: a unit whose stored ciphertext is all zero bytes reads as zeros.
//! Regions never written (sparse extension, truncate up) are left as zero
//! bytes, and every explicit write is encrypted.
//!
//! Failures: a change reserves the space it needs and checks the final
//! length before it replaces any old byte; if a later step fails, the old
//! bytes it replaced are written back and the length restored, and the
//! in-memory state is re-read from the backing file.

use crate::keys::{FsKeys, KeyError, FILE_NONCE_LEN};
use crate::units::{last_unit_start, unit_bounds};
pub use crate::units::{FILE_HEADER_LEN, MAX_SIZE, TINY_LIMIT, UNIT_SIZE};
use crate::xts::Xts256;
use std::io;

const FILE_MAGIC: [u8; 4] = *b"kmsF";
const FILE_VERSION: u8 = 2;
/// Header flag: the file is tiny; byte 6 holds its length.
const FLAG_TINY: u8 = 0x01;
/// The tweak-key input for a tiny file's keystream: no data unit can have
/// this number, since file offsets are below 2^64.
const TINY_KEYSTREAM_INPUT: u128 = u128::MAX;
/// Longest data unit: a full unit with a 15-byte remainder merged in.
const MAX_UNIT: usize = (UNIT_SIZE + TINY_LIMIT - 1) as usize;

/// Positional I/O on the backing (ciphertext) file.
pub trait Backing {
    /// Reads up to `buf.len()` bytes at `off`; returns the count, 0 at end of file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Reads into `bufs` in order from `off` (one `preadv` where possible);
    /// returns the total count, short only at end of file.
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], off: u64) -> io::Result<usize> {
        let mut done = 0u64;
        for buf in bufs.iter_mut() {
            let want = buf.len();
            let n = read_full(self, buf, off + done)?;
            done += n as u64;
            if n < want {
                break;
            }
        }
        Ok(done as usize)
    }
    /// Writes all of `buf` at `off`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's current length in bytes (`fstat`).
    fn file_len(&self) -> io::Result<u64>;
    /// Reserves space for `[off, off + len)` without changing the file's
    /// length, so that a full disk or a size limit fails the change before
    /// any byte of existing data is replaced. The default reserves nothing.
    fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        let _ = (off, len);
        Ok(())
    }
}

impl Backing for std::fs::File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, off)
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], off: u64) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        let iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        if iov.is_empty() {
            return Ok(0);
        }
        let r = loop {
            // SAFETY: every iovec points into a distinct live `&mut [u8]`
            // borrowed for this call, with its exact length.
            let r = unsafe {
                libc::preadv(
                    self.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    off as libc::off_t,
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        if r == want || r == 0 {
            return Ok(r);
        }
        // A short read (rare: end of file, or a signal): finish piecewise.
        let mut skip = r;
        let mut done = r;
        for buf in bufs.iter_mut() {
            if skip >= buf.len() {
                skip -= buf.len();
                continue;
            }
            let part = &mut buf[skip..];
            let n = read_full(self, part, off + done as u64)?;
            done += n;
            if n < part.len() {
                break;
            }
            skip = 0;
        }
        Ok(done)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, off)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }
    fn file_len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        // SAFETY: plain syscall on a descriptor this File owns.
        let r = unsafe { libc::fallocate(self.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, o, l) };
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

/// Plaintext size of a backing file of `backing_len` bytes whose header is
/// not a tiny one (the common case; a tiny header names its own length).
pub fn plaintext_size(backing_len: u64) -> u64 {
    backing_len.saturating_sub(FILE_HEADER_LEN)
}

/// A decoded file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// The file nonce, input to the per-file key.
    pub nonce: [u8; FILE_NONCE_LEN],
    /// For a tiny file, its length (1..15); the backing file may be longer.
    pub tiny_len: Option<u8>,
}

/// Encodes the 32-byte header of a file of at least 16 bytes under `nonce`.
pub fn encode_file_header(nonce: &[u8; FILE_NONCE_LEN]) -> [u8; FILE_HEADER_LEN as usize] {
    let mut h = [0u8; FILE_HEADER_LEN as usize];
    h[..4].copy_from_slice(&FILE_MAGIC);
    h[4] = FILE_VERSION;
    h[16..].copy_from_slice(nonce);
    h
}

/// Encodes the 32-byte header of a tiny file of `len` (1..15) bytes.
pub fn encode_tiny_file_header(
    nonce: &[u8; FILE_NONCE_LEN],
    len: u8,
) -> [u8; FILE_HEADER_LEN as usize] {
    debug_assert!(len > 0 && u64::from(len) < TINY_LIMIT);
    let mut h = encode_file_header(nonce);
    h[5] = FLAG_TINY;
    h[6] = len;
    h
}

/// Decodes a file header strictly.
pub fn decode_file_header(h: &[u8]) -> Result<FileHeader, ContentsError> {
    if h.len() < FILE_HEADER_LEN as usize {
        return Err(ContentsError::BadHeader(
            "truncated (shorter than 32 bytes)",
        ));
    }
    if h[..4] != FILE_MAGIC {
        return Err(ContentsError::BadHeader("bad magic"));
    }
    if h[4] != FILE_VERSION {
        return Err(ContentsError::BadHeader(
            "unknown file format version (this build reads version 2)",
        ));
    }
    let tiny_len = match h[5] {
        0 if h[6] == 0 => None,
        FLAG_TINY if h[6] > 0 && u64::from(h[6]) < TINY_LIMIT => Some(h[6]),
        0 | FLAG_TINY => {
            return Err(ContentsError::BadHeader(
                "tiny length out of range for the tiny flag",
            ))
        }
        _ => return Err(ContentsError::BadHeader("unknown flag bits")),
    };
    if h[7..16].iter().any(|&b| b != 0) {
        return Err(ContentsError::BadHeader("reserved bytes are not zero"));
    }
    let mut nonce = [0u8; FILE_NONCE_LEN];
    nonce.copy_from_slice(&h[16..32]);
    Ok(FileHeader { nonce, tiny_len })
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// One planned `pwrite`: backing offset and bytes.
struct Put {
    off: u64,
    bytes: Vec<u8>,
}

/// The open state of one encrypted file: its cipher and its plaintext size.
///
/// Callers serialise access per file (the FUSE driver holds one per inode
/// under a lock); reads take `&self`, changes `&mut self`.
#[derive(Debug)]
pub struct FileContents {
    cipher: Option<Xts256>,
    size: u64,
    /// A tiny file whose backing file is still longer than header + size
    /// (a shrink whose truncate has not happened yet).
    stale_tail: bool,
}

impl FileContents {
    /// Opens a backing file of `backing_len` bytes, reading its header. A
    /// tiny file left longer by an interrupted shrink is truncated when the
    /// backing file is writable, and before its next change otherwise.
    pub fn open<B: Backing>(
        keys: &FsKeys,
        backing: &B,
        backing_len: u64,
    ) -> Result<Self, ContentsError> {
        if backing_len == 0 {
            return Ok(FileContents {
                cipher: None,
                size: 0,
                stale_tail: false,
            });
        }
        let mut h = [0u8; FILE_HEADER_LEN as usize];
        let n = read_full(backing, &mut h, 0)?;
        if n < h.len() {
            return Err(ContentsError::BadHeader(
                "truncated (shorter than 32 bytes)",
            ));
        }
        let header = decode_file_header(&h)?;
        let cipher = Some(keys.file_cipher(&header.nonce)?);
        let (size, stale_tail) = match header.tiny_len {
            Some(n) => {
                let n = u64::from(n);
                if backing_len < FILE_HEADER_LEN + n {
                    return Err(ContentsError::BadHeader(
                        "tiny file shorter than its header says",
                    ));
                }
                let stale = backing_len > FILE_HEADER_LEN + n
                    && backing.set_len(FILE_HEADER_LEN + n).is_err();
                (n, stale)
            }
            None => {
                let size = plaintext_size(backing_len);
                if size > 0 && size < TINY_LIMIT {
                    return Err(ContentsError::BadHeader(
                        "file of 1..15 bytes without the tiny flag",
                    ));
                }
                (size, false)
            }
        };
        Ok(FileContents {
            cipher,
            size,
            stale_tail,
        })
    }

    /// The plaintext size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn cipher(&self) -> Result<&Xts256, ContentsError> {
        self.cipher
            .as_ref()
            .ok_or(ContentsError::BadHeader("non-empty file without a header"))
    }

    /// Reads plaintext at `off` into `buf`; returns the count (short at end of file).
    ///
    /// Units wholly inside `buf` are decrypted in place. XTS blocks are
    /// independent given their tweaks and every unit starts on a 16-byte
    /// boundary, so of an edge unit only the 16-byte blocks that overlap
    /// `buf` are read (in the same vectored read, into small scratch
    /// buffers) and decrypted; only a final unit whose length is not a
    /// multiple of 16 (ciphertext stealing) is read and decrypted whole.
    /// A kernel read of plaintext page k thus reads exactly the 4096
    /// backing bytes it needs, though they span two units.
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
        let cipher = self.cipher()?;
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
        let (first, first_end, _) = unit_bounds(self.size, off);
        let (last, last_end, _) = unit_bounds(self.size, end - 1);
        let stolen = |s: u64, e: u64| (e - s) % 16 != 0;
        // What to read: whole 16-byte blocks, or a whole stolen unit.
        let read_from = if stolen(first, first_end) {
            first
        } else {
            off & !15
        };
        let read_to = if stolen(last, last_end) {
            last_end
        } else {
            end.next_multiple_of(16).min(last_end)
        };
        let mut head = [0u8; MAX_UNIT];
        let mut tail = [0u8; MAX_UNIT];
        let head = &mut head[..(off - read_from) as usize];
        let tail = &mut tail[..(read_to - end) as usize];
        let buf = &mut buf[..n];
        let want = head.len() + n + tail.len();
        let got = backing.read_vectored_at(
            &mut [&mut *head, &mut *buf, &mut *tail],
            FILE_HEADER_LEN + read_from,
        )?;
        if got < want {
            return Err(ContentsError::ShortRead {
                at: FILE_HEADER_LEN + read_from + got as u64,
                wanted: FILE_HEADER_LEN + read_to,
            });
        }
        let mut crypter = cipher.crypter(false);
        let mut pos = first;
        while pos < last_end {
            let (s, e, idx) = unit_bounds(self.size, pos);
            pos = e;
            let (a, b) = (s.max(off), e.min(end));
            let inside = &mut buf[(a - off) as usize..(b - off) as usize];
            // Only the first unit can start before `off`, the last end after `end`.
            let before: &[u8] = if s < off { head } else { &[] };
            let after: &[u8] = if e > end { tail } else { &[] };
            // A hole is all-zero ciphertext; a written block is all zeros
            // with probability 2^-128, so the blocks read decide.
            if is_zero(before) && is_zero(inside) && is_zero(after) {
                inside.fill(0);
                continue;
            }
            if s >= off && e <= end {
                crypter
                    .unit(inside, u128::from(idx))
                    .map_err(KeyError::from)?;
                continue;
            }
            if stolen(s, e) {
                // Read whole (see `read_from`/`read_to`): decrypt it whole.
                let mut unit = [0u8; MAX_UNIT];
                let unit = &mut unit[..(e - s) as usize];
                let skip = (a - s) as usize;
                unit[..before.len()].copy_from_slice(before);
                unit[skip..skip + inside.len()].copy_from_slice(inside);
                unit[skip + inside.len()..].copy_from_slice(after);
                crypter
                    .unit(unit, u128::from(idx))
                    .map_err(KeyError::from)?;
                inside.copy_from_slice(&unit[skip..skip + inside.len()]);
                continue;
            }
            // The blocks [a & !15, ceil16(b)) of this unit: `before` and
            // `after` hold exactly their parts outside `buf`.
            let first_block = ((a & !15) - s) / 16;
            if before.is_empty() && inside.len() % 16 == 0 {
                crypter
                    .blocks(inside, u128::from(idx), first_block)
                    .map_err(KeyError::from)?;
                continue;
            }
            let mut blocks = [0u8; MAX_UNIT + 32];
            let len = before.len() + inside.len() + after.len();
            let blocks = &mut blocks[..len];
            blocks[..before.len()].copy_from_slice(before);
            blocks[before.len()..before.len() + inside.len()].copy_from_slice(inside);
            blocks[before.len() + inside.len()..].copy_from_slice(after);
            crypter
                .blocks(blocks, u128::from(idx), first_block)
                .map_err(KeyError::from)?;
            inside.copy_from_slice(&blocks[before.len()..before.len() + inside.len()]);
        }
        Ok(n)
    }

    /// Writes `data` at plaintext offset `off`, growing the file if needed.
    ///
    /// Work is bounded by the data units `data` touches plus the old final
    /// unit when the size changes; a gap before `off` stays a hole. On an
    /// error every byte reads as before or as written, and the size is the
    /// old one or the new one.
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
            .filter(|&e| e <= MAX_SIZE)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if !self.stale_tail && self.overwrite_blocks(backing, off, data)? {
            return Ok(());
        }
        let new_size = self.size.max(end);
        self.change(keys, backing, new_size, Some((off, data)))
    }

    /// Overwrites `data` at `off` without reading anything back, when that
    /// is possible: the range is whole 16-byte blocks inside the current
    /// size, no unit it touches uses ciphertext stealing, and every unit it
    /// covers only in part has been written (is not a hole: a hole must
    /// stay all-zero or be written whole). XTS blocks are independent, so
    /// only the new blocks are encrypted and written; the unit's other
    /// blocks on disk stay valid. Every changed byte of a unit lies on that
    /// unit's own backing page, so a write torn between pages still leaves
    /// each unit old or new. Returns whether it wrote.
    fn overwrite_blocks<B: Backing>(
        &self,
        backing: &B,
        off: u64,
        data: &[u8],
    ) -> Result<bool, ContentsError> {
        let end = off + data.len() as u64;
        let Some(cipher) = self.cipher.as_ref() else {
            return Ok(false);
        };
        if self.size < TINY_LIMIT || end > self.size || off % 16 != 0 || end % 16 != 0 {
            return Ok(false);
        }
        let (first, _, _) = unit_bounds(self.size, off);
        let (last, last_end, _) = unit_bounds(self.size, end - 1);
        if (last_end - last) % 16 != 0 {
            return Ok(false);
        }
        // A block of each edge unit that the write does not cover must be
        // written ciphertext (the unit's first or last block).
        let mut probes = Vec::with_capacity(2);
        if off > first {
            probes.push(first);
        }
        if end < last_end && (last != first || probes.is_empty()) {
            probes.push(last_end - 16);
        }
        for at in probes {
            let mut block = [0u8; 16];
            read_exact(backing, &mut block, FILE_HEADER_LEN + at)?;
            if is_zero(&block) {
                return Ok(false);
            }
        }
        let mut ct = data.to_vec();
        let mut crypter = cipher.crypter(true);
        let mut pos = off;
        while pos < end {
            let (s, e, idx) = unit_bounds(self.size, pos);
            let b = e.min(end);
            crypter
                .blocks(
                    &mut ct[(pos - off) as usize..(b - off) as usize],
                    u128::from(idx),
                    (pos - s) / 16,
                )
                .map_err(KeyError::from)?;
            pos = b;
        }
        backing.write_all_at(&ct, FILE_HEADER_LEN + off)?;
        Ok(true)
    }

    /// Truncates or extends the plaintext to `new_size` bytes, with the
    /// same guarantee on errors as [`FileContents::write_at`].
    pub fn set_len<B: Backing>(
        &mut self,
        keys: &FsKeys,
        backing: &B,
        new_size: u64,
    ) -> Result<(), ContentsError> {
        if new_size > MAX_SIZE {
            return Err(io::Error::from_raw_os_error(libc::EFBIG).into());
        }
        if new_size == self.size {
            return Ok(());
        }
        self.change(keys, backing, new_size, None)
    }

    fn change<B: Backing>(
        &mut self,
        keys: &FsKeys,
        backing: &B,
        new_size: u64,
        data: Option<(u64, &[u8])>,
    ) -> Result<(), ContentsError> {
        let r = if self.stale_tail {
            // Safe at any time: the tiny header names the size.
            backing
                .set_len(FILE_HEADER_LEN + self.size)
                .map_err(ContentsError::from)
        } else {
            Ok(())
        };
        let r = r.and_then(|()| {
            self.stale_tail = false;
            if new_size == 0 {
                backing.set_len(0)?;
                self.cipher = None;
                self.size = 0;
                Ok(())
            } else if new_size < TINY_LIMIT {
                self.change_tiny(keys, backing, new_size, data)
            } else {
                self.change_units(keys, backing, new_size, data)
            }
        });
        if r.is_err() {
            self.resync(keys, backing);
        }
        r
    }

    /// Re-reads size and cipher from the backing file after a failure, so
    /// memory says what the disk says.
    fn resync<B: Backing>(&mut self, keys: &FsKeys, backing: &B) {
        if let Ok(fresh) = backing
            .file_len()
            .map_err(ContentsError::from)
            .and_then(|len| FileContents::open(keys, backing, len))
        {
            *self = fresh;
        }
    }

    /// Replaces the whole file with a tiny (1..15 byte) one, under a fresh
    /// nonce so that no keystream ever encrypts two versions. The header
    /// and ciphertext go out in one `pwrite` inside the first page, and the
    /// header names the length: until the truncate that follows, a reader
    /// already sees the new file.
    fn change_tiny<B: Backing>(
        &mut self,
        keys: &FsKeys,
        backing: &B,
        new_size: u64,
        data: Option<(u64, &[u8])>,
    ) -> Result<(), ContentsError> {
        let mut plain = [0u8; TINY_LIMIT as usize];
        let plain = &mut plain[..new_size as usize];
        self.read_at(backing, 0, plain)?;
        if let Some((off, d)) = data {
            plain[off as usize..off as usize + d.len()].copy_from_slice(d);
        }
        let (nonce, cipher, ct) = loop {
            let nonce = random_nonce()?;
            let cipher = keys.file_cipher(&nonce)?;
            let mut ct = [0u8; TINY_LIMIT as usize];
            let ct_len = plain.len();
            ct[..ct_len].copy_from_slice(plain);
            tiny_xor(&cipher, &mut ct[..ct_len]);
            // All-zero ciphertext means "hole" and would read back as zeros.
            if !is_zero(&ct[..ct_len]) || is_zero(plain) {
                break (nonce, cipher, ct);
            }
        };
        let mut out = [0u8; (FILE_HEADER_LEN + TINY_LIMIT) as usize];
        out[..32].copy_from_slice(&encode_tiny_file_header(&nonce, new_size as u8));
        out[32..32 + plain.len()].copy_from_slice(&ct[..plain.len()]);
        let out = &out[..32 + plain.len()];
        let old_len = self.backing_len();
        if out.len() as u64 > old_len {
            backing.allocate(0, out.len() as u64)?;
        }
        backing.write_all_at(out, 0)?;
        self.cipher = Some(cipher);
        self.size = new_size;
        if old_len > out.len() as u64 {
            self.stale_tail = true;
            backing.set_len(out.len() as u64)?;
            self.stale_tail = false;
        }
        Ok(())
    }

    /// The backing length that matches the in-memory state.
    fn backing_len(&self) -> u64 {
        if self.cipher.is_none() {
            0
        } else {
            FILE_HEADER_LEN + self.size
        }
    }

    /// Changes a file whose new size is at least 16 bytes: re-encrypts the
    /// units of the new layout that `data` touches and, when the size
    /// changes, the units whose layout changes (the old and new last unit).
    fn change_units<B: Backing>(
        &mut self,
        keys: &FsKeys,
        backing: &B,
        new_size: u64,
        data: Option<(u64, &[u8])>,
    ) -> Result<(), ContentsError> {
        let old = self.size;
        let old_len = self.backing_len();
        // A file with no header yet gets one with a fresh nonce; a tiny file
        // keeps its nonce (its keystream block is no XTS unit) and loses the
        // tiny flag in the same pwrite that writes its first unit.
        let (new_cipher, header) = match &self.cipher {
            None => {
                let nonce = random_nonce()?;
                (Some(keys.file_cipher(&nonce)?), Some(nonce))
            }
            Some(_) if old > 0 && old < TINY_LIMIT => {
                let mut h = [0u8; FILE_HEADER_LEN as usize];
                read_exact(backing, &mut h, 0)?;
                (None, Some(decode_file_header(&h)?.nonce))
            }
            Some(_) => (None, None),
        };
        let cipher = match (&new_cipher, &self.cipher) {
            (Some(c), _) | (None, Some(c)) => c,
            (None, None) => return Err(ContentsError::BadHeader("file has no header")),
        };

        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(3);
        if let Some((off, d)) = data {
            ranges.push((off, off + d.len() as u64));
        }
        if new_size != old && old > 0 {
            let tail = if old < TINY_LIMIT {
                (0, old)
            } else {
                let a = last_unit_start(old);
                (a, old.min(new_size))
            };
            ranges.push(tail);
            if new_size < old {
                ranges.push((last_unit_start(new_size), new_size));
            }
        }
        // A unit whose bounds are the same in both layouts and that no data
        // touches keeps its ciphertext (a grow from, or a shrink to, a unit
        // boundary needs no rewrite).
        let layout_changes =
            |a: u64| old < TINY_LIMIT || unit_bounds(old, a) != unit_bounds(new_size, a);
        let data_range = data.map(|(off, d)| (off, off + d.len() as u64));
        let mut spans: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|(a, b)| a < b)
            .filter(|&&(a, b)| Some((a, b)) == data_range || layout_changes(a))
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

        // Build every write before changing anything.
        let mut puts: Vec<Put> = Vec::with_capacity(merged.len() + 1);
        if let Some(nonce) = header {
            if merged.first().map(|s| s.0) != Some(0) {
                puts.push(Put {
                    off: 0,
                    bytes: encode_file_header(&nonce).to_vec(),
                });
            }
        }
        let mut crypter = cipher.crypter(true);
        for &(ua, ub) in &merged {
            // The span is built front to back so that the new data is
            // copied once and never zero-filled first (filling a buffer the
            // size of the write cost about a twentieth of a sequential
            // write's time in the daemon).
            let mut bytes = Vec::with_capacity(FILE_HEADER_LEN as usize + (ub - ua) as usize);
            if let Some(nonce) = header.filter(|_| ua == 0) {
                bytes.extend_from_slice(&encode_file_header(&nonce));
            }
            let pre = bytes.len();
            let span_end = pre + (ub - ua) as usize;
            match data {
                Some((off, d)) if off < ub && off + d.len() as u64 > ua => {
                    let dend = off + d.len() as u64;
                    // Only the parts of the span the new data does not cover
                    // need the old plaintext.
                    if ua < off {
                        bytes.resize(pre + (off - ua) as usize, 0);
                        self.read_at(backing, ua, &mut bytes[pre..])?;
                    }
                    let from = off.max(ua);
                    let to = dend.min(ub);
                    bytes.extend_from_slice(&d[(from - off) as usize..(to - off) as usize]);
                    if dend < ub {
                        let at = bytes.len();
                        bytes.resize(span_end, 0);
                        self.read_at(backing, dend, &mut bytes[at..])?;
                    }
                }
                _ => {
                    bytes.resize(span_end, 0);
                    self.read_at(backing, ua, &mut bytes[pre..])?;
                }
            }
            debug_assert_eq!(bytes.len(), span_end);
            let buf = &mut bytes[pre..];
            let mut pos = ua;
            while pos < ub {
                let (s, e, idx) = unit_bounds(new_size, pos);
                crypter
                    .unit(
                        &mut buf[(s - ua) as usize..(e - ua) as usize],
                        u128::from(idx),
                    )
                    .map_err(KeyError::from)?;
                pos = e;
            }
            puts.push(Put {
                off: FILE_HEADER_LEN + ua - pre as u64,
                bytes,
            });
        }
        // Back to the key's spare contexts before the key may be replaced.
        drop(crypter);

        // Reserve: the final length first (EFBIG, EDQUOT, ENOSPC), then
        // every write that goes past the old end, before any old byte moves.
        let new_len = FILE_HEADER_LEN + new_size;
        if new_len > old_len {
            backing.allocate(new_len - 1, 1)?;
        }
        for p in &puts {
            let p_end = p.off + p.bytes.len() as u64;
            if p_end > old_len {
                backing.allocate(p.off, p.bytes.len() as u64)?;
            }
        }

        // Keep the old ciphertext of every byte a write replaces whose unit
        // is not the same in both layouts (or is the last, which may span
        // two pages), to put back if a later step fails.
        let undo_from = if old < TINY_LIMIT {
            0
        } else {
            FILE_HEADER_LEN + last_unit_start(old).min(last_unit_start(new_size))
        };
        let mut undo: Vec<Put> = Vec::new();
        for p in &puts {
            let a = p.off.max(undo_from);
            let b = (p.off + p.bytes.len() as u64).min(old_len);
            if a < b {
                let mut bytes = vec![0u8; (b - a) as usize];
                read_exact(backing, &mut bytes, a)?;
                undo.push(Put { off: a, bytes });
            }
        }

        // Apply in ascending order: each write that extends the file ends at
        // a unit boundary (or the new end), so even a crash part way leaves
        // a readable file; the length changes last.
        let applied = || -> io::Result<()> {
            let mut reached = old_len;
            for p in &puts {
                backing.write_all_at(&p.bytes, p.off)?;
                reached = reached.max(p.off + p.bytes.len() as u64);
            }
            if reached != new_len {
                backing.set_len(new_len)?;
            }
            Ok(())
        };
        if let Err(e) = applied() {
            // Put the old bytes back and the old length; best effort (the
            // caller re-reads the state from disk either way).
            for u in &undo {
                let _ = backing.write_all_at(&u.bytes, u.off);
            }
            let _ = backing.set_len(old_len);
            return Err(e.into());
        }
        if let Some(c) = new_cipher {
            self.cipher = Some(c);
        }
        self.size = new_size;
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

fn read_full<B: Backing + ?Sized>(backing: &B, buf: &mut [u8], off: u64) -> io::Result<usize> {
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
