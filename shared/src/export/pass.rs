//! The consistency pass: rounds that bring every table to one slice's snapshot.

use super::options::ExportOptions;
use super::plan::{plan_lanes, plan_table, table_shape, MAX_XID_DISTANCE};
use super::worker::reset;
use crate::catalog;
use crate::db::Session;
use crate::format::progress::{ConsistencyPass, ExportScope, PassBase, RunProgress, TableProgress};
use crate::format::{quote_ident, Fingerprint, TableMode, TableName};
use crate::run::RunError;

/// The xmin of slice `slice`'s snapshot (the run's first snapshot if unknown).
pub(super) fn slice_xmin(doc: &RunProgress, slice: u32) -> u64 {
    doc.slice_snapshots
        .iter()
        .find(|s| s.slice == slice)
        .map_or(doc.snapshot.xmin, |s| s.snapshot.xmin)
}

/// Starts a consistency-pass round in this slice: every table not yet of this slice's
/// snapshot exports again what changed since the oldest snapshot its data is of.
/// Returns false when the run gives up on one point in time instead.
pub(super) async fn start_round(
    doc: &mut RunProgress,
    client: &Session<'_>,
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
            table.keys_of_rows = base.keys_of_rows;
            table.gaps_to_probe.clear();
            table.gaps_probed = true;
            for lane in &mut table.lanes {
                lane.done = true;
            }
            table.done = true;
        }
    }
    let round = doc.pass.as_ref().map_or(0, |p| p.round) + 1;
    if round > opts.settings.max_pass_rounds.max(1) {
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
    reconcile_catalog(doc, client, opts).await?;
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
            keys_of_rows: table.keys_of_rows,
        });
        let since = (!too_long).then_some(since);
        prepare_pass(table, since, client, opts, slice).await?;
    }
    Ok(true)
}

/// Sets a table up to be brought to this slice's snapshot: what changed since
/// `since_xmin`, or (`None`) all of a `changes` table again.
pub(super) async fn prepare_pass(
    table: &mut TableProgress,
    since_xmin: Option<u64>,
    client: &Session<'_>,
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
            // Changes since then are not changes since the parent: the key set is read
            // and written whole.
            table.parent_keys = None;
            table.keys_of_rows = false;
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
            let mark = append_mark(client, &table.name, &relation, &table.key[0]).await?;
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
    table.lanes = plan_lanes(client, table, table.est_rows, opts.settings.lanes()).await?;
    Ok(())
}

/// The highest key of an `append` table now (`None` when empty).
pub(super) async fn append_mark(
    client: &Session<'_>,
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
        .map_err(|e| RunError::table(table, client.failed("reading the append mark")(e)))?
        .get(0);
    Ok(mark)
}

/// The tables as they are in this snapshot: a table created during the run is added, one
/// whose definition changed (another oid, other columns or key) is exported whole again,
/// one dropped is left out; each with a warning in the manifest.
pub(super) async fn reconcile_catalog(
    doc: &mut RunProgress,
    client: &Session<'_>,
    opts: &ExportOptions,
) -> Result<(), RunError> {
    let found = catalog::discover(client, &opts.settings.selection).await?;
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
                tables.push(plan_table(client, table, None, opts).await?);
            }
            None => {
                warnings.push(format!(
                    "table {} was created during the backup; it is exported whole at the backup's moment",
                    table.name
                ));
                tables.push(plan_table(client, table, None, opts).await?);
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
