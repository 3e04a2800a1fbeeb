//! The manifest function: seal a finished run into `manifests/{id}.json`.
//!
//! Input: `{"run_id"}` (the export output), `{}` or a Scheduled Event (seal the run that
//! holds the lease). Output: `{"backup_id", "kind", "parent", "created", ...}`.
//!
//! It also closes failed runs: `{"failure": {"run_id", "execution", "error"}}` (the state
//! machine's failure step) writes `state/last-failure.json` and releases the run's lease.

use std::sync::Arc;

use lambda_runtime::LambdaEvent;
use serde_json::Value;
use tidemark_core::events;
use tidemark_core::failure::Failure;
use tidemark_core::metrics::{self, Unit};
use tidemark_core::store::WriteStore;
use tidemark_lambda::FunctionError;

/// Clients built once per cold start.
#[derive(Debug, Clone)]
pub struct Deps {
    pub store: Arc<dyn WriteStore>,
}

impl Deps {
    /// Reads `TIDEMARK_STORE`.
    ///
    /// # Errors
    /// A message naming the variable that is missing or malformed.
    pub async fn from_env() -> Result<Self, String> {
        Ok(Self {
            store: tidemark_lambda::store_from_env().await?,
        })
    }
}

/// Seals the run, or records a failed one (`{"failure": {...}}`, the state machine's
/// failure step).
///
/// # Errors
/// [`FunctionError`] typed retryable, fatal or locked.
pub async fn handle(event: LambdaEvent<Value>, deps: &Deps) -> Result<Value, FunctionError> {
    let request = events::manifest_event(event.payload)?;
    if let Some(failure) = request.failure {
        return record_failure(deps, failure.to_failure()).await;
    }
    let run_id = match request.run_id {
        Some(id) => id,
        None => match tidemark_core::lease::current(deps.store.as_ref()).await? {
            Some((lease, _)) if lease.operation == "backup" => lease.run_id,
            _ => {
                return Err(FunctionError::fatal(
                    "no run_id given and no backup run holds the lease",
                ))
            }
        },
    };
    let holder = tidemark_lambda::holder(&event.context);
    let report = tidemark_core::manifest::seal_run(deps.store.clone(), &run_id, &holder).await?;
    if report.created {
        let (succeeded, inconsistent) = if report.consistent {
            (1.0, 0.0)
        } else {
            (0.0, 1.0)
        };
        tidemark_lambda::metrics()
            .with(metrics::BACKUP_SUCCEEDED, Unit::Count, succeeded)
            .with(metrics::BACKUP_INCONSISTENT, Unit::Count, inconsistent)
            .with(
                metrics::BACKUP_DURATION_SECONDS,
                Unit::Seconds,
                report.duration_seconds,
            )
            .emit();
    }
    serde_json::to_value(report).map_err(|e| FunctionError::fatal(e.to_string()))
}

async fn record_failure(deps: &Deps, failure: Failure) -> Result<Value, FunctionError> {
    let record = tidemark_core::failure::record_failure(deps.store.as_ref(), failure).await?;
    tidemark_lambda::metrics()
        .with(metrics::BACKUP_SUCCEEDED, Unit::Count, 0.0)
        .emit();
    let mut out = serde_json::to_value(&record).map_err(|e| FunctionError::fatal(e.to_string()))?;
    if let Some(map) = out.as_object_mut() {
        map.insert("recorded".into(), true.into());
    }
    Ok(out)
}
