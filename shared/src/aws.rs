//! AWS SDK configuration shared by every client Tidemark builds.
//!
//! Region, credentials and endpoint come from the SDK's standard chain (environment,
//! profile, Lambda execution role), so `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` point
//! Tidemark at an S3-compatible server without any Tidemark-specific setting.

use aws_config::{BehaviorVersion, SdkConfig};

/// Loads the SDK configuration once; build every client from the result.
pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}
