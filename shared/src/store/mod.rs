//! The store: where backups live.
//!
//! A store is a flat namespace of objects addressed by `/`-separated keys relative to one
//! root (an S3 `bucket/prefix`, or a local directory with the same layout). Two capability
//! traits describe it: [`ReadStore`] for what verify and restore need, [`WriteStore`] for
//! what export, manifest and prune need. [`S3Store`] and [`LocalStore`] implement both and
//! pass one conformance suite (`tests/tests/store_conformance.rs`).
//!
//! Guarantees every adapter gives:
//! - a write is atomic: readers see the old object or the new one, never a part;
//! - [`WriteCondition::IfAbsent`] creates an object only if no object has the key, and of
//!   two racing creators exactly one wins;
//! - [`WriteCondition::IfMatch`] replaces an object only if its entity tag is still the one
//!   the writer read (no lost update);
//! - every write is checked against a SHA-256 of its bytes computed before they left the
//!   caller ([`PutReceipt::sha256`] returns it, so callers can record it);
//! - [`WriteStore::upload`] streams with bounded memory, whatever the object size.

mod counting;
mod faults;
mod local;
pub mod retry;
mod s3;
mod settings;
mod url;

use std::fmt;
use std::pin::Pin;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::{Classified, ErrorKind};

pub use self::counting::CountingStore;
pub use self::faults::{Fault, FaultyStore};
pub use self::local::{readable_by_others, LocalStore};
pub use self::retry::RetryPolicy;
pub use self::s3::{S3Store, S3StoreOptions};
pub use self::settings::StoreSettings;
pub use self::url::StoreUrl;

/// Most keys one batched delete request carries (the S3 `DeleteObjects` limit).
pub const DELETE_BATCH: usize = 1000;

/// An entity tag: an opaque token that changes whenever an object's content changes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ETag(pub String);

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// When a write may take effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteCondition {
    /// Always (last writer wins).
    Always,
    /// Only if no object has this key (`If-None-Match: *`).
    IfAbsent,
    /// Only if the current object still has this entity tag (`If-Match`).
    IfMatch(ETag),
}

/// What a successful write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutReceipt {
    /// Entity tag of the new object, for a later [`WriteCondition::IfMatch`].
    pub etag: ETag,
    /// SHA-256 of the bytes written, lowercase hex.
    pub sha256: String,
    /// Bytes written.
    pub size: u64,
}

/// An object's metadata as [`ReadStore::head`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size: u64,
    pub etag: ETag,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// Key relative to the store root.
    pub key: String,
    pub size: u64,
    pub last_modified: Option<SystemTime>,
}

/// A whole object read into memory, with the tag to replace it conditionally.
#[derive(Debug, Clone)]
pub struct StoredObject {
    pub bytes: Bytes,
    pub etag: ETag,
}

/// A streaming read of one object.
pub struct ObjectStream {
    pub size: u64,
    pub body: Pin<Box<dyn AsyncRead + Send>>,
}

impl fmt::Debug for ObjectStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStream")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Errors of every store operation. Each names the object (or store) it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("store path {path} is not a directory")]
    NotADirectory { path: String },
    #[error("bucket {bucket:?} does not exist (or this identity cannot see it)")]
    NoSuchBucket { bucket: String },
    #[error("access denied to {location} ({operation})")]
    AccessDenied {
        location: String,
        operation: &'static str,
    },
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error("object {key} was changed or created by another writer (precondition failed)")]
    PreconditionFailed { key: String },
    #[error("checksum mismatch for {key}: expected sha256 {expected}, got {actual}")]
    ChecksumMismatch {
        key: String,
        expected: String,
        actual: String,
    },
    #[error("the multipart upload of {key} is gone (completed or aborted)")]
    UploadGone { key: String },
    #[error("the store kept {stored} bytes of {key}, {sent} were sent")]
    SizeMismatch { key: String, sent: u64, stored: u64 },
    #[error("{operation} {key}: {source}")]
    Io {
        operation: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("S3 {operation} {location}: {message}")]
    S3 {
        operation: &'static str,
        location: String,
        message: String,
        /// Decided from S3's answer where it was received.
        kind: ErrorKind,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// The store's classifier, one of the two in Tidemark (the other is the database's):
/// throttling, timeouts and server trouble are transient (S3's answers are classified
/// where they are received, see `s3/error.rs`); a failed precondition is a conflict the
/// caller resolves by reading again; a changed byte or a missing object is corruption.
impl Classified for StoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            StoreError::S3 { kind, .. } => *kind,
            StoreError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut => {
                    ErrorKind::Transient
                }
                _ => ErrorKind::Fatal,
            },
            StoreError::PreconditionFailed { .. } => ErrorKind::Conflict,
            StoreError::NotFound { .. }
            | StoreError::ChecksumMismatch { .. }
            | StoreError::SizeMismatch { .. } => ErrorKind::Corrupt,
            StoreError::InvalidUrl { .. }
            | StoreError::InvalidKey { .. }
            | StoreError::NotADirectory { .. }
            | StoreError::NoSuchBucket { .. }
            | StoreError::AccessDenied { .. }
            | StoreError::UploadGone { .. } => ErrorKind::Fatal,
        }
    }
}

impl StoreError {
    /// The same error with `note` added to its message (S3 errors only; others unchanged).
    pub fn with_note(self, note: &str) -> Self {
        match self {
            StoreError::S3 {
                operation,
                location,
                message,
                kind,
                source,
            } => StoreError::S3 {
                operation,
                location,
                message: format!("{message} ({note})"),
                kind,
                source,
            },
            other => other,
        }
    }
}

/// A multipart upload that was started and neither completed nor aborted (a killed
/// writer's), or a local store's leftover temporary file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// The key the upload was for (empty when the store cannot tell).
    pub key: String,
    /// The store's handle of the upload.
    pub upload_id: String,
    /// When it was started, if the store says.
    pub initiated: Option<SystemTime>,
}

/// Reading side of a store: enough for verify and restore.
#[async_trait]
pub trait ReadStore: Send + Sync + fmt::Debug {
    /// Where this store lives, as a URL a user would type (`s3://bucket/prefix`, `/path`).
    fn location(&self) -> String;

    /// Streams one object.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if no object has the key; backend errors otherwise.
    async fn get(&self, key: &str) -> Result<ObjectStream, StoreError>;

    /// Reads a whole (small) object with its entity tag, or `None` if it does not exist.
    ///
    /// # Errors
    /// Backend errors; a missing object is `Ok(None)`.
    async fn read(&self, key: &str) -> Result<Option<StoredObject>, StoreError>;

    /// Size and entity tag of one object, or `None` if it does not exist.
    ///
    /// # Errors
    /// Backend errors; a missing object is `Ok(None)`.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError>;

    /// Every object whose key starts with `prefix`, sorted by key. Paginates internally.
    ///
    /// # Errors
    /// Backend errors.
    async fn list(&self, prefix: &str) -> Result<Vec<ListedObject>, StoreError>;
}

/// Writing side of a store.
#[async_trait]
pub trait WriteStore: ReadStore {
    /// Writes a whole object from memory, checksummed, under `condition`.
    ///
    /// # Errors
    /// [`StoreError::PreconditionFailed`] when `condition` does not hold; backend errors.
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        condition: WriteCondition,
    ) -> Result<PutReceipt, StoreError>;

    /// Streams an object of any size from `body` (last writer wins). Large objects go up
    /// in parts (multipart upload on S3); memory stays bounded by a few parts.
    ///
    /// # Errors
    /// Backend errors, or an error reading `body`; nothing is left behind on failure.
    async fn upload(
        &self,
        key: &str,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<PutReceipt, StoreError>;

    /// Deletes one object; deleting a missing object is not an error.
    ///
    /// # Errors
    /// Backend errors.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Deletes many objects in batches of [`DELETE_BATCH`]; missing objects are ignored.
    ///
    /// # Errors
    /// The first batch that failed, naming a key it could not delete.
    async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError>;

    /// Uploads under `prefix` that were started and never completed nor aborted.
    ///
    /// # Errors
    /// Backend errors.
    async fn incomplete_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError>;

    /// Aborts an incomplete upload, freeing what its parts hold; an upload already gone
    /// is not an error.
    ///
    /// # Errors
    /// Backend errors.
    async fn abort_upload(&self, upload: &PendingUpload) -> Result<(), StoreError>;
}

/// A store that can be read and written: what [`open`] returns.
pub type DynStore = std::sync::Arc<dyn WriteStore>;

/// Opens the store a URL names (`s3://bucket/prefix`, `file:///abs/path` or a path);
/// `retry` says how long a failed S3 request is tried again.
///
/// # Errors
/// [`StoreError::InvalidUrl`] for a URL that names no store; [`StoreError::NotADirectory`]
/// for a local path that exists and is not a directory.
pub async fn open(url: &StoreUrl, retry: RetryPolicy) -> Result<DynStore, StoreError> {
    Ok(match url {
        StoreUrl::S3 { bucket, prefix } => {
            let config = crate::aws::sdk_config().await;
            std::sync::Arc::new(S3Store::new(
                &config,
                bucket,
                prefix,
                S3StoreOptions {
                    retry,
                    ..S3StoreOptions::default()
                },
            ))
        }
        StoreUrl::Local(path) => std::sync::Arc::new(LocalStore::open(path)?),
    })
}

/// Checks that `key` is a relative, normalised object key.
///
/// # Errors
/// [`StoreError::InvalidKey`] naming what is wrong.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let invalid = |reason| {
        Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason,
        })
    };
    if key.is_empty() {
        return invalid("empty");
    }
    if key.len() > 900 {
        return invalid("longer than 900 bytes");
    }
    if key.starts_with('/') || key.ends_with('/') {
        return invalid("starts or ends with '/'");
    }
    if key.contains('\0') || key.contains('\\') {
        return invalid("contains NUL or backslash");
    }
    for segment in key.split('/') {
        match segment {
            "" => return invalid("contains an empty path segment"),
            "." | ".." => return invalid("contains '.' or '..'"),
            s if s.starts_with(".tidemark") => {
                return invalid("uses the reserved '.tidemark' name")
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks a listing prefix: empty (everything) or a key prefix with no `..` segments.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_key(prefix.trim_end_matches('/'))
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Reads from `body` until `buf` holds `limit` bytes or the input ends; returns whether it
/// ended.
pub(crate) async fn fill_part(
    body: &mut (dyn AsyncRead + Send + Unpin),
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<bool> {
    while buf.len() < limit {
        let want = limit - buf.len();
        let n = (&mut *body).take(want as u64).read_buf(buf).await?;
        if n == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        for good in [
            "lock",
            "state/checkpoint.json",
            "chunks/r1/public.t/000001.copy.zst",
        ] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/abs",
            "dir/",
            "a//b",
            "a/../b",
            "./a",
            "a\\b",
            ".tidemark/tmp/x",
            "x/.tidemark-lock",
        ] {
            assert!(
                matches!(validate_key(bad), Err(StoreError::InvalidKey { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn fill_part_stops_at_limit_and_at_end() {
        let data = vec![7u8; 10];
        let mut reader: &[u8] = &data;
        let mut buf = Vec::new();
        assert!(!fill_part(&mut reader, &mut buf, 4).await.unwrap_or(true));
        assert_eq!(buf.len(), 4);
        buf.clear();
        assert!(!fill_part(&mut reader, &mut buf, 4).await.unwrap_or(true));
        buf.clear();
        assert!(fill_part(&mut reader, &mut buf, 4).await.unwrap_or(false));
        assert_eq!(buf.len(), 2);
    }
}
