//! Reading every regular file through the contents layer, on worker
//! threads: decryption is the cost of a check, so files are cut into spans
//! that the workers read in large chunks in parallel.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError};

use kmsfs_core::contents::FileContents;

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

/// One open file whose header has been read.
#[derive(Debug)]
pub struct FileJob {
    file: File,
    contents: FileContents,
    backing: PathBuf,
    plain: Option<String>,
    /// Set by the first span that fails, so that a file is reported once.
    failed: AtomicBool,
}

/// A byte range `[start, end)` of one file's plaintext.
#[derive(Debug)]
pub struct Span {
    job: Arc<FileJob>,
    start: u64,
    end: u64,
}

/// Cuts an opened file into spans for the workers (none for an empty file).
pub fn spans(
    file: File,
    contents: FileContents,
    backing: PathBuf,
    plain: Option<String>,
) -> Vec<Span> {
    let size = contents.size();
    let job = Arc::new(FileJob {
        file,
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
