//! Reading every regular file through the contents layer, on worker
//! threads: decryption is the cost of a check, so files are cut into spans
//! that the workers read in large chunks in parallel.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError};

use kmsfs_core::contents::{Backing, FileContents};

use super::report::{Problem, ProblemKind};

/// Bytes decrypted per `read_at` call.
pub const READ_CHUNK: usize = 1 << 20;
/// Bytes of one file handed to one worker at a time.
const SPAN: u64 = 16 << 20;

/// Where the walker and the workers put what they find.
#[derive(Debug, Default)]
pub struct Sink {
    problems: Mutex<Vec<Problem>>,
    bytes: AtomicU64,
}

impl Sink {
    /// Records a problem.
    pub fn push(&self, p: Problem) {
        self.problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(p);
    }

    /// Everything recorded, and the plaintext bytes read.
    pub fn into_parts(self) -> (Vec<Problem>, u64) {
        let problems = self
            .problems
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        (problems, self.bytes.into_inner())
    }
}

/// An open backing file behind a trait object: the real file in use, a
/// fault-injecting one in tests.
struct Shared(Box<dyn Backing + Send + Sync>);

impl Backing for Shared {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        self.0.read_at(buf, off)
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], off: u64) -> std::io::Result<usize> {
        self.0.read_vectored_at(bufs, off)
    }
    fn file_len(&self) -> std::io::Result<u64> {
        self.0.file_len()
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.0.write_all_at(buf, off)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
}

/// One open file whose header has been read.
pub struct FileJob {
    file: Shared,
    contents: FileContents,
    backing: PathBuf,
    plain: Option<String>,
    /// Set by the first span that fails, so that a file is reported once.
    failed: AtomicBool,
}

/// A byte range `[start, end)` of one file's plaintext.
pub struct Span {
    job: Arc<FileJob>,
    start: u64,
    end: u64,
}

/// Cuts an opened file into spans for the workers (none for an empty file).
pub fn spans(
    file: impl Backing + Send + Sync + 'static,
    contents: FileContents,
    backing: PathBuf,
    plain: Option<String>,
) -> Vec<Span> {
    let size = contents.size();
    let job = Arc::new(FileJob {
        file: Shared(Box::new(file)),
        contents,
        backing,
        plain,
        failed: AtomicBool::new(false),
    });
    (0..size.div_ceil(SPAN))
        .map(|i| Span {
            job: Arc::clone(&job),
            start: i * SPAN,
            end: ((i + 1) * SPAN).min(size),
        })
        .collect()
}

/// A worker: reads spans until the channel closes.
pub fn worker(rx: &Mutex<Receiver<Span>>, sink: &Sink) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(span) = next else {
            return;
        };
        read_span(&span, &mut buf, sink);
    }
}

fn read_span(span: &Span, buf: &mut [u8], sink: &Sink) {
    let job = &span.job;
    let mut off = span.start;
    while off < span.end {
        if job.failed.load(Ordering::Relaxed) {
            return;
        }
        let want = (span.end - off).min(buf.len() as u64) as usize;
        let detail = match job.contents.read_at(&job.file, off, &mut buf[..want]) {
            Ok(n) if n == want => {
                sink.bytes.fetch_add(n as u64, Ordering::Relaxed);
                off += n as u64;
                continue;
            }
            Ok(n) => format!(
                "reading {want} bytes at plaintext offset {off} returned {n}: the file changed while being checked"
            ),
            Err(e) => format!("reading at plaintext offset {off}: {e}"),
        };
        if !job.failed.swap(true, Ordering::Relaxed) {
            sink.push(Problem {
                kind: ProblemKind::FileContents,
                backing: job.backing.clone(),
                plain: job.plain.clone(),
                detail,
                repaired: false,
            });
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmsfs_core::keys::{FsKeys, MasterKey};
    use std::io;
    use std::sync::atomic::AtomicUsize;

    /// A backing file in memory whose `fail_on`-th read (0-based) fails
    /// with EIO, and which may claim to be longer than it is.
    struct Faulty {
        data: Mutex<Vec<u8>>,
        reads: AtomicUsize,
        fail_on: usize,
    }

    impl Faulty {
        fn new(fail_on: usize) -> Self {
            Faulty {
                data: Mutex::new(Vec::new()),
                reads: AtomicUsize::new(0),
                fail_on,
            }
        }
        fn len(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
    }

    impl Backing for Faulty {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            if self.reads.fetch_add(1, Ordering::SeqCst) == self.fail_on {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let d = self.data.lock().unwrap();
            let off = (off as usize).min(d.len());
            let n = buf.len().min(d.len() - off);
            buf[..n].copy_from_slice(&d[off..off + n]);
            Ok(n)
        }
        /// One call, like the `preadv` it stands for: counted once.
        fn read_vectored_at(&self, bufs: &mut [&mut [u8]], off: u64) -> io::Result<usize> {
            if self.reads.fetch_add(1, Ordering::SeqCst) == self.fail_on {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let d = self.data.lock().unwrap();
            let mut pos = (off as usize).min(d.len());
            let start = pos;
            for buf in bufs.iter_mut() {
                let n = buf.len().min(d.len() - pos);
                buf[..n].copy_from_slice(&d[pos..pos + n]);
                pos += n;
            }
            Ok(pos - start)
        }
        fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            let mut d = self.data.lock().unwrap();
            let end = off as usize + buf.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[off as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.data.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn file_len(&self) -> io::Result<u64> {
            Ok(self.len())
        }
    }

    const SIZE: usize = 2 * SPAN as usize + 12_345;

    /// A file of SIZE bytes written through the contents layer into a
    /// `Faulty` that fails on its `fail_on`-th read from now on.
    fn file(keys: &FsKeys, fail_on: usize) -> Faulty {
        let f = Faulty::new(usize::MAX);
        let mut c = FileContents::open(keys, &f, 0).unwrap();
        let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        c.write_at(keys, &f, 0, &data).unwrap();
        f.reads.store(0, Ordering::SeqCst);
        Faulty { fail_on, ..f }
    }

    fn keys() -> FsKeys {
        FsKeys::derive(&MasterKey::generate().unwrap(), &[7u8; 16])
    }

    /// Opens `f` claiming `len` bytes and reads every span as the workers do.
    fn check(keys: &FsKeys, f: Faulty, len: u64) -> (Vec<Problem>, u64) {
        let contents = FileContents::open(keys, &f, len).unwrap();
        let all = spans(f, contents, "/b/x".into(), Some("/x".into()));
        assert_eq!(all.len(), 3, "a file over two spans is cut in three");
        let sink = Sink::default();
        let mut buf = vec![0u8; READ_CHUNK];
        for s in &all {
            read_span(s, &mut buf, &sink);
        }
        sink.into_parts()
    }

    #[test]
    fn every_byte_of_a_sound_file_is_read() {
        let keys = keys();
        let f = file(&keys, usize::MAX);
        let len = f.len();
        let (problems, bytes) = check(&keys, f, len);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(bytes, SIZE as u64);
    }

    #[test]
    fn a_failing_read_is_reported_once_with_both_paths() {
        let keys = keys();
        // Read 0 is the header; fail the fifth chunk.
        let f = file(&keys, 5);
        let len = f.len();
        let (problems, bytes) = check(&keys, f, len);
        assert_eq!(problems.len(), 1, "{problems:?}");
        let p = &problems[0];
        assert_eq!(p.kind, ProblemKind::FileContents);
        assert_eq!(p.backing, PathBuf::from("/b/x"));
        assert_eq!(p.plain.as_deref(), Some("/x"));
        assert!(p.detail.contains("offset 4194304"), "{}", p.detail);
        assert!(bytes < SIZE as u64);
    }

    #[test]
    fn a_file_shorter_than_its_length_is_a_short_read() {
        let keys = keys();
        let f = file(&keys, usize::MAX);
        // The file shrank after its length was taken.
        let len = f.len() + 10_000;
        let (problems, _) = check(&keys, f, len);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].detail.contains("short read"),
            "{}",
            problems[0].detail
        );
    }
}
