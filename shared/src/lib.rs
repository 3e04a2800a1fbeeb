//! Tidemark core: incremental, verified, logical PostgreSQL backups into S3 or a directory.
//!
//! Everything worth testing lives here; the Lambda functions and the `tidemark` CLI are
//! thin shells that decode input, build clients once and call into this crate.
//!
//! # Layout
//! - [`store`]: the object store trait ([`store::ReadStore`], [`store::WriteStore`]) with
//!   an S3 adapter and a local-directory adapter, and store URLs.
//! - [`db`]: database settings (URL or RDS secret), TLS, sessions with pinned settings,
//!   and the relay that gives libpq tools the same TLS.
//! - [`aws`]: the one AWS SDK configuration every client is built from.
//! - [`check`]: reachability checks of the database and the store (`tidemark check`).
//! - [`telemetry`]: logging, human or JSON.
//! - [`format`]: the stored JSON documents (lease, checkpoint, progress, manifest).
//! - [`catalog`]: which tables a backup covers, their definitions and modes.
//! - [`schema`]: the whole schema, captured with pg_dump in the backup's snapshot and
//!   restored in pg_restore's order; compared by verify.
//! - [`chunk`]: zstd COPY-text chunks streamed to the store.
//! - [`lease`]: the run lease; [`run`]: run ids and lifecycle errors.
//! - [`failure`]: recording a failed run and releasing its lease.
//! - [`metrics`]: CloudWatch Embedded Metric Format lines.
//! - [`export`]: one time-boxed slice of a backup run.
//! - [`manifest`]: sealing a run into a manifest, and listing backups.
//! - [`restore`]: restoring a backup into a database (also the verification restore).
//! - [`verify`]: verification restores into a scratch database, and their records.
//! - [`prune`]: the prune plan and its application.
//! - [`retention`]: which backups a retention policy keeps (pure).
//! - [`config`]: settings shared by CLI flags and Lambda environment variables.
//! - [`events`]: the payloads the Lambda functions accept.

pub mod aws;
pub mod catalog;
pub mod check;
pub mod chunk;
pub mod config;
pub mod db;
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
