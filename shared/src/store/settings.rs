//! Where backups live and how long failed requests are retried: the store settings of
//! every operation, declared once (flags, variables), for the CLI and the functions.

use std::time::Duration;

use super::retry::{self, RetryPolicy};
use super::{DynStore, StoreUrl};

/// The store settings a user gives. The CLI flattens this struct (global flags); the
/// functions read it from their environment with [`crate::config::from_env`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreSettings {
    /// Where backups live: s3://bucket/prefix, file:///abs/path or a directory path.
    #[arg(long, env = "TIDEMARK_STORE", global = true, value_name = "URL")]
    pub store: Option<String>,
    /// How long a failed store request is tried again, in seconds (0: only the SDK's
    /// quick retries), riding out throttling and short outages.
    #[arg(long, env = "TIDEMARK_STORE_RETRY_SECS", global = true, value_name = "SECONDS", value_parser = retry::parse_budget)]
    pub store_retry: Option<Duration>,
}

impl StoreSettings {
    /// The store's URL.
    ///
    /// # Errors
    /// One line naming the setting, when it is missing or not a store URL.
    pub fn url(&self) -> Result<StoreUrl, String> {
        let raw = self
            .store
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .ok_or(
            "no store configured: TIDEMARK_STORE (--store) is not set; give s3://bucket/prefix, \
                 file:///abs/path or a directory",
        )?;
        raw.parse()
            .map_err(|e| format!("--store (TIDEMARK_STORE): {}", crate::error_chain(&e)))
    }

    /// How failed requests are retried.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            budget: self.store_retry.unwrap_or(RetryPolicy::default().budget),
            ..RetryPolicy::default()
        }
    }

    /// Opens the store.
    ///
    /// # Errors
    /// As [`StoreSettings::url`]; the store's error when it cannot be opened.
    pub async fn open(&self) -> Result<DynStore, String> {
        super::open(&self.url()?, self.retry_policy())
            .await
            .map_err(|e| crate::error_chain(&e))
    }
}
