//! The S3 store, through `aws-sdk-s3`.
//!
//! - Every write carries `x-amz-checksum-sha256`, so S3 rejects bytes that changed on the
//!   way; multipart uploads carry one per part.
//! - Conditional writes map to `If-None-Match: *` and `If-Match: <etag>`; S3 answers 412
//!   (or 409 while a racing conditional write is in flight) when the condition fails.
//! - [`WriteStore::upload`] reads the next part while up to
//!   [`S3StoreOptions::upload_concurrency`] parts (default one) are in flight, so memory
//!   stays at a few parts whatever the object size, and reading overlaps uploading.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
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
use tokio::io::{AsyncRead, ReadBuf};
use tokio::task::JoinSet;

use super::retry::{with_retry, with_retry_counting, Attempts, RetryPolicy};
use super::{
    fill_part, validate_key, validate_prefix, ETag, ListedObject, ObjectMeta, ObjectStream,
    PendingUpload, PutReceipt, ReadStore, StoreError, StoredObject, WriteCondition, WriteStore,
    DELETE_BATCH,
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

    /// Maps an SDK error to a [`StoreError`] that names the object, in one line: the S3
    /// error code and HTTP status (the SDK's full report goes to the debug log).
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
        tracing::debug!(operation, location, status, error = %DisplayErrorContext(&err), "S3 request failed");
        match (status, code.as_deref()) {
            (_, Some("NoSuchBucket")) => StoreError::NoSuchBucket {
                bucket: self.bucket.clone(),
            },
            (Some(412), _) | (_, Some("PreconditionFailed" | "ConditionalRequestConflict")) => {
                StoreError::PreconditionFailed {
                    key: key.to_owned(),
                }
            }
            (_, Some("NoSuchUpload")) => StoreError::UploadGone {
                key: key.to_owned(),
            },
            (Some(404), _) | (_, Some("NoSuchKey" | "NotFound")) => StoreError::NotFound {
                key: key.to_owned(),
            },
            (Some(403), _) | (_, Some("AccessDenied")) => StoreError::AccessDenied {
                location,
                operation,
            },
            _ => {
                let (message, retryable) = match &err {
                    SdkError::TimeoutError(_) => ("timed out".to_owned(), true),
                    SdkError::DispatchFailure(e) => (
                        format!(
                            "could not reach the store: {}",
                            e.as_connector_error().map_or_else(
                                || crate::error_chain(&err),
                                |c| crate::error_chain(c)
                            )
                        ),
                        !e.is_user(),
                    ),
                    SdkError::ResponseError(_) => (
                        format!("the response was cut off: {}", crate::error_chain(&err)),
                        true,
                    ),
                    SdkError::ServiceError(_) => {
                        let mut text = code.clone().unwrap_or_else(|| "error".to_owned());
                        if let Some(status) = status {
                            text.push_str(&format!(" (HTTP {status})"));
                        }
                        if let Some(m) = err.message().filter(|m| !m.is_empty()) {
                            text.push_str(": ");
                            text.push_str(m);
                        }
                        let retryable = status.is_some_and(|s| s >= 500 || s == 429)
                            || matches!(
                                code.as_deref(),
                                Some(
                                    "SlowDown"
                                        | "Throttling"
                                        | "ThrottlingException"
                                        | "RequestTimeout"
                                        | "RequestTimeTooSkewed"
                                        | "InternalError"
                                        | "ServiceUnavailable"
                                )
                            );
                        (text, retryable)
                    }
                    _ => (crate::error_chain(&err), false),
                };
                StoreError::S3 {
                    operation,
                    location,
                    message,
                    retryable,
                    source: None,
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
        let checksum = base64::engine::general_purpose::STANDARD.encode(digest);
        let size = body.len() as u64;
        let policy = self.options.retry;
        with_retry_counting(&policy, "PutObject", key, |attempt| {
            let body = body.clone();
            let (full, checksum) = (&full, &checksum);
            async move {
                let mut request = self
                    .client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .checksum_sha256(checksum)
                    .body(ByteStream::from(body));
                request = match condition {
                    WriteCondition::Always => request,
                    WriteCondition::IfAbsent => request.if_none_match("*"),
                    WriteCondition::IfMatch(etag) => request.if_match(&etag.0),
                };
                let sent = match condition {
                    WriteCondition::Always => request.send().await,
                    // Every attempt of a conditional write is ours, so that a 412 after one
                    // whose answer was lost is told from a real conflict.
                    _ => {
                        request
                            .customize()
                            .config_override(
                                aws_sdk_s3::config::Builder::default().retry_config(
                                    aws_sdk_s3::config::retry::RetryConfig::disabled(),
                                ),
                            )
                            .send()
                            .await
                    }
                };
                let err = match sent {
                    Ok(out) => {
                        if let Some(stored) = out.checksum_sha256().filter(|c| c != checksum) {
                            return Err(StoreError::ChecksumMismatch {
                                key: key.to_owned(),
                                expected: hex::encode(digest),
                                actual: format!("{stored} (base64, as the store reported it)"),
                            });
                        }
                        tracing::debug!(key, size, request_id = out.request_id(), "put object");
                        return Ok(PutReceipt {
                            etag: ETag(out.e_tag().unwrap_or_default().to_owned()),
                            sha256: hex::encode(digest),
                            size,
                        });
                    }
                    Err(e) => match (self.error("PutObject", key, e), condition) {
                        // S3 answers 404 to If-Match on a missing key: the condition failed.
                        (StoreError::NotFound { key }, WriteCondition::IfMatch(_)) => {
                            StoreError::PreconditionFailed { key }
                        }
                        (other, _) => other,
                    },
                };
                // A retry of a write whose acknowledgement was lost finds its own write in
                // place: that is success, not a conflict. (Only on a retry: a first-attempt
                // 412 is a real conflict, even if the winner wrote the same bytes — a
                // read-modify-write must not take another's write for its own.)
                if matches!(err, StoreError::PreconditionFailed { .. }) && attempt > 1 {
                    if let Some(receipt) = self.already_written(key, &digest, size).await? {
                        tracing::info!(
                            key,
                            "a retried conditional write found its own write in place"
                        );
                        return Ok(receipt);
                    }
                }
                Err(err)
            }
        })
        .await
    }

    /// The receipt of the object under `key` if it holds exactly these bytes.
    async fn already_written(
        &self,
        key: &str,
        digest: &[u8],
        size: u64,
    ) -> Result<Option<PutReceipt>, StoreError> {
        let Some(found) = self.read(key).await? else {
            return Ok(None);
        };
        if found.bytes.len() as u64 != size || Sha256::digest(&found.bytes).as_slice() != digest {
            return Ok(None);
        }
        Ok(Some(PutReceipt {
            etag: found.etag,
            sha256: hex::encode(digest),
            size,
        }))
    }

    async fn multipart(
        &self,
        key: &str,
        first: Vec<u8>,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<PutReceipt, StoreError> {
        let full = self.full_key(key)?;
        let created = with_retry(
            &self.options.retry,
            "CreateMultipartUpload",
            key,
            || async {
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full)
                    .checksum_algorithm(ChecksumAlgorithm::Sha256)
                    .send()
                    .await
                    .map_err(|e| self.error("CreateMultipartUpload", key, e))
            },
        )
        .await?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(StoreError::S3 {
                operation: "CreateMultipartUpload",
                location: self.url_of(key),
                message: "response has no upload id".into(),
                retryable: false,
                source: None,
            });
        };
        let result = self.upload_parts(key, &full, &upload_id, first, body).await;
        if result.is_err() {
            let upload = PendingUpload {
                key: key.to_owned(),
                upload_id: upload_id.clone(),
                initiated: None,
            };
            if let Err(e) = self.abort_upload(&upload).await {
                tracing::warn!(key, error = %e, "could not abort the multipart upload; the next run or prune will");
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
        let mut in_flight: JoinSet<Result<UploadedPart, StoreError>> = JoinSet::new();
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
        parts.sort_by_key(|(p, _)| p.part_number());
        // S3's checksum of a multipart object: the SHA-256 of the parts' SHA-256s.
        let mut composite = Sha256::new();
        for (_, digest) in &parts {
            composite.update(digest);
        }
        let b64 = &base64::engine::general_purpose::STANDARD;
        let composite = b64.encode(composite.finalize());
        let sha256 = hasher.finalize();
        let whole = b64.encode(sha256);
        let parts: Vec<CompletedPart> = parts.into_iter().map(|(p, _)| p).collect();
        let etag = with_retry(
            &self.options.retry,
            "CompleteMultipartUpload",
            key,
            || async {
                let completed = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts.clone()))
                            .build(),
                    )
                    .send()
                    .await;
                match completed {
                    Ok(out) => {
                        if let Some(stored) = out.checksum_sha256() {
                            let stored_digest = stored.split('-').next().unwrap_or(stored);
                            if stored_digest != composite && stored_digest != whole {
                                return Err(StoreError::ChecksumMismatch {
                                    key: key.to_owned(),
                                    expected: hex::encode(sha256),
                                    actual: format!("{stored} (base64, as the store reported it)"),
                                });
                            }
                        }
                        Ok(ETag(out.e_tag().unwrap_or_default().to_owned()))
                    }
                    // A retry of a completion whose answer was lost finds the upload gone:
                    // the object's size (checked by `upload`) tells whether it is in place.
                    Err(e) => match self.error("CompleteMultipartUpload", key, e) {
                        err @ StoreError::UploadGone { .. } => match self.head(key).await? {
                            Some(meta) => Ok(meta.etag),
                            None => Err(err),
                        },
                        err => Err(err),
                    },
                }
            },
        )
        .await?;
        Ok(PutReceipt {
            etag,
            sha256: hex::encode(sha256),
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
    ) -> Result<UploadedPart, StoreError> {
        let digest = Sha256::digest(&part).to_vec();
        let checksum = base64::engine::general_purpose::STANDARD.encode(&digest);
        let out = with_retry(&self.options.retry, "UploadPart", key, || async {
            self.client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(part_number)
                .checksum_sha256(&checksum)
                .body(ByteStream::from(part.clone()))
                .send()
                .await
                .map_err(|e| self.error("UploadPart", key, e))
        })
        .await?;
        if let Some(stored) = out.checksum_sha256().filter(|c| *c != checksum) {
            return Err(StoreError::ChecksumMismatch {
                key: format!("{key} (part {part_number})"),
                expected: hex::encode(&digest),
                actual: format!("{stored} (base64, as the store reported it)"),
            });
        }
        Ok((
            CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .checksum_sha256(checksum)
                .build(),
            digest,
        ))
    }

    /// Opens a GET of `key` from byte `from` (the whole object from 0), of the version
    /// with `etag` when given. Returns the object's total size, its tag and the body.
    async fn open_from(
        &self,
        key: &str,
        from: u64,
        etag: Option<&str>,
    ) -> Result<(u64, Option<String>, ByteStream), StoreError> {
        let full = self.full_key(key)?;
        let mut request = self.client.get_object().bucket(&self.bucket).key(full);
        if from > 0 {
            request = request.range(format!("bytes={from}-"));
        }
        if let Some(etag) = etag {
            request = request.if_match(etag);
        }
        let out = request
            .send()
            .await
            .map_err(|e| self.error("GetObject", key, e))?;
        let length = out.content_length().unwrap_or(0).max(0) as u64;
        let size = out
            .content_range()
            .and_then(|r| r.rsplit('/').next())
            .and_then(|total| total.parse().ok())
            .unwrap_or(from + length);
        Ok((size, out.e_tag().map(str::to_owned), out.body))
    }
}

/// A part in place, with the SHA-256 of its bytes.
type UploadedPart = (CompletedPart, Vec<u8>);

fn join_part(
    key: &str,
    store: &S3Store,
    joined: Option<Result<Result<UploadedPart, StoreError>, tokio::task::JoinError>>,
) -> Result<UploadedPart, StoreError> {
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

/// A GET body that, when the connection breaks or ends early, asks again for the rest
/// (a ranged GET of the same object version, from the byte reached), within the store's
/// retry budget: the reader sees one unbroken stream or an error.
struct ResumingBody {
    store: S3Store,
    key: String,
    etag: Option<String>,
    size: u64,
    offset: u64,
    attempts: Attempts,
    state: BodyState,
}

type Reopen = Pin<Box<dyn Future<Output = Result<ByteStream, StoreError>> + Send>>;

enum BodyState {
    Reading(Pin<Box<dyn AsyncRead + Send>>),
    Reopening(Reopen),
}

impl ResumingBody {
    /// After the stream failed with `cause`: the future that re-opens it, or the error
    /// to give the reader when the failure is final.
    fn reopen(&mut self, cause: std::io::Error) -> Result<Reopen, std::io::Error> {
        let err = StoreError::S3 {
            operation: "GetObject",
            location: self.store.url_of(&self.key),
            message: format!(
                "the body broke off at byte {} of {}: {cause}",
                self.offset, self.size
            ),
            retryable: true,
            source: None,
        };
        let Some(delay) = self.attempts.next_delay(&self.store.options.retry, &err) else {
            return Err(std::io::Error::other(self.attempts.give_up(err)));
        };
        tracing::warn!(key = self.key, offset = self.offset, error = %err, retry_in_ms = delay.as_millis() as u64, "reading an object broke off; asking for the rest");
        let (store, key, etag, offset) = (
            self.store.clone(),
            self.key.clone(),
            self.etag.clone(),
            self.offset,
        );
        Ok(Box::pin(async move {
            tokio::time::sleep(delay).await;
            let policy = store.options.retry;
            with_retry(&policy, "GetObject", &key, || {
                store.open_from(&key, offset, etag.as_deref())
            })
            .await
            .map(|(_, _, body)| body)
        }))
    }
}

impl AsyncRead for ResumingBody {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            let failure = match &mut this.state {
                BodyState::Reading(body) => {
                    let before = buf.filled().len();
                    match body.as_mut().poll_read(cx, buf) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) => {
                            let n = (buf.filled().len() - before) as u64;
                            if n > 0 || this.offset >= this.size {
                                this.offset += n;
                                return Poll::Ready(Ok(()));
                            }
                            std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the connection ended early",
                            )
                        }
                        Poll::Ready(Err(e)) => e,
                    }
                }
                BodyState::Reopening(reopen) => match reopen.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(body)) => {
                        this.state = BodyState::Reading(Box::pin(body.into_async_read()));
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
                },
            };
            match this.reopen(failure) {
                Ok(reopen) => this.state = BodyState::Reopening(reopen),
                Err(e) => return Poll::Ready(Err(e)),
            }
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
                    retryable: true,
                    source: None,
                })?
                .into_bytes();
            if bytes.len() as u64 != size {
                return Err(StoreError::S3 {
                    operation: "GetObject",
                    location: self.url_of(key),
                    message: format!("the body ended after {} of {size} bytes", bytes.len()),
                    retryable: true,
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
        let at_end = fill_part(body, &mut first, self.options.part_size)
            .await
            .map_err(|source| StoreError::Io {
                operation: "read the body of",
                key: key.to_owned(),
                source,
            })?;
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
                        retryable: matches!(
                            failed.code(),
                            Some("SlowDown" | "InternalError" | "ServiceUnavailable")
                        ),
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
