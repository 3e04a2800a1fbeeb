//! A store decorator that counts the operations made through it (the run's "store
//! requests": a multipart upload counts once).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncRead;

use super::{
    ListedObject, ObjectMeta, ObjectStream, PendingUpload, PutReceipt, ReadStore, StoreError,
    StoredObject, WriteCondition, WriteStore,
};

/// Counts every operation made through it.
#[derive(Debug, Clone)]
pub struct CountingStore {
    inner: Arc<dyn WriteStore>,
    count: Arc<AtomicU64>,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn WriteStore>) -> Self {
        Self {
            inner,
            count: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Operations made so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Counts one request (logged at trace level, so an operator can see what a run
    /// asked the store for: `RUST_LOG=tidemark_core::store=trace`).
    fn tick(&self, op: &'static str, key: &str) {
        tracing::trace!(op, key, "store request");
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl ReadStore for CountingStore {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn get(&self, key: &str) -> Result<ObjectStream, StoreError> {
        self.tick("get", key);
        self.inner.get(key).await
    }

    async fn read(&self, key: &str) -> Result<Option<StoredObject>, StoreError> {
        self.tick("read", key);
        self.inner.read(key).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        self.tick("head", key);
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ListedObject>, StoreError> {
        self.tick("list", prefix);
        self.inner.list(prefix).await
    }
}

#[async_trait]
impl WriteStore for CountingStore {
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        condition: WriteCondition,
    ) -> Result<PutReceipt, StoreError> {
        self.tick("put", key);
        self.inner.put(key, body, condition).await
    }

    async fn upload(
        &self,
        key: &str,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<PutReceipt, StoreError> {
        self.tick("upload", key);
        self.inner.upload(key, body).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.tick("delete", key);
        self.inner.delete(key).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        self.count.fetch_add(
            keys.len().div_ceil(super::DELETE_BATCH) as u64,
            Ordering::Relaxed,
        );
        self.inner.delete_many(keys).await
    }

    async fn incomplete_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        self.tick("incomplete_uploads", prefix);
        self.inner.incomplete_uploads(prefix).await
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<(), StoreError> {
        self.tick("abort_upload", &upload.key);
        self.inner.abort_upload(upload).await
    }
}
