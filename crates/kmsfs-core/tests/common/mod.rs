//! Test helpers shared by the core's integration tests.

use kmsfs_core::contents::Backing;
use std::cell::RefCell;
use std::io;

/// A backing file in memory.
#[derive(Default)]
pub struct MemFile(pub RefCell<Vec<u8>>);

impl Backing for MemFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let v = self.0.borrow();
        let off = (off as usize).min(v.len());
        let n = buf.len().min(v.len() - off);
        buf[..n].copy_from_slice(&v[off..off + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut v = self.0.borrow_mut();
        let end = off as usize + buf.len();
        if v.len() < end {
            v.resize(end, 0);
        }
        v[off as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.borrow_mut().resize(len as usize, 0);
        Ok(())
    }
    fn file_len(&self) -> io::Result<u64> {
        Ok(self.0.borrow().len() as u64)
    }
}
