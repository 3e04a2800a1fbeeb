//! What a slice's workers share: the progress document, the queue of work, the flush policy.

use super::append::MAX_GAPS;
use super::items::Claims;
use super::options::{ExportMeter, ExportOptions};
use super::slice::write_progress;
use crate::chunk::ChunkSink;
use crate::format::checkpoint::GapRange;
use crate::format::item::ItemPart;
use crate::format::progress::{Lane, RunProgress, TableProgress};
use crate::format::{ChunkKind, ChunkRef, Fingerprint, KeyRange, TableName};
use crate::lease;
use crate::repo::chunk_key;
use crate::run::RunError;
use crate::store::{CountingStore, ETag, WriteCondition, WriteStore};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

pub(super) struct ProgressState {
    pub(super) doc: RunProgress,
    pub(super) etag: ETag,
    pub(super) last_write: Instant,
    /// How long the last progress write took.
    pub(super) write_cost: Duration,
}

/// One unit of work of a slice.
#[derive(Debug, Clone, Copy)]
pub(super) enum Work {
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
pub(super) fn work_left(tables: &[TableProgress]) -> VecDeque<Work> {
    let mut queue = VecDeque::new();
    for (t, table) in tables.iter().enumerate() {
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
#[derive(Debug, Default, Clone)]
pub(super) struct Delta {
    pub(super) chunks: Vec<ChunkRef>,
    pub(super) key_chunks: Vec<ChunkRef>,
    /// The live key set is the parent's, the keys of the chain's rows ([`TableProgress::keys_of_rows`]).
    pub(super) keys_of_rows: bool,
    pub(super) fingerprint: Fingerprint,
    /// `append`: the keys exported.
    pub(super) key_fingerprint: Fingerprint,
    pub(super) gaps: Vec<GapRange>,
}

impl Delta {
    pub(super) fn apply(self, table: &mut TableProgress) {
        for chunk in &self.chunks {
            table.exported_rows += chunk.rows;
        }
        table.chunks.extend(self.chunks);
        table.key_chunks.extend(self.key_chunks);
        table.keys_of_rows |= self.keys_of_rows;
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

/// What a slice starts its work with.
pub(super) struct Slice {
    /// The snapshot the slice's workers import.
    pub(super) snapshot_id: String,
    /// Keeps the run's lease while the slice works.
    pub(super) heartbeat: lease::Heartbeat,
    /// Store requests of the run before this slice.
    pub(super) base_requests: u64,
    /// The ETag of the progress document the slice wrote first.
    pub(super) etag: ETag,
}

pub(super) struct Shared {
    pub(super) store: Arc<dyn WriteStore>,
    pub(super) counting: Arc<CountingStore>,
    pub(super) base_requests: u64,
    pub(super) state: Mutex<ProgressState>,
    /// Keeps the run's lease renewed while the slice works.
    pub(super) heartbeat: lease::Heartbeat,
    pub(super) queue: std::sync::Mutex<VecDeque<Work>>,
    pub(super) opts: ExportOptions,
    pub(super) meter: Arc<ExportMeter>,
    pub(super) slice_rows: AtomicU64,
    pub(super) slice_bytes: AtomicU64,
    pub(super) slice_raw: AtomicU64,
    pub(super) slice_chunks: AtomicU64,
    /// Some work of this slice is recorded in the progress.
    pub(super) recorded: AtomicBool,
    /// A consistency-pass round is running in this slice.
    pub(super) in_round: AtomicBool,
    pub(super) snapshot_id: String,
    pub(super) slice: u32,
    pub(super) run_id: String,
    /// A worker of a fanned-out run: the items it holds and may claim. Its work is
    /// recorded in them, never in the progress document.
    pub(super) claims: Option<Claims>,
    /// A slice of a fanned-out run: a table started again gets new work items for the
    /// workers instead of being exported by the slice.
    pub(super) fan_out: bool,
}

impl Shared {
    /// Whether to start no more work. Every slice records at least one piece of work
    /// first, whatever its deadline, so a loop of slices always finishes the run.
    /// The state of a slice that has written its first progress document (`slice.etag`).
    pub(super) fn new(
        store: Arc<dyn WriteStore>,
        counting: Arc<CountingStore>,
        opts: &ExportOptions,
        slice: Slice,
        progress: RunProgress,
    ) -> Self {
        Self {
            heartbeat: slice.heartbeat,
            store,
            counting,
            base_requests: slice.base_requests,
            queue: std::sync::Mutex::new(VecDeque::new()),
            opts: opts.clone(),
            meter: opts.meter.clone().unwrap_or_default(),
            slice_rows: AtomicU64::new(0),
            slice_bytes: AtomicU64::new(0),
            slice_raw: AtomicU64::new(0),
            slice_chunks: AtomicU64::new(0),
            recorded: AtomicBool::new(false),
            in_round: AtomicBool::new(false),
            snapshot_id: slice.snapshot_id,
            slice: progress.slices,
            run_id: progress.run_id.clone(),
            claims: None,
            fan_out: progress.fan_out,
            state: Mutex::new(ProgressState {
                doc: progress,
                etag: slice.etag,
                last_write: Instant::now(),
                write_cost: Duration::ZERO,
            }),
        }
    }

    /// Shows how many tables the run has and how many are done.
    pub(super) fn show_tables(&self, doc: &RunProgress) {
        self.meter
            .tables_total
            .store(doc.tables.len(), Ordering::Relaxed);
        let done = doc.tables.iter().filter(|t| t.done).count();
        self.meter.tables_done.store(done, Ordering::Relaxed);
    }

    pub(super) fn past_deadline(&self) -> bool {
        if self.in_round.load(Ordering::Relaxed) {
            // A consistency round only counts if it finishes in this snapshot: it may
            // run past the slice's deadline, up to the pass deadline.
            return self.opts.pass_deadline.is_some_and(|d| Instant::now() >= d);
        }
        self.past_soft_deadline()
    }

    /// The slice's own deadline (after its first recorded piece of work).
    pub(super) fn past_soft_deadline(&self) -> bool {
        self.recorded.load(Ordering::Relaxed)
            && self.opts.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The next piece of work: from the slice's queue, else (a worker of a fanned-out
    /// run) an item claimed in the store.
    pub(super) async fn next_work(&self) -> Result<Option<Work>, RunError> {
        let queued = self.queue.lock().ok().and_then(|mut q| q.pop_front());
        match (queued, &self.claims) {
            (Some(work), _) => Ok(Some(work)),
            (None, Some(claims)) => claims.claim(self).await,
            (None, None) => Ok(None),
        }
    }

    /// Puts `work` back at the head of the queue (to redo it).
    pub(super) fn push_front(&self, work: Work) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.push_front(work);
        }
    }

    pub(super) fn push_work(&self, work: Work) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.push_back(work);
        }
    }

    pub(super) fn count_chunk(&self, chunk: &ChunkRef) {
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
    pub(super) fn open_sink(&self, table: &TableName, seq: u32, kind: ChunkKind) -> ChunkSink {
        ChunkSink::open(
            self.store.clone(),
            chunk_key(&self.run_id, table, seq, self.slice, kind),
            kind,
            &self.run_id,
            self.opts.settings.zstd_level,
        )
    }

    /// Completes a chunk and counts it.
    pub(super) async fn land(
        &self,
        sink: ChunkSink,
        range: Option<KeyRange>,
    ) -> Result<ChunkRef, RunError> {
        let chunk = sink.finish(range).await?;
        self.count_chunk(&chunk);
        Ok(chunk)
    }

    /// The table as it stands, noting the slice its export started in.
    pub(super) async fn begin(&self, t: usize) -> TableProgress {
        let mut state = self.state.lock().await;
        let table = &mut state.doc.tables[t];
        if table.started_in_slice == 0 {
            table.started_in_slice = self.slice;
        }
        table.clone()
    }

    /// A chunk sequence number of table `t`, unique within the run.
    pub(super) async fn next_seq(&self, t: usize) -> u32 {
        let mut state = self.state.lock().await;
        let table = &mut state.doc.tables[t];
        let seq = table.next_seq;
        table.next_seq += 1;
        seq
    }

    /// Adds `delta` (and a lane's new state) to table `t`; writes the progress document
    /// when due. Returns whether every piece of the table is now exported.
    pub(super) async fn record(
        &self,
        t: usize,
        lane: Option<(usize, Lane)>,
        delta: Delta,
        probed: bool,
    ) -> Result<bool, RunError> {
        self.recorded.store(true, Ordering::Relaxed);
        if let Some(claims) = &self.claims {
            let (id, lane_state, finished) = match &lane {
                Some((l, state)) => ((t, ItemPart::Lane { lane: *l }), Some(state), state.done),
                None if probed => ((t, ItemPart::Probe), None, true),
                None => ((t, ItemPart::Whole), None, false),
            };
            claims
                .record(self, id, &delta, lane_state, finished)
                .await?;
        }
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
        // A worker of a fanned-out run leaves finishing the table to the run's slice.
        let complete = self.claims.is_none()
            && !table.done
            && table.gaps_probed
            && table.lanes.iter().all(|l| l.done);
        self.flush_if_due(&mut state).await?;
        Ok(complete)
    }

    /// Replaces table `t` wholesale (a restart) and records it.
    pub(super) async fn replace(&self, t: usize, table: TableProgress) -> Result<(), RunError> {
        if let Some(claims) = &self.claims {
            claims.restart((t, ItemPart::Whole)).await;
        }
        let mut state = self.state.lock().await;
        state.doc.tables[t] = table;
        self.flush(&mut state).await
    }

    pub(super) async fn mark_done(&self, t: usize) -> Result<(), RunError> {
        if let Some(claims) = &self.claims {
            // A worker finishes only keyless tables: their one item is done.
            let none = Delta::default();
            claims
                .record(self, (t, ItemPart::Whole), &none, None, true)
                .await?;
        }
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
    pub(super) async fn flush_if_due(&self, state: &mut ProgressState) -> Result<(), RunError> {
        let since = state.last_write.elapsed();
        if since >= self.opts.progress_interval && since >= state.write_cost * 4 {
            self.flush(state).await?;
        }
        Ok(())
    }

    pub(super) async fn warn(&self, message: String) {
        tracing::warn!("{message}");
        self.state.lock().await.doc.warnings.push(message);
    }

    pub(super) async fn flush(&self, state: &mut ProgressState) -> Result<(), RunError> {
        self.heartbeat.check()?;
        if let Some(claims) = &self.claims {
            // A worker's record is its items.
            let started = Instant::now();
            claims.flush(self, false).await?;
            state.last_write = Instant::now();
            state.write_cost = started.elapsed();
            return Ok(());
        }
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
