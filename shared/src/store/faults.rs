//! A store decorator that fails on purpose, deterministically, at one operation index:
//! the crash-and-resume tests go through every index of a run with it instead of killing
//! processes at wall-clock times.
//!
//! Operations are numbered from 1 in the order they reach the store (a `delete_many`
//! counts once). [`Fault::FailOnce`] fails operation N with a transient error (as a
//! dropped connection would) and lets every other through; [`Fault::Kill`] fails operation
//! N and every one after it, as if the process had died there: nothing it would have done
//! from then on reaches the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncRead;

use super::{
    ListedObject, ObjectMeta, ObjectStream, PendingUpload, PutReceipt, ReadStore, StoreError,
    StoredObject, WriteCondition, WriteStore,
};

/// What happens at the chosen operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// That operation fails with a transient (retryable) error; the others go through.
    FailOnce,
    /// That operation and every later one fail: the run died there.
    Kill,
}

/// Fails the operation numbered `at` (from 1) as `fault` says.
#[derive(Debug, Clone)]
pub struct FaultyStore {
    inner: Arc<dyn WriteStore>,
    at: u64,
    fault: Fault,
    seen: Arc<AtomicU64>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn WriteStore>, at: u64, fault: Fault) -> Self {
        Self {
            inner,
            at,
            fault,
            seen: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Operations that reached this store so far, the failed ones included.
    pub fn operations(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }

    /// Whether the fault has happened.
    pub fn tripped(&self) -> bool {
        self.operations() >= self.at
    }

    fn check(&self, operation: &'static str, key: &str) -> Result<(), StoreError> {
        let n = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        let hit = match self.fault {
            Fault::FailOnce => n == self.at,
            Fault::Kill => n >= self.at,
        };
        if hit {
            Err(StoreError::Io {
                operation,
                key: key.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "injected fault ({:?} at store operation {})",
                        self.fault, self.at
                    ),
                ),
            })
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl ReadStore for FaultyStore {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn get(&self, key: &str) -> Result<ObjectStream, StoreError> {
        self.check("get", key)?;
        self.inner.get(key).await
    }

    async fn read(&self, key: &str) -> Result<Option<StoredObject>, StoreError> {
        self.check("read", key)?;
        self.inner.read(key).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        self.check("head", key)?;
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ListedObject>, StoreError> {
        self.check("list", prefix)?;
        self.inner.list(prefix).await
    }
}

#[async_trait]
impl WriteStore for FaultyStore {
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        condition: WriteCondition,
    ) -> Result<PutReceipt, StoreError> {
        self.check("put", key)?;
        self.inner.put(key, body, condition).await
    }

    async fn upload(
        &self,
        key: &str,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<PutReceipt, StoreError> {
        self.check("upload", key)?;
        self.inner.upload(key, body).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.check("delete", key)?;
        self.inner.delete(key).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        self.check("delete", keys.first().map_or("", String::as_str))?;
        self.inner.delete_many(keys).await
    }

    async fn incomplete_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        self.check("list uploads", prefix)?;
        self.inner.incomplete_uploads(prefix).await
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<(), StoreError> {
        self.check("abort upload", &upload.key)?;
        self.inner.abort_upload(upload).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Classified;
    use crate::store::LocalStore;

    async fn store(at: u64, fault: Fault) -> (tempfile::TempDir, FaultyStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = LocalStore::open(dir.path()).expect("local store");
        (dir, FaultyStore::new(Arc::new(local), at, fault))
    }

    #[tokio::test]
    async fn fail_once_fails_only_that_operation() {
        let (_dir, s) = store(2, Fault::FailOnce).await;
        let put = |k: &'static str| s.put(k, Bytes::from_static(b"x"), WriteCondition::Always);
        assert!(put("a").await.is_ok());
        let err = put("b").await.expect_err("operation 2 fails");
        assert!(err.is_retryable() && err.to_string().contains("injected fault"));
        assert!(put("c").await.is_ok());
        assert!(s.head("b").await.expect("head").is_none());
        assert_eq!(s.operations(), 4);
    }

    #[tokio::test]
    async fn kill_fails_everything_from_that_operation_on() {
        let (_dir, s) = store(2, Fault::Kill).await;
        assert!(!s.tripped());
        assert!(s.head("a").await.is_ok());
        assert!(s.head("a").await.is_err());
        assert!(s.tripped());
        assert!(s.list("").await.is_err());
    }
}
