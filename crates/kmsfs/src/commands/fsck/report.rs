//! What the checker found: problems, counts, the exit code, and their
//! text and JSON forms.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Exit code: no problem found (fsck(8)).
pub const EXIT_CLEAN: i32 = 0;
/// Exit code: problems were found and all of them repaired.
pub const EXIT_CORRECTED: i32 = 1;
/// Exit code: problems are left.
pub const EXIT_ERRORS_LEFT: i32 = 4;
/// Exit code: the check could not run (KMS unreachable, header unreadable).
pub const EXIT_OPERATIONAL: i32 = 8;

/// The kind of a problem; its JSON name is [`ProblemKind::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemKind {
    /// `kmsfs.diriv` missing, of the wrong size or type, or unreadable.
    DirIv,
    /// A backing name that does not decrypt.
    Name,
    /// A hashed long name whose sidecar is missing.
    MissingSidecar,
    /// A sidecar that is not a regular file or does not hash to its name.
    BadSidecar,
    /// A sidecar with no entry it names.
    OrphanSidecar,
    /// A file whose header is missing, truncated or malformed.
    FileHeader,
    /// A file whose contents cannot be read through the contents layer.
    FileContents,
    /// A symlink whose stored target does not decrypt.
    Symlink,
    /// An extended attribute (or ACL) that does not decrypt for its entry.
    Xattr,
    /// A temporary symlink left by an interrupted rename.
    LeftoverTemp,
    /// An entry kmsfs never creates (a foreign name, a non-UTF-8 name).
    UnexpectedEntry,
    /// The backing store could not be read here.
    Io,
}

impl ProblemKind {
    /// The stable name used in JSON and text output.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::DirIv => "dir_iv",
            ProblemKind::Name => "name",
            ProblemKind::MissingSidecar => "missing_sidecar",
            ProblemKind::BadSidecar => "bad_sidecar",
            ProblemKind::OrphanSidecar => "orphan_sidecar",
            ProblemKind::FileHeader => "file_header",
            ProblemKind::FileContents => "file_contents",
            ProblemKind::Symlink => "symlink",
            ProblemKind::Xattr => "xattr",
            ProblemKind::LeftoverTemp => "leftover_temp",
            ProblemKind::UnexpectedEntry => "unexpected_entry",
            ProblemKind::Io => "io",
        }
    }
}

/// One problem, at one backing path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// The damaged backing path.
    pub backing: PathBuf,
    /// The plaintext path (from the mount's root), when it is known.
    pub plain: Option<String>,
    /// Details and, where there is one, the fix.
    pub detail: String,
    /// Whether `--repair` fixed it.
    pub repaired: bool,
}

/// What was checked.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Backing directories walked.
    pub directories: u64,
    /// Regular files whose contents were read.
    pub files: u64,
    /// Symlinks whose targets were decrypted.
    pub symlinks: u64,
    /// FIFOs, sockets and devices (nothing to decrypt).
    pub special: u64,
    /// Plaintext bytes read and decrypted.
    pub bytes: u64,
}

/// The result of a whole check.
#[derive(Debug)]
pub struct Report {
    /// The backing directory checked.
    pub cipherdir: PathBuf,
    /// The problems, sorted by backing path.
    pub problems: Vec<Problem>,
    /// What was checked.
    pub counts: Counts,
}

impl Report {
    /// Problems repaired.
    pub fn repaired(&self) -> usize {
        self.problems.iter().filter(|p| p.repaired).count()
    }

    /// Problems left.
    pub fn left(&self) -> usize {
        self.problems.len() - self.repaired()
    }

    /// The fsck(8) exit code.
    pub fn exit_code(&self) -> i32 {
        if self.left() > 0 {
            EXIT_ERRORS_LEFT
        } else if self.repaired() > 0 {
            EXIT_CORRECTED
        } else {
            EXIT_CLEAN
        }
    }

    /// The report as one JSON document.
    pub fn to_json(&self) -> Value {
        let c = &self.counts;
        let problems: Vec<Value> = self
            .problems
            .iter()
            .map(|p| {
                json!({
                    "kind": p.kind.as_str(),
                    "backing_path": p.backing.to_string_lossy(),
                    "plaintext_path": p.plain,
                    "detail": p.detail,
                    "repaired": p.repaired,
                })
            })
            .collect();
        json!({
            "cipherdir": self.cipherdir.to_string_lossy(),
            "exit_code": self.exit_code(),
            "counts": {
                "directories": c.directories,
                "files": c.files,
                "symlinks": c.symlinks,
                "special": c.special,
                "bytes": c.bytes,
                "problems": self.problems.len(),
                "repaired": self.repaired(),
                "left": self.left(),
            },
            "problems": problems,
        })
    }

    /// The report as text: one line per problem, then a summary.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for p in &self.problems {
            out.push_str(&problem_line(p));
            out.push('\n');
        }
        let c = &self.counts;
        let what = format!(
            "{} directories, {} files ({} bytes), {} symlinks, {} other entries",
            c.directories, c.files, c.bytes, c.symlinks, c.special
        );
        let verdict = match self.exit_code() {
            EXIT_CLEAN => "clean".to_string(),
            EXIT_CORRECTED => format!("{} problems, all repaired", self.problems.len()),
            _ => format!(
                "{} problems, {} repaired, {} left",
                self.problems.len(),
                self.repaired(),
                self.left()
            ),
        };
        out.push_str(&format!(
            "{}: {verdict}; checked {what}\n",
            self.cipherdir.display()
        ));
        out
    }
}

fn problem_line(p: &Problem) -> String {
    let plain = match &p.plain {
        Some(s) => format!(" (plaintext {s})"),
        None => String::new(),
    };
    let fixed = if p.repaired { " [repaired]" } else { "" };
    format!(
        "{}: {}{plain}: {}{fixed}",
        p.kind.as_str(),
        p.backing.display(),
        p.detail
    )
}

/// The JSON document for a check that could not run.
pub fn operational_json(cipherdir: &Path, error: &str) -> Value {
    json!({
        "cipherdir": cipherdir.to_string_lossy(),
        "exit_code": EXIT_OPERATIONAL,
        "error": error,
    })
}
