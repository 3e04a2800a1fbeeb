//! Exporting one key range of a table (every row, the changed rows, or the keys past an
//! `append` cursor) and fingerprinting the source.

use super::append::find_gaps;
use super::plan::{bound_columns, XID_WRAP};
use super::sql::{column_list, copy_err, db_err, first_i64, range_condition};
use super::state::{Delta, Shared};
use crate::chunk::{copy_field, leading_fields, ChunkSink};
use crate::db::copy::{self, CopyLines};
use crate::db::Session;
use crate::format::progress::{ExportScope, Lane, ParentKeys, TableProgress};
use crate::format::{ChunkKind, Fingerprint, KeyRange};
use crate::run::RunError;
use crate::store::sha256_hex;
use chrono::Utc;

/// Exports the next key range of `lane` as chunk `seq`; returns what it added and the
/// lane's new state.
pub(super) async fn export_range(
    shared: &Shared,
    client: &Session<'_>,
    table: &TableProgress,
    lane: &Lane,
    seq: u32,
) -> Result<(Delta, Lane), RunError> {
    let lower = lane.cursor.as_ref().or(lane.after.as_ref());
    let bound = next_bound(client, table, lower, lane.until.as_ref()).await?;
    let last = bound.is_none() || bound == lane.until;
    let range = KeyRange {
        after: lower.cloned(),
        upto: bound.or_else(|| lane.until.clone()),
    };
    let query = RangeQuery::new(table, &range);
    let whole = range.after.is_none() && range.upto.is_none();
    let keys = match &table.parent_keys {
        Some(parent) if whole && query.changed_since.is_some() => KeySet::Held {
            text: Vec::new(),
            rows: 0,
            parent: parent.clone(),
        },
        _ => KeySet::Unopened,
    };
    let mut copy = RangeCopy {
        shared,
        table,
        seq,
        query: &query,
        rows: None,
        keys,
        delta: Delta::default(),
        append_keys: Vec::new(),
        stripped: Vec::new(),
        row: Vec::new(),
        key_line: Vec::with_capacity(64),
    };
    if let Err(e) = copy.read(client).await {
        let keys = match copy.keys {
            KeySet::Writing(sink) => Some(sink),
            KeySet::Unopened | KeySet::Held { .. } => None,
        };
        for sink in [copy.rows, keys].into_iter().flatten() {
            sink.abort().await;
        }
        return Err(e);
    }
    let delta = copy.finish(&range).await?;
    let mut next = lane.clone();
    if range.upto.is_some() {
        next.cursor = range.upto;
    }
    next.done = last;
    Ok((delta, next))
}

/// The key `rows_per_chunk` rows past `lower` (no further than `until`), from an
/// index-only scan; `None` when fewer rows are left.
async fn next_bound(
    client: &Session<'_>,
    table: &TableProgress,
    lower: Option<&Vec<String>>,
    until: Option<&Vec<String>>,
) -> Result<Option<Vec<String>>, RunError> {
    let sql = bound_sql(table, lower, until);
    let row = client.query_opt(&sql, &[]).await.map_err(db_err(
        table,
        client,
        "finding the next key range",
    ))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let bound = (0..table.key.len())
        .map(|i| row.try_get::<_, String>(i))
        .collect::<Result<_, _>>()
        .map_err(db_err(table, client, "reading a key bound"))?;
    Ok(Some(bound))
}

/// The query [`next_bound`] runs.
pub(super) fn bound_sql(
    table: &TableProgress,
    lower: Option<&Vec<String>>,
    until: Option<&Vec<String>>,
) -> String {
    format!(
        "SELECT {} FROM {} WHERE {} ORDER BY {} OFFSET {} LIMIT 1",
        bound_columns(table),
        table.own_rows(),
        range_condition(table, lower, until),
        column_list(&table.key),
        table.rows_per_chunk.saturating_sub(1)
    )
}

/// What one key range reads, and where the key columns are in the rows it reads.
#[derive(Debug, PartialEq)]
pub(super) struct RangeQuery {
    pub(super) select: String,
    /// `changes` incremental: rows at or after this xmin are exported; every row's key goes
    /// to the key set. Each row read then ends in a flag column (`t`: changed).
    pub(super) changed_since: Option<u64>,
    /// Columns read (before the flag).
    pub(super) read: usize,
    /// Columns stored: the first this many of a row read.
    pub(super) exported: usize,
    /// Whether key columns that are not exported are read after them (and cut off).
    pub(super) hidden_keys: bool,
    /// Position of each key column in a row read.
    pub(super) key_positions: Vec<usize>,
}

impl RangeQuery {
    pub(super) fn new(table: &TableProgress, range: &KeyRange) -> Self {
        let name = table.own_rows();
        let condition = range_condition(table, range.after.as_ref(), range.upto.as_ref());
        let changed_since = match table.scope {
            ExportScope::Changed { since_xmin } => Some(since_xmin),
            _ => None,
        };
        // Key columns that are not exported (generated ones, which COPY FROM refuses) are
        // read after the row's columns, for the key set and the append keys, and cut off
        // the row before it is written.
        let hidden: Vec<&String> = table
            .key
            .iter()
            .filter(|k| !table.columns.contains(k))
            .collect();
        let read: Vec<String> = table
            .columns
            .iter()
            .chain(hidden.iter().copied())
            .cloned()
            .collect();
        let select = match changed_since {
            // Everything written at or after the parent's snapshot xmin counts as changed:
            // xmin in the window [since, this snapshot's xmax) of 64-bit xids. xmin is
            // 32-bit, so the window is taken modulo 2^32 (it is shorter than 2^31: see
            // chain_break). Not age(xmin): a frozen row keeps its raw xmin, and one
            // written 2^31 or more xids ago would look newer than the parent and be
            // exported again every time.
            Some(since) => format!(
                "SELECT {}{}(xmin::text::bigint - {low} + {wrap}) % {wrap} \
                   < (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint - {since}) \
                 FROM {name} WHERE {condition}",
                column_list(&read),
                if read.is_empty() { "" } else { ", " },
                low = since % XID_WRAP,
                wrap = XID_WRAP,
            ),
            None => format!(
                "SELECT {} FROM {name} WHERE {condition}",
                column_list(&read)
            ),
        };
        let key_positions = table
            .key
            .iter()
            .filter_map(|k| read.iter().position(|c| c == k))
            .collect();
        Self {
            select,
            changed_since,
            read: read.len(),
            exported: table.columns.len(),
            hidden_keys: !hidden.is_empty(),
            key_positions,
        }
    }
}

/// Key text held in memory before it is known whether it is the parent's key set.
const HELD_KEYS_MAX: usize = 1 << 20;

/// Where a range's live key set (`changes` incremental) goes.
enum KeySet {
    /// Nothing read yet: a chunk is opened at the first key.
    Unopened,
    /// A whole table whose parent's key set is known ([`ParentKeys`]): the key text is
    /// held (up to [`HELD_KEYS_MAX`]) and, if it is the parent's key set, not written
    /// again — a table that did not change costs no store request.
    Held {
        text: Vec<u8>,
        rows: u64,
        parent: ParentKeys,
    },
    Writing(ChunkSink),
}

/// One range's COPY on its way into chunks: rows, the key set, append keys, fingerprints.
struct RangeCopy<'a> {
    shared: &'a Shared,
    table: &'a TableProgress,
    seq: u32,
    query: &'a RangeQuery,
    rows: Option<ChunkSink>,
    keys: KeySet,
    delta: Delta,
    append_keys: Vec<i64>,
    stripped: Vec<u8>,
    row: Vec<u8>,
    key_line: Vec<u8>,
}

impl RangeCopy<'_> {
    async fn read(&mut self, client: &Session<'_>) -> Result<(), RunError> {
        let table = self.table;
        let mut lines = CopyLines::start(client, &self.query.select)
            .await
            .map_err(copy_err(table, client, "starting COPY"))?;
        while let Some(raw) =
            lines
                .next_line()
                .await
                .map_err(copy_err(table, client, "reading COPY data"))?
        {
            self.line(&raw).await?;
        }
        Ok(())
    }

    /// Takes one line of the COPY output.
    async fn line(&mut self, raw: &[u8]) -> Result<(), RunError> {
        let Self {
            shared,
            table,
            seq,
            query,
            rows,
            keys,
            delta,
            append_keys,
            stripped,
            row,
            key_line,
        } = self;
        let (full, export): (&[u8], bool) = match query.changed_since {
            Some(_) => {
                let changed = strip_flag(raw, query.read, stripped);
                (stripped, changed)
            }
            None => (raw, true),
        };
        // The row as stored: the exported columns only.
        let line: &[u8] = if query.hidden_keys {
            row.clear();
            row.extend_from_slice(leading_fields(full, query.exported));
            row.push(b'\n');
            row
        } else {
            full
        };
        delta.fingerprint.add_line(line);
        if matches!(table.scope, ExportScope::Appended { .. }) {
            if let Some(k) = copy_field(full, query.key_positions[0])
                .and_then(|f| std::str::from_utf8(f).ok())
                .and_then(|f| f.parse::<i64>().ok())
            {
                append_keys.push(k);
                delta.key_fingerprint.add_key(k);
            }
        }
        if export {
            let sink =
                rows.get_or_insert_with(|| shared.open_sink(&table.name, *seq, ChunkKind::Rows));
            sink.write_line(line).await?;
        }
        if query.changed_since.is_some() {
            key_fields(full, &query.key_positions, key_line);
            match keys {
                KeySet::Held { text, rows, .. } if text.len() < HELD_KEYS_MAX => {
                    text.extend_from_slice(key_line);
                    *rows += 1;
                }
                KeySet::Held { text, rows, .. } => {
                    // Too big to hold: written as any key set is.
                    let mut sink = open_keys(shared, table, *seq, text, *rows).await?;
                    sink.write_line(key_line).await?;
                    *keys = KeySet::Writing(sink);
                }
                KeySet::Unopened => {
                    let mut sink = open_keys(shared, table, *seq, &[], 0).await?;
                    sink.write_line(key_line).await?;
                    *keys = KeySet::Writing(sink);
                }
                KeySet::Writing(sink) => sink.write_line(key_line).await?,
            }
        }
        Ok(())
    }

    /// Lands the range's chunks; returns what the range added.
    async fn finish(self, range: &KeyRange) -> Result<Delta, RunError> {
        let mut delta = self.delta;
        let changed_rows = self.rows.is_some();
        if let Some(sink) = self.rows {
            let mut chunk = self.shared.land(sink, Some(range.clone())).await?;
            chunk.first_read = self.table.pass_base.is_none();
            delta.chunks.push(chunk);
        }
        match self.keys {
            KeySet::Unopened => {}
            KeySet::Writing(sink) => {
                let chunk = self.shared.land(sink, Some(range.clone())).await?;
                delta.key_chunks.push(chunk);
            }
            KeySet::Held {
                rows,
                parent: ParentKeys::OfRows { rows: before },
                ..
            } if rows == before && !changed_rows => {
                tracing::debug!(table = %self.table.name, "no row changed or deleted: the live keys are the chain's");
                delta.keys_of_rows = true;
            }
            KeySet::Held { text, .. } if text.is_empty() => {}
            KeySet::Held {
                text,
                parent: ParentKeys::Chunk { chunk },
                ..
            } if chunk.text_sha256.as_deref() == Some(sha256_hex(&text).as_str()) => {
                tracing::debug!(table = %self.table.name, chunk = chunk.key, "live key set unchanged: the parent's chunk is kept");
                delta.key_chunks.push(chunk);
            }
            KeySet::Held { text, rows, .. } => {
                let sink = open_keys(self.shared, self.table, self.seq, &text, rows).await?;
                let chunk = self.shared.land(sink, Some(range.clone())).await?;
                delta.key_chunks.push(chunk);
            }
        }
        if matches!(self.table.scope, ExportScope::Appended { .. }) {
            let mut keys = self.append_keys;
            let (after, upto) = (
                first_i64(range.after.as_ref()),
                first_i64(range.upto.as_ref()),
            );
            delta.gaps = find_gaps(&mut keys, after, upto, Utc::now());
        }
        Ok(delta)
    }
}

/// Opens range `seq`'s key-set chunk, starting with `rows` key lines already read.
async fn open_keys(
    shared: &Shared,
    table: &TableProgress,
    seq: u32,
    text: &[u8],
    rows: u64,
) -> Result<ChunkSink, RunError> {
    let mut sink = shared.open_sink(&table.name, seq, ChunkKind::Keys);
    if rows > 0 {
        sink.write_lines(text, rows).await?;
    }
    Ok(sink)
}

/// Cuts the changed flag off a line of a `changes` read ("...\tt\n", or "t\n" alone
/// when no column is read) into `out`, which ends in a newline; returns the flag.
pub(super) fn strip_flag(raw: &[u8], columns_read: usize, out: &mut Vec<u8>) -> bool {
    let changed = raw.len() >= 2 && raw[raw.len() - 2] == b't';
    let flag = if columns_read == 0 { 2 } else { 3 };
    out.clear();
    out.extend_from_slice(&raw[..raw.len().saturating_sub(flag)]);
    out.push(b'\n');
    changed
}

/// The key columns of a COPY line, as a line of their own.
pub(super) fn key_fields(line: &[u8], positions: &[usize], out: &mut Vec<u8>) {
    out.clear();
    for (i, pos) in positions.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        out.extend_from_slice(copy_field(line, *pos).unwrap_or_default());
    }
    out.push(b'\n');
}

/// The fingerprint of `select`'s rows, computed from the source's COPY output.
pub(super) async fn source_fingerprint(
    client: &Session<'_>,
    table: &TableProgress,
    select: &str,
) -> Result<Fingerprint, RunError> {
    copy::fingerprint(client, select).await.map_err(copy_err(
        table,
        client,
        "fingerprinting the source",
    ))
}
