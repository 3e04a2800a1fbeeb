//! Planning a run: its kind and parent, each table's scope, key ranges and lanes.

use super::options::ExportOptions;
use super::pass::append_mark;
use super::sql::{column_list, db_err, range_condition};
use crate::catalog::{self, CatalogTable};
use crate::db::Session;
use crate::format::checkpoint::{Checkpoint, TableCheckpoint};
use crate::format::manifest::{Manifest, SchemaDump, TableEntry};
use crate::format::progress::{
    ExportScope, ExportSettings, Lane, ParentKeys, RunProgress, TableProgress,
};
use crate::format::{
    quote_ident, read_doc, BackupKind, Fingerprint, FingerprintOf, PgSnapshot, TableMode,
    FORMAT_VERSION,
};
use crate::repo::CHECKPOINT_KEY;
use crate::run::{new_run_id, RunError};
use crate::store::WriteStore;
use chrono::Utc;

/// Plans a new run inside the coordinator's snapshot: tables, scopes, marks, sequences;
/// with the parent backup's schema, for the capture to compare with.
pub(super) async fn plan_run(
    client: &Session<'_>,
    store: &dyn WriteStore,
    opts: &ExportOptions,
    run_id: Option<String>,
) -> Result<(RunProgress, Option<SchemaDump>), RunError> {
    let now = Utc::now();
    let row = client
        .query_one(
            "SELECT pg_current_snapshot()::text, current_setting('server_version'), current_database(), \
                    (SELECT system_identifier::text FROM pg_control_system())",
            &[],
        )
        .await
        .map_err(client.failed("reading the snapshot"))?;
    let snapshot_text: String = row.get(0);
    let snapshot: PgSnapshot = snapshot_text
        .parse()
        .map_err(|reason| client.unexpected("reading the snapshot", &snapshot_text, reason))?;
    let tables = catalog::discover(client, &opts.settings.selection).await?;
    let sequences = catalog::sequences(client, &opts.settings.selection.schemas).await?;

    let mut warnings = Vec::new();
    let system_identifier: Option<String> = row.get(3);
    let parent = match opts.full {
        true => None,
        false => read_parent(store, &mut warnings).await?,
    };
    // A chain continues only on the same server with the same transaction counter, and
    // only while 32-bit xid comparisons still order it.
    let parent = parent.filter(|(checkpoint, _)| {
        let reason = chain_break(checkpoint, &snapshot, system_identifier.as_deref());
        if let Some(reason) = &reason {
            let warning = format!("taking a full backup instead of an incremental: {reason}");
            tracing::warn!("{warning}");
            warnings.push(warning);
        }
        reason.is_none()
    });
    let kind = if parent.is_some() {
        BackupKind::Incremental
    } else {
        BackupKind::Full
    };
    let mut planned = Vec::with_capacity(tables.len());
    for table in tables {
        planned.push(plan_table(client, table, parent.as_ref(), opts).await?);
    }
    let run_id = run_id.unwrap_or_else(|| new_run_id(now));
    let deep = opts.settings.deep
        || (opts.settings.deep_every > 0
            && parent
                .as_ref()
                .is_some_and(|(cp, _)| cp.runs_since_deep + 1 >= opts.settings.deep_every));
    let progress = RunProgress {
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
            chunk_rows: opts.settings.chunk_rows.max(1),
            chunk_bytes: opts.settings.chunk_bytes.max(1),
            zstd_level: opts.settings.zstd_level,
            gap_ttl_secs: opts.settings.gap_ttl.as_secs(),
        },
        tables: planned,
        sequences,
        schema_dump: None,
        schema_slice: 0,
        slice_snapshots: Vec::new(),
        pass: None,
        consistent_in_slice: None,
        inconsistent: None,
        fan_out: false,
        slices: 1,
        store_requests: 0,
        warnings,
    };
    Ok((
        progress,
        parent.and_then(|(_, manifest)| manifest.schema_dump),
    ))
}

/// The backup the checkpoint names, with its manifest; `None` (and a warning) when it has
/// none or one edited after it was sealed.
async fn read_parent(
    store: &dyn WriteStore,
    warnings: &mut Vec<String>,
) -> Result<Option<(Checkpoint, Manifest)>, RunError> {
    let Some((checkpoint, _)) = read_doc::<Checkpoint>(store, CHECKPOINT_KEY).await? else {
        return Ok(None);
    };
    match crate::format::manifest::read_manifest(store, &checkpoint.backup_id).await {
        Ok(Some(manifest)) => Ok(Some((checkpoint, manifest))),
        // Never build on a manifest edited after it was sealed.
        Err(crate::format::FormatError::Invalid { key, reason }) => {
            warnings.push(format!(
                "the checkpoint's manifest {key} is {reason}; taking a full backup"
            ));
            Ok(None)
        }
        Err(e) => Err(e.into()),
        Ok(None) => {
            warnings.push(format!(
                "the checkpoint's backup {} has no manifest; taking a full backup",
                checkpoint.backup_id
            ));
            Ok(None)
        }
    }
}

/// 32-bit transaction ids wrap around at this.
pub(super) const XID_WRAP: u64 = 1 << 32;

/// Transactions since a snapshot beyond which a 32-bit `xmin` no longer tells whether a
/// row was written before or after it.
pub(super) const MAX_XID_DISTANCE: u64 = 1 << 31;

/// Why no chain may continue from `parent` at `now`: another server, a transaction
/// counter that went backwards (a restored copy), or too many transactions since.
pub(super) fn chain_break(
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

pub(super) async fn plan_table(
    client: &Session<'_>,
    table: CatalogTable,
    parent: Option<&(Checkpoint, Manifest)>,
    opts: &ExportOptions,
) -> Result<TableProgress, RunError> {
    let (previous, new_chain) = previous_link(&table, parent);
    let mut progress = new_progress(&table, rows_per_chunk(&table, opts), new_chain);
    match table.mode {
        TableMode::Snapshot => {}
        TableMode::Changes => {
            if let (Some((checkpoint, _)), Some((_, entry))) = (parent, previous) {
                progress.scope = ExportScope::Changed {
                    since_xmin: checkpoint.snapshot.xmin,
                };
                progress.inherited = entry.chunks.clone();
                progress.parent_keys = match entry.key_chunks.as_slice() {
                    [one] if one.text_sha256.is_some() => {
                        Some(ParentKeys::Chunk { chunk: one.clone() })
                    }
                    [] if !entry.has_key_set() && entry.fingerprint_of == FingerprintOf::Rows => {
                        Some(ParentKeys::OfRows {
                            rows: entry.fingerprint.rows,
                        })
                    }
                    _ => None,
                };
            }
        }
        TableMode::Append => {
            let relation = table.name.own_rows(table.schema.is_partitioned());
            let mark = append_mark(client, &table.name, &relation, &table.key[0].0).await?;
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
    progress.lanes = plan_lanes(client, &progress, table.est_rows, opts.settings.lanes()).await?;
    Ok(progress)
}

/// The parent's link for this table, trusted only if it is provably the same table; else
/// why the table starts a new chain (`None` for a full backup).
pub(super) fn previous_link<'a>(
    table: &CatalogTable,
    parent: Option<&'a (Checkpoint, Manifest)>,
) -> (
    Option<(&'a TableCheckpoint, &'a TableEntry)>,
    Option<String>,
) {
    let Some((checkpoint, manifest)) = parent else {
        return (None, None);
    };
    let cp = checkpoint.tables.iter().find(|t| t.name == table.name);
    let entry = manifest.tables.iter().find(|t| t.name == table.name);
    let (Some(cp), Some(entry)) = (cp, entry) else {
        return (None, Some("it is not in the parent backup".to_owned()));
    };
    let reason = match &cp.identity {
        None => Some("the parent recorded no identity for it".to_owned()),
        Some(was) => table.identity.change_from(was),
    }
    .or_else(|| {
        (cp.mode != table.mode).then(|| format!("its mode changed ({} to {})", cp.mode, table.mode))
    });
    match reason {
        None => (Some((cp, entry)), None),
        Some(reason) => (None, Some(reason)),
    }
}

/// Keys per range: about `chunk_bytes` of rows at the table's average row width, at most
/// `chunk_rows`.
pub(super) fn rows_per_chunk(table: &CatalogTable, opts: &ExportOptions) -> u64 {
    let avg_row = if table.est_rows >= 1.0 {
        (table.heap_bytes as f64 / table.est_rows).max(16.0)
    } else {
        100.0
    };
    ((opts.settings.chunk_bytes as f64 / avg_row) as u64).clamp(1, opts.settings.chunk_rows.max(1))
}

/// A table's progress before any of it is exported, of scope `Whole`.
fn new_progress(
    table: &CatalogTable,
    rows_per_chunk: u64,
    new_chain: Option<String>,
) -> TableProgress {
    TableProgress {
        name: table.name.clone(),
        mode: table.mode,
        columns: table.columns.clone(),
        key: table.key.iter().map(|(n, _)| n.clone()).collect(),
        scope: ExportScope::Whole,
        inherited: Vec::new(),
        parent_keys: None,
        keys_of_rows: false,
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
        item_generation: 0,
        new_chain,
        schema: table.schema.clone(),
    }
}

/// One lane over the key range a table's scope covers, `(after, until]` with `None`
/// open; `None` for an empty `append` range.
pub(super) fn scope_lane(table: &TableProgress) -> Option<Lane> {
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

/// Splits a keyed table into up to `most` lanes of about equal row counts (bounds from
/// an index-only scan), so that several connections, of one slice or of many workers,
/// export one big table at once ([`super::ExportSettings::lanes`]).
pub(super) async fn plan_lanes(
    client: &Session<'_>,
    table: &TableProgress,
    est_rows: f64,
    most: usize,
) -> Result<Vec<Lane>, RunError> {
    let Some(whole) = scope_lane(table) else {
        return Ok(Vec::new());
    };
    let (after, until) = (whole.after.clone(), whole.until.clone());
    let wanted = if table.key.is_empty() {
        1
    } else {
        ((est_rows / table.rows_per_chunk.max(1) as f64).ceil() as usize).clamp(1, most.max(1))
    };
    if wanted == 1 {
        return Ok(vec![whole]);
    }
    let condition = range_condition(table, after.as_ref(), until.as_ref());
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
            client,
            "splitting the table into lanes",
        ))?;
        let Some(row) = row else { break };
        let bound: Vec<String> = (0..table.key.len())
            .map(|i| row.try_get::<_, String>(i))
            .collect::<Result<_, _>>()
            .map_err(db_err(table, client, "reading a lane bound"))?;
        if bounds.last() != Some(&bound) {
            bounds.push(bound);
        }
    }
    Ok(lanes_between(after, bounds, until))
}

/// The lanes `(after, b1], (b1, b2], ..., (bn, until]`.
pub(super) fn lanes_between(
    after: Option<Vec<String>>,
    bounds: Vec<Vec<String>>,
    until: Option<Vec<String>>,
) -> Vec<Lane> {
    let mut lanes = Vec::with_capacity(bounds.len() + 1);
    let mut previous = after;
    for bound in bounds {
        let next = Some(bound);
        lanes.push(Lane {
            after: std::mem::replace(&mut previous, next.clone()),
            until: next,
            cursor: None,
            done: false,
        });
    }
    lanes.push(Lane {
        after: previous,
        until,
        cursor: None,
        done: false,
    });
    lanes
}

/// `k1::text AS tidemark_bound_0, ...`: aliased, so that ORDER BY names the key columns,
/// not these text casts.
pub(super) fn bound_columns(table: &TableProgress) -> String {
    table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{}::text AS tidemark_bound_{i}", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(", ")
}
