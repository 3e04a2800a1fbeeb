//! S3 errors as [`StoreError`]s that name the object.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::store::StoreError;

use super::S3Store;

impl S3Store {
    /// Maps an SDK error to a [`StoreError`] that names the object, in one line: the S3
    /// error code and HTTP status (the SDK's full report goes to the debug log).
    pub(super) fn error<E>(
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
            _ => StoreError::S3 {
                operation,
                location,
                message: describe(&err, code.as_deref(), status),
                kind: crate::aws::error_kind(&err),
                source: None,
            },
        }
    }
}

/// An error S3 did not classify as one of [`StoreError`]'s own kinds: its one-line
/// description (its kind is [`crate::aws::error_kind`]'s).
fn describe<E>(err: &SdkError<E, HttpResponse>, code: Option<&str>, status: Option<u16>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match err {
        SdkError::TimeoutError(_) => "timed out".to_owned(),
        SdkError::DispatchFailure(e) => format!(
            "could not reach the store: {}",
            e.as_connector_error()
                .map_or_else(|| crate::error_chain(err), |c| crate::error_chain(c))
        ),
        SdkError::ResponseError(_) => {
            format!("the response was cut off: {}", crate::error_chain(err))
        }
        SdkError::ServiceError(_) => {
            let mut text = code.unwrap_or("error").to_owned();
            if let Some(status) = status {
                text.push_str(&format!(" (HTTP {status})"));
            }
            if let Some(m) = err.message().filter(|m| !m.is_empty()) {
                text.push_str(": ");
                text.push_str(m);
            }
            text
        }
        _ => crate::error_chain(err),
    }
}
