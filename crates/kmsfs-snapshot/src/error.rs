//! The errors of snapshot operations: each one line an operator can act on.

use std::path::PathBuf;

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The target is malformed, missing, or has no credentials.
    #[error("{0}")]
    Target(String),
    /// The object store refused or could not be reached.
    #[error("{target}: {what}: {detail}")]
    Store {
        /// The target, as written.
        target: String,
        /// What was being done.
        what: String,
        /// What went wrong, and what to check.
        detail: String,
    },
    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The backing directory holds something a snapshot cannot carry.
    #[error("{}: {detail}", path.display())]
    Backing {
        /// The entry.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No snapshot with this id in the target.
    #[error("{target}: no snapshot '{id}' (see kmsfs snapshot list)")]
    NoSuchSnapshot {
        /// The target.
        target: String,
        /// The id asked for.
        id: String,
    },
    /// A manifest is malformed or does not authenticate.
    #[error("{target}: snapshot {id}: {detail}")]
    Manifest {
        /// The target.
        target: String,
        /// The snapshot.
        id: String,
        /// What is wrong.
        detail: String,
    },
    /// An object the manifest names is missing from the store.
    #[error("{target}: object {object} is missing (backing file {file}); the snapshot cannot be restored in full")]
    MissingObject {
        /// The target.
        target: String,
        /// The object's path in the store.
        object: String,
        /// The backing file that needs it.
        file: String,
    },
    /// An object does not match its hash in the manifest.
    #[error("{target}: object {object} does not match its hash in the manifest (backing file {file}): it was tampered with or damaged")]
    TamperedObject {
        /// The target.
        target: String,
        /// The object's path in the store.
        object: String,
        /// The backing file that needs it.
        file: String,
    },
    /// The restore destination is not an empty directory.
    #[error("{}: {detail}", path.display())]
    Destination {
        /// NEWDIR.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A background task failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl SnapshotError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SnapshotError::Io {
            path: path.into(),
            source,
        }
    }
}
