//! One slice of a run: which run it continues, its one snapshot, the lease, and the loop of
//! work steps until the deadline or the seal.

use super::items::{fold_items, is_item};
use super::options::{ExportOptions, SliceReport};
use super::pass::start_round;
use super::plan::plan_run;
use super::seal::{dump_schemas, finalize_run};
use super::state::{work_left, Shared, Slice, Work};
use super::worker::worker;
use crate::db::{Connection, DbSettings, Session, Snapshot};
use crate::format::manifest::{Manifest, SchemaDump};
use crate::format::progress::{RunProgress, SliceSnapshot};
use crate::format::{read_doc, write_doc, PgSnapshot};
use crate::lease;
use crate::repo::{chunk_prefix, manifest_key, progress_key};
use crate::run::RunError;
use crate::schema::capture::CaptureRequest;
use crate::schema::{self, PgDump};
use crate::store::{CountingStore, ETag, StoreError, WriteCondition, WriteStore};
use chrono::Utc;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

    let resume = match find_run(store.as_ref(), opts).await? {
        Found::Sealed(manifest) => return Ok(sealed_report(&manifest, started, counting.count())),
        Found::Resume(progress) => Some(progress),
        Found::New => None,
    };
    // The slice's one moment, which its workers and pg_dump import.
    let mut connection = Connection::connect(db).await?;
    let snapshot = connection.snapshot(None).await?;
    let coordinator = snapshot.session();
    let snapshot_id = export_snapshot(&coordinator).await?;
    // A new run captures the schema: find a fit pg_dump before anything is written.
    let schema_tool = match resume {
        Some(_) => None,
        None => Some(locate_pg_dump(&coordinator, opts).await?),
    };
    let resumed = resume.is_some();
    let (mut progress, progress_etag, parent_schema) = match resume {
        Some((mut progress, etag)) => {
            if progress.fan_out {
                // What the run's workers finished, and the slices they read in.
                fold_items(store.as_ref(), &mut progress).await?;
            }
            progress.slices += 1;
            (progress, Some(etag), None)
        }
        None => {
            let planned = plan_run(&coordinator, store.as_ref(), opts, opts.run_id.clone());
            let (progress, parent_schema) = planned.await?;
            (progress, None, parent_schema)
        }
    };
    // Every slice cuts chunks the way the run started, whatever this invocation was given.
    let mut opts = opts.clone();
    let first = &progress.settings;
    opts.settings.chunk_rows = first.chunk_rows;
    opts.settings.chunk_bytes = first.chunk_bytes;
    opts.settings.zstd_level = first.zstd_level;
    opts.settings.gap_ttl = Duration::from_secs(first.gap_ttl_secs);
    let opts = &opts;
    let run_id = progress.run_id.clone();
    let held = lease::acquire(
        store.as_ref(),
        &run_id,
        "backup",
        &opts.holder,
        opts.lease_ttl,
    );
    let held = held.await?;
    if resumed {
        abort_leftover_uploads(store.as_ref(), &run_id).await;
    }
    let result = async {
        if let Some(tool) = &schema_tool {
            let capture = Capture {
                tool,
                snapshot_id: &snapshot_id,
                parent_schema: parent_schema.as_ref(),
            };
            capture_schema(store.as_ref(), &coordinator, db, &capture, opts, &mut progress).await?;
        }
        record_slice_snapshot(&coordinator, &mut progress).await?;
        let base_requests = progress.store_requests;
        progress.store_requests = base_requests + counting.count();
        let condition = match progress_etag {
            Some(etag) => WriteCondition::IfMatch(etag),
            None => WriteCondition::IfAbsent,
        };
        let etag = write_progress(store.as_ref(), &progress, condition).await?;
        log_start(opts, &progress);
        let slice = Slice {
            snapshot_id: snapshot_id.clone(),
            heartbeat: lease::Heartbeat::start(store.clone(), held, opts.lease_ttl),
            base_requests,
            etag,
        };
        let shared = Arc::new(Shared::new(store.clone(), counting.clone(), opts, slice, progress));
        shared.show_tables(&shared.state.lock().await.doc);

        let outcome = work_loop(&shared, &coordinator, db, opts).await;
        let fan_out = match outcome {
            Ok(fan_out) => fan_out,
            Err(e) => {
            // Keep what finished: the next slice resumes from it.
            if !matches!(e, RunError::LeaseLost { .. } | RunError::Conflict { .. }) {
                let mut state = shared.state.lock().await;
                if let Err(flush) = shared.flush(&mut state).await {
                    tracing::warn!(run_id, error = %flush, "could not save the progress of the failed slice");
                }
            }
            return Err(e);
            }
        };
        let mut state = shared.state.lock().await;
        shared.flush(&mut state).await?;
        let mut report = slice_report(&shared, &state.doc, started);
        report.fan_out = fan_out;
        Ok(report)
    }
    .await;
    match &result {
        Ok(_) => end_snapshot(snapshot, &run_id).await,
        // The snapshot rolls back as it is dropped.
        Err(e) => release_after_failure(store.as_ref(), &run_id, e).await,
    }
    result
}

/// Exports the slice's snapshot for its workers and pg_dump to import.
async fn export_snapshot(coordinator: &Session<'_>) -> Result<String, RunError> {
    let id = coordinator
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(coordinator.failed("exporting the snapshot"))?;
    Ok(id)
}

/// Ends the slice's snapshot. What the slice read is recorded: a COMMIT that fails (the
/// connection went away) loses nothing, so it is logged rather than failing the slice.
async fn end_snapshot(snapshot: Snapshot<'_>, run_id: &str) {
    if let Err(e) = snapshot.commit().await {
        tracing::warn!(run_id, error = %crate::error_chain(&e), "could not end the slice's snapshot transaction");
    }
}

fn log_start(opts: &ExportOptions, progress: &RunProgress) {
    let left = |deadline: Option<Instant>| {
        deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64())
    };
    tracing::info!(
        run_id = progress.run_id,
        slice = progress.slices,
        kind = %progress.kind,
        tables = progress.tables.len(),
        seconds_left = left(opts.deadline),
        pass_seconds_left = left(opts.pass_deadline),
        "export slice started"
    );
}

/// Which run a slice is for.
enum Found {
    /// The run asked for is sealed already: nothing to do.
    Sealed(Manifest),
    /// Continue this run, whose progress document has this ETag.
    Resume((RunProgress, ETag)),
    /// Start a new run (under the id asked for, if any).
    New,
}

/// Finds the run this slice continues: the one named, else the run of a lease whose
/// holder died, else none.
async fn find_run(store: &dyn WriteStore, opts: &ExportOptions) -> Result<Found, RunError> {
    let Some(run_id) = &opts.run_id else {
        return match lease::current(store).await? {
            Some((lease, _)) if lease::is_live(&lease, Utc::now()) => Err(RunError::Locked {
                run_id: lease.run_id,
                since: lease.acquired_at,
                expires: lease.expires_at,
            }),
            // The previous holder died: finish its run rather than start another.
            Some((lease, _)) if lease.operation == "backup" => {
                if store.head(&manifest_key(&lease.run_id)).await?.is_some() {
                    return Ok(Found::New);
                }
                let progress = read_doc::<RunProgress>(store, &progress_key(&lease.run_id)).await?;
                Ok(progress.map_or(Found::New, Found::Resume))
            }
            _ => Ok(Found::New),
        };
    };
    if let Some((manifest, _)) = read_doc::<Manifest>(store, &manifest_key(run_id)).await? {
        return Ok(Found::Sealed(manifest));
    }
    lease::ensure_free_for(store, run_id).await?;
    if let Some(found) = read_doc::<RunProgress>(store, &progress_key(run_id)).await? {
        return Ok(Found::Resume(found));
    }
    // A first slice that died between taking the lease and writing its progress: start
    // the run afresh under the same id.
    match lease::current(store).await? {
        Some((lease, _)) if &lease.run_id == run_id => Ok(Found::New),
        _ => Err(RunError::NoSuchRun {
            run_id: run_id.clone(),
        }),
    }
}

/// Finds a pg_dump that can dump this server.
async fn locate_pg_dump(client: &Session<'_>, opts: &ExportOptions) -> Result<PgDump, RunError> {
    let tool = PgDump::locate(opts.pg_dump.as_deref()).await?;
    let server: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(client.failed("reading the server version"))?;
    tool.check_server(server as u32)?;
    Ok(tool)
}

/// A new run's schema capture: the pg_dump found for the server, the slice's snapshot, and
/// the parent backup's schema as the plan read it.
struct Capture<'a> {
    tool: &'a PgDump,
    snapshot_id: &'a str,
    parent_schema: Option<&'a SchemaDump>,
}

/// Captures the schema (and large objects) in the slice's snapshot into the progress.
async fn capture_schema(
    store: &dyn WriteStore,
    client: &Session<'_>,
    db: &DbSettings,
    capture: &Capture<'_>,
    opts: &ExportOptions,
    progress: &mut RunProgress,
) -> Result<(), RunError> {
    let schemas = dump_schemas(&opts.settings.selection, progress);
    let request = CaptureRequest {
        tool: capture.tool,
        settings: db,
        snapshot_id: capture.snapshot_id,
        run_id: &progress.run_id,
        schemas: &schemas,
        parent: progress.parent.as_deref(),
        parent_schema: capture.parent_schema,
    };
    let (dump, warnings) = schema::capture::capture(store, client, &request).await?;
    for warning in warnings {
        tracing::warn!(run_id = progress.run_id, "{warning}");
        progress.warnings.push(warning);
    }
    progress.schema_dump = Some(dump);
    progress.schema_slice = progress.slices;
    Ok(())
}

/// All in this slice's one snapshot: the ranges left, then, once every table is exported,
/// consistency-pass rounds that bring every table to this snapshot. In a fanned-out run
/// (`concurrency` above 1) the ranges are left to workers: returns true when they are
/// to run next.
async fn work_loop(
    shared: &Arc<Shared>,
    coordinator: &Session<'_>,
    db: &DbSettings,
    opts: &ExportOptions,
) -> Result<bool, RunError> {
    let slice = shared.slice;
    loop {
        let step = {
            let mut state = shared.state.lock().await;
            let past_deadline = shared.past_soft_deadline();
            let mut step =
                next_step(&mut state.doc, coordinator, opts, slice, past_deadline).await?;
            let in_round = state.doc.pass.as_ref().is_some_and(|p| p.slice == slice);
            if let Step::Work(queue) = &mut step {
                // A run fans out once it needs a second slice: one that fits a slice stays
                // one snapshot with no consistency pass, whatever the concurrency.
                let fanned =
                    state.doc.fan_out || (opts.settings.concurrency > 1 && state.doc.slices > 1);
                if fanned && state.doc.pass.is_none() && queue.iter().any(is_item) {
                    // The export's ranges go to the workers; this slice only finishes tables.
                    queue.retain(|w| !is_item(w));
                    if queue.is_empty() {
                        step = Step::FanOut;
                    }
                    if !state.doc.fan_out {
                        state.doc.fan_out = true;
                        tracing::info!(
                            run_id = shared.run_id,
                            concurrency = opts.settings.concurrency,
                            "the export is fanned out over workers"
                        );
                    }
                }
            }
            shared.in_round.store(in_round, Ordering::Relaxed);
            if let Step::Work(queue) = &step {
                if let Ok(mut q) = shared.queue.lock() {
                    *q = queue.clone();
                }
                shared.show_tables(&state.doc);
            }
            if !matches!(step, Step::Stop) {
                shared.flush(&mut state).await?;
            }
            step
        };
        match step {
            Step::Stop => return Ok(false),
            Step::FanOut => return Ok(true),
            Step::Finalize => {
                finalize_run(shared, coordinator, db, opts, &shared.snapshot_id).await?;
                return Ok(false);
            }
            Step::Work(_) => {
                run_workers(shared, db, opts.settings.workers).await?;
                if shared.past_deadline() {
                    return Ok(false);
                }
            }
        }
    }
}

/// What the slice did, from its counters and the progress document.
fn slice_report(shared: &Shared, doc: &RunProgress, started: Instant) -> SliceReport {
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
        store_requests: shared.counting.count(),
        seconds: started.elapsed().as_secs_f64(),
        fan_out: false,
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
    report
}

/// A slice that fails on its own hands the run back at once (its progress is saved): a
/// plain re-run resumes it instead of waiting out the lease.
async fn release_after_failure(store: &dyn WriteStore, run_id: &str, error: &RunError) {
    if matches!(
        error,
        RunError::LeaseLost { .. } | RunError::Conflict { .. }
    ) {
        return;
    }
    match lease::release(store, run_id).await {
        Ok(_) => tracing::info!(
            run_id,
            "lease released after the failure; a re-run resumes this run"
        ),
        Err(release) => {
            tracing::warn!(run_id, error = %release, "could not release the lease after the failure")
        }
    }
}

/// Aborts the multipart uploads a killed slice of this run left unfinished (they are
/// billed until aborted). A failure here only delays that to prune.
pub(super) async fn abort_leftover_uploads(store: &dyn WriteStore, run_id: &str) {
    let prefix = chunk_prefix(run_id);
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
pub(super) async fn record_slice_snapshot(
    client: &Session<'_>,
    progress: &mut RunProgress,
) -> Result<(), RunError> {
    let slice = progress.slices;
    let taken = read_slice_snapshot(client, slice).await?;
    progress.slice_snapshots.retain(|s| s.slice != slice);
    progress.slice_snapshots.push(taken);
    Ok(())
}

/// The snapshot `client` reads in (and the WAL position), as slice `slice`'s.
pub(super) async fn read_slice_snapshot(
    client: &Session<'_>,
    slice: u32,
) -> Result<SliceSnapshot, RunError> {
    let row = client
        .query_one(
            "SELECT pg_current_snapshot()::text, \
                    (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                          ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .map_err(client.failed("reading the slice's snapshot"))?;
    let text: String = row.get(0);
    let snapshot: PgSnapshot = text
        .parse()
        .map_err(|reason| client.unexpected("reading the slice's snapshot", &text, reason))?;
    Ok(SliceSnapshot {
        slice,
        snapshot,
        lsn: row.get(1),
        taken_at: Utc::now(),
    })
}

/// Runs `count` workers over the shared queue until it is empty or the deadline passes.
pub(super) async fn run_workers(
    shared: &Arc<Shared>,
    db: &DbSettings,
    count: usize,
) -> Result<(), RunError> {
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..count.max(1) {
        let shared = shared.clone();
        let db = db.clone();
        workers.spawn(async move { worker(shared, db).await });
    }
    crate::join_workers(workers, |e| RunError::WorkerPanicked {
        run_id: shared.run_id.clone(),
        detail: e.to_string(),
    })
    .await
}

/// What a slice does next.
#[derive(Debug, Clone)]
pub(super) enum Step {
    /// Export this work (ranges, or a pass round's).
    Work(VecDeque<Work>),
    /// Every table is of this slice's snapshot: record it as the backup's moment.
    Finalize,
    /// Nothing more in this slice (done, or the next slice starts the next round).
    Stop,
    /// The export's ranges are left: workers of a fanned-out run claim them.
    FanOut,
}

/// Decides the slice's next step, starting a consistency-pass round when every table's
/// ranges are exported but the tables are of several snapshots.
pub(super) async fn next_step(
    doc: &mut RunProgress,
    client: &Session<'_>,
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
        let pending = work_left(&doc.tables);
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
    if !start_round(doc, client, opts, slice).await? {
        return Ok(Step::Stop);
    }
    let pending = work_left(&doc.tables);
    Ok(if pending.is_empty() {
        Step::Finalize
    } else {
        Step::Work(pending)
    })
}

pub(super) fn sealed_report(manifest: &Manifest, started: Instant, requests: u64) -> SliceReport {
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
        fan_out: false,
    }
}

pub(super) async fn write_progress(
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
