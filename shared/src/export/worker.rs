//! The worker pool: one connection each in the slice's snapshot, reconnecting on a dropped
//! connection, taking work from the shared queue.

use super::append::{check_append, probe_gaps, AppendCheck};
use super::keyless::export_keyless;
use super::range::export_range;
use super::state::{Shared, Work};
use crate::db::{Connection, DbError, DbSettings, Session};
use crate::error::Classified;
use crate::format::progress::{ExportScope, TableProgress};
use crate::format::Fingerprint;
use crate::run::RunError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Times a worker reconnects in one slice after losing its connection.
pub(super) const RECONNECTS: u32 = 5;

pub(super) async fn worker(shared: Arc<Shared>, db: DbSettings) -> Result<(), RunError> {
    let mut connection = Connection::connect(&db).await?;
    let mut reconnects = 0;
    while !shared.past_deadline() {
        let Some(work) = shared.next_work().await? else {
            break;
        };
        let Err(err) = in_snapshot(&shared, &mut connection, work).await else {
            continue;
        };
        if !err.kind().is_transient() || reconnects >= RECONNECTS || alive(&connection).await {
            return Err(err);
        }
        // The connection died (backend terminated, server restarted, failover): redo
        // the work on a new one, in the same snapshot while the coordinator holds it.
        reconnects += 1;
        tracing::warn!(run_id = shared.run_id, attempt = reconnects, error = %err, "lost the database connection; redoing the work on a new one");
        shared.push_front(work);
        connection = reconnect(&db, reconnects).await?;
        // Only while the coordinator holds the snapshot can it still be imported.
        let lost = |e: DbError| RunError::SnapshotLost {
            detail: e.to_string(),
        };
        let check = connection.snapshot(Some(&shared.snapshot_id)).await;
        check.map_err(lost)?.commit().await.map_err(lost)?;
    }
    Ok(())
}

/// Whether the connection still answers. Asked after a failure rather than read from
/// `is_closed` alone: a terminated backend's connection is only seen closed once its
/// task has read the end of the stream, which may not have happened yet when the
/// statement's error arrives.
async fn alive(connection: &Connection) -> bool {
    let session = connection.session();
    !session.is_closed() && session.batch_execute("").await.is_ok()
}

/// Does `work` in the slice's snapshot, imported into a transaction on `connection`.
/// What the work read is recorded before it returns, so a COMMIT that fails (the
/// connection went away) loses nothing: it is logged, and the next piece of work finds
/// the connection closed and reconnects.
async fn in_snapshot(
    shared: &Shared,
    connection: &mut Connection,
    work: Work,
) -> Result<(), RunError> {
    let snapshot = connection.snapshot(Some(&shared.snapshot_id)).await?;
    do_work(shared, &snapshot.session(), work).await?;
    if let Err(e) = snapshot.commit().await {
        tracing::warn!(run_id = shared.run_id, error = %crate::error_chain(&e), "could not end a snapshot transaction");
    }
    Ok(())
}

/// A new connection after the `attempt`-th loss, waiting a little longer each time for
/// a restarting server (about a minute in all).
pub(super) async fn reconnect(db: &DbSettings, attempt: u32) -> Result<Connection, RunError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(500 * u64::from(attempt));
    loop {
        tokio::time::sleep(delay).await;
        match Connection::connect(db).await {
            Ok(client) => return Ok(client),
            Err(e) if e.kind().is_transient() && started.elapsed() < Duration::from_secs(60) => {
                tracing::warn!(error = %e, "the database is not reachable yet");
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

pub(super) async fn do_work(
    shared: &Shared,
    client: &Session<'_>,
    work: Work,
) -> Result<(), RunError> {
    match work {
        Work::Keyless(t) => {
            // A keyless table has no cursor: it is exported whole within one slice.
            let mut table = shared.begin(t).await;
            reset(&mut table, shared.slice);
            shared.replace(t, table.clone()).await?;
            let delta = export_keyless(shared, client, &table, t).await?;
            shared.record(t, None, delta, false).await?;
            shared.mark_done(t).await
        }
        Work::Probe(t) => {
            let table = shared.begin(t).await;
            let delta = probe_gaps(shared, client, &table, t).await?;
            if shared.record(t, None, delta, true).await? {
                finalize(shared, client, t).await?;
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
                let (delta, next) = export_range(shared, client, &table, &lane, seq).await?;
                lane = next;
                if shared
                    .record(t, Some((l, lane.clone())), delta, false)
                    .await?
                {
                    finalize(shared, client, t).await?;
                }
            }
            Ok(())
        }
        Work::Finalize(t) => finalize(shared, client, t).await,
    }
}

/// Clears what a run exported of a table, to export it again.
pub(super) fn reset(table: &mut TableProgress, slice: u32) {
    table.chunks.clear();
    table.key_chunks.clear();
    table.keys_of_rows = false;
    table.fingerprint = Fingerprint::default();
    table.exported_rows = 0;
    table.gaps.clear();
    table.key_fingerprint = Fingerprint::default();
    table.truth = None;
    table.started_in_slice = slice;
}

/// All of a table is exported: for an `append` table, take the source's truth and check
/// the chain against it; then mark it done.
pub(super) async fn finalize(
    shared: &Shared,
    client: &Session<'_>,
    t: usize,
) -> Result<(), RunError> {
    let table = shared.begin(t).await;
    if let ExportScope::Appended { upto, .. } = table.scope {
        match check_append(shared, client, &table, upto).await? {
            AppendCheck::ExportWhole(mut whole) => {
                if shared.fan_out {
                    // New items, which the next workers export.
                    whole.item_generation += 1;
                    return shared.replace(t, *whole).await;
                }
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
