//! The run lifecycle's shared vocabulary: run ids and the errors of export and seal.

use chrono::{DateTime, Utc};

use crate::catalog::CatalogError;
use crate::db::DbError;
use crate::error::{Classified, ErrorKind};
use crate::format::{FormatError, TableName};
use crate::schema::SchemaError;
use crate::store::StoreError;

/// A new run id: sortable UTC time plus a random suffix, e.g. `20261122T211500Z-3f9a1c`.
/// The backup a run seals has the same id.
pub fn new_run_id(now: DateTime<Utc>) -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", now.format("%Y%m%dT%H%M%SZ"), &suffix[..6])
}

/// Errors of the run lifecycle (export slices, sealing, the lease).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("locked by run {run_id} since {since} (expires {expires})")]
    Locked {
        run_id: String,
        since: DateTime<Utc>,
        expires: DateTime<Utc>,
    },
    #[error("run {run_id} lost its lease to another run (it expired while this slice worked)")]
    LeaseLost { run_id: String },
    #[error("no run {run_id} in the store (no progress and no manifest)")]
    NoSuchRun { run_id: String },
    #[error("run {run_id} is not finished: {left} table(s) still to export; run export again")]
    NotFinished { run_id: String, left: usize },
    #[error("run {run_id} has exported every table but not yet brought them to one point in time (the consistency pass); run export again")]
    NotConsistentYet { run_id: String },
    #[error("the slice's snapshot is gone (the session holding it was lost: {detail}); the next slice resumes the run in a new snapshot")]
    SnapshotLost { detail: String },
    #[error("run {run_id} progress was changed by another writer; is a second slice of this run running?")]
    Conflict { run_id: String },
    #[error("run {run_id}: work item {item} was taken over by another worker (this worker's claim lapsed); what this worker exported of it since its last record is left out")]
    ItemTaken { run_id: String, item: String },
    #[error("an export worker needs the id of a fanned-out run (run_id)")]
    WorkerWithoutRun,
    #[error("exporting {table}: {source}")]
    Table {
        table: TableName,
        #[source]
        source: Box<DbError>,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("capturing the schema: {0}")]
    Schema(#[from] SchemaError),
    /// A bug, not a failure of the database or the store: never retried.
    #[error(
        "an export worker of run {run_id} died: {detail} (a bug in Tidemark: please report it)"
    )]
    WorkerPanicked { run_id: String, detail: String },
}

impl Classified for RunError {
    fn kind(&self) -> ErrorKind {
        match self {
            RunError::Locked { .. } => ErrorKind::Locked,
            // A write of a dead slice landed late; reading the progress again resolves it.
            RunError::Conflict { .. } => ErrorKind::Conflict,
            // Another worker has the item: nothing of this worker's is recorded twice.
            RunError::ItemTaken { .. } => ErrorKind::Conflict,
            RunError::WorkerWithoutRun => ErrorKind::BadInput,
            RunError::SnapshotLost { .. } => ErrorKind::Transient,
            RunError::LeaseLost { .. }
            | RunError::NoSuchRun { .. }
            | RunError::NotFinished { .. }
            | RunError::NotConsistentYet { .. } => ErrorKind::Fatal,
            RunError::WorkerPanicked { .. } => ErrorKind::Bug,
            RunError::Table { source, .. } => source.kind(),
            RunError::Catalog(e) => e.kind(),
            RunError::Db(e) => e.kind(),
            RunError::Store(e) => e.kind(),
            RunError::Format(e) => e.kind(),
            RunError::Schema(e) => e.kind(),
        }
    }
}

impl RunError {
    pub(crate) fn table(table: &TableName, source: DbError) -> Self {
        RunError::Table {
            table: table.clone(),
            source: Box::new(source),
        }
    }
}
