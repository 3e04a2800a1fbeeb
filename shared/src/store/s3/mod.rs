//! The S3 store, through `aws-sdk-s3`.
//!
//! - Every write carries `x-amz-checksum-sha256`, so S3 rejects bytes that changed on the
//!   way; multipart uploads carry one per part.
//! - Conditional writes map to `If-None-Match: *` and `If-Match: <etag>`; S3 answers 412
//!   (or 409 while a racing conditional write is in flight) when the condition fails.
//! - [`WriteStore::upload`] reads the next part while up to
//!   [`S3StoreOptions::upload_concurrency`] parts (default one) are in flight, so memory
//!   stays at a few parts whatever the object size, and reading overlaps uploading.

mod body;
mod error;
mod upload;

use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::io::AsyncRead;

use super::retry::{with_retry, Attempts, RetryPolicy};
use super::{
    validate_key, validate_prefix, ETag, ListedObject, ObjectMeta, ObjectStream, PendingUpload,
    PutReceipt, ReadStore, StoreError, StoredObject, WriteCondition, WriteStore, DELETE_BATCH,
};
use crate::error::ErrorKind;
use body::{BodyState, ResumingBody};

/// Tuning of the S3 adapter.
#[derive(Debug, Clone)]
pub struct S3StoreOptions {
    /// Size of one multipart part (S3 requires at least 5 MiB for all but the last part).
    /// Objects smaller than this go up in one `PutObject`.
    pub part_size: usize,
    /// Parts uploaded at once by one [`WriteStore::upload`].
    pub upload_concurrency: usize,
    /// Keys one `ListObjectsV2` page asks for (at most 1000).
    pub list_page_size: i32,
    /// How failed requests are tried again.
    pub retry: RetryPolicy,
}

impl Default for S3StoreOptions {
    fn default() -> Self {
        Self {
            part_size: 5 * 1024 * 1024,
            upload_concurrency: 1,
            list_page_size: 1000,
            retry: RetryPolicy::default(),
        }
    }
}

/// A store under `s3://bucket/prefix`.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    options: S3StoreOptions,
}

impl S3Store {
    /// A store in `bucket` under `prefix`. With a custom endpoint (`AWS_ENDPOINT_URL`,
    /// `AWS_ENDPOINT_URL_S3`), requests use path-style addressing, which S3-compatible
    /// servers expect.
    pub fn new(
        config: &aws_config::SdkConfig,
        bucket: &str,
        prefix: &str,
        options: S3StoreOptions,
    ) -> Self {
        let custom_endpoint = config.endpoint_url().is_some()
            || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some()
            || std::env::var_os("AWS_ENDPOINT_URL").is_some();
        let s3_config = aws_sdk_s3::config::Builder::from(config)
            .force_path_style(custom_endpoint)
            .build();
        Self {
            client: Client::from_conf(s3_config),
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            options,
        }
    }

    /// A store that sends its requests through `client` (configured by the caller:
    /// endpoint, addressing style, HTTP connector).
    pub fn from_client(
        client: Client,
        bucket: &str,
        prefix: &str,
        options: S3StoreOptions,
    ) -> Self {
        Self {
            client,
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            options,
        }
    }

    /// The SDK client this store uses.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn full_key(&self, key: &str) -> Result<String, StoreError> {
        validate_key(key)?;
        Ok(if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        })
    }

    fn url_of(&self, key: &str) -> String {
        match (self.prefix.is_empty(), key.is_empty()) {
            (true, _) => format!("s3://{}/{key}", self.bucket),
            (false, true) => format!("s3://{}/{}", self.bucket, self.prefix),
            (false, false) => format!("s3://{}/{}/{key}", self.bucket, self.prefix),
        }
    }

    fn relative_key<'k>(&self, full: &'k str) -> &'k str {
        if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(&self.prefix)
                .and_then(|rest| rest.strip_prefix('/'))
                .unwrap_or(full)
        }
    }
}

#[async_trait]
impl ReadStore for S3Store {
    fn location(&self) -> String {
        self.url_of("")
    }

    async fn get(&self, key: &str) -> Result<ObjectStream, StoreError> {
        let (size, etag, body) = with_retry(&self.options.retry, "GetObject", key, || {
            self.open_from(key, 0, None)
        })
        .await?;
        Ok(ObjectStream {
            size,
            body: Box::pin(ResumingBody {
                store: self.clone(),
                key: key.to_owned(),
                etag,
                size,
                offset: 0,
                attempts: Attempts::new(),
                state: BodyState::Reading(Box::pin(body.into_async_read())),
            }),
        })
    }

    async fn read(&self, key: &str) -> Result<Option<StoredObject>, StoreError> {
        let attempt = || async {
            let (size, etag, body) = match self.open_from(key, 0, None).await {
                Ok(found) => found,
                Err(StoreError::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let bytes = body
                .collect()
                .await
                .map_err(|e| StoreError::S3 {
                    operation: "GetObject",
                    location: self.url_of(key),
                    message: format!("reading the body failed: {}", crate::error_chain(&e)),
                    kind: ErrorKind::Transient,
                    source: Some(Box::new(e)),
                })?
                .into_bytes();
            if bytes.len() as u64 != size {
                return Err(StoreError::S3 {
                    operation: "GetObject",
                    location: self.url_of(key),
                    message: format!("the body ended after {} of {size} bytes", bytes.len()),
                    kind: ErrorKind::Transient,
                    source: None,
                });
            }
            Ok(Some(StoredObject {
                bytes,
                etag: ETag(etag.unwrap_or_default()),
            }))
        };
        with_retry(&self.options.retry, "GetObject", key, attempt).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let full = self.full_key(key)?;
        let attempt = || async {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| self.error("HeadObject", key, e))
            {
                Ok(out) => Ok(Some(ObjectMeta {
                    size: out.content_length().unwrap_or(0).max(0) as u64,
                    etag: ETag(out.e_tag().unwrap_or_default().to_owned()),
                })),
                Err(StoreError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        };
        with_retry(&self.options.retry, "HeadObject", key, attempt).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ListedObject>, StoreError> {
        validate_prefix(prefix)?;
        let full_prefix = if self.prefix.is_empty() {
            prefix.to_owned()
        } else {
            format!("{}/{prefix}", self.prefix)
        };
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = with_retry(&self.options.retry, "ListObjectsV2", prefix, || async {
                self.client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full_prefix)
                    .max_keys(self.options.list_page_size)
                    .set_continuation_token(token.clone())
                    .send()
                    .await
                    .map_err(|e| self.error("ListObjectsV2", prefix, e))
            })
            .await?;
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.get(strip..)) else {
                    continue;
                };
                out.push(ListedObject {
                    key: key.to_owned(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                    last_modified: object
                        .last_modified()
                        .and_then(|t| SystemTime::try_from(*t).ok()),
                });
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[async_trait]
impl WriteStore for S3Store {
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        condition: WriteCondition,
    ) -> Result<PutReceipt, StoreError> {
        self.put_single(key, body, &condition).await
    }

    async fn upload(
        &self,
        key: &str,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<PutReceipt, StoreError> {
        validate_key(key)?;
        let mut first = Vec::with_capacity(self.options.part_size.min(1 << 20));
        let at_end = self.read_part(key, body, &mut first).await?;
        let receipt = if at_end {
            self.put_single(key, Bytes::from(first), &WriteCondition::Always)
                .await?
        } else {
            self.multipart(key, first, body).await?
        };
        // What the store says it keeps must be what was sent, before anyone records it.
        match self.head(key).await? {
            Some(meta) if meta.size == receipt.size => Ok(receipt),
            Some(meta) => Err(StoreError::SizeMismatch {
                key: key.to_owned(),
                sent: receipt.size,
                stored: meta.size,
            }),
            None => Err(StoreError::NotFound {
                key: key.to_owned(),
            }),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        with_retry(&self.options.retry, "DeleteObject", key, || async {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| self.error("DeleteObject", key, e))
        })
        .await?;
        Ok(())
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        for batch in keys.chunks(DELETE_BATCH) {
            let Some(first_key) = batch.first() else {
                continue;
            };
            let mut objects = Vec::with_capacity(batch.len());
            for key in batch {
                let full = self.full_key(key)?;
                objects.push(ObjectIdentifier::builder().key(full).build().map_err(|e| {
                    StoreError::S3 {
                        operation: "DeleteObjects",
                        location: self.url_of(key),
                        message: e.to_string(),
                        kind: ErrorKind::Fatal,
                        source: Some(Box::new(e)),
                    }
                })?);
            }
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| StoreError::S3 {
                    operation: "DeleteObjects",
                    location: self.url_of(first_key),
                    message: e.to_string(),
                    kind: ErrorKind::Fatal,
                    source: Some(Box::new(e)),
                })?;
            let attempt = || async {
                let out = self
                    .client
                    .delete_objects()
                    .bucket(&self.bucket)
                    .delete(delete.clone())
                    .send()
                    .await
                    .map_err(|e| self.error("DeleteObjects", first_key, e))?;
                if let Some(failed) = out.errors().first() {
                    let key = failed
                        .key()
                        .map_or(first_key.as_str(), |k| self.relative_key(k));
                    return Err(StoreError::S3 {
                        operation: "DeleteObjects",
                        location: self.url_of(key),
                        message: format!(
                            "{} of {} keys not deleted: {} {}",
                            out.errors().len(),
                            batch.len(),
                            failed.code().unwrap_or("error"),
                            failed.message().unwrap_or_default()
                        ),
                        kind: crate::aws::code_kind(failed.code()),
                        source: None,
                    });
                }
                Ok(())
            };
            with_retry(&self.options.retry, "DeleteObjects", first_key, attempt).await?;
            tracing::debug!(count = batch.len(), "deleted objects");
        }
        Ok(())
    }

    async fn incomplete_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        validate_prefix(prefix)?;
        let full_prefix = if self.prefix.is_empty() {
            prefix.to_owned()
        } else {
            format!("{}/{prefix}", self.prefix)
        };
        let mut out = Vec::new();
        let mut markers: (Option<String>, Option<String>) = (None, None);
        loop {
            let page = with_retry(
                &self.options.retry,
                "ListMultipartUploads",
                prefix,
                || async {
                    self.client
                        .list_multipart_uploads()
                        .bucket(&self.bucket)
                        .prefix(&full_prefix)
                        .set_key_marker(markers.0.clone())
                        .set_upload_id_marker(markers.1.clone())
                        .send()
                        .await
                        .map_err(|e| self.error("ListMultipartUploads", prefix, e))
                },
            )
            .await?;
            for upload in page.uploads() {
                let (Some(key), Some(upload_id)) = (upload.key(), upload.upload_id()) else {
                    continue;
                };
                out.push(PendingUpload {
                    key: self.relative_key(key).to_owned(),
                    upload_id: upload_id.to_owned(),
                    initiated: upload
                        .initiated()
                        .and_then(|t| SystemTime::try_from(*t).ok()),
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            let next = (
                page.next_key_marker().map(str::to_owned),
                page.next_upload_id_marker().map(str::to_owned),
            );
            if next == markers || next.0.is_none() {
                break;
            }
            markers = next;
        }
        Ok(out)
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<(), StoreError> {
        let full = self.full_key(&upload.key)?;
        let key = upload.key.as_str();
        let outcome = with_retry(&self.options.retry, "AbortMultipartUpload", key, || async {
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload.upload_id)
                .send()
                .await
                .map_err(|e| self.error("AbortMultipartUpload", key, e))
        })
        .await;
        match outcome {
            Ok(_) => Ok(()),
            // Already completed or aborted.
            Err(StoreError::NotFound { .. } | StoreError::UploadGone { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
