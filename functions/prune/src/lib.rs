//! The prune function: apply the retention policy, delete what no kept backup needs.
//!
//! Policy from the environment (`TIDEMARK_KEEP_DAILY`, ..., the CLI's flag names) with
//! the event's fields overriding (`{"keep_daily": 7}`); `{"dry_run": true}` plans only.
//! Input may also be `{}`, a Scheduled Event, or the verify step's output (treated as
//! `{}`). Output: the prune report (`plan`, `deleted`, `dry_run`).

use std::sync::Arc;

use lambda_runtime::LambdaEvent;
use serde_json::Value;
use tidemark_core::events;
use tidemark_core::metrics::{self, Unit};
use tidemark_core::prune::{self, PruneOptions, PruneSettings};
use tidemark_core::store::WriteStore;
use tidemark_lambda::FunctionError;

/// Clients built once per cold start.
#[derive(Debug, Clone)]
pub struct Deps {
    pub store: Arc<dyn WriteStore>,
    /// Looks a `TIDEMARK_*` variable up (the process environment in Lambda).
    pub env: fn(&str) -> Option<String>,
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Deps {
    /// Reads `TIDEMARK_STORE`.
    ///
    /// # Errors
    /// A message naming the variable that is missing or malformed.
    pub async fn from_env() -> Result<Self, String> {
        Ok(Self {
            store: tidemark_lambda::store_from_env().await?,
            env: process_env,
        })
    }
}

/// Prunes (or plans).
///
/// # Errors
/// [`FunctionError`]: a bad event or policy is fatal, another run holding the lease is
/// locked, store trouble is retryable.
pub async fn handle(event: LambdaEvent<Value>, deps: &Deps) -> Result<Value, FunctionError> {
    let request = events::prune_event(event.payload)?;
    let configured = tidemark_core::config::from_env::<PruneSettings>(&deps.env)
        .map_err(FunctionError::fatal)?;
    let settings = request.overriding(&configured)?;
    let opts = PruneOptions {
        policy: settings.policy(),
        grace: settings.grace,
        dry_run: request.dry_run,
        holder: tidemark_lambda::holder(&event.context),
        ..PruneOptions::default()
    };
    let report = prune::prune(deps.store.clone(), &opts).await?;
    if !report.dry_run {
        tidemark_lambda::metrics()
            .with(metrics::PRUNED_OBJECTS, Unit::Count, report.deleted as f64)
            .emit();
    }
    // A summary: the plan's key list grows with the store, past Step Functions' cap.
    serde_json::to_value(report.summary()).map_err(|e| FunctionError::fatal(e.to_string()))
}
