//! `append` tables: gaps in the key sequence left by transactions still in flight, probed
//! again for late commits until a TTL, and the check that no row was missed.

use super::range::source_fingerprint;
use super::sql::{column_list, copy_err};
use super::state::{Delta, Shared};
use super::worker::reset;
use crate::chunk::{copy_field, ChunkSink};
use crate::db::copy::CopyLines;
use crate::db::Session;
use crate::format::checkpoint::GapRange;
use crate::format::progress::{AppendTruth, ExportScope, Lane, TableProgress};
use crate::format::{quote_ident, ChunkKind, Fingerprint};
use crate::run::RunError;
use chrono::{DateTime, Utc};

/// Most gap ranges remembered per `append` table; beyond that the oldest are dropped
/// (and the row-count check catches any row they hid).
pub(super) const MAX_GAPS: usize = 10_000;

/// The key ranges in `(after, upto]` that no visible row had.
pub(super) fn find_gaps(
    keys: &mut [i64],
    after: Option<i64>,
    upto: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<GapRange> {
    keys.sort_unstable();
    let mut gaps = Vec::new();
    // The next key expected; `None` before the first key, and after the largest key
    // there is.
    let mut expected = after.and_then(|a| a.checked_add(1));
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
        match k.checked_add(1) {
            Some(next) => expected = Some(next),
            None => return gaps,
        }
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
pub(super) async fn probe_gaps(
    shared: &Shared,
    client: &Session<'_>,
    table: &TableProgress,
    t: usize,
) -> Result<Delta, RunError> {
    let mut delta = Delta::default();
    let gaps = &table.gaps_to_probe;
    if gaps.is_empty() {
        return Ok(delta);
    }
    let select = probe_select(table, gaps);
    let key_pos = table
        .columns
        .iter()
        .position(|c| c == &table.key[0])
        .unwrap_or(0);
    let seq = shared.next_seq(t).await;
    let mut sink: Option<ChunkSink> = None;
    let mut found: Vec<i64> = Vec::new();
    let streamed: Result<(), RunError> = async {
        let mut lines = CopyLines::start(client, &select).await.map_err(copy_err(
            table,
            client,
            "probing append gaps",
        ))?;
        while let Some(line) =
            lines
                .next_line()
                .await
                .map_err(copy_err(table, client, "probing append gaps"))?
        {
            delta.fingerprint.add_line(&line);
            if let Some(k) = copy_field(&line, key_pos)
                .and_then(|f| std::str::from_utf8(f).ok())
                .and_then(|f| f.parse::<i64>().ok())
            {
                found.push(k);
                delta.key_fingerprint.add_key(k);
            }
            let s = sink.get_or_insert_with(|| shared.open_sink(&table.name, seq, ChunkKind::Rows));
            s.write_line(&line).await?;
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
    let ttl = chrono::TimeDelta::seconds(shared.opts.settings.gap_ttl.as_secs() as i64);
    delta.gaps = still_empty(gaps, &mut found, ttl, Utc::now());
    Ok(delta)
}

/// The rows of an `append` table in its gaps.
pub(super) fn probe_select(table: &TableProgress, gaps: &[GapRange]) -> String {
    let key = quote_ident(&table.key[0]);
    let values = gaps
        .iter()
        .map(|g| format!("({}::int8, {}::int8)", g.from, g.to))
        .collect::<Vec<_>>()
        .join(", ");
    let columns = table
        .columns
        .iter()
        .map(|c| format!("t.{}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT {columns} FROM {} t JOIN (VALUES {values}) g(lo, hi) ON t.{key} BETWEEN g.lo AND g.hi",
        table.own_rows(),
    )
}

/// The parts of `gaps` that none of the `found` keys filled, for gaps seen within `ttl`
/// of `now` (older ones are given up).
pub(super) fn still_empty(
    gaps: &[GapRange],
    found: &mut [i64],
    ttl: chrono::TimeDelta,
    now: DateTime<Utc>,
) -> Vec<GapRange> {
    found.sort_unstable();
    let mut left = Vec::new();
    for gap in gaps.iter().filter(|g| g.seen_at + ttl >= now) {
        // The first key of the gap not yet accounted for (`None`: past the largest key).
        let mut start = Some(gap.from);
        for &k in found.iter().filter(|&&k| k >= gap.from && k <= gap.to) {
            if let Some(from) = start.filter(|&from| k > from) {
                left.push(GapRange {
                    from,
                    to: k - 1,
                    seen_at: gap.seen_at,
                });
            }
            start = k.checked_add(1);
        }
        if let Some(from) = start.filter(|&from| from <= gap.to) {
            left.push(GapRange {
                from,
                to: gap.to,
                seen_at: gap.seen_at,
            });
        }
    }
    left
}

/// What the `append` check found.
#[derive(Debug)]
pub(super) enum AppendCheck {
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
pub(super) async fn check_append(
    shared: &Shared,
    client: &Session<'_>,
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
        let whole = export_whole(table, shared.slice, upto);
        return Ok(AppendCheck::ExportWhole(Box::new(whole)));
    }
    let rows = if deep {
        Some(
            source_fingerprint(
                client,
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

/// `table` to be exported again whole up to `upto`, as a new chain, from `slice` on.
pub(super) fn export_whole(table: &TableProgress, slice: u32, upto: i64) -> TableProgress {
    let mut whole = table.clone();
    reset(&mut whole, slice);
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
    whole
}
