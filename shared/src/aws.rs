//! AWS SDK configuration shared by every client Tidemark builds.
//!
//! Region, credentials and endpoint come from the SDK's standard chain (environment,
//! profile, Lambda execution role), so `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` point
//! Tidemark at an S3-compatible server without any Tidemark-specific setting.

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::error::ErrorKind;

/// Loads the SDK configuration once; build every client from the result.
pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// What an AWS service's failure means — the classifier of AWS answers, one of the two
/// in Tidemark (the other is the database's, [`crate::db::transient`]). Timeouts, cut-off
/// responses, unreachable endpoints, throttling and server errors (5xx, 429) are
/// transient; everything else (a refused request, a bad parameter) is fatal. Codes that
/// have a meaning of their own (S3's `NoSuchKey`, a failed precondition) are told apart
/// by the caller before it asks.
pub fn error_kind<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> ErrorKind {
    match err {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => ErrorKind::Transient,
        SdkError::DispatchFailure(e) if !e.is_user() => ErrorKind::Transient,
        SdkError::ServiceError(_) => {
            let status = err.raw_response().map(|r| r.status().as_u16());
            if status.is_some_and(|s| s >= 500 || s == 429) {
                ErrorKind::Transient
            } else {
                code_kind(err.code())
            }
        }
        _ => ErrorKind::Fatal,
    }
}

/// The kind of an AWS error code alone, for answers that come without a status (the
/// per-key errors of S3's `DeleteObjects`).
pub fn code_kind(code: Option<&str>) -> ErrorKind {
    match code {
        Some(
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "TooManyRequestsException"
            | "RequestTimeout"
            | "RequestTimeTooSkewed"
            | "InternalError"
            | "InternalServiceError"
            | "InternalFailure"
            | "ServiceUnavailable",
        ) => ErrorKind::Transient,
        _ => ErrorKind::Fatal,
    }
}
