//! Where snapshots go: an S3 bucket (with an optional key prefix) or a local
//! directory, opened as one [`Store`] with the same operations.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::error::SnapshotError;

/// A parsed snapshot target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `s3://BUCKET[/PREFIX]`.
    S3 {
        /// The bucket name.
        bucket: String,
        /// Key prefix inside the bucket, without leading or trailing `/`.
        prefix: String,
    },
    /// A directory (`file:///path` or an absolute path): NFS, a USB disk.
    Dir(PathBuf),
}

impl Target {
    /// Parses `s3://BUCKET[/PREFIX]`, `file:///DIR` or an absolute `/DIR`.
    pub fn parse(s: &str) -> Result<Target, SnapshotError> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(SnapshotError::Target(format!(
                    "{s}: no bucket name; write s3://BUCKET[/PREFIX]"
                )));
            }
            return Ok(Target::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        if !path.starts_with('/') {
            return Err(SnapshotError::Target(format!(
                "{s}: a target is s3://BUCKET[/PREFIX], file:///DIR or an absolute directory path"
            )));
        }
        Ok(Target::Dir(PathBuf::from(path)))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Target::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Target::Dir(p) => write!(f, "{}", p.display()),
        }
    }
}

/// How to reach an S3 target. Credentials come from the environment the way
/// the AWS CLI takes them (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`), never from argv.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Overrides `AWS_ENDPOINT_URL` (`--s3-endpoint`).
    pub endpoint: Option<String>,
}

/// An opened target.
pub struct Store {
    pub(crate) os: Arc<dyn ObjectStore>,
    prefix: String,
    /// The directory of a local target: written files are fsynced there.
    pub(crate) local_root: Option<PathBuf>,
    /// The target as the user wrote it, for messages.
    pub(crate) display: String,
    /// Where an S3 target is served, for messages.
    pub(crate) endpoint: Option<String>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("target", &self.display)
            .finish_non_exhaustive()
    }
}

/// Environment variables that name a credential source other than a key
/// pair; with none of them and no key pair, opening an S3 target fails at
/// once instead of probing the EC2 instance metadata service for minutes.
const OTHER_CREDENTIAL_SOURCES: &[&str] = &[
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
];

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

impl Store {
    /// Opens `target`. A directory target is created when `create` is set
    /// (its parent must exist); otherwise it must exist.
    pub fn open(target: &Target, s3: &S3Options, create: bool) -> Result<Store, SnapshotError> {
        match target {
            Target::Dir(dir) => Self::open_dir(dir, create),
            Target::S3 { bucket, prefix } => Self::open_s3(bucket, prefix, s3, target),
        }
    }

    fn open_dir(dir: &Path, create: bool) -> Result<Store, SnapshotError> {
        if create {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(SnapshotError::Target(format!(
                        "cannot create the target directory {}: {e}",
                        dir.display()
                    )))
                }
            }
        }
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(SnapshotError::Target(format!(
                    "{} is not a directory",
                    dir.display()
                )))
            }
            Err(e) => {
                return Err(SnapshotError::Target(format!(
                    "target directory {}: {e}",
                    dir.display()
                )))
            }
        }
        let fs = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| SnapshotError::Target(format!("cannot open {}: {e}", dir.display())))?;
        Ok(Store {
            os: Arc::new(fs),
            prefix: String::new(),
            local_root: Some(dir.to_path_buf()),
            display: dir.display().to_string(),
            endpoint: None,
        })
    }

    fn open_s3(
        bucket: &str,
        prefix: &str,
        s3: &S3Options,
        target: &Target,
    ) -> Result<Store, SnapshotError> {
        let has_pair = env_set("AWS_ACCESS_KEY_ID") && env_set("AWS_SECRET_ACCESS_KEY");
        if !has_pair && !OTHER_CREDENTIAL_SOURCES.iter().any(|v| env_set(v)) {
            return Err(SnapshotError::Target(format!(
                "{target}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                 (or AWS_WEB_IDENTITY_TOKEN_FILE) in the environment"
            )));
        }
        let endpoint = s3.endpoint.clone().or_else(|| {
            std::env::var("AWS_ENDPOINT_URL")
                .ok()
                .filter(|s| !s.is_empty())
        });
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if !env_set("AWS_REGION") && !env_set("AWS_DEFAULT_REGION") {
            b = b.with_region("us-east-1");
        }
        let mut client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(60));
        if let Some(ep) = &endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(SnapshotError::Target(format!(
                    "S3 endpoint '{ep}' must start with http:// or https://"
                )));
            }
            // A private endpoint (MinIO, Ceph RGW, SeaweedFS) serves
            // buckets as paths, not as host names.
            b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
            client = client.with_allow_http(ep.starts_with("http://"));
        }
        // Few, quick retries: an object store that is down should make the
        // command fail within seconds, and a rerun finishes the work.
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
        };
        let s3store = b
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(|e| SnapshotError::Target(format!("{target}: {e}")))?;
        Ok(Store {
            os: Arc::new(s3store),
            prefix: prefix.to_string(),
            local_root: None,
            display: target.to_string(),
            endpoint: Some(endpoint.unwrap_or_else(|| "AWS S3".to_string())),
        })
    }

    /// The object path of `rel` (`chunks/..`, `snapshots/..`) under the prefix.
    pub(crate) fn path(&self, rel: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// `rel` of an object path listed under the prefix.
    pub(crate) fn rel<'a>(&self, p: &'a ObjPath) -> &'a str {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            s
        } else {
            s.strip_prefix(self.prefix.as_str())
                .map(|r| r.trim_start_matches('/'))
                .unwrap_or(s)
        }
    }

    /// The target as written, for messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Makes an object written to a local target durable: fsync of the
    /// file and of its directory (object stores are durable on success).
    pub(crate) fn sync_local(&self, rel: &str) -> Result<(), SnapshotError> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let file = root.join(rel);
        let io = |p: &Path, e: std::io::Error| SnapshotError::Io {
            path: p.to_path_buf(),
            source: e,
        };
        std::fs::File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(&file, e))?;
        if let Some(dir) = file.parent() {
            std::fs::File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(dir, e))?;
        }
        Ok(())
    }

    /// Makes everything written to a local target so far durable at once
    /// (`syncfs` of its filesystem): cheaper than an fsync per chunk, and
    /// done before the manifest that names the chunks is written.
    pub(crate) fn sync_all(&self) -> Result<(), SnapshotError> {
        use std::os::fd::AsRawFd as _;
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let d = std::fs::File::open(root).map_err(|e| SnapshotError::io(root, e))?;
        // SAFETY: `d` is an open descriptor for the duration of the call.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(SnapshotError::io(root, std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// An operator-facing error for a failed store operation: one line
    /// that says what failed and what to check.
    pub(crate) fn error(&self, what: &str, e: object_store::Error) -> SnapshotError {
        let mut chain = e.to_string();
        let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
        while let Some(s) = src {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            src = s.source();
        }
        let ep = self.endpoint.as_deref().unwrap_or("");
        let lower = chain.to_ascii_lowercase();
        let detail = if lower.contains("nosuchbucket") || lower.contains("bucket does not exist") {
            format!("the bucket does not exist at {ep}; create it or fix the target")
        } else if lower.contains("invalidaccesskeyid")
            || lower.contains("signaturedoesnotmatch")
            || lower.contains("accessdenied")
            || lower.contains("403 forbidden")
        {
            format!(
                "{ep} refused the credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy)"
            )
        } else if lower.contains("connection refused")
            || lower.contains("dns error")
            || lower.contains("error sending request")
            || lower.contains("timed out")
            || lower.contains("connection reset")
            || lower.contains("connection closed")
        {
            format!(
                "cannot reach the object store at {ep} (check --s3-endpoint / AWS_ENDPOINT_URL and that it is up)"
            )
        } else if let object_store::Error::NotFound { path, .. } = &e {
            format!("{path} not found")
        } else {
            // Keep it to one line.
            chain.lines().next().unwrap_or("").to_string()
        };
        SnapshotError::Store {
            target: self.display.clone(),
            what: what.to_string(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("s3://b/x/y/").unwrap(),
            Target::S3 {
                bucket: "b".into(),
                prefix: "x/y".into()
            }
        );
        assert_eq!(
            Target::parse("s3://b").unwrap(),
            Target::S3 {
                bucket: "b".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            Target::parse("file:///mnt/usb").unwrap(),
            Target::Dir("/mnt/usb".into())
        );
        assert_eq!(
            Target::parse("/mnt/nfs").unwrap(),
            Target::Dir("/mnt/nfs".into())
        );
        assert!(Target::parse("relative/dir").is_err());
        assert!(Target::parse("s3:///x").is_err());
    }
}
