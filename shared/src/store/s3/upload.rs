//! Writing objects: single PUTs (conditional ones told from their own retries) and
//! multipart uploads with parts in flight while the next is read.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::operation::put_object::{PutObjectError, PutObjectOutput};
use aws_sdk_s3::operation::RequestId;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::AsyncRead;
use tokio::task::JoinSet;

use crate::error::ErrorKind;
use crate::store::retry::{with_retry, with_retry_counting};
use crate::store::{
    fill_part, ETag, PendingUpload, PutReceipt, ReadStore, StoreError, WriteCondition, WriteStore,
};

use super::S3Store;

impl S3Store {
    pub(super) async fn put_single(
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
                let sent = self.send_put(full, checksum, body, condition).await;
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

    /// One PutObject request, with the condition as S3 headers. Every attempt of a
    /// conditional write is ours (the SDK's retries are off), so that a 412 after one
    /// whose answer was lost is told from a real conflict.
    async fn send_put(
        &self,
        full: &str,
        checksum: &str,
        body: Bytes,
        condition: &WriteCondition,
    ) -> Result<PutObjectOutput, SdkError<PutObjectError, HttpResponse>> {
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .checksum_sha256(checksum)
            .body(ByteStream::from(body));
        let request = match condition {
            WriteCondition::Always => return request.send().await,
            WriteCondition::IfAbsent => request.if_none_match("*"),
            WriteCondition::IfMatch(etag) => request.if_match(&etag.0),
        };
        let no_retries = aws_sdk_s3::config::Builder::default()
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled());
        request.customize().config_override(no_retries).send().await
    }

    /// Reads the next part of the body of `key` into `buf` (up to the part size);
    /// returns whether the body is at its end.
    pub(super) async fn read_part(
        &self,
        key: &str,
        body: &mut (dyn AsyncRead + Send + Unpin),
        buf: &mut Vec<u8>,
    ) -> Result<bool, StoreError> {
        fill_part(body, buf, self.options.part_size)
            .await
            .map_err(|source| StoreError::Io {
                operation: "read the body of",
                key: key.to_owned(),
                source,
            })
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

    pub(super) async fn multipart(
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
                kind: ErrorKind::Fatal,
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
            at_end = self.read_part(key, body, &mut next).await?;
        }
        while !in_flight.is_empty() {
            parts.push(join_part(key, self, in_flight.join_next().await)?);
        }
        let sha256 = hasher.finalize();
        let etag = self.complete(key, full, upload_id, parts, &sha256).await?;
        Ok(PutReceipt {
            etag,
            sha256: hex::encode(sha256),
            size,
        })
    }

    /// Completes the upload of `parts` (in any order) and checks the store's checksum of
    /// the object against the parts' (`sha256` is the whole body's).
    async fn complete(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        mut parts: Vec<UploadedPart>,
        sha256: &[u8],
    ) -> Result<ETag, StoreError> {
        parts.sort_by_key(|(p, _)| p.part_number());
        // S3's checksum of a multipart object: the SHA-256 of the parts' SHA-256s.
        let mut composite = Sha256::new();
        for (_, digest) in &parts {
            composite.update(digest);
        }
        let b64 = &base64::engine::general_purpose::STANDARD;
        let composite = b64.encode(composite.finalize());
        let whole = b64.encode(sha256);
        let parts: Vec<CompletedPart> = parts.into_iter().map(|(p, _)| p).collect();
        with_retry(
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
        .await
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
            kind: if e.is_panic() {
                ErrorKind::Bug
            } else {
                ErrorKind::Transient
            },
            source: Some(Box::new(e)),
        }),
        None => Err(StoreError::S3 {
            operation: "UploadPart",
            location: store.url_of(key),
            message: "no part in flight".into(),
            kind: ErrorKind::Fatal,
            source: None,
        }),
    }
}
