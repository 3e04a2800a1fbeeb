//! Reading objects: ranged GETs and a body that resumes where its connection broke.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use aws_sdk_s3::primitives::ByteStream;
use tokio::io::{AsyncRead, ReadBuf};

use crate::error::ErrorKind;
use crate::store::retry::{with_retry, Attempts};
use crate::store::StoreError;

use super::S3Store;

impl S3Store {
    /// Opens a GET of `key` from byte `from` (the whole object from 0), of the version
    /// with `etag` when given. Returns the object's total size, its tag and the body.
    pub(super) async fn open_from(
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

/// A GET body that, when the connection breaks or ends early, asks again for the rest
/// (a ranged GET of the same object version, from the byte reached), within the store's
/// retry budget: the reader sees one unbroken stream or an error.
pub(super) struct ResumingBody {
    pub(super) store: S3Store,
    pub(super) key: String,
    pub(super) etag: Option<String>,
    pub(super) size: u64,
    pub(super) offset: u64,
    pub(super) attempts: Attempts,
    pub(super) state: BodyState,
}

type Reopen = Pin<Box<dyn Future<Output = Result<ByteStream, StoreError>> + Send>>;

pub(super) enum BodyState {
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
            kind: ErrorKind::Transient,
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
