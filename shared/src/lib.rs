//! Tidemark core: incremental, verified, logical PostgreSQL backups into S3 or a directory.
//!
//! Everything worth testing lives here; the Lambda functions and the `tidemark` CLI are
//! thin shells that decode input, build clients once and call into this crate.
//!
//! # Layout
//! Stored formats apart from the operations that read and write them; each operation a
//! module (or a folder of small ones) named for it.
//!
//! Foundations:
//! - [`store`]: the object store trait ([`store::ReadStore`], [`store::WriteStore`]) and
//!   its adapters: `store/s3/` (requests and errors, uploads, resuming reads) and a local
//!   directory; store URLs, retries, request counting and a failure-injecting wrapper
//!   (`store::faults`) with the same trait.
//! - [`repo`]: where every object lives: each key and prefix built and parsed in one
//!   place (a typed [`repo::Key`]), the list of sealed backups and the one definition of
//!   "latest" (from manifests, never object times).
//! - [`format`](mod@format): every stored document as a serde type: lease, checkpoint, progress,
//!   manifest, verification records, the prune journal, failures.
//! - [`db`]: database settings (URL or RDS secret), TLS, connections with pinned
//!   settings, [`db::Connection`] and its [`db::Session`] view (statements whose errors
//!   name the server) and [`db::Snapshot`] (a repeatable-read transaction), the relay
//!   that gives libpq tools the same TLS, and `db::copy` — the one COPY-lines reader and
//!   fingerprint that export and verify share; [`db::transient`] classifies PostgreSQL
//!   failures.
//! - [`aws`]: the one AWS SDK configuration every client is built from, and
//!   [`aws::error_kind`], the classifier of AWS answers.
//! - [`catalog`]: which tables a backup covers, their definitions and modes.
//! - [`schema`]: the whole schema, captured with pg_dump in the backup's snapshot
//!   (`capture`), split into entries (`script`), applied in pg_restore's order (`apply`)
//!   and compared by verify (`compare`); `tool` finds and runs pg_dump.
//! - [`chunk`]: zstd COPY-text chunks streamed to the store.
//! - [`lease`]: the run lease; [`run`]: run ids and lifecycle errors; [`failure`]:
//!   recording a failed run and releasing its lease.
//!
//! Operations:
//! - [`export`]: one time-boxed slice of a backup run — `options`, `slice` (the
//!   orchestration), `plan` (the run's tables and ranges), `state` (shared progress and
//!   its flush policy), `worker` (the pool and reconnects), `range`, `keyless` and
//!   `append` (the three ways a table is read), `pass` (the consistency pass), `seal`
//!   (the moment recorded), `sql` (fragments).
//! - [`manifest`]: sealing a run into a manifest, and listing backups.
//! - [`restore`]: restoring a backup — `run` (the phases), `preflight` (checks before
//!   anything is written), `tables` and `load` (parallel loading, chunk by chunk when
//!   time-boxed), `data_only`, `sequences`, `large_objects`, `roles`, `error`.
//! - [`verify`]: verification restores into a scratch database, compared with the source.
//! - [`retention`]: which backups a retention policy keeps (pure); [`prune`]: the prune
//!   plan and its application.
//!
//! Around them: [`error`] (the one [`error::ErrorKind`] every error carries up from
//! where it happened: the store, the database or AWS), [`config`] (settings shared by
//! CLI flags and Lambda environment variables), [`events`] (the payloads the Lambda
//! functions accept), [`check`] (`tidemark check`), [`metrics`] (CloudWatch Embedded
//! Metric Format lines), [`telemetry`] (logging, human or JSON).

pub mod aws;
pub mod catalog;
pub mod check;
pub mod chunk;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
pub mod export;
pub mod failure;
pub mod format;
pub mod lease;
pub mod manifest;
pub mod metrics;
pub mod prune;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod run;
pub mod schema;
pub mod store;
pub mod telemetry;
pub mod verify;

/// An error and its causes on one line, each cause once: many errors repeat their source's
/// text in their own message, and some (tokio-postgres) show only the outermost part.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// Waits for every worker of `workers`; the first error (or panic, turned into an error by
/// `panicked`) wins and stops the others.
pub(crate) async fn join_workers<E: Send + 'static>(
    mut workers: tokio::task::JoinSet<Result<(), E>>,
    panicked: impl Fn(tokio::task::JoinError) -> E,
) -> Result<(), E> {
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        if let Err(e) = joined.unwrap_or_else(|e| Err(panicked(e))) {
            if first_error.is_none() {
                first_error = Some(e);
                workers.abort_all();
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Classified;

    #[tokio::test]
    async fn a_panicking_worker_is_reported_as_a_panic_and_stops_the_others() {
        let mut workers = tokio::task::JoinSet::new();
        workers.spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            panic!("worker bug")
        });
        workers.spawn(async {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            Ok::<(), String>(())
        });
        let started = std::time::Instant::now();
        let err = join_workers(workers, |e| format!("panic: {e}"))
            .await
            .expect_err("a worker panicked");
        assert!(
            err.starts_with("panic:") && err.contains("panicked"),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
    }

    #[test]
    fn a_dead_worker_is_named_and_never_retried() {
        let run = run::RunError::WorkerPanicked {
            run_id: "r1".into(),
            detail: "task 7 panicked".into(),
        };
        assert!(!run.is_retryable());
        assert_eq!(run.kind(), error::ErrorKind::Bug);
        assert!(run.to_string().contains("a bug in Tidemark"), "{run}");
        let restore = restore::RestoreError::WorkerPanicked {
            detail: "task 7 panicked".into(),
        };
        assert!(!restore.is_retryable());
        assert_eq!(restore.kind(), error::ErrorKind::Bug);
    }
}
