//! Export: one time-boxed slice of a backup run.
//!
//! The first slice takes the lease, records in one snapshot where every table stands
//! (`pg_current_snapshot()`, the high-water mark of each `append` table) and writes
//! `runs/{id}/progress.json`. Every slice then exports key ranges until the deadline
//! nears, recording each finished range in the progress document. A slice killed at any
//! point loses only what it had not recorded; the next slice redoes that under the same
//! chunk names, so nothing is lost or duplicated.
//!
//! Within one slice all workers share one exported snapshot, so a run that finishes in
//! one slice is a single point in time. A run that spans slices has read its tables in
//! several snapshots; once every range is exported, a **consistency pass** brings every
//! table to one slice's snapshot: in that one snapshot, each table exports what changed
//! since the oldest snapshot its data is of (`changes` tables: the `xmin` filter plus the
//! live key set and fingerprint of now; `append` tables: the keys past their cursor and
//! earlier gaps; keyless and `snapshot` tables: whole again), the catalog is read again
//! (tables created, changed or dropped meanwhile), and the schema and sequences are
//! taken in it. A round only counts if it finishes within one slice; an unfinished round
//! is rolled back and the next slice starts another from its own snapshot. After
//! `max_pass_rounds` the run is sealed as not one point in time, loudly. Ranges, not
//! rows, are the unit of work:
//! - tables with a primary key are cut into ranges of `rows_per_chunk` keys (bounds from
//!   an index-only scan), one chunk per range; a big table is first split into up to
//!   `workers` lanes of about equal size, which connections export at once;
//! - keyless tables are exported whole in one statement, cut into chunks as they stream,
//!   and restarted if a slice ends in the middle.
//!
//! What a range exports depends on the table's [`ExportScope`]: every row, the rows
//! changed since the parent's snapshot (`xmin` at or after its `xmin`, which over-exports
//! a little and never misses a change; the same read also yields the live key set and
//! the fingerprint of the whole table), or the keys past an `append` cursor (and earlier
//! gaps, probed again for late commits until a TTL).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::{pin_mut, TryStreamExt};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::catalog::{self, CatalogTable, TableSelection};
use crate::chunk::{chunk_key, copy_field, leading_fields, ChunkSink, LineSplitter};
use crate::db::{self, DbError, DbSettings};
use crate::format::checkpoint::{Checkpoint, GapRange, TableCheckpoint};
use crate::format::manifest::Manifest;
use crate::format::progress::{
    AppendTruth, ConsistencyPass, ExportScope, ExportSettings, Lane, PassBase, RunProgress,
    SliceSnapshot, TableProgress,
};
use crate::format::{
    manifest_key, progress_key, quote_ident, quote_literal, read_doc, write_doc, BackupKind,
    ChunkKind, ChunkRef, Fingerprint, KeyRange, PgSnapshot, TableMode, TableName, CHECKPOINT_KEY,
    FORMAT_VERSION,
};
use crate::lease;
use crate::run::{new_run_id, RunError};
use crate::schema::{self, capture::CaptureRequest, PgDump};
use crate::store::{CountingStore, ETag, StoreError, WriteCondition, WriteStore};

/// Most gap ranges remembered per `append` table; beyond that the oldest are dropped
/// (and the row-count check catches any row they hid).
const MAX_GAPS: usize = 10_000;

/// How a slice runs.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Continue this run; `None` continues the run in flight or starts a new one.
    pub run_id: Option<String>,
    /// Start a new chain (only for a new run).
    pub full: bool,
    pub selection: TableSelection,
    /// Most rows in one chunk.
    pub chunk_rows: u64,
    /// Target size of one chunk's COPY text, before compression.
    pub chunk_bytes: u64,
    pub zstd_level: i32,
    /// How long an `append` gap is probed for late commits.
    pub gap_ttl: Duration,
    /// Database connections exporting at once.
    pub workers: usize,
    /// Start no new range after this instant (the caller leaves its own safety margin).
    pub deadline: Option<Instant>,
    /// Who holds the lease (host:pid, Lambda request id).
    pub holder: String,
    pub lease_ttl: Duration,
    /// Least time between two progress writes. The default, 0, records a range as it
    /// finishes whenever writing the progress costs little next to the work it saves (see
    /// `flush_if_due`), so a killed slice loses only the ranges it had in flight.
    pub progress_interval: Duration,
    /// Live counters for a progress display.
    pub meter: Option<Arc<ExportMeter>>,
    /// The pg_dump that captures the schema (`None`: the one on `PATH`).
    pub pg_dump: Option<std::path::PathBuf>,
    /// Consistency-pass rounds a run spanning slices tries before it is sealed as not one
    /// point in time.
    pub max_pass_rounds: u32,
    /// Fingerprint `append` tables whole in this run (a deep check): updates to their rows,
    /// which `append` mode does not export, show up in verification.
    pub deep: bool,
    /// A deep check every this many backups of a chain (0: only when `deep`).
    pub deep_every: u32,
    /// A consistency-pass round must finish within one slice to count, so it may run past
    /// `deadline` up to this instant (the invocation's hard limit, less what finishing the
    /// slice needs); `None`: no limit.
    pub pass_deadline: Option<Instant>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            run_id: None,
            full: false,
            selection: TableSelection::default(),
            chunk_rows: 1_000_000,
            chunk_bytes: 64 * 1024 * 1024,
            zstd_level: 1,
            gap_ttl: Duration::from_secs(3600),
            workers: 2,
            deadline: None,
            holder: lease::default_holder(),
            lease_ttl: lease::DEFAULT_TTL,
            progress_interval: Duration::ZERO,
            meter: None,
            pg_dump: None,
            max_pass_rounds: 3,
            pass_deadline: None,
            deep: false,
            deep_every: 0,
        }
    }
}

/// Live counters of a slice, for progress bars.
#[derive(Debug, Default)]
pub struct ExportMeter {
    pub tables_total: AtomicUsize,
    pub tables_done: AtomicUsize,
    pub rows: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub bytes: AtomicU64,
    pub chunks: AtomicU64,
}

/// What a slice did: the JSON the export Lambda returns.
#[derive(Debug, Clone, Serialize)]
pub struct SliceReport {
    pub run_id: String,
    /// All tables exported: the run is ready to seal.
    pub done: bool,
    pub kind: BackupKind,
    pub parent: Option<String>,
    /// The backup is already sealed (this slice did nothing).
    pub sealed: bool,
    pub slice: u32,
    pub tables: usize,
    pub tables_done: usize,
    /// The consistency pass's round, once it has started.
    pub pass_round: Option<u32>,
    /// Once the run is ready to seal: whether it is one point in time.
    pub consistent: Option<bool>,
    pub chunks: u64,
    pub rows: u64,
    pub bytes: u64,
    pub raw_bytes: u64,
    pub store_requests: u64,
    pub seconds: f64,
}

/// Runs one slice of a backup run.
///
/// # Errors
/// [`RunError::Locked`] when another run holds the lease; catalog errors (unknown table)
/// and connection errors before anything is written; store and query errors.
pub async fn export_slice(
    store: Arc<dyn WriteStore>,
    db: &DbSettings,
    opts: &ExportOptions,
) -> Result<SliceReport, RunError> {
    let started = Instant::now();
    let counting = Arc::new(CountingStore::new(store));
    let store: Arc<dyn WriteStore> = counting.clone();

    // Which run is this slice for?
    let resume = match &opts.run_id {
        Some(run_id) => {
            if let Some((manifest, _)) =
                read_doc::<Manifest>(store.as_ref(), &manifest_key(run_id)).await?
            {
                return Ok(sealed_report(&manifest, started, counting.count()));
            }
            lease::ensure_free_for(store.as_ref(), run_id).await?;
            match read_doc::<RunProgress>(store.as_ref(), &progress_key(run_id)).await? {
                Some(found) => Some(found),
                // A first slice that died between taking the lease and writing its
                // progress: start the run afresh under the same id.
                None if lease::current(store.as_ref())
                    .await?
                    .is_some_and(|(l, _)| &l.run_id == run_id) =>
                {
                    None
                }
                None => {
                    return Err(RunError::NoSuchRun {
                        run_id: run_id.clone(),
                    })
                }
            }
        }
        None => match lease::current(store.as_ref()).await? {
            Some((lease, _)) if lease::is_live(&lease, Utc::now()) => {
                return Err(RunError::Locked {
                    run_id: lease.run_id,
                    since: lease.acquired_at,
                    expires: lease.expires_at,
                })
            }
            // The previous holder died: finish its run rather than start another.
            Some((lease, _)) if lease.operation == "backup" => {
                let sealed = store.head(&manifest_key(&lease.run_id)).await?.is_some();
                if sealed {
                    None
                } else {
                    read_doc::<RunProgress>(store.as_ref(), &progress_key(&lease.run_id)).await?
                }
            }
            _ => None,
        },
    };

    let mut coordinator = db::connect(db).await?;
    coordinator
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| DbError::query("starting the export transaction", db, e))?;
    // The slice's one snapshot: its workers and pg_dump import it.
    let snapshot_id: String = coordinator
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(|e| DbError::query("exporting the snapshot", db, e))?
        .try_get(0)
        .map_err(|e| DbError::query("exporting the snapshot", db, e))?;
    // A new run captures the schema: find a fit pg_dump before anything is written.
    let schema_tool = match resume {
        Some(_) => None,
        None => {
            let tool = PgDump::locate(opts.pg_dump.as_deref()).await?;
            let server: i32 = coordinator
                .query_one("SELECT current_setting('server_version_num')::int4", &[])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(|e| DbError::query("reading the server version", db, e))?;
            tool.check_server(server as u32)?;
            Some(tool)
        }
    };

    let resume_of = resume.as_ref().map(|(p, _)| p.run_id.clone());
    let (mut progress, progress_etag) = match resume {
        Some((mut progress, etag)) => {
            progress.slices += 1;
            (progress, Some(etag))
        }
        None => (
            plan_run(
                &mut coordinator,
                db,
                store.as_ref(),
                opts,
                opts.run_id.clone(),
            )
            .await?,
            None,
        ),
    };
    // Every slice cuts chunks the way the run started, whatever this invocation was given.
    let opts = &ExportOptions {
        chunk_rows: progress.settings.chunk_rows,
        chunk_bytes: progress.settings.chunk_bytes,
        zstd_level: progress.settings.zstd_level,
        gap_ttl: Duration::from_secs(progress.settings.gap_ttl_secs),
        ..opts.clone()
    };
    let run_id = progress.run_id.clone();
    let held = lease::acquire(
        store.as_ref(),
        &run_id,
        "backup",
        &opts.holder,
        opts.lease_ttl,
    )
    .await?;
    if resume_of.is_some() {
        abort_leftover_uploads(store.as_ref(), &run_id).await;
    }
    let result = async {
        let condition = match progress_etag {
            Some(etag) => WriteCondition::IfMatch(etag),
            None => WriteCondition::IfAbsent,
        };
        if let Some(tool) = &schema_tool {
            let schemas = dump_schemas(&opts.selection, &progress);
            let (dump, warnings) = schema::capture::capture(
                store.as_ref(),
                &coordinator,
                &CaptureRequest {
                    tool,
                    settings: db,
                    snapshot_id: &snapshot_id,
                    run_id: &run_id,
                    schemas: &schemas,
                    parent: progress.parent.as_deref(),
                },
            )
            .await?;
            for warning in warnings {
                tracing::warn!(run_id, "{warning}");
                progress.warnings.push(warning);
            }
            progress.schema_dump = Some(dump);
        }
        if schema_tool.is_some() {
            progress.schema_slice = progress.slices;
        }
        record_slice_snapshot(&coordinator, db, &mut progress).await?;
        let base_requests = progress.store_requests;
        progress.store_requests = base_requests + counting.count();
        let etag = write_progress(store.as_ref(), &progress, condition).await?;
        tracing::info!(
            run_id,
            slice = progress.slices,
            kind = %progress.kind,
            tables = progress.tables.len(),
            seconds_left = opts.deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64()),
            pass_seconds_left = opts.pass_deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64()),
            "export slice started"
        );

        let meter = opts.meter.clone().unwrap_or_default();
        meter
            .tables_total
            .store(progress.tables.len(), Ordering::Relaxed);
        meter.tables_done.store(
            progress.tables.iter().filter(|t| t.done).count(),
            Ordering::Relaxed,
        );
        let slice = progress.slices;
        let shared = Arc::new(Shared {
            store: store.clone(),
            counting: counting.clone(),
            base_requests,
            state: Mutex::new(ProgressState {
                doc: progress,
                etag,
                last_write: Instant::now(),
                write_cost: Duration::ZERO,
            }),
            heartbeat: lease::Heartbeat::start(store.clone(), held, opts.lease_ttl),
            queue: std::sync::Mutex::new(VecDeque::new()),
            opts: opts.clone(),
            meter: meter.clone(),
            slice_rows: AtomicU64::new(0),
            slice_bytes: AtomicU64::new(0),
            slice_raw: AtomicU64::new(0),
            slice_chunks: AtomicU64::new(0),
            recorded: AtomicBool::new(false),
            in_round: AtomicBool::new(false),
            snapshot_id: snapshot_id.clone(),
            slice,
            run_id: run_id.clone(),
        });

        // All in this slice's one snapshot: the ranges left, then, once every table is
        // exported, consistency-pass rounds that bring every table to this snapshot.
        let outcome = async {
            loop {
                let step = {
                    let mut state = shared.state.lock().await;
                    let step = next_step(
                        &mut state.doc,
                        &coordinator,
                        db,
                        opts,
                        slice,
                        shared.past_soft_deadline(),
                    )
                    .await?;
                    shared.in_round.store(
                        state.doc.pass.as_ref().is_some_and(|p| p.slice == slice),
                        Ordering::Relaxed,
                    );
                    if let Step::Work(queue) = &step {
                        if let Ok(mut q) = shared.queue.lock() {
                            *q = queue.clone();
                        }
                        meter
                            .tables_total
                            .store(state.doc.tables.len(), Ordering::Relaxed);
                        meter.tables_done.store(
                            state.doc.tables.iter().filter(|t| t.done).count(),
                            Ordering::Relaxed,
                        );
                    }
                    if !matches!(step, Step::Stop) {
                        shared.flush(&mut state).await?;
                    }
                    step
                };
                match step {
                    Step::Stop => return Ok::<(), RunError>(()),
                    Step::Finalize => {
                        finalize_run(&shared, &coordinator, db, opts, &snapshot_id).await?;
                        return Ok(());
                    }
                    Step::Work(_) => {
                        run_workers(&shared, db, opts.workers).await?;
                        if shared.past_deadline() {
                            return Ok(());
                        }
                    }
                }
            }
        }
        .await;
        let _ = coordinator.batch_execute("COMMIT").await;
        if let Err(e) = outcome {
            // Keep what finished: the next slice resumes from it.
            if !matches!(e, RunError::LeaseLost { .. } | RunError::Conflict { .. }) {
                let mut state = shared.state.lock().await;
                if let Err(flush) = shared.flush(&mut state).await {
                    tracing::warn!(run_id, error = %flush, "could not save the progress of the failed slice");
                }
            }
            return Err(e);
        }

        let mut state = shared.state.lock().await;
        shared.flush(&mut state).await?;
        let doc = &state.doc;
        let tables_done = doc.tables.iter().filter(|t| t.done).count();
        let report = SliceReport {
            run_id: doc.run_id.clone(),
            done: doc.consistent_in_slice.is_some() || doc.inconsistent.is_some(),
            kind: doc.kind,
            parent: doc.parent.clone(),
            sealed: false,
            slice: doc.slices,
            tables: doc.tables.len(),
            tables_done,
            pass_round: doc.pass.as_ref().map(|p| p.round),
            consistent: match (&doc.consistent_in_slice, &doc.inconsistent) {
                (Some(_), _) => Some(true),
                (None, Some(_)) => Some(false),
                _ => None,
            },
            chunks: shared.slice_chunks.load(Ordering::Relaxed),
            rows: shared.slice_rows.load(Ordering::Relaxed),
            bytes: shared.slice_bytes.load(Ordering::Relaxed),
            raw_bytes: shared.slice_raw.load(Ordering::Relaxed),
            store_requests: counting.count(),
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            run_id = report.run_id,
            done = report.done,
            tables_done,
            pass_round = report.pass_round,
            rows = report.rows,
            bytes = report.bytes,
            "export slice finished"
        );
        Ok(report)
    }
    .await;
    if let Err(e) = &result {
        // A slice that fails on its own hands the run back at once (its progress is
        // saved): a plain re-run resumes it instead of waiting out the lease.
        if !matches!(e, RunError::LeaseLost { .. } | RunError::Conflict { .. }) {
            match lease::release(store.as_ref(), &run_id).await {
                Ok(_) => tracing::info!(
                    run_id,
                    "lease released after the failure; a re-run resumes this run"
                ),
                Err(release) => {
                    tracing::warn!(run_id, error = %release, "could not release the lease after the failure")
                }
            }
        }
    }
    result
}

/// Aborts the multipart uploads a killed slice of this run left unfinished (they are
/// billed until aborted). A failure here only delays that to prune.
async fn abort_leftover_uploads(store: &dyn WriteStore, run_id: &str) {
    let prefix = format!("chunks/{run_id}/");
    match store.incomplete_uploads(&prefix).await {
        Ok(uploads) => {
            for upload in &uploads {
                if let Err(e) = store.abort_upload(upload).await {
                    tracing::warn!(run_id, key = upload.key, error = %e, "could not abort a leftover upload; prune will");
                    return;
                }
            }
            if !uploads.is_empty() {
                tracing::info!(
                    run_id,
                    count = uploads.len(),
                    "aborted the unfinished uploads of an earlier slice"
                );
            }
        }
        Err(e) => {
            tracing::warn!(run_id, error = %e, "could not list unfinished uploads; prune will abort them")
        }
    }
}

/// Records the snapshot this slice reads in (and the WAL position), replacing a record
/// of the same slice number left by a first slice that died.
async fn record_slice_snapshot(
    client: &Client,
    db: &DbSettings,
    progress: &mut RunProgress,
) -> Result<(), RunError> {
    let row = client
        .query_one(
            "SELECT pg_current_snapshot()::text, \
                    (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                          ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .map_err(|e| DbError::query("reading the slice's snapshot", db, e))?;
    let text: String = row.get(0);
    let snapshot: PgSnapshot = text.parse().map_err(|reason| RunError::Table {
        table: TableName::new("pg_catalog", "pg_current_snapshot"),
        detail: reason,
        retryable: false,
    })?;
    let slice = progress.slices;
    progress.slice_snapshots.retain(|s| s.slice != slice);
    progress.slice_snapshots.push(SliceSnapshot {
        slice,
        snapshot,
        lsn: row.get(1),
        taken_at: Utc::now(),
    });
    Ok(())
}

/// Runs `count` workers over the shared queue until it is empty or the deadline passes.
async fn run_workers(shared: &Arc<Shared>, db: &DbSettings, count: usize) -> Result<(), RunError> {
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..count.max(1) {
        let shared = shared.clone();
        let db = db.clone();
        workers.spawn(async move { worker(shared, db).await });
    }
    crate::join_workers(workers, |e| {
        RunError::Store(StoreError::Io {
            operation: "run export worker for",
            key: shared.run_id.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    })
    .await
}

/// What a slice does next.
#[derive(Debug, Clone)]
enum Step {
    /// Export this work (ranges, or a pass round's).
    Work(VecDeque<Work>),
    /// Every table is of this slice's snapshot: record it as the backup's moment.
    Finalize,
    /// Nothing more in this slice (done, or the next slice starts the next round).
    Stop,
}

/// Decides the slice's next step, starting a consistency-pass round when every table's
/// ranges are exported but the tables are of several snapshots.
async fn next_step(
    doc: &mut RunProgress,
    client: &Client,
    db: &DbSettings,
    opts: &ExportOptions,
    slice: u32,
    past_deadline: bool,
) -> Result<Step, RunError> {
    if doc.consistent_in_slice.is_some() || doc.inconsistent.is_some() {
        return Ok(Step::Stop);
    }
    // A round an earlier slice did not finish starts again, from this snapshot.
    let stale_round = doc.pass.as_ref().is_some_and(|p| p.slice != slice);
    if !stale_round {
        let pending = work_left(doc);
        if !pending.is_empty() {
            return Ok(if past_deadline {
                Step::Stop
            } else {
                Step::Work(pending)
            });
        }
        // Every table is exported. Of this slice's snapshot already?
        let this_slice_only = doc.pass.as_ref().is_some_and(|p| p.slice == slice)
            || doc.tables.iter().all(|t| t.started_in_slice == slice);
        if this_slice_only {
            return Ok(Step::Finalize);
        }
    }
    if past_deadline {
        return Ok(Step::Stop);
    }
    if !start_round(doc, client, db, opts, slice).await? {
        return Ok(Step::Stop);
    }
    let pending = work_left(doc);
    Ok(if pending.is_empty() {
        Step::Finalize
    } else {
        Step::Work(pending)
    })
}

/// The xmin of slice `slice`'s snapshot (the run's first snapshot if unknown).
fn slice_xmin(doc: &RunProgress, slice: u32) -> u64 {
    doc.slice_snapshots
        .iter()
        .find(|s| s.slice == slice)
        .map_or(doc.snapshot.xmin, |s| s.snapshot.xmin)
}

/// Starts a consistency-pass round in this slice: every table not yet of this slice's
/// snapshot exports again what changed since the oldest snapshot its data is of.
/// Returns false when the run gives up on one point in time instead.
async fn start_round(
    doc: &mut RunProgress,
    client: &Client,
    db: &DbSettings,
    opts: &ExportOptions,
    slice: u32,
) -> Result<bool, RunError> {
    // What an unfinished round began is undone: each table back to its state before it.
    for table in &mut doc.tables {
        if let Some(base) = table.pass_base.take() {
            table.chunks = base.chunks;
            table.key_chunks = base.key_chunks;
            table.fingerprint = base.fingerprint;
            table.exported_rows = base.exported_rows;
            table.scope = base.scope;
            table.gaps = base.gaps;
            table.key_fingerprint = base.key_fingerprint;
            table.truth = base.truth;
            table.gaps_to_probe.clear();
            table.gaps_probed = true;
            for lane in &mut table.lanes {
                lane.done = true;
            }
            table.done = true;
        }
    }
    let round = doc.pass.as_ref().map_or(0, |p| p.round) + 1;
    if round > opts.max_pass_rounds.max(1) {
        let reason = format!(
            "the consistency pass did not finish within one slice in {} round(s): every round re-reads the changed tables in one snapshot; give the export more time per slice (a longer function timeout, more workers), or back up from the CLI, which has no slice limit",
            round - 1
        );
        tracing::warn!(
            run_id = doc.run_id,
            "backup is not one point in time: {reason}"
        );
        doc.inconsistent = Some(reason);
        for table in &mut doc.tables {
            table.done = true;
        }
        return Ok(false);
    }
    doc.pass = Some(ConsistencyPass { round, slice });
    tracing::info!(
        run_id = doc.run_id,
        round,
        slice,
        "consistency pass round started"
    );
    reconcile_catalog(doc, client, db, opts).await?;
    let first_round = round == 1;
    for t in 0..doc.tables.len() {
        let table = &doc.tables[t];
        if !table.done {
            continue; // new or changed: exported whole in this snapshot
        }
        if first_round && table.consistent_in_slice.is_none() && table.started_in_slice == slice {
            doc.tables[t].consistent_in_slice = Some(slice);
            continue;
        }
        let since_slice = table
            .consistent_in_slice
            .unwrap_or(table.started_in_slice.max(1));
        let since = slice_xmin(doc, since_slice);
        // A run this long outlives what a 32-bit xmin can tell apart: export it whole.
        let too_long = slice_xmin(doc, slice).saturating_sub(since) >= MAX_XID_DISTANCE;
        let table = &mut doc.tables[t];
        table.pass_base = Some(PassBase {
            chunks: table.chunks.clone(),
            key_chunks: table.key_chunks.clone(),
            fingerprint: table.fingerprint,
            exported_rows: table.exported_rows,
            scope: table.scope.clone(),
            gaps: table.gaps.clone(),
            key_fingerprint: table.key_fingerprint,
            truth: table.truth,
        });
        let since = (!too_long).then_some(since);
        prepare_pass(table, since, client, db, opts, slice).await?;
    }
    Ok(true)
}

/// Sets a table up to be brought to this slice's snapshot: what changed since
/// `since_xmin`, or (`None`) all of a `changes` table again.
async fn prepare_pass(
    table: &mut TableProgress,
    since_xmin: Option<u64>,
    client: &Client,
    db: &DbSettings,
    opts: &ExportOptions,
    slice: u32,
) -> Result<(), RunError> {
    table.done = false;
    if table.key.is_empty() {
        // Keyless: exported whole again (the keyless work resets it first).
        return Ok(());
    }
    match (table.mode, since_xmin) {
        (TableMode::Changes, Some(since_xmin)) => {
            // What changed since then, and the live key set and fingerprint of now.
            table.scope = ExportScope::Changed { since_xmin };
            table.key_chunks.clear();
            table.fingerprint = Fingerprint::default();
            table.gaps_probed = true;
        }
        (TableMode::Snapshot | TableMode::Changes, _) => {
            reset(table, slice);
            table.scope = ExportScope::Whole;
            table.gaps_probed = true;
        }
        (TableMode::Append, _) => {
            let after = match table.scope {
                ExportScope::Appended { upto, .. } => upto,
                _ => None,
            };
            let relation = table.own_rows();
            let mark = append_mark(client, db, &table.name, &relation, &table.key[0]).await?;
            table.scope = ExportScope::Appended {
                after,
                upto: mark.max(after),
            };
            table.truth = None;
            // Gaps passed while exporting may have been filled since.
            table.gaps_to_probe = std::mem::take(&mut table.gaps);
            table.gaps_probed = table.gaps_to_probe.is_empty();
            // The row-count check then runs in this snapshot.
            table.started_in_slice = slice;
        }
    }
    table.lanes = plan_lanes(client, db, table, table.est_rows, opts.workers).await?;
    Ok(())
}

/// The highest key of an `append` table now (`None` when empty).
async fn append_mark(
    client: &Client,
    db: &DbSettings,
    table: &TableName,
    relation: &str,
    key: &str,
) -> Result<Option<i64>, RunError> {
    let mark: Option<i64> = client
        .query_one(
            &format!("SELECT max({})::int8 FROM {relation}", quote_ident(key)),
            &[],
        )
        .await
        .map_err(|e| RunError::table(table, DbError::query("reading the append mark", db, e)))?
        .get(0);
    Ok(mark)
}

/// The tables as they are in this snapshot: a table created during the run is added, one
/// whose definition changed (another oid, other columns or key) is exported whole again,
/// one dropped is left out; each with a warning in the manifest.
async fn reconcile_catalog(
    doc: &mut RunProgress,
    client: &Client,
    db: &DbSettings,
    opts: &ExportOptions,
) -> Result<(), RunError> {
    let found = catalog::discover(client, db, &opts.selection).await?;
    let mut tables = Vec::with_capacity(found.len());
    let mut warnings = Vec::new();
    for table in found {
        let shape = table_shape(&table.columns, &table.schema);
        let key: Vec<String> = table.key.iter().map(|(n, _)| n.clone()).collect();
        match doc.tables.iter().position(|t| t.name == table.name) {
            Some(i)
                if doc.tables[i].done
                    && doc.tables[i]
                        .identity
                        .as_ref()
                        .is_none_or(|was| table.identity.change_from(was).is_none())
                    && table_shape(&doc.tables[i].columns, &doc.tables[i].schema) == shape
                    && doc.tables[i].key == key
                    && doc.tables[i].mode == table.mode =>
            {
                tables.push(doc.tables[i].clone());
            }
            Some(i) => {
                if doc.tables[i].done {
                    warnings.push(format!(
                        "table {} changed during the backup; it is exported whole at the backup's moment",
                        table.name
                    ));
                }
                tables.push(plan_table(client, db, table, None, opts).await?);
            }
            None => {
                warnings.push(format!(
                    "table {} was created during the backup; it is exported whole at the backup's moment",
                    table.name
                ));
                tables.push(plan_table(client, db, table, None, opts).await?);
            }
        }
    }
    for old in &doc.tables {
        if !tables.iter().any(|t| t.name == old.name) {
            warnings.push(format!(
                "table {} was dropped during the backup; it is not in it",
                old.name
            ));
        }
    }
    for warning in warnings {
        tracing::warn!(run_id = doc.run_id, "{warning}");
        if !doc.warnings.contains(&warning) {
            doc.warnings.push(warning);
        }
    }
    doc.tables = tables;
    Ok(())
}

/// Every table is of this slice's snapshot: the schema and sequences are taken again in
/// it (unless the run's schema already is), and the run is ready to seal.
async fn finalize_run(
    shared: &Shared,
    client: &Client,
    db: &DbSettings,
    opts: &ExportOptions,
    snapshot_id: &str,
) -> Result<(), RunError> {
    let slice = shared.slice;
    let (schema_slice, schemas, parent) = {
        let state = shared.state.lock().await;
        (
            state.doc.schema_slice,
            dump_schemas(&opts.selection, &state.doc),
            state.doc.parent.clone(),
        )
    };
    let mut recaptured = None;
    if schema_slice != slice {
        let tool = PgDump::locate(opts.pg_dump.as_deref()).await?;
        recaptured = Some(
            schema::capture::capture(
                shared.store.as_ref(),
                client,
                &CaptureRequest {
                    tool: &tool,
                    settings: db,
                    snapshot_id,
                    run_id: &shared.run_id,
                    schemas: &schemas,
                    parent: parent.as_deref(),
                },
            )
            .await?,
        );
    }
    let sequences = catalog::sequences(client, db, &opts.selection.schemas).await?;
    let mut state = shared.state.lock().await;
    let doc = &mut state.doc;
    if let Some((dump, warnings)) = recaptured {
        doc.schema_dump = Some(dump);
        doc.schema_slice = slice;
        for warning in warnings {
            if !doc.warnings.contains(&warning) {
                doc.warnings.push(warning);
            }
        }
    }
    doc.sequences = sequences;
    for table in &mut doc.tables {
        table.consistent_in_slice = Some(slice);
        table.pass_base = None;
    }
    doc.consistent_in_slice = Some(slice);
    tracing::info!(
        run_id = doc.run_id,
        slice,
        rounds = doc.pass.as_ref().map_or(0, |p| p.round),
        "every table is of one snapshot"
    );
    shared.flush(&mut state).await
}

/// The schemas whose objects a backup's schema dump covers: the selected schemas (or the
/// listed tables'), and every schema a partition of a covered table lives in.
fn dump_schemas(selection: &TableSelection, progress: &RunProgress) -> Vec<String> {
    let mut schemas: Vec<String> = if selection.tables.is_empty() {
        if selection.schemas.is_empty() {
            vec!["public".to_owned()]
        } else {
            selection.schemas.clone()
        }
    } else {
        Vec::new()
    };
    for table in &progress.tables {
        schemas.push(table.name.schema.clone());
        schemas.extend(
            table
                .schema
                .partitions
                .iter()
                .map(|p| p.name.schema.clone()),
        );
    }
    schemas.sort();
    schemas.dedup();
    schemas
}

fn sealed_report(manifest: &Manifest, started: Instant, requests: u64) -> SliceReport {
    SliceReport {
        run_id: manifest.id.clone(),
        done: true,
        kind: manifest.kind,
        parent: manifest.parent.clone(),
        sealed: true,
        slice: manifest.totals.slices,
        tables: manifest.tables.len(),
        tables_done: manifest.tables.len(),
        pass_round: manifest.consistency.as_ref().map(|c| c.pass_rounds),
        consistent: Some(manifest.is_consistent()),
        chunks: 0,
        rows: 0,
        bytes: 0,
        raw_bytes: 0,
        store_requests: requests,
        seconds: started.elapsed().as_secs_f64(),
    }
}

async fn write_progress(
    store: &dyn WriteStore,
    progress: &RunProgress,
    condition: WriteCondition,
) -> Result<ETag, RunError> {
    match write_doc(store, &progress_key(&progress.run_id), progress, condition).await {
        Ok(receipt) => Ok(receipt.etag),
        Err(crate::format::FormatError::Store(StoreError::PreconditionFailed { .. })) => {
            Err(RunError::Conflict {
                run_id: progress.run_id.clone(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Plans a new run inside the coordinator's snapshot: tables, scopes, marks, sequences.
async fn plan_run(
    client: &mut Client,
    db: &DbSettings,
    store: &dyn WriteStore,
    opts: &ExportOptions,
    run_id: Option<String>,
) -> Result<RunProgress, RunError> {
    let now = Utc::now();
    let row = client
        .query_one(
            "SELECT pg_current_snapshot()::text, current_setting('server_version'), current_database(), \
                    (SELECT system_identifier::text FROM pg_control_system())",
            &[],
        )
        .await
        .map_err(|e| DbError::query("reading the snapshot", db, e))?;
    let snapshot_text: String = row.get(0);
    let snapshot: PgSnapshot = snapshot_text.parse().map_err(|reason| RunError::Table {
        table: crate::format::TableName::new("pg_catalog", "pg_current_snapshot"),
        detail: reason,
        retryable: false,
    })?;
    let tables = catalog::discover(client, db, &opts.selection).await?;
    let sequences = catalog::sequences(client, db, &opts.selection.schemas).await?;

    let mut warnings = Vec::new();
    let parent = if opts.full {
        None
    } else {
        match read_doc::<Checkpoint>(store, CHECKPOINT_KEY).await? {
            None => None,
            Some((checkpoint, _)) => {
                match crate::format::manifest::read_manifest(store, &checkpoint.backup_id).await {
                    Ok(Some(manifest)) => Some((checkpoint, manifest)),
                    // Never build on a manifest edited after it was sealed.
                    Err(crate::format::FormatError::Invalid { key, reason }) => {
                        warnings.push(format!(
                            "the checkpoint's manifest {key} is {reason}; taking a full backup"
                        ));
                        None
                    }
                    Err(e) => return Err(e.into()),
                    Ok(None) => {
                        warnings.push(format!(
                            "the checkpoint's backup {} has no manifest; taking a full backup",
                            checkpoint.backup_id
                        ));
                        None
                    }
                }
            }
        }
    };
    let system_identifier: Option<String> = row.get(3);
    // A chain continues only on the same server with the same transaction counter, and
    // only while 32-bit xid comparisons still order it.
    let parent = match parent {
        Some((checkpoint, manifest)) => {
            match chain_break(&checkpoint, &snapshot, system_identifier.as_deref()) {
                Some(reason) => {
                    let warning =
                        format!("taking a full backup instead of an incremental: {reason}");
                    tracing::warn!("{warning}");
                    warnings.push(warning);
                    None
                }
                None => Some((checkpoint, manifest)),
            }
        }
        None => None,
    };
    let kind = if parent.is_some() {
        BackupKind::Incremental
    } else {
        BackupKind::Full
    };
    let mut planned = Vec::with_capacity(tables.len());
    for table in tables {
        planned.push(plan_table(client, db, table, parent.as_ref(), opts).await?);
    }
    let run_id = run_id.unwrap_or_else(|| new_run_id(now));
    let deep = opts.deep
        || (opts.deep_every > 0
            && parent
                .as_ref()
                .is_some_and(|(cp, _)| cp.runs_since_deep + 1 >= opts.deep_every));
    Ok(RunProgress {
        deep,
        version: FORMAT_VERSION,
        run_id: run_id.clone(),
        kind,
        parent: parent.as_ref().map(|(c, _)| c.backup_id.clone()),
        chain: match &parent {
            Some((_, manifest)) => {
                let mut chain = manifest.chain.clone();
                if chain.is_empty() {
                    chain.push(manifest.id.clone());
                }
                chain
            }
            None => Vec::new(),
        },
        started_at: now,
        snapshot,
        server_version: row.get(1),
        system_identifier,
        database: row.get(2),
        settings: ExportSettings {
            chunk_rows: opts.chunk_rows.max(1),
            chunk_bytes: opts.chunk_bytes.max(1),
            zstd_level: opts.zstd_level,
            gap_ttl_secs: opts.gap_ttl.as_secs(),
        },
        tables: planned,
        sequences,
        schema_dump: None,
        schema_slice: 0,
        slice_snapshots: Vec::new(),
        pass: None,
        consistent_in_slice: None,
        inconsistent: None,
        slices: 1,
        store_requests: 0,
        warnings,
    })
}

/// 32-bit transaction ids wrap around at this.
const XID_WRAP: u64 = 1 << 32;

/// Transactions since a snapshot beyond which a 32-bit `xmin` no longer tells whether a
/// row was written before or after it.
const MAX_XID_DISTANCE: u64 = 1 << 31;

/// Why no chain may continue from `parent` at `now`: another server, a transaction
/// counter that went backwards (a restored copy), or too many transactions since.
fn chain_break(
    parent: &Checkpoint,
    now: &PgSnapshot,
    system_identifier: Option<&str>,
) -> Option<String> {
    if let (Some(was), Some(is)) = (parent.system_identifier.as_deref(), system_identifier) {
        if was != is {
            return Some(format!(
                "the database is on another server (system identifier {is}, the parent backup's {was})"
            ));
        }
    }
    if now.xmax < parent.snapshot.xmin {
        return Some(format!(
            "the server's transaction counter went backwards (now {}, the parent backup's {}): a restored or another copy of the database",
            now.xmax, parent.snapshot.xmin
        ));
    }
    if now.xmax - parent.snapshot.xmin >= MAX_XID_DISTANCE {
        return Some(format!(
            "{} transactions since the parent backup, more than 2^31: row versions can no longer be ordered by xid",
            now.xmax - parent.snapshot.xmin
        ));
    }
    None
}

/// `name type` of each exported column: a change means the chain cannot continue.
pub(crate) fn table_shape(
    columns: &[String],
    schema: &crate::format::manifest::TableSchema,
) -> Vec<String> {
    columns
        .iter()
        .map(|c| {
            let ty = schema
                .columns
                .iter()
                .find(|d| &d.name == c)
                .map(|d| d.type_name.as_str())
                .unwrap_or("?");
            format!("{c} {ty}")
        })
        .collect()
}

async fn plan_table(
    client: &Client,
    db: &DbSettings,
    table: CatalogTable,
    parent: Option<&(Checkpoint, Manifest)>,
    opts: &ExportOptions,
) -> Result<TableProgress, RunError> {
    // The parent's link for this table, trusted only if it is provably the same table.
    let mut new_chain = None;
    let previous: Option<(&TableCheckpoint, &crate::format::manifest::TableEntry)> = match parent {
        None => None,
        Some((checkpoint, manifest)) => {
            let cp = checkpoint.tables.iter().find(|t| t.name == table.name);
            let entry = manifest.tables.iter().find(|t| t.name == table.name);
            match (cp, entry) {
                (Some(cp), Some(entry)) => {
                    let reason = match &cp.identity {
                        None => Some("the parent recorded no identity for it".to_owned()),
                        Some(was) => table.identity.change_from(was),
                    }
                    .or_else(|| {
                        (cp.mode != table.mode)
                            .then(|| format!("its mode changed ({} to {})", cp.mode, table.mode))
                    });
                    match reason {
                        None => Some((cp, entry)),
                        Some(reason) => {
                            new_chain = Some(reason);
                            None
                        }
                    }
                }
                _ => {
                    new_chain = Some("it is not in the parent backup".to_owned());
                    None
                }
            }
        }
    };
    let avg_row = if table.est_rows >= 1.0 {
        (table.heap_bytes as f64 / table.est_rows).max(16.0)
    } else {
        100.0
    };
    let rows_per_chunk =
        ((opts.chunk_bytes as f64 / avg_row) as u64).clamp(1, opts.chunk_rows.max(1));
    let mut progress = TableProgress {
        name: table.name.clone(),
        mode: table.mode,
        columns: table.columns.clone(),
        key: table.key.iter().map(|(n, _)| n.clone()).collect(),
        scope: ExportScope::Whole,
        inherited: Vec::new(),
        inherited_keys: Fingerprint::default(),
        key_fingerprint: Fingerprint::default(),
        truth: None,
        gaps_to_probe: Vec::new(),
        gaps: Vec::new(),
        rows_per_chunk,
        lanes: Vec::new(),
        gaps_probed: true,
        done: false,
        chunks: Vec::new(),
        key_chunks: Vec::new(),
        next_seq: 1,
        fingerprint: Fingerprint::default(),
        exported_rows: 0,
        started_in_slice: 0,
        consistent_in_slice: None,
        pass_base: None,
        est_rows: table.est_rows,
        identity: Some(table.identity.clone()),
        new_chain,
        schema: table.schema.clone(),
    };
    match table.mode {
        TableMode::Snapshot => {}
        TableMode::Changes => {
            if let (Some((checkpoint, _)), Some((_, entry))) = (parent, previous) {
                progress.scope = ExportScope::Changed {
                    since_xmin: checkpoint.snapshot.xmin,
                };
                progress.inherited = entry.chunks.clone();
            }
        }
        TableMode::Append => {
            let relation = table.name.own_rows(table.schema.is_partitioned());
            let mark = append_mark(client, db, &table.name, &relation, &table.key[0].0).await?;
            match previous {
                Some((cp, entry)) if cp.append_cursor.is_some() && cp.key_fingerprint.is_some() => {
                    let after = cp.append_cursor;
                    progress.scope = ExportScope::Appended {
                        after,
                        upto: mark.max(after),
                    };
                    progress.inherited = entry.chunks.clone();
                    progress.inherited_keys = cp.key_fingerprint.unwrap_or_default();
                    progress.gaps_to_probe = cp.gaps.clone();
                    progress.gaps_probed = cp.gaps.is_empty();
                }
                _ => {
                    progress.scope = ExportScope::Appended {
                        after: None,
                        upto: mark,
                    };
                }
            }
        }
    }
    progress.lanes = plan_lanes(client, db, &progress, table.est_rows, opts.workers).await?;
    Ok(progress)
}

/// One lane over the key range a table's scope covers, `(after, until]` with `None`
/// open; `None` for an empty `append` range.
fn scope_lane(table: &TableProgress) -> Option<Lane> {
    let (after, until) = match table.scope {
        ExportScope::Appended { after, upto } => {
            let upto = upto?;
            if after.is_some_and(|a| upto <= a) {
                return None;
            }
            (
                after.map(|a| vec![a.to_string()]),
                Some(vec![upto.to_string()]),
            )
        }
        _ => (None, None),
    };
    Some(Lane {
        after,
        until,
        cursor: None,
        done: false,
    })
}

/// Splits a keyed table into up to `workers` lanes of about equal row counts (bounds from
/// an index-only scan), so that several connections export one big table at once.
async fn plan_lanes(
    client: &Client,
    db: &DbSettings,
    table: &TableProgress,
    est_rows: f64,
    workers: usize,
) -> Result<Vec<Lane>, RunError> {
    let Some(whole) = scope_lane(table) else {
        return Ok(Vec::new());
    };
    let (after, until) = (whole.after.clone(), whole.until.clone());
    let wanted = if table.key.is_empty() {
        1
    } else {
        ((est_rows / table.rows_per_chunk.max(1) as f64).ceil() as usize).clamp(1, workers.max(1))
    };
    if wanted == 1 {
        return Ok(vec![whole]);
    }
    let mut lower = Vec::new();
    if let Some(a) = &after {
        lower.push(key_compare(table, ">", a));
    }
    if let Some(u) = &until {
        lower.push(key_compare(table, "<=", u));
    }
    let condition = if lower.is_empty() {
        "true".to_owned()
    } else {
        lower.join(" AND ")
    };
    let step = (est_rows / wanted as f64).max(1.0) as u64;
    let mut bounds: Vec<Vec<String>> = Vec::new();
    for i in 1..wanted {
        let sql = format!(
            "SELECT {} FROM {} WHERE {condition} ORDER BY {} OFFSET {} LIMIT 1",
            bound_columns(table),
            table.own_rows(),
            column_list(&table.key),
            step * i as u64
        );
        let row = client.query_opt(&sql, &[]).await.map_err(db_err(
            table,
            db,
            "splitting the table into lanes",
        ))?;
        let Some(row) = row else { break };
        let bound: Vec<String> = (0..table.key.len())
            .map(|i| row.try_get::<_, String>(i))
            .collect::<Result<_, _>>()
            .map_err(db_err(table, db, "reading a lane bound"))?;
        if bounds.last() != Some(&bound) {
            bounds.push(bound);
        }
    }
    let mut lanes = Vec::with_capacity(bounds.len() + 1);
    let mut previous = after;
    for bound in bounds {
        lanes.push(Lane {
            after: previous.clone(),
            until: Some(bound.clone()),
            cursor: None,
            done: false,
        });
        previous = Some(bound);
    }
    lanes.push(Lane {
        after: previous,
        until,
        cursor: None,
        done: false,
    });
    Ok(lanes)
}

/// `k1::text AS tidemark_bound_0, ...`: aliased, so that ORDER BY names the key columns,
/// not these text casts.
fn bound_columns(table: &TableProgress) -> String {
    table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{}::text AS tidemark_bound_{i}", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

struct ProgressState {
    doc: RunProgress,
    etag: ETag,
    last_write: Instant,
    /// How long the last progress write took.
    write_cost: Duration,
}

/// One unit of work of a slice.
#[derive(Debug, Clone, Copy)]
enum Work {
    /// Probe an `append` table's earlier gaps for late commits.
    Probe(usize),
    /// Export the ranges of one lane of a keyed table.
    Lane(usize, usize),
    /// Export a keyless table whole.
    Keyless(usize),
    /// Every lane is done: check and mark the table done.
    Finalize(usize),
}

/// The work left in a run, in table order.
fn work_left(doc: &RunProgress) -> VecDeque<Work> {
    let mut queue = VecDeque::new();
    for (t, table) in doc.tables.iter().enumerate() {
        if table.done {
            continue;
        }
        if table.key.is_empty() {
            queue.push_back(Work::Keyless(t));
            continue;
        }
        if !table.gaps_probed {
            queue.push_back(Work::Probe(t));
        }
        let open: Vec<usize> = (0..table.lanes.len())
            .filter(|&l| !table.lanes[l].done)
            .collect();
        if open.is_empty() && table.gaps_probed {
            queue.push_back(Work::Finalize(t));
        }
        queue.extend(open.into_iter().map(|l| Work::Lane(t, l)));
    }
    queue
}

/// What one piece of work adds to a table.
#[derive(Debug, Default)]
struct Delta {
    chunks: Vec<ChunkRef>,
    key_chunks: Vec<ChunkRef>,
    fingerprint: Fingerprint,
    /// `append`: the keys exported.
    key_fingerprint: Fingerprint,
    gaps: Vec<GapRange>,
}

impl Delta {
    fn apply(self, table: &mut TableProgress) {
        for chunk in &self.chunks {
            table.exported_rows += chunk.rows;
        }
        table.chunks.extend(self.chunks);
        table.key_chunks.extend(self.key_chunks);
        table.fingerprint = table.fingerprint.combine(self.fingerprint);
        table.key_fingerprint = table.key_fingerprint.combine(self.key_fingerprint);
        table.gaps.extend(self.gaps);
        if table.gaps.len() > MAX_GAPS {
            table.gaps.sort_by_key(|g| (g.seen_at, g.from));
            let excess = table.gaps.len() - MAX_GAPS;
            table.gaps.drain(..excess);
        }
    }
}

struct Shared {
    store: Arc<dyn WriteStore>,
    counting: Arc<CountingStore>,
    base_requests: u64,
    state: Mutex<ProgressState>,
    /// Keeps the run's lease renewed while the slice works.
    heartbeat: lease::Heartbeat,
    queue: std::sync::Mutex<VecDeque<Work>>,
    opts: ExportOptions,
    meter: Arc<ExportMeter>,
    slice_rows: AtomicU64,
    slice_bytes: AtomicU64,
    slice_raw: AtomicU64,
    slice_chunks: AtomicU64,
    /// Some work of this slice is recorded in the progress.
    recorded: AtomicBool,
    /// A consistency-pass round is running in this slice.
    in_round: AtomicBool,
    snapshot_id: String,
    slice: u32,
    run_id: String,
}

impl Shared {
    /// Whether to start no more work. Every slice records at least one piece of work
    /// first, whatever its deadline, so a loop of slices always finishes the run.
    fn past_deadline(&self) -> bool {
        if self.in_round.load(Ordering::Relaxed) {
            // A consistency round only counts if it finishes in this snapshot: it may
            // run past the slice's deadline, up to the pass deadline.
            return self.opts.pass_deadline.is_some_and(|d| Instant::now() >= d);
        }
        self.past_soft_deadline()
    }

    /// The slice's own deadline (after its first recorded piece of work).
    fn past_soft_deadline(&self) -> bool {
        self.recorded.load(Ordering::Relaxed)
            && self.opts.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn next_work(&self) -> Option<Work> {
        self.queue.lock().ok()?.pop_front()
    }

    /// Puts `work` back at the head of the queue (to redo it).
    fn push_front(&self, work: Work) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.push_front(work);
        }
    }

    fn push_work(&self, work: Work) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.push_back(work);
        }
    }

    fn count_chunk(&self, chunk: &ChunkRef) {
        self.slice_chunks.fetch_add(1, Ordering::Relaxed);
        self.slice_bytes.fetch_add(chunk.bytes, Ordering::Relaxed);
        self.slice_raw.fetch_add(chunk.raw_bytes, Ordering::Relaxed);
        self.meter.chunks.fetch_add(1, Ordering::Relaxed);
        self.meter.bytes.fetch_add(chunk.bytes, Ordering::Relaxed);
        self.meter
            .raw_bytes
            .fetch_add(chunk.raw_bytes, Ordering::Relaxed);
        if chunk.kind == ChunkKind::Rows {
            self.slice_rows.fetch_add(chunk.rows, Ordering::Relaxed);
            self.meter.rows.fetch_add(chunk.rows, Ordering::Relaxed);
        }
    }

    /// Starts streaming chunk `seq` of `table` (named for this run and slice).
    fn open_sink(&self, table: &TableName, seq: u32, kind: ChunkKind) -> ChunkSink {
        ChunkSink::open(
            self.store.clone(),
            chunk_key(&self.run_id, table, seq, self.slice, kind),
            kind,
            &self.run_id,
            self.opts.zstd_level,
        )
    }

    /// Completes a chunk and counts it.
    async fn land(&self, sink: ChunkSink, range: Option<KeyRange>) -> Result<ChunkRef, RunError> {
        let chunk = sink.finish(range).await?;
        self.count_chunk(&chunk);
        Ok(chunk)
    }

    /// The table as it stands, noting the slice its export started in.
    async fn begin(&self, t: usize) -> TableProgress {
        let mut state = self.state.lock().await;
        let table = &mut state.doc.tables[t];
        if table.started_in_slice == 0 {
            table.started_in_slice = self.slice;
        }
        table.clone()
    }

    /// A chunk sequence number of table `t`, unique within the run.
    async fn next_seq(&self, t: usize) -> u32 {
        let mut state = self.state.lock().await;
        let table = &mut state.doc.tables[t];
        let seq = table.next_seq;
        table.next_seq += 1;
        seq
    }

    /// Adds `delta` (and a lane's new state) to table `t`; writes the progress document
    /// when due. Returns whether every piece of the table is now exported.
    async fn record(
        &self,
        t: usize,
        lane: Option<(usize, Lane)>,
        delta: Delta,
        probed: bool,
    ) -> Result<bool, RunError> {
        self.recorded.store(true, Ordering::Relaxed);
        let mut state = self.state.lock().await;
        let table = &mut state.doc.tables[t];
        delta.apply(table);
        if let Some((l, lane)) = lane {
            table.lanes[l] = lane;
        }
        if probed {
            table.gaps_probed = true;
            table.gaps_to_probe.clear();
        }
        let complete = !table.done && table.gaps_probed && table.lanes.iter().all(|l| l.done);
        self.flush_if_due(&mut state).await?;
        Ok(complete)
    }

    /// Replaces table `t` wholesale (a restart) and records it.
    async fn replace(&self, t: usize, table: TableProgress) -> Result<(), RunError> {
        let mut state = self.state.lock().await;
        state.doc.tables[t] = table;
        self.flush(&mut state).await
    }

    async fn mark_done(&self, t: usize) -> Result<(), RunError> {
        let mut state = self.state.lock().await;
        let in_round = state
            .doc
            .pass
            .as_ref()
            .is_some_and(|p| p.slice == self.slice);
        let table = &mut state.doc.tables[t];
        if !table.done {
            table.done = true;
            self.meter.tables_done.fetch_add(1, Ordering::Relaxed);
        }
        if in_round {
            // Brought to this slice's snapshot by this round.
            table.consistent_in_slice = Some(self.slice);
            table.pass_base = None;
        }
        self.flush_if_due(&mut state).await
    }

    /// Writes the progress when due: at once after work that took longer than a few
    /// progress writes (a range of real size is recorded as it finishes, so a kill loses
    /// only what was in flight), but never spending more than a fifth of the time writing
    /// it (a run of thousands of small tables would otherwise rewrite a document that
    /// lists them all after each one: quadratic).
    async fn flush_if_due(&self, state: &mut ProgressState) -> Result<(), RunError> {
        let since = state.last_write.elapsed();
        if since >= self.opts.progress_interval && since >= state.write_cost * 4 {
            self.flush(state).await?;
        }
        Ok(())
    }

    async fn warn(&self, message: String) {
        tracing::warn!("{message}");
        self.state.lock().await.doc.warnings.push(message);
    }

    async fn flush(&self, state: &mut ProgressState) -> Result<(), RunError> {
        self.heartbeat.check()?;
        let started = Instant::now();
        state.doc.store_requests = self.base_requests + self.counting.count() + 1;
        state.etag = write_progress(
            self.store.as_ref(),
            &state.doc,
            WriteCondition::IfMatch(state.etag.clone()),
        )
        .await?;
        state.last_write = Instant::now();
        state.write_cost = started.elapsed();
        Ok(())
    }
}

/// Times a worker reconnects in one slice after losing its connection.
const RECONNECTS: u32 = 5;

async fn worker(shared: Arc<Shared>, db: DbSettings) -> Result<(), RunError> {
    let mut client = db::connect(&db).await?;
    let mut reconnects = 0;
    while !shared.past_deadline() {
        let Some(work) = shared.next_work() else {
            break;
        };
        let result = async {
            import_snapshot(&client, &db, &shared.snapshot_id).await?;
            do_work(&shared, &client, &db, work).await
        }
        .await;
        let _ = client.batch_execute("COMMIT").await;
        let Err(err) = result else { continue };
        if !(client.is_closed() && err.is_retryable()) || reconnects >= RECONNECTS {
            return Err(err);
        }
        // The connection died (backend terminated, server restarted, failover): redo
        // the work on a new one, in the same snapshot while the coordinator holds it.
        reconnects += 1;
        tracing::warn!(run_id = shared.run_id, attempt = reconnects, error = %err, "lost the database connection; redoing the work on a new one");
        shared.push_front(work);
        client = reconnect(&db, reconnects).await?;
        import_snapshot(&client, &db, &shared.snapshot_id)
            .await
            .map_err(|e| RunError::SnapshotLost {
                detail: e.to_string(),
            })?;
        let _ = client.batch_execute("COMMIT").await;
    }
    Ok(())
}

async fn import_snapshot(
    client: &Client,
    db: &DbSettings,
    snapshot_id: &str,
) -> Result<(), RunError> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot_id)
        ))
        .await
        .map_err(|e| DbError::query("importing the snapshot", db, e).into())
}

/// A new connection after the `attempt`-th loss, waiting a little longer each time for
/// a restarting server (about a minute in all).
async fn reconnect(db: &DbSettings, attempt: u32) -> Result<Client, RunError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(500 * u64::from(attempt));
    loop {
        tokio::time::sleep(delay).await;
        match db::connect(db).await {
            Ok(client) => return Ok(client),
            Err(e) if e.is_retryable() && started.elapsed() < Duration::from_secs(60) => {
                tracing::warn!(error = %e, "the database is not reachable yet");
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn do_work(
    shared: &Shared,
    client: &Client,
    db: &DbSettings,
    work: Work,
) -> Result<(), RunError> {
    match work {
        Work::Keyless(t) => {
            // A keyless table has no cursor: it is exported whole within one slice.
            let mut table = shared.begin(t).await;
            reset(&mut table, shared.slice);
            shared.replace(t, table.clone()).await?;
            let delta = export_keyless(shared, client, db, &table, t).await?;
            shared.record(t, None, delta, false).await?;
            shared.mark_done(t).await
        }
        Work::Probe(t) => {
            let table = shared.begin(t).await;
            let delta = probe_gaps(shared, client, db, &table, t).await?;
            if shared.record(t, None, delta, true).await? {
                finalize(shared, client, db, t).await?;
            }
            Ok(())
        }
        Work::Lane(t, l) => {
            let table = shared.begin(t).await;
            let mut lane = table.lanes[l].clone();
            while !lane.done {
                if shared.past_deadline() {
                    return Ok(());
                }
                let seq = shared.next_seq(t).await;
                let (delta, next) = export_range(shared, client, db, &table, &lane, seq).await?;
                lane = next;
                if shared
                    .record(t, Some((l, lane.clone())), delta, false)
                    .await?
                {
                    finalize(shared, client, db, t).await?;
                }
            }
            Ok(())
        }
        Work::Finalize(t) => finalize(shared, client, db, t).await,
    }
}

/// Clears what a run exported of a table, to export it again.
fn reset(table: &mut TableProgress, slice: u32) {
    table.chunks.clear();
    table.key_chunks.clear();
    table.fingerprint = Fingerprint::default();
    table.exported_rows = 0;
    table.gaps.clear();
    table.key_fingerprint = Fingerprint::default();
    table.truth = None;
    table.started_in_slice = slice;
}

/// All of a table is exported: for an `append` table, take the source's truth and check
/// the chain against it; then mark it done.
async fn finalize(
    shared: &Shared,
    client: &Client,
    db: &DbSettings,
    t: usize,
) -> Result<(), RunError> {
    let table = shared.begin(t).await;
    if let ExportScope::Appended { upto, .. } = table.scope {
        match check_append(shared, client, db, &table, upto).await? {
            AppendCheck::ExportWhole(whole) => {
                shared.replace(t, *whole).await?;
                shared.push_work(Work::Lane(t, 0));
                return Ok(());
            }
            AppendCheck::Truth(truth) => {
                shared.state.lock().await.doc.tables[t].truth = Some(truth);
            }
            AppendCheck::Later => {}
        }
    }
    shared.mark_done(t).await
}

fn db_err<'a>(
    table: &TableProgress,
    db: &'a DbSettings,
    what: &'static str,
) -> impl Fn(tokio_postgres::Error) -> RunError + 'a {
    let name = table.name.clone();
    move |e| RunError::table(&name, DbError::query(what, db, e))
}

fn column_list(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `(k1, k2) OP ('v1'::t1, 'v2'::t2)`.
fn key_compare(table: &TableProgress, op: &str, values: &[String]) -> String {
    let types: Vec<&str> = table
        .key
        .iter()
        .map(|k| {
            table
                .schema
                .columns
                .iter()
                .find(|c| &c.name == k)
                .map(|c| c.type_name.as_str())
                .unwrap_or("text")
        })
        .collect();
    let literals = values
        .iter()
        .zip(types)
        .map(|(v, t)| format!("{}::{t}", quote_literal(v)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("({}) {op} ({literals})", column_list(&table.key))
}

fn first_i64(values: Option<&Vec<String>>) -> Option<i64> {
    values.and_then(|v| v.first()).and_then(|v| v.parse().ok())
}

/// Exports the next key range of `lane` as chunk `seq`; returns what it added and the
/// lane's new state.
async fn export_range(
    shared: &Shared,
    client: &Client,
    db: &DbSettings,
    table: &TableProgress,
    lane: &Lane,
    seq: u32,
) -> Result<(Delta, Lane), RunError> {
    let name = table.own_rows();
    let keys = column_list(&table.key);
    let lower = lane.cursor.as_ref().or(lane.after.as_ref());
    let mut conditions = Vec::new();
    if let Some(after) = lower {
        conditions.push(key_compare(table, ">", after));
    }
    let mut bound_conditions = conditions.clone();
    if let Some(until) = &lane.until {
        bound_conditions.push(key_compare(table, "<=", until));
    }
    let where_bound = if bound_conditions.is_empty() {
        "true".to_owned()
    } else {
        bound_conditions.join(" AND ")
    };
    let bound_sql = format!(
        "SELECT {} FROM {name} WHERE {where_bound} ORDER BY {keys} OFFSET {} LIMIT 1",
        bound_columns(table),
        table.rows_per_chunk.saturating_sub(1)
    );
    let bound: Option<Vec<String>> = match client
        .query_opt(&bound_sql, &[])
        .await
        .map_err(db_err(table, db, "finding the next key range"))?
    {
        Some(row) => Some(
            (0..table.key.len())
                .map(|i| row.try_get::<_, String>(i))
                .collect::<Result<_, _>>()
                .map_err(db_err(table, db, "reading a key bound"))?,
        ),
        None => None,
    };
    let last = bound.is_none() || bound == lane.until;
    let upper = bound.or_else(|| lane.until.clone());
    if let Some(u) = &upper {
        conditions.push(key_compare(table, "<=", u));
    }
    let condition = if conditions.is_empty() {
        "true".to_owned()
    } else {
        conditions.join(" AND ")
    };
    let range = KeyRange {
        after: lower.cloned(),
        upto: upper.clone(),
    };
    let changed_since = match table.scope {
        ExportScope::Changed { since_xmin } => Some(since_xmin),
        _ => None,
    };
    // Key columns that are not exported (generated ones, which COPY FROM refuses) are
    // read after the row's columns, for the key set and the append keys, and cut off the
    // row before it is written.
    let hidden_keys: Vec<String> = table
        .key
        .iter()
        .filter(|k| !table.columns.contains(k))
        .cloned()
        .collect();
    let read_columns: Vec<String> = table.columns.iter().chain(&hidden_keys).cloned().collect();
    let select = match changed_since {
        // Everything written at or after the parent's snapshot xmin counts as changed:
        // xmin in the window [since, this snapshot's xmax) of 64-bit xids. xmin is 32-bit,
        // so the window is taken modulo 2^32 (it is shorter than 2^31: see chain_break).
        // Not age(xmin): a frozen row keeps its raw xmin, and one written 2^31 or more
        // xids ago would look newer than the parent and be exported again every time.
        Some(since) => format!(
            "SELECT {}{}(xmin::text::bigint - {low} + {wrap}) % {wrap} \
               < (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint - {since}) \
             FROM {name} WHERE {condition}",
            column_list(&read_columns),
            if read_columns.is_empty() { "" } else { ", " },
            low = since % XID_WRAP,
            wrap = XID_WRAP,
        ),
        None => format!(
            "SELECT {} FROM {name} WHERE {condition}",
            column_list(&read_columns)
        ),
    };
    let key_positions: Vec<usize> = table
        .key
        .iter()
        .filter_map(|k| read_columns.iter().position(|c| c == k))
        .collect();
    let collect_append = matches!(table.scope, ExportScope::Appended { .. });
    let mut rows_sink: Option<ChunkSink> = None;
    let mut keys_sink: Option<ChunkSink> = None;
    let mut delta = Delta::default();
    let mut append_keys: Vec<i64> = Vec::new();
    let result: Result<(), RunError> = async {
        let stream = client
            .copy_out(&format!("COPY ({select}) TO STDOUT"))
            .await
            .map_err(db_err(table, db, "starting COPY"))?;
        pin_mut!(stream);
        let mut splitter = LineSplitter::default();
        let mut stripped = Vec::new();
        let mut row = Vec::new();
        let mut key_line = Vec::with_capacity(64);
        while let Some(block) =
            stream
                .try_next()
                .await
                .map_err(db_err(table, db, "reading COPY data"))?
        {
            for raw in splitter.feed(block) {
                let (full, export): (&[u8], bool) = match changed_since {
                    Some(_) => {
                        // "...\tt\n" or "...\tf\n" ("t\n" alone with no columns):
                        // strip the flag column.
                        let changed = raw.len() >= 2 && raw[raw.len() - 2] == b't';
                        let flag = if read_columns.is_empty() { 2 } else { 3 };
                        stripped.clear();
                        stripped.extend_from_slice(&raw[..raw.len().saturating_sub(flag)]);
                        stripped.push(b'\n');
                        (&stripped, changed)
                    }
                    None => (&raw, true),
                };
                // The row as stored: the exported columns only.
                let line: &[u8] = if hidden_keys.is_empty() {
                    full
                } else {
                    row.clear();
                    row.extend_from_slice(leading_fields(full, table.columns.len()));
                    row.push(b'\n');
                    &row
                };
                delta.fingerprint.add_line(line);
                if collect_append {
                    if let Some(k) = copy_field(full, key_positions[0])
                        .and_then(|f| std::str::from_utf8(f).ok())
                        .and_then(|f| f.parse::<i64>().ok())
                    {
                        append_keys.push(k);
                        delta.key_fingerprint.add_key(k);
                    }
                }
                if export {
                    let sink = rows_sink
                        .get_or_insert_with(|| shared.open_sink(&table.name, seq, ChunkKind::Rows));
                    sink.write_line(line).await?;
                }
                if changed_since.is_some() {
                    key_line.clear();
                    for (i, pos) in key_positions.iter().enumerate() {
                        if i > 0 {
                            key_line.push(b'\t');
                        }
                        key_line.extend_from_slice(copy_field(full, *pos).unwrap_or_default());
                    }
                    key_line.push(b'\n');
                    let sink = keys_sink
                        .get_or_insert_with(|| shared.open_sink(&table.name, seq, ChunkKind::Keys));
                    sink.write_line(&key_line).await?;
                }
            }
        }
        if splitter.remainder() > 0 {
            return Err(RunError::Table {
                table: table.name.clone(),
                detail: "COPY output ended in the middle of a row".into(),
                retryable: true,
            });
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        for sink in [rows_sink, keys_sink].into_iter().flatten() {
            sink.abort().await;
        }
        return Err(e);
    }
    if let Some(sink) = rows_sink {
        delta
            .chunks
            .push(shared.land(sink, Some(range.clone())).await?);
    }
    if let Some(sink) = keys_sink {
        delta
            .key_chunks
            .push(shared.land(sink, Some(range.clone())).await?);
    }
    if collect_append {
        delta.gaps = find_gaps(
            &mut append_keys,
            first_i64(lower),
            first_i64(upper.as_ref()),
        );
    }
    let mut next = lane.clone();
    if upper.is_some() {
        next.cursor = upper;
    }
    next.done = last;
    Ok((delta, next))
}

/// The key ranges in `(after, upto]` that no visible row had.
fn find_gaps(keys: &mut [i64], after: Option<i64>, upto: Option<i64>) -> Vec<GapRange> {
    keys.sort_unstable();
    let now = Utc::now();
    let mut gaps = Vec::new();
    let mut expected = after.map(|a| a.saturating_add(1));
    for &k in keys.iter() {
        if let Some(e) = expected {
            if k > e {
                gaps.push(GapRange {
                    from: e,
                    to: k - 1,
                    seen_at: now,
                });
            }
        }
        expected = Some(k.saturating_add(1));
    }
    if let (Some(e), Some(u)) = (expected, upto) {
        if u >= e {
            gaps.push(GapRange {
                from: e,
                to: u,
                seen_at: now,
            });
        }
    }
    gaps
}

/// Looks again at earlier gaps of an `append` table: rows that committed late are
/// exported now; gaps still empty are kept until their TTL.
async fn probe_gaps(
    shared: &Shared,
    client: &Client,
    db: &DbSettings,
    table: &TableProgress,
    t: usize,
) -> Result<Delta, RunError> {
    let mut delta = Delta::default();
    let gaps = &table.gaps_to_probe;
    if gaps.is_empty() {
        return Ok(delta);
    }
    let key = quote_ident(&table.key[0]);
    let values = gaps
        .iter()
        .map(|g| format!("({}::int8, {}::int8)", g.from, g.to))
        .collect::<Vec<_>>()
        .join(", ");
    let select = format!(
        "SELECT {cols} FROM {name} t JOIN (VALUES {values}) g(lo, hi) ON t.{key} BETWEEN g.lo AND g.hi",
        cols = table
            .columns
            .iter()
            .map(|c| format!("t.{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", "),
        name = table.own_rows(),
    );
    let key_pos = table
        .columns
        .iter()
        .position(|c| c == &table.key[0])
        .unwrap_or(0);
    let seq = shared.next_seq(t).await;
    let stream = client
        .copy_out(&format!("COPY ({select}) TO STDOUT"))
        .await
        .map_err(db_err(table, db, "probing append gaps"))?;
    pin_mut!(stream);
    let mut sink: Option<ChunkSink> = None;
    let mut found: Vec<i64> = Vec::new();
    let mut splitter = LineSplitter::default();
    let streamed: Result<(), RunError> = async {
        while let Some(block) =
            stream
                .try_next()
                .await
                .map_err(db_err(table, db, "probing append gaps"))?
        {
            for line in splitter.feed(block) {
                delta.fingerprint.add_line(&line);
                if let Some(k) = copy_field(&line, key_pos)
                    .and_then(|f| std::str::from_utf8(f).ok())
                    .and_then(|f| f.parse::<i64>().ok())
                {
                    found.push(k);
                    delta.key_fingerprint.add_key(k);
                }
                let s =
                    sink.get_or_insert_with(|| shared.open_sink(&table.name, seq, ChunkKind::Rows));
                s.write_line(&line).await?;
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = streamed {
        if let Some(s) = sink {
            s.abort().await;
        }
        return Err(e);
    }
    if let Some(s) = sink {
        delta.chunks.push(shared.land(s, None).await?);
        tracing::info!(table = %table.name, rows = found.len(), "late-committed rows found in earlier gaps");
    }
    // What is still empty stays a gap, until its TTL.
    found.sort_unstable();
    let ttl = chrono::TimeDelta::seconds(shared.opts.gap_ttl.as_secs() as i64);
    let now = Utc::now();
    for gap in gaps {
        if gap.seen_at + ttl < now {
            continue;
        }
        let mut start = gap.from;
        for &k in found.iter().filter(|&&k| k >= gap.from && k <= gap.to) {
            if k > start {
                delta.gaps.push(GapRange {
                    from: start,
                    to: k - 1,
                    seen_at: gap.seen_at,
                });
            }
            start = k.saturating_add(1);
        }
        if start <= gap.to {
            delta.gaps.push(GapRange {
                from: start,
                to: gap.to,
                seen_at: gap.seen_at,
            });
        }
    }
    Ok(delta)
}

/// What the `append` check found.
#[derive(Debug)]
enum AppendCheck {
    /// The chain does not hold the source's rows: export the table whole (this table).
    ExportWhole(Box<TableProgress>),
    /// The source's truth, taken in this snapshot.
    Truth(AppendTruth),
    /// The table was read in an earlier snapshot: the consistency pass checks it.
    Later,
}

/// For `append` tables: the source's key fingerprint of the rows at or below the mark,
/// taken in this snapshot, must equal the chain's (the parent's plus the keys this run
/// exported) — a count cannot see a delete that a late row makes up for. On a mismatch
/// (a late commit past its TTL or its gap dropped, a delete) the table is exported whole.
/// A deep check also fingerprints those rows whole.
async fn check_append(
    shared: &Shared,
    client: &Client,
    db: &DbSettings,
    table: &TableProgress,
    upto: Option<i64>,
) -> Result<AppendCheck, RunError> {
    if table.started_in_slice != shared.slice {
        return Ok(AppendCheck::Later);
    }
    let deep = shared.state.lock().await.doc.deep;
    let Some(upto) = upto else {
        // Empty at the mark: nothing to hold.
        return Ok(AppendCheck::Truth(AppendTruth {
            keys: Fingerprint::default(),
            rows: deep.then(Fingerprint::default),
        }));
    };
    let whole_here = matches!(table.scope, ExportScope::Appended { after: None, .. })
        && table.inherited.is_empty();
    if whole_here {
        // Exported whole in this snapshot: what was read is what the source held, every
        // row of it.
        return Ok(AppendCheck::Truth(AppendTruth {
            keys: table.key_fingerprint,
            rows: Some(table.fingerprint),
        }));
    }
    let key = quote_ident(&table.key[0]);
    let keys = source_fingerprint(
        client,
        db,
        table,
        &format!(
            "SELECT {key} FROM {} WHERE {key} <= {upto}",
            table.own_rows()
        ),
    )
    .await?;
    let expected = table.inherited_keys.combine(table.key_fingerprint);
    if keys != expected {
        shared
            .warn(format!(
                "append table {}: the source has {} rows at or below key {upto} but the chain holds {} other keys \
                 (a late commit past the gap TTL, or a delete); exporting it whole",
                table.name, keys.rows, expected.rows
            ))
            .await;
        let mut whole = table.clone();
        reset(&mut whole, shared.slice);
        whole.scope = ExportScope::Appended {
            after: None,
            upto: Some(upto),
        };
        whole.inherited.clear();
        whole.inherited_keys = Fingerprint::default();
        whole.gaps_to_probe.clear();
        whole.gaps_probed = true;
        whole.new_chain = Some("its rows no longer matched the chain's".into());
        whole.lanes = vec![Lane {
            after: None,
            until: Some(vec![upto.to_string()]),
            cursor: None,
            done: false,
        }];
        return Ok(AppendCheck::ExportWhole(Box::new(whole)));
    }
    let rows = if deep {
        Some(
            source_fingerprint(
                client,
                db,
                table,
                &format!(
                    "SELECT {} FROM {} WHERE {key} <= {upto}",
                    column_list(&table.columns),
                    table.own_rows()
                ),
            )
            .await?,
        )
    } else {
        None
    };
    Ok(AppendCheck::Truth(AppendTruth { keys, rows }))
}

/// The fingerprint of `select`'s rows, computed from the source's COPY output.
async fn source_fingerprint(
    client: &Client,
    db: &DbSettings,
    table: &TableProgress,
    select: &str,
) -> Result<Fingerprint, RunError> {
    let stream = client
        .copy_out(&format!("COPY ({select}) TO STDOUT"))
        .await
        .map_err(db_err(table, db, "fingerprinting the source"))?;
    pin_mut!(stream);
    let mut fingerprint = Fingerprint::default();
    let mut splitter = LineSplitter::default();
    while let Some(block) =
        stream
            .try_next()
            .await
            .map_err(db_err(table, db, "fingerprinting the source"))?
    {
        for line in splitter.feed(block) {
            fingerprint.add_line(&line);
        }
    }
    Ok(fingerprint)
}

/// Exports a keyless table in one statement, cutting chunks as the rows stream by.
async fn export_keyless(
    shared: &Shared,
    client: &Client,
    db: &DbSettings,
    table: &TableProgress,
    t: usize,
) -> Result<Delta, RunError> {
    let stream = client
        .copy_out(&format!(
            "COPY (SELECT {} FROM {}) TO STDOUT",
            column_list(&table.columns),
            table.own_rows()
        ))
        .await
        .map_err(db_err(table, db, "starting COPY"))?;
    pin_mut!(stream);
    let mut splitter = LineSplitter::default();
    let mut sink: Option<ChunkSink> = None;
    let mut delta = Delta::default();
    let limit_rows = shared.opts.chunk_rows.max(1);
    let limit_bytes = shared.opts.chunk_bytes.max(1);
    let streamed: Result<(), RunError> = async {
        while let Some(block) =
            stream
                .try_next()
                .await
                .map_err(db_err(table, db, "reading COPY data"))?
        {
            for line in splitter.feed(block) {
                delta.fingerprint.add_line(&line);
                if sink.is_none() {
                    let seq = shared.next_seq(t).await;
                    sink = Some(shared.open_sink(&table.name, seq, ChunkKind::Rows));
                }
                if let Some(s) = sink.as_mut() {
                    s.write_line(&line).await?;
                    if s.rows() >= limit_rows || s.raw_bytes() >= limit_bytes {
                        if let Some(full) = sink.take() {
                            delta.chunks.push(shared.land(full, None).await?);
                        }
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = streamed {
        if let Some(s) = sink {
            s.abort().await;
        }
        return Err(e);
    }
    if let Some(last) = sink {
        delta.chunks.push(shared.land(last, None).await?);
    }
    Ok(delta)
}
