//! Sequences: set to their recorded values, and checked against the keys restored.

use super::error::RestoreError;
use crate::db::{DbError, DbSettings};
use crate::format::manifest::{Manifest, TableEntry};
use crate::format::{quote_ident, quote_literal};
use tokio_postgres::Client;

/// Sequences a restore of `tables` sets: all of them for a whole restore, those owned
/// by a restored table for a subset.
pub(super) fn wanted_sequence(
    seq: &crate::format::manifest::SequenceValue,
    tables: &[TableEntry],
    all: usize,
) -> bool {
    if tables.len() == all {
        return true;
    }
    seq.owned_by
        .as_ref()
        .is_some_and(|(t, _)| tables.iter().any(|e| &e.name == t))
}

/// SQL naming `seq` in the target as text for `to_regclass`: the sequence's own name
/// (pg_dump keeps identity sequences' names), never what a column resolves to — after a
/// serial column became an identity one, `pg_get_serial_sequence` names the old serial
/// sequence it still owns, not the identity's.
pub(super) fn sequence_regclass(seq: &crate::format::manifest::SequenceValue) -> String {
    quote_literal(&seq.name.quoted())
}

/// For each restored serial or identity sequence, a query that finds whether the source
/// held it behind the keys its column holds (rows written with explicit keys, or a
/// sequence reset behind its data), so that `nextval` would return a key the data
/// already uses; each row it returns is a warning naming the sequence. With `advance`
/// (`--advance-sequences`) it also moves the sequence past those keys, within its
/// bounds; otherwise the sequence stays exactly as the source had it. Integer columns
/// only.
pub(super) fn sequence_catch_up(
    manifest: &Manifest,
    tables: &[TableEntry],
    advance: bool,
) -> Vec<String> {
    let mut queries = Vec::new();
    for seq in manifest
        .sequences
        .iter()
        .filter(|s| wanted_sequence(s, tables, manifest.tables.len()))
    {
        let Some((table, column)) = &seq.owned_by else {
            continue;
        };
        let integer = tables.iter().any(|t| {
            &t.name == table
                && t.schema.columns.iter().any(|c| {
                    &c.name == column
                        && matches!(c.type_name.as_str(), "smallint" | "integer" | "bigint")
                })
        });
        let next = if seq.is_called {
            seq.last_value.checked_add(seq.increment_by)
        } else {
            Some(seq.last_value)
        };
        let (Some(next), true) = (next, integer) else {
            continue;
        };
        let (extreme, used, bound) = if seq.increment_by > 0 {
            ("max", format!(">= {next}"), format!("<= {}", seq.max_value))
        } else {
            ("min", format!("<= {next}"), format!(">= {}", seq.min_value))
        };
        let regclass = sequence_regclass(seq);
        let (action, outcome) = if advance {
            (
                format!("setval(to_regclass({regclass}), m, true)"),
                "moved past them",
            )
        } else {
            (
                "m".to_owned(),
                "left as the source had it (--advance-sequences moves it past them)",
            )
        };
        queries.push(format!(
            "SELECT format('sequence %s was behind the keys in %s: its next value %s is already used (the keys reach %s); {outcome}', \
               {name}, {col}, {next}, m) \
             FROM (SELECT m, CASE WHEN m {used} AND m {bound} \
                     THEN {action} END AS moved \
                   FROM (SELECT {extreme}({column})::bigint AS m FROM {table}) d) x \
             WHERE moved IS NOT NULL",
            name = quote_literal(&seq.name.to_string()),
            col = quote_literal(&format!("{table}.{column}")),
            column = quote_ident(column),
            table = table.quoted(),
        ));
    }
    queries
}

pub(super) async fn set_sequences(
    client: &Client,
    target: &DbSettings,
    manifest: &Manifest,
    tables: &[TableEntry],
    data_only: bool,
) -> Result<(), RestoreError> {
    for seq in manifest
        .sequences
        .iter()
        .filter(|s| wanted_sequence(s, tables, manifest.tables.len()))
    {
        let regclass = sequence_regclass(seq);
        let sql = format!(
            "SELECT setval(to_regclass({regclass}), {}, {}) WHERE to_regclass({regclass}) IS NOT NULL",
            seq.last_value, seq.is_called
        );
        if let Err(e) = client.batch_execute(&sql).await {
            if data_only {
                tracing::warn!(sequence = %seq.name, error = %e, "could not set a sequence");
                continue;
            }
            return Err(DbError::query("setting sequences", target, e).into());
        }
    }
    Ok(())
}
