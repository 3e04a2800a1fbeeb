//! One worker of a fanned-out run (`export_worker`): what one iteration of the state
//! machine's Map runs, and each of `tidemark backup --concurrency N`'s workers.
//!
//! A worker reads the run's progress (never writes it), keeps the run's lease alive
//! beside the other workers, takes a slice number of its own with the snapshot it reads
//! in, and claims work items until none is left for it or its deadline nears; then it
//! hands back what it holds unfinished.

use super::items::{open_items, take_slice, Claims};
use super::options::ExportOptions;
use super::slice::{read_slice_snapshot, run_workers};
use super::state::{Shared, Slice};
use crate::db::{Connection, DbSettings};
use crate::format::progress::{RunProgress, SliceSnapshot};
use crate::format::read_doc;
use crate::lease;
use crate::repo::{manifest_key, progress_key};
use crate::run::RunError;
use crate::store::{CountingStore, WriteStore};
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// What a worker did: the JSON one Map iteration returns (small whatever the run's size).
#[derive(Debug, Clone, Serialize)]
pub struct WorkerReport {
    pub run_id: String,
    /// The worker's slot in the Map (0-based).
    pub worker: usize,
    /// The worker's slice number (in its chunk names); absent when it had nothing to do.
    pub slice: Option<u32>,
    /// Items it finished.
    pub items_done: u64,
    /// Items it handed back unfinished at its deadline.
    pub items_released: u64,
    /// Items it took over from a worker whose claim had lapsed (one that died).
    pub items_taken_over: u64,
    pub chunks: u64,
    pub rows: u64,
    pub bytes: u64,
    pub raw_bytes: u64,
    pub store_requests: u64,
    pub seconds: f64,
}

/// Runs one worker of the fanned-out run `opts.run_id`.
///
/// # Errors
/// [`RunError::WorkerWithoutRun`] without a run id; [`RunError::NoSuchRun`];
/// [`RunError::Locked`] when another run holds the lease; [`RunError::ItemTaken`] when
/// an item this worker held was taken over; connection, query and store errors (what it
/// recorded of its items stays recorded).
pub async fn export_worker(
    store: Arc<dyn WriteStore>,
    db: &DbSettings,
    opts: &ExportOptions,
) -> Result<WorkerReport, RunError> {
    let started = Instant::now();
    let run_id = opts.run_id.clone().ok_or(RunError::WorkerWithoutRun)?;
    let counting = Arc::new(CountingStore::new(store));
    let store: Arc<dyn WriteStore> = counting.clone();
    let mut report = WorkerReport {
        run_id: run_id.clone(),
        worker: opts.worker_slot,
        slice: None,
        items_done: 0,
        items_released: 0,
        items_taken_over: 0,
        chunks: 0,
        rows: 0,
        bytes: 0,
        raw_bytes: 0,
        store_requests: 0,
        seconds: 0.0,
    };
    let Some((mut progress, etag)) =
        read_doc::<RunProgress>(store.as_ref(), &progress_key(&run_id)).await?
    else {
        if store.head(&manifest_key(&run_id)).await?.is_some() {
            // Sealed already: a late or repeated iteration has nothing to do.
            report.store_requests = counting.count();
            return Ok(report);
        }
        return Err(RunError::NoSuchRun { run_id });
    };
    let items: Vec<_> = if progress.fan_out && progress.pass.is_none() {
        (0..progress.tables.len())
            .flat_map(|t| open_items(t, &progress.tables[t]))
            .collect()
    } else {
        Vec::new()
    };
    if items.is_empty() {
        report.store_requests = counting.count();
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let holder = format!("{} worker {}", opts.holder, opts.worker_slot);
    let held = lease::acquire(store.as_ref(), &run_id, "backup", &holder, opts.lease_ttl).await?;
    drop(held);
    let heartbeat = lease::Heartbeat::start_shared(store.clone(), &run_id, &holder, opts.lease_ttl);

    // The worker's own moment, which its connections import.
    let mut connection = Connection::connect(db).await?;
    let snapshot = connection.snapshot(None).await?;
    let session = snapshot.session();
    let snapshot_id: String = session
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(session.failed("exporting the worker's snapshot"))?;
    let taken = read_slice_snapshot(&session, 0).await?;
    let slice = take_slice(
        store.as_ref(),
        &run_id,
        &holder,
        progress.slices,
        taken.clone(),
    )
    .await?;
    progress.slices = slice;
    progress
        .slice_snapshots
        .push(SliceSnapshot { slice, ..taken });
    report.slice = Some(slice);
    let worker_name = format!("{holder} slice {slice}");
    tracing::info!(
        run_id,
        worker = opts.worker_slot,
        slice,
        items = items.len(),
        "export worker started"
    );
    let claims = Claims::new(
        worker_name,
        opts.lease_ttl,
        items,
        opts.worker_slot,
        opts.settings.concurrency.max(1),
    )
    .ending_at(opts.invocation_end);
    let mut shared = Shared::new(
        store.clone(),
        counting.clone(),
        opts,
        Slice {
            snapshot_id,
            heartbeat,
            base_requests: progress.store_requests,
            etag,
        },
        progress,
    );
    shared.claims = Some(claims);
    let shared = Arc::new(shared);
    // Renews the claims of items a long range keeps busy, while this worker lives: a
    // worker that dies (or whose future is dropped) stops renewing them, so that others
    // take its items over once its claims lapse.
    let renewal = {
        let shared = Arc::downgrade(&shared);
        let every = opts.lease_ttl / 4;
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                if let Some(claims) = &shared.claims {
                    if let Err(e) = claims.flush(&shared, false).await {
                        tracing::warn!(error = %e, "could not renew the worker's claims");
                    }
                }
            }
        }))
    };
    let outcome = run_workers(&shared, db, opts.settings.workers).await;
    drop(renewal);
    let handed_back = match &shared.claims {
        Some(claims) if !matches!(outcome, Err(RunError::ItemTaken { .. })) => {
            claims.flush(&shared, true).await
        }
        _ => Ok(()),
    };
    if let Err(e) = snapshot.commit().await {
        tracing::warn!(run_id, error = %crate::error_chain(&e), "could not end the worker's snapshot transaction");
    }
    outcome?;
    handed_back?;
    if let Some(claims) = &shared.claims {
        let counts = claims.counts().await;
        report.items_done = counts.done;
        report.items_released = counts.released;
        report.items_taken_over = counts.taken_over;
    }
    report.chunks = shared.slice_chunks.load(Ordering::Relaxed);
    report.rows = shared.slice_rows.load(Ordering::Relaxed);
    report.bytes = shared.slice_bytes.load(Ordering::Relaxed);
    report.raw_bytes = shared.slice_raw.load(Ordering::Relaxed);
    report.store_requests = counting.count();
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        run_id,
        worker = opts.worker_slot,
        slice,
        items_done = report.items_done,
        items_released = report.items_released,
        rows = report.rows,
        "export worker finished"
    );
    Ok(report)
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
