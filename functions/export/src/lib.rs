//! The export function: one time-boxed slice of a backup run.
//!
//! Input: `{"run_id"?, "mode"?: "full" | "incremental", "execution"?, "concurrency"?}`
//! (what the state machine passes), `{}`, or a Scheduled Event; with `"worker": SLOT`
//! (and the run id) one worker of a fanned-out run instead of a slice.
//! Output: the slice report, `{"run_id", "done", "fan_out", ...counts}`; Step Functions
//! loops while `done` is false and runs the workers when `fan_out` is true. A worker
//! returns its own small report.

use std::sync::Arc;

use lambda_runtime::LambdaEvent;
use serde_json::Value;
use tidemark_core::db::DbSettings;
use tidemark_core::events::{self, RunMode};
use tidemark_core::export::{self, ExportOptions};
use tidemark_core::metrics::{self, Unit};
use tidemark_core::store::WriteStore;
use tidemark_lambda::FunctionError;

/// Clients and settings built once per cold start.
#[derive(Debug, Clone)]
pub struct Deps {
    pub store: Arc<dyn WriteStore>,
    pub db: DbSettings,
    pub options: ExportOptions,
    pub margin: std::time::Duration,
}

impl Deps {
    /// Reads the environment (`TIDEMARK_STORE`, `DATABASE_URL` or `TIDEMARK_SECRET_ID`,
    /// `TIDEMARK_SCHEMAS`, `TIDEMARK_TABLE_MODES`, ...).
    ///
    /// # Errors
    /// A message naming the variable that is missing or malformed.
    pub async fn from_env() -> Result<Self, String> {
        Ok(Self {
            store: tidemark_lambda::store_from_env().await?,
            db: tidemark_lambda::database_from_env().await?,
            options: tidemark_core::config::export_options_from_env(&|n| std::env::var(n).ok())?,
            margin: tidemark_lambda::slice_margin(&|n| std::env::var(n).ok())?,
        })
    }
}

/// Runs one slice.
///
/// # Errors
/// [`FunctionError`] typed retryable, fatal or locked.
pub async fn handle(event: LambdaEvent<Value>, deps: &Deps) -> Result<Value, FunctionError> {
    let request = events::export_event(event.payload)?;
    let mut options = deps.options.clone();
    options.run_id = request.run_id;
    options.full = request.mode == Some(RunMode::Full);
    options.deadline = Some(tidemark_lambda::work_deadline(&event.context, deps.margin));
    // A consistency round may use the margin too, all but what returning needs.
    options.pass_deadline = tidemark_lambda::pass_deadline(&event.context, deps.margin);
    options.invocation_end = tidemark_lambda::invocation_end(&event.context);
    // The execution first: the failure step finds the run by it.
    options.holder = match &request.execution {
        Some(execution) => format!("{execution} {}", tidemark_lambda::holder(&event.context)),
        None => tidemark_lambda::holder(&event.context),
    };
    if let Some(n) = request.concurrency {
        options.settings.concurrency = n;
    }
    if let Some(slot) = request.worker {
        // One iteration of the Map: claims the run's work items until its deadline.
        options.worker_slot = slot;
        let report = export::export_worker(deps.store.clone(), &deps.db, &options).await?;
        tidemark_lambda::metrics()
            .with(metrics::ROWS_EXPORTED, Unit::Count, report.rows as f64)
            .with(metrics::BYTES_EXPORTED, Unit::Bytes, report.bytes as f64)
            .emit();
        return serde_json::to_value(report).map_err(|e| FunctionError::fatal(e.to_string()));
    }
    let report = export::export_slice(deps.store.clone(), &deps.db, &options).await?;
    if !report.sealed {
        tidemark_lambda::metrics()
            .with(metrics::ROWS_EXPORTED, Unit::Count, report.rows as f64)
            .with(metrics::BYTES_EXPORTED, Unit::Bytes, report.bytes as f64)
            .emit();
    }
    serde_json::to_value(report).map_err(|e| FunctionError::fatal(e.to_string()))
}
