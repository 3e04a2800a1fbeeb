//! The S3 store, through `aws-sdk-s3`.
//!
//! - Every write carries `x-amz-checksum-sha256`, so S3 rejects bytes that changed on the
//!   way; multipart uploads carry one per part.
//! - Conditional writes map to `If-None-Match: *` and `If-Match: <etag>`; S3 answers 412
//!   (or 409 while a racing conditional write is in flight) when the condition fails.
//! - [`WriteStore::upload`] reads the next part while up to
//!   [`S3StoreOptions::upload_concurrency`] parts (default one) are in flight, so memory
//!   stays at a few parts whatever the object size, and reading overlaps uploading.

use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier,
};
use aws_sdk_s3::Client;
use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::AsyncRead;
use tokio::task::JoinSet;

use super::{
    fill_part, validate_key, validate_prefix, ETag, ListedObject, ObjectMeta, ObjectStream,
    PutReceipt, ReadStore, StoreError, StoredObject, WriteCondition, WriteStore, DELETE_BATCH,
};

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
}

impl Default for S3StoreOptions {
    fn default() -> Self {
        Self {
            part_size: 5 * 1024 * 1024,
            upload_concurrency: 1,
            list_page_size: 1000,
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

    /// Maps an SDK error to a [`StoreError`] that names the object.
    fn error<E>(
        &self,
        operation: &'static str,
        key: &str,
        err: SdkError<E, HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_owned);
        let location = self.url_of(key);
        match (status, code.as_deref()) {
            (_, Some("NoSuchBucket")) => StoreError::NoSuchBucket {
                bucket: self.bucket.clone(),
            },
            (Some(412), _) | (_, Some("PreconditionFailed" | "ConditionalRequestConflict")) => {
                StoreError::PreconditionFailed {
                    key: key.to_owned(),
                }
            }
            (Some(404), _) | (_, Some("NoSuchKey" | "NotFound")) => StoreError::NotFound {
                key: key.to_owned(),
            },
            (Some(403), _) | (_, Some("AccessDenied")) => StoreError::AccessDenied {
                location,
                operation,
            },
            _ => {
                let retryable = match &err {
                    SdkError::TimeoutError(_)
                    | SdkError::DispatchFailure(_)
                    | SdkError::ResponseError(_) => true,
                    SdkError::ServiceError(_) => {
                        status.is_some_and(|s| s >= 500 || s == 429)
                            || matches!(
                                code.as_deref(),
                                Some(
                                    "SlowDown" | "Throttling" | "RequestTimeout" | "InternalError"
                                )
                            )
                    }
                    _ => false,
                };
                StoreError::S3 {
                    operation,
                    location,
                    message: DisplayErrorContext(&err).to_string(),
                    retryable,
                    source: Some(Box::new(err)),
                }
            }
        }
    }

    async fn put_single(
        &self,
        key: &str,
        body: Bytes,
        condition: &WriteCondition,
    ) -> Result<PutReceipt, StoreError> {
        let full = self.full_key(key)?;
        let digest = Sha256::digest(&body);
        let size = body.len() as u64;
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .checksum_sha256(base64::engine::general_purpose::STANDARD.encode(digest))
            .body(ByteStream::from(body));
        request = match condition {
            WriteCondition::Always => request,
            WriteCondition::IfAbsent => request.if_none_match("*"),
            WriteCondition::IfMatch(etag) => request.if_match(&etag.0),
        };
        let out = request.send().await.map_err(|e| {
            match (self.error("PutObject", key, e), condition) {
                // S3 answers 404 to If-Match on a missing key: the condition failed.
                (StoreError::NotFound { key }, WriteCondition::IfMatch(_)) => {
                    StoreError::PreconditionFailed { key }
                }
                (other, _) => other,
            }
        })?;
        tracing::debug!(key, size, request_id = out.request_id(), "put object");
        Ok(PutReceipt {
            etag: ETag(out.e_tag().unwrap_or_default().to_owned()),
            sha256: hex::encode(digest),
            size,
        })
    }

    async fn multipart(
        &self,
        key: &str,
        first: Vec<u8>,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<PutReceipt, StoreError> {
        let full = self.full_key(key)?;
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| self.error("CreateMultipartUpload", key, e))?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(StoreError::S3 {
                operation: "CreateMultipartUpload",
                location: self.url_of(key),
                message: "response has no upload id".into(),
                retryable: true,
                source: None,
            });
        };
        let result = self.upload_parts(key, &full, &upload_id, first, body).await;
        if result.is_err() {
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(e) = aborted {
                tracing::warn!(key, error = %DisplayErrorContext(&e), "could not abort multipart upload; the bucket's lifecycle rule will remove it");
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        first: Vec<u8>,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<PutReceipt, StoreError> {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut in_flight: JoinSet<Result<CompletedPart, StoreError>> = JoinSet::new();
        let mut parts = Vec::new();
        let mut next = first;
        let mut part_number = 0i32;
        let mut at_end = false;
        loop {
            if !next.is_empty() {
                part_number += 1;
                hasher.update(&next);
                size += next.len() as u64;
                let part = Bytes::from(std::mem::take(&mut next));
                let store = self.clone();
                let (key, full, upload_id) =
                    (key.to_owned(), full.to_owned(), upload_id.to_owned());
                in_flight.spawn(async move {
                    store
                        .upload_part(&key, &full, &upload_id, part_number, part)
                        .await
                });
            }
            if at_end {
                break;
            }
            // Keep at most `upload_concurrency` parts in flight while reading the next.
            while in_flight.len() >= self.options.upload_concurrency.max(1) {
                parts.push(join_part(key, self, in_flight.join_next().await)?);
            }
            next = Vec::with_capacity(self.options.part_size);
            at_end = fill_part(body, &mut next, self.options.part_size)
                .await
                .map_err(|source| StoreError::Io {
                    operation: "read the body of",
                    key: key.to_owned(),
                    source,
                })?;
        }
        while !in_flight.is_empty() {
            parts.push(join_part(key, self, in_flight.join_next().await)?);
        }
        parts.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.error("CompleteMultipartUpload", key, e))
            .map(|out| PutReceipt {
                etag: ETag(out.e_tag().unwrap_or_default().to_owned()),
                sha256: hex::encode(hasher.finalize()),
                size,
            })
    }

    async fn upload_part(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        part_number: i32,
        part: Bytes,
    ) -> Result<CompletedPart, StoreError> {
        let checksum = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&part));
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .part_number(part_number)
            .checksum_sha256(&checksum)
            .body(ByteStream::from(part))
            .send()
            .await
            .map_err(|e| self.error("UploadPart", key, e))?;
        Ok(CompletedPart::builder()
            .part_number(part_number)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .checksum_sha256(checksum)
            .build())
    }
}

fn join_part(
    key: &str,
    store: &S3Store,
    joined: Option<Result<Result<CompletedPart, StoreError>, tokio::task::JoinError>>,
) -> Result<CompletedPart, StoreError> {
    match joined {
        Some(Ok(part)) => part,
        Some(Err(e)) => Err(StoreError::S3 {
            operation: "UploadPart",
            location: store.url_of(key),
            message: format!("upload task failed: {e}"),
            retryable: true,
            source: None,
        }),
        None => Err(StoreError::S3 {
            operation: "UploadPart",
            location: store.url_of(key),
            message: "no part in flight".into(),
            retryable: false,
            source: None,
        }),
    }
}

#[async_trait]
impl ReadStore for S3Store {
    fn location(&self) -> String {
        self.url_of("")
    }

    async fn get(&self, key: &str) -> Result<ObjectStream, StoreError> {
        let full = self.full_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.error("GetObject", key, e))?;
        let size = out.content_length().unwrap_or(0).max(0) as u64;
        Ok(ObjectStream {
            size,
            body: Box::pin(out.body.into_async_read()),
        })
    }

    async fn read(&self, key: &str) -> Result<Option<StoredObject>, StoreError> {
        let full = self.full_key(key)?;
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.error("GetObject", key, e))
        {
            Ok(out) => out,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let etag = ETag(out.e_tag().unwrap_or_default().to_owned());
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::S3 {
                operation: "GetObject",
                location: self.url_of(key),
                message: format!("reading the body failed: {e}"),
                retryable: true,
                source: Some(Box::new(e)),
            })?
            .into_bytes();
        Ok(Some(StoredObject { bytes, etag }))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let full = self.full_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
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
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .max_keys(self.options.list_page_size)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error("ListObjectsV2", prefix, e))?;
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
        let at_end = fill_part(body, &mut first, self.options.part_size)
            .await
            .map_err(|source| StoreError::Io {
                operation: "read the body of",
                key: key.to_owned(),
                source,
            })?;
        if at_end {
            self.put_single(key, Bytes::from(first), &WriteCondition::Always)
                .await
        } else {
            self.multipart(key, first, body).await
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.error("DeleteObject", key, e))?;
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
                        retryable: false,
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
                    retryable: false,
                    source: Some(Box::new(e)),
                })?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
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
                    retryable: matches!(failed.code(), Some("SlowDown" | "InternalError")),
                    source: None,
                });
            }
            tracing::debug!(count = batch.len(), "deleted objects");
        }
        Ok(())
    }
}
