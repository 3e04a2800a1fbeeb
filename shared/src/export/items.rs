//! Fan-out: a run's export as work items in the store, claimed by the workers of many
//! invocations at once (the state machine's Map, or `tidemark backup --concurrency N`).
//!
//! An item is one lane of a keyed table, a keyless table whole, or an `append` table's gap
//! probe ([`ItemPart`]), with its own document under `runs/{run}/items/`. A worker claims
//! one by creating its document (create-if-absent) or by replacing, If-Match, one that is
//! released or whose holder's claim lapsed; it records each finished range in it (the
//! lane's cursor, the chunks, the fingerprints) as the slice records the progress
//! document, and releases it unfinished at its deadline. Two workers can never both
//! record into one item (each write is conditional on the last), a worker's unrecorded
//! chunks are never referenced (their names carry its own slice number), and whoever
//! takes an item over continues from what was recorded: nothing is lost or listed twice.
//!
//! Each worker reads in a snapshot of its own (recorded under `runs/{run}/slices/`); the
//! run's slices fold finished items into the progress document, and the consistency pass
//! then brings every table to one snapshot, as for a run that spanned slices.

use super::state::{Delta, Shared, Work};
use crate::format::item::{ItemHolder, ItemPart, WorkItem, WorkerSlice};
use crate::format::progress::{Lane, RunProgress, SliceSnapshot, TableProgress};
use crate::format::{read_doc, write_doc, FormatError, FORMAT_VERSION};
use crate::repo::{item_key, items_prefix, slice_key, slice_of_key, slices_prefix};
use crate::run::RunError;
use crate::store::{ETag, StoreError, WriteCondition, WriteStore};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;
use tokio::sync::Mutex;

/// One item of a run: table index and part.
pub(super) type ItemId = (usize, ItemPart);

/// The items table `t` has left.
pub(super) fn open_items(t: usize, table: &TableProgress) -> Vec<ItemId> {
    if table.done {
        return Vec::new();
    }
    if table.key.is_empty() {
        return vec![(t, ItemPart::Whole)];
    }
    let mut items = Vec::new();
    if !table.gaps_probed {
        items.push((t, ItemPart::Probe));
    }
    for (l, lane) in table.lanes.iter().enumerate() {
        if !lane.done {
            items.push((t, ItemPart::Lane { lane: l }));
        }
    }
    items
}

/// The work an item is.
pub(super) fn work_of((t, part): ItemId) -> Work {
    match part {
        ItemPart::Lane { lane } => Work::Lane(t, lane),
        ItemPart::Whole => Work::Keyless(t),
        ItemPart::Probe => Work::Probe(t),
    }
}

/// Whether a piece of work is done by the workers of a fanned-out run (rather than by the
/// slice itself, as finishing a table is).
pub(super) fn is_item(work: &Work) -> bool {
    !matches!(work, Work::Finalize(_))
}

fn precondition(e: &FormatError) -> bool {
    matches!(e, FormatError::Store(StoreError::PreconditionFailed { .. }))
}

/// An item this worker holds.
struct Held {
    doc: WorkItem,
    etag: ETag,
    key: String,
    dirty: bool,
}

/// How an attempt to claim an item went.
enum Attempt {
    Claimed(Work),
    /// Another worker holds it, until then.
    Busy(DateTime<Utc>),
    /// Done, or gone.
    Skip,
}

#[derive(Default)]
struct Book {
    /// Items not tried yet, in the order this worker tries them.
    candidates: VecDeque<ItemId>,
    /// Items another worker holds, until when.
    busy: Vec<(ItemId, DateTime<Utc>)>,
    held: BTreeMap<ItemId, Held>,
    done: u64,
    released: u64,
    taken_over: u64,
    /// Items this worker claimed.
    claimed: u64,
}

/// What one worker holds and may still claim.
pub(super) struct Claims {
    worker: String,
    ttl: Duration,
    /// Claims lapse by then at the latest (the invocation's end).
    ends: Option<DateTime<Utc>>,
    book: Mutex<Book>,
}

/// How many items a worker finished and handed back.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ClaimCounts {
    pub(super) done: u64,
    pub(super) released: u64,
    /// Items taken over from a worker whose claim lapsed.
    pub(super) taken_over: u64,
}

impl Claims {
    /// The claims of worker `worker` (its name in the items it holds) over `items`, tried
    /// from the `slot`-th of `slots` equal shares on, so that workers starting together
    /// do not all race for the same first item.
    pub(super) fn new(
        worker: String,
        ttl: Duration,
        items: Vec<ItemId>,
        slot: usize,
        slots: usize,
    ) -> Self {
        let mut candidates: VecDeque<ItemId> = items.into();
        if !candidates.is_empty() && slots > 1 {
            let start = candidates.len() * (slot % slots) / slots;
            candidates.rotate_left(start);
        }
        Self {
            worker,
            ttl,
            ends: None,
            book: Mutex::new(Book {
                candidates,
                ..Book::default()
            }),
        }
    }

    pub(super) async fn counts(&self) -> ClaimCounts {
        let book = self.book.lock().await;
        ClaimCounts {
            done: book.done,
            released: book.released,
            taken_over: book.taken_over,
        }
    }

    /// Claims lapse no later than `end` (when this process is certainly gone).
    pub(super) fn ending_at(mut self, end: Option<std::time::Instant>) -> Self {
        self.ends = end.map(|end| {
            let left = end.saturating_duration_since(std::time::Instant::now());
            Utc::now() + chrono::TimeDelta::from_std(left).unwrap_or_default()
        });
        self
    }

    fn holder(&self, slice: u32) -> ItemHolder {
        let by_ttl = Utc::now() + chrono::TimeDelta::from_std(self.ttl).unwrap_or_default();
        ItemHolder {
            worker: self.worker.clone(),
            slice,
            expires_at: self.ends.map_or(by_ttl, |end| end.min(by_ttl)),
        }
    }

    /// Claims the next item this worker can have. A worker that has had none yet waits
    /// for items other workers hold until their claims lapse or they finish, as long as
    /// its deadline allows. `None` when no item is left for it.
    pub(super) async fn claim(&self, shared: &Shared) -> Result<Option<Work>, RunError> {
        loop {
            if shared.past_deadline() {
                return Ok(None);
            }
            // The book is never held while the progress state is locked (a flush holds
            // that and then takes the book).
            let next = {
                let mut book = self.book.lock().await;
                match book.candidates.pop_front() {
                    Some(id) => Ok(id),
                    // A worker that got work leaves what others hold to them (or, if one
                    // died, to the next workers); only one that got none waits for it.
                    None if book.claimed > 0 => Err(None),
                    None => Err(book.busy.iter().map(|(_, until)| *until).min()),
                }
            };
            let until = match next {
                Ok(id) => {
                    match self.try_claim(shared, id).await? {
                        Attempt::Claimed(work) => return Ok(Some(work)),
                        Attempt::Busy(until) => self.book.lock().await.busy.push((id, until)),
                        Attempt::Skip => {}
                    }
                    continue;
                }
                Err(None) => return Ok(None),
                Err(Some(until)) => until,
            };
            // Held elsewhere: look again once the first claim may have lapsed (a worker
            // that died), or sooner (one that finishes or releases it).
            let wait = (until - Utc::now())
                .to_std()
                .unwrap_or_default()
                .clamp(Duration::from_millis(200), Duration::from_secs(1));
            if shared
                .opts
                .deadline
                .is_some_and(|d| std::time::Instant::now() + wait >= d)
            {
                return Ok(None);
            }
            {
                let mut book = self.book.lock().await;
                let busy: Vec<ItemId> = book.busy.drain(..).map(|(id, _)| id).collect();
                book.candidates.extend(busy);
            }
            tokio::time::sleep(wait).await;
        }
    }

    async fn try_claim(&self, shared: &Shared, id: ItemId) -> Result<Attempt, RunError> {
        let (t, part) = id;
        let (name, generation, lane) = {
            let state = shared.state.lock().await;
            let table = &state.doc.tables[t];
            let lane = match part {
                ItemPart::Lane { lane } => table.lanes.get(lane).cloned(),
                _ => None,
            };
            (table.name.clone(), table.item_generation, lane)
        };
        let key = item_key(&shared.run_id, &name, generation, part);
        let store = shared.store.as_ref();
        let fresh = WorkItem {
            version: FORMAT_VERSION,
            run_id: shared.run_id.clone(),
            table: name,
            generation,
            part,
            holder: Some(self.holder(shared.slice)),
            lane,
            chunks: Vec::new(),
            key_chunks: Vec::new(),
            keys_of_rows: false,
            fingerprint: Default::default(),
            key_fingerprint: Default::default(),
            gaps: Vec::new(),
            slices: Vec::new(),
            done: false,
            updated_at: Utc::now(),
        };
        let mut lapsed = false;
        let (doc, etag) = match write_doc(store, &key, &fresh, WriteCondition::IfAbsent).await {
            Ok(receipt) => (fresh, receipt.etag),
            Err(e) if precondition(&e) => {
                let Some((mut item, etag)) = read_doc::<WorkItem>(store, &key).await? else {
                    return Ok(Attempt::Skip);
                };
                if item.done {
                    return Ok(Attempt::Skip);
                }
                if let Some(holder) = &item.holder {
                    if holder.expires_at > Utc::now() && holder.worker != self.worker {
                        return Ok(Attempt::Busy(holder.expires_at));
                    }
                    tracing::warn!(
                        run_id = shared.run_id,
                        item = key,
                        worker = holder.worker,
                        "taking over an item whose worker's claim lapsed"
                    );
                }
                lapsed = item.holder.is_some();
                item.holder = Some(self.holder(shared.slice));
                item.updated_at = Utc::now();
                if !matches!(part, ItemPart::Lane { .. }) {
                    // A keyless table or a probe is done again from its start.
                    clear(&mut item);
                }
                match write_doc(store, &key, &item, WriteCondition::IfMatch(etag)).await {
                    Ok(receipt) => (item, receipt.etag),
                    // Another worker took it first.
                    Err(e) if precondition(&e) => return Ok(Attempt::Busy(Utc::now())),
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        if let (ItemPart::Lane { lane }, Some(state)) = (part, &doc.lane) {
            // Continue from where the item's holders got to.
            shared.state.lock().await.doc.tables[t].lanes[lane] = state.clone();
        }
        let mut book = self.book.lock().await;
        book.taken_over += u64::from(lapsed);
        book.claimed += 1;
        book.held.insert(
            id,
            Held {
                doc,
                etag,
                key,
                dirty: false,
            },
        );
        Ok(Attempt::Claimed(work_of(id)))
    }

    /// Records what a piece of work added to the item it belongs to; writes the item
    /// at once when it is done. `lane` is a lane's new state, `probed` a finished probe.
    pub(super) async fn record(
        &self,
        shared: &Shared,
        id: ItemId,
        delta: &Delta,
        lane: Option<&Lane>,
        finished: bool,
    ) -> Result<(), RunError> {
        let mut book = self.book.lock().await;
        let Some(held) = book.held.get_mut(&id) else {
            return Ok(());
        };
        let item = &mut held.doc;
        item.chunks.extend(delta.chunks.iter().cloned());
        item.key_chunks.extend(delta.key_chunks.iter().cloned());
        item.keys_of_rows |= delta.keys_of_rows;
        item.fingerprint = item.fingerprint.combine(delta.fingerprint);
        item.key_fingerprint = item.key_fingerprint.combine(delta.key_fingerprint);
        item.gaps.extend(delta.gaps.iter().cloned());
        if !item.slices.contains(&shared.slice) {
            item.slices.push(shared.slice);
        }
        if let Some(lane) = lane {
            item.lane = Some(lane.clone());
        }
        item.done |= finished;
        held.dirty = true;
        if finished {
            self.write(shared, &mut book, Some(id), false).await?;
        }
        Ok(())
    }

    /// Forgets what was recorded of an item that starts again (a keyless table).
    pub(super) async fn restart(&self, id: ItemId) {
        if let Some(held) = self.book.lock().await.held.get_mut(&id) {
            clear(&mut held.doc);
            held.dirty = true;
        }
    }

    /// Writes the items this worker holds (`only`: just that one), renewing its claims,
    /// or (`release`) handing them back.
    pub(super) async fn flush(&self, shared: &Shared, release: bool) -> Result<(), RunError> {
        let mut book = self.book.lock().await;
        self.write(shared, &mut book, None, release).await
    }

    async fn write(
        &self,
        shared: &Shared,
        book: &mut Book,
        only: Option<ItemId>,
        release: bool,
    ) -> Result<(), RunError> {
        let ids: Vec<ItemId> = match only {
            Some(id) => vec![id],
            None => book.held.keys().copied().collect(),
        };
        for id in ids {
            let Some(held) = book.held.get_mut(&id) else {
                continue;
            };
            let finished = held.doc.done;
            held.doc.holder = if finished || release {
                None
            } else {
                Some(self.holder(shared.slice))
            };
            held.doc.updated_at = Utc::now();
            let condition = WriteCondition::IfMatch(held.etag.clone());
            match write_doc(shared.store.as_ref(), &held.key, &held.doc, condition).await {
                Ok(receipt) => {
                    held.etag = receipt.etag;
                    held.dirty = false;
                }
                Err(e) if precondition(&e) => {
                    // Our claim lapsed and another worker took the item over: what this
                    // worker exported of it since its last write is not recorded.
                    let key = held.key.clone();
                    book.held.remove(&id);
                    tracing::error!(
                        run_id = shared.run_id,
                        item = key,
                        "another worker took over an item this worker held"
                    );

                    return Err(RunError::ItemTaken {
                        run_id: shared.run_id.clone(),
                        item: key,
                    });
                }
                Err(e) => return Err(e.into()),
            }
            if finished {
                book.held.remove(&id);
                book.done += 1;
            } else if release {
                book.held.remove(&id);
                book.released += 1;
            }
        }
        Ok(())
    }
}

/// Clears what was recorded of an item.
fn clear(item: &mut WorkItem) {
    item.chunks.clear();
    item.key_chunks.clear();
    item.keys_of_rows = false;
    item.fingerprint = Default::default();
    item.key_fingerprint = Default::default();
    item.gaps.clear();
    item.slices.clear();
}

/// Takes a slice number no other worker of the run has, recording the snapshot it reads
/// in under it; returns the number.
pub(super) async fn take_slice(
    store: &dyn WriteStore,
    run_id: &str,
    worker: &str,
    after: u32,
    snapshot: SliceSnapshot,
) -> Result<u32, RunError> {
    let mut doc = WorkerSlice {
        version: FORMAT_VERSION,
        run_id: run_id.to_owned(),
        worker: worker.to_owned(),
        snapshot,
    };
    let listed = store.list(&slices_prefix(run_id)).await?;
    let mut next = listed
        .iter()
        .filter_map(|o| slice_of_key(run_id, &o.key))
        .max()
        .unwrap_or(0)
        .max(after)
        + 1;
    for _ in 0..1000 {
        doc.snapshot.slice = next;
        match write_doc(
            store,
            &slice_key(run_id, next),
            &doc,
            WriteCondition::IfAbsent,
        )
        .await
        {
            Ok(_) => return Ok(next),
            Err(e) if precondition(&e) => next += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Err(RunError::Conflict {
        run_id: run_id.to_owned(),
    })
}

/// Folds into the progress document the slices the run's workers read in and every
/// finished item of a table not yet done. Items still held or released unfinished stay
/// in the store for the next workers.
pub(super) async fn fold_items(
    store: &dyn WriteStore,
    doc: &mut RunProgress,
) -> Result<(), RunError> {
    let run_id = doc.run_id.clone();
    for listed in store.list(&slices_prefix(&run_id)).await? {
        let Some(n) = slice_of_key(&run_id, &listed.key) else {
            continue;
        };
        if doc.slice_snapshots.iter().any(|s| s.slice == n) {
            continue;
        }
        if let Some((slice, _)) = read_doc::<WorkerSlice>(store, &listed.key).await? {
            doc.slice_snapshots.push(SliceSnapshot {
                slice: n,
                ..slice.snapshot
            });
            doc.slices = doc.slices.max(n);
        }
    }
    doc.slice_snapshots.sort_by_key(|s| s.slice);
    let present: HashSet<String> = store
        .list(&items_prefix(&run_id))
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    let mut folded = 0usize;
    for t in 0..doc.tables.len() {
        for (_, part) in open_items(t, &doc.tables[t]) {
            let table = &doc.tables[t];
            let key = item_key(&run_id, &table.name, table.item_generation, part);
            if !present.contains(&key) {
                continue;
            }
            let Some((item, _)) = read_doc::<WorkItem>(store, &key).await? else {
                continue;
            };
            if !item.done {
                continue;
            }
            let oldest = oldest_slice(doc, t, &item.slices);
            apply(&mut doc.tables[t], item, oldest);
            folded += 1;
        }
    }
    if folded > 0 {
        tracing::info!(
            run_id,
            items = folded,
            "folded finished work items into the run"
        );
    }
    Ok(())
}

/// Of the slices table `t`'s data is from so far and `more`, the one whose snapshot is
/// oldest (least xmin): the consistency pass brings the table forward from it.
fn oldest_slice(doc: &RunProgress, t: usize, more: &[u32]) -> u32 {
    let started = doc.tables[t].started_in_slice;
    let xmin = |n: u32| {
        doc.slice_snapshots
            .iter()
            .find(|s| s.slice == n)
            .map_or(doc.snapshot.xmin, |s| s.snapshot.xmin)
    };
    (started != 0)
        .then_some(started)
        .into_iter()
        .chain(more.iter().copied())
        .min_by_key(|&n| (xmin(n), n))
        .unwrap_or(started)
}

/// Adds a finished item to its table.
fn apply(table: &mut TableProgress, item: WorkItem, oldest: u32) {
    let seq = item
        .chunks
        .iter()
        .chain(&item.key_chunks)
        .filter_map(|c| chunk_seq(&c.key))
        .max()
        .unwrap_or(0);
    table.next_seq = table.next_seq.max(seq + 1);
    table.started_in_slice = oldest;
    let delta = Delta {
        chunks: item.chunks,
        key_chunks: item.key_chunks,
        keys_of_rows: item.keys_of_rows,
        fingerprint: item.fingerprint,
        key_fingerprint: item.key_fingerprint,
        gaps: item.gaps,
    };
    match item.part {
        ItemPart::Lane { lane } => {
            delta.apply(table);
            if let (Some(slot), Some(state)) = (table.lanes.get_mut(lane), item.lane) {
                *slot = state;
            }
        }
        ItemPart::Probe => {
            delta.apply(table);
            table.gaps_probed = true;
            table.gaps_to_probe.clear();
        }
        ItemPart::Whole => {
            super::worker::reset(table, oldest);
            delta.apply(table);
            table.done = true;
        }
    }
}

/// The sequence number in a chunk's name (`.../{seq}-{slice}.copy.zst`).
fn chunk_seq(key: &str) -> Option<u32> {
    let name = key.rsplit('/').next()?;
    name.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::PgSnapshot;

    fn snapshot(slice: u32, xmin: u64) -> SliceSnapshot {
        SliceSnapshot {
            slice,
            snapshot: PgSnapshot {
                xmin,
                xmax: xmin + 10,
                xip: Vec::new(),
            },
            lsn: None,
            taken_at: Utc::now(),
        }
    }

    #[test]
    fn chunk_sequence_numbers_are_read_from_chunk_names() {
        assert_eq!(chunk_seq("chunks/r/public.t/000042-007.copy.zst"), Some(42));
        assert_eq!(
            chunk_seq("chunks/r/public.t/000003-1234.keys.copy.zst"),
            Some(3)
        );
        assert_eq!(chunk_seq("chunks/r/public.t/schema"), None);
    }

    #[test]
    fn a_table_is_brought_forward_from_its_oldest_snapshot_not_its_lowest_slice() {
        // Slice 5 took its number first but its snapshot later than slice 6's.
        let mut doc: RunProgress = serde_json::from_value(serde_json::json!({
            "version": 2, "run_id": "r", "kind": "full", "started_at": Utc::now(),
            "snapshot": serde_json::to_value(snapshot(0, 100).snapshot).expect("json"), "server_version": "15", "database": "d",
            "settings": {"chunk_rows": 1, "chunk_bytes": 1, "zstd_level": 1, "gap_ttl_secs": 1},
            "tables": [], "sequences": [], "slices": 6, "store_requests": 0
        }))
        .expect("progress");
        doc.slice_snapshots = vec![snapshot(1, 100), snapshot(5, 140), snapshot(6, 120)];
        doc.tables.push(
            serde_json::from_value(serde_json::json!({
                "name": {"schema": "public", "name": "t"}, "mode": "changes",
                "schema": {"kind": "table", "columns": [], "primary_key": ["id"]},
                "columns": ["id"], "key": ["id"], "scope": {"type": "whole"},
                "rows_per_chunk": 10, "gaps_probed": true, "done": false, "next_seq": 1,
                "fingerprint": serde_json::to_value(crate::format::Fingerprint::default()).expect("json"), "exported_rows": 0
            }))
            .expect("table"),
        );
        assert_eq!(oldest_slice(&doc, 0, &[5, 6]), 6);
        assert_eq!(oldest_slice(&doc, 0, &[5]), 5);
        doc.tables[0].started_in_slice = 1;
        assert_eq!(oldest_slice(&doc, 0, &[5, 6]), 1);
    }

    #[test]
    fn a_table_has_an_item_per_open_lane_a_probe_or_itself_whole() {
        let mut table: TableProgress = serde_json::from_value(serde_json::json!({
            "name": {"schema": "public", "name": "t"}, "mode": "append",
            "schema": {"kind": "table", "columns": [], "primary_key": ["id"]},
            "columns": ["id"], "key": ["id"], "scope": {"type": "whole"},
            "rows_per_chunk": 10, "gaps_probed": false, "done": false, "next_seq": 1,
            "fingerprint": serde_json::to_value(crate::format::Fingerprint::default()).expect("json"), "exported_rows": 0,
            "lanes": [{"done": true}, {"done": false}, {"done": false}]
        }))
        .expect("table");
        assert_eq!(
            open_items(3, &table),
            vec![
                (3, ItemPart::Probe),
                (3, ItemPart::Lane { lane: 1 }),
                (3, ItemPart::Lane { lane: 2 })
            ]
        );
        table.key.clear();
        assert_eq!(open_items(3, &table), vec![(3, ItemPart::Whole)]);
        table.done = true;
        assert!(open_items(3, &table).is_empty());
    }

    #[tokio::test]
    async fn workers_start_claiming_at_their_own_share_of_the_items() {
        let items: Vec<ItemId> = (0..8).map(|t| (t, ItemPart::Whole)).collect();
        let first = |slot| {
            let claims = Claims::new("w".into(), Duration::from_secs(1), items.clone(), slot, 4);
            let t = claims.book.try_lock().expect("book").candidates[0].0;
            t
        };
        assert_eq!([first(0), first(1), first(2), first(3)], [0, 2, 4, 6]);
    }
}
