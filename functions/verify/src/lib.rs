//! The verify function: restore a backup into a scratch database and compare it with
//! what the source held at the backup's snapshot.
//!
//! Input: `{"backup_id"}` (the manifest step's output), `{}` or a Scheduled Event (the
//! newest backup not verified yet). Output: the verification record, `{"backup_id",
//! "ok", "done", "restore_seconds", "tables", ...}`, or `{"backup_id", "ok": null,
//! "done": false, ...}` while slices remain; a backup that fails verification is
//! `"ok": false`, not an error, so the state machine and the alarms can tell a bad
//! backup from a failed invocation.

use std::sync::Arc;

use lambda_runtime::LambdaEvent;
use serde_json::Value;
use tidemark_core::config;
use tidemark_core::db::DbSettings;
use tidemark_core::events;
use tidemark_core::metrics::{self, Unit};
use tidemark_core::restore::BackupSelector;
use tidemark_core::store::WriteStore;
use tidemark_core::verify::{self, VerifyOptions, VerifySettings};
use tidemark_lambda::FunctionError;

/// Clients and settings built once per cold start.
#[derive(Debug, Clone)]
pub struct Deps {
    pub store: Arc<dyn WriteStore>,
    /// The verification server: `TIDEMARK_SCRATCH_URL` / `TIDEMARK_SCRATCH_SECRET_ID`, or
    /// the source database's server.
    pub server: DbSettings,
    pub options: VerifyOptions,
    /// Stop starting new tables this long before the invocation deadline.
    pub margin: std::time::Duration,
}

impl Deps {
    /// Reads the environment.
    ///
    /// # Errors
    /// A message naming the variable that is missing or malformed.
    pub async fn from_env() -> Result<Self, String> {
        let env = |n: &str| std::env::var(n).ok();
        let settings: VerifySettings = config::from_env(&env)?;
        let source = tidemark_lambda::database_source(&env)?;
        let server = match settings.scratch_source(&source) {
            Some(scratch) => scratch.resolve().await,
            None => source.resolve().await,
        }
        .map_err(|e| tidemark_core::error_chain(&e))?;
        let options = VerifyOptions {
            pg_dump: config::pg_dump_from_env(&env),
            workers: settings.workers,
            ..VerifyOptions::default()
        };
        Ok(Self {
            store: tidemark_lambda::store_from_env().await?,
            server,
            options,
            margin: tidemark_lambda::slice_margin(&|n| std::env::var(n).ok())?,
        })
    }
}

/// Verifies one backup.
///
/// # Errors
/// [`FunctionError`] when no result could be produced (unknown backup, unreachable
/// server); a failed verification is a normal result.
pub async fn handle(event: LambdaEvent<Value>, deps: &Deps) -> Result<Value, FunctionError> {
    let request = events::verify_event(event.payload)?;
    let mut options = deps.options.clone();
    options.backup = request.backup_id.map(BackupSelector::Id);
    options.deadline = Some(tidemark_lambda::work_deadline(&event.context, deps.margin));
    let slice = verify::verify_slice(deps.store.clone(), &deps.server, &options).await?;
    if let Some(record) = &slice.record {
        let (succeeded, failed) = if record.ok { (1.0, 0.0) } else { (0.0, 1.0) };
        let mut set = tidemark_lambda::metrics()
            .with(metrics::VERIFICATION_SUCCEEDED, Unit::Count, succeeded)
            .with(metrics::VERIFICATION_FAILED, Unit::Count, failed);
        if record.ok {
            set = set.with(
                metrics::RESTORE_SECONDS,
                Unit::Seconds,
                record.restore_seconds,
            );
        }
        set.emit();
    }
    // A summary: the record's per-table list grows with the database, past Step
    // Functions' cap; the whole record is in the store.
    let mut out = match &slice.record {
        Some(record) => serde_json::to_value(record.summary()),
        None => serde_json::to_value(&slice),
    }
    .map_err(|e| FunctionError::fatal(e.to_string()))?;
    if let Some(map) = out.as_object_mut() {
        map.insert("done".into(), slice.done.into());
        map.insert("tables_done".into(), slice.tables_done.into());
        // The state machine selects `ok` from every output: unknown until done.
        map.entry("ok").or_insert(Value::Null);
    }
    Ok(out)
}
