//! SQL fragments the export builds: column lists, key comparisons.

use crate::db::copy::CopyError;
use crate::db::Session;
use crate::format::progress::TableProgress;
use crate::format::quote_literal;
use crate::run::RunError;

pub(super) fn db_err<'a>(
    table: &TableProgress,
    client: &'a Session,
    what: &'static str,
) -> impl Fn(tokio_postgres::Error) -> RunError + 'a {
    let name = table.name.clone();
    move |e| RunError::table(&name, client.failed(what)(e))
}

/// Maps a COPY's failure to the table's error; a cut-off stream may succeed when retried.
pub(super) fn copy_err<'a>(
    table: &TableProgress,
    client: &'a Session,
    what: &'static str,
) -> impl Fn(CopyError) -> RunError + 'a {
    let name = table.name.clone();
    move |e| RunError::table(&name, client.failed_copy(what)(e))
}

pub(super) use crate::format::column_list;

/// `(k1, k2) OP ('v1'::t1, 'v2'::t2)`.
pub(super) fn key_compare(table: &TableProgress, op: &str, values: &[String]) -> String {
    let types: Vec<&str> = table
        .key
        .iter()
        .map(|k| {
            table
                .schema
                .columns
                .iter()
                .find(|c| &c.name == k)
                .map(|c| c.type_name.as_str())
                .unwrap_or("text")
        })
        .collect();
    let literals = values
        .iter()
        .zip(types)
        .map(|(v, t)| format!("{}::{t}", quote_literal(v)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("({}) {op} ({literals})", column_list(&table.key))
}

pub(super) fn first_i64(values: Option<&Vec<String>>) -> Option<i64> {
    values.and_then(|v| v.first()).and_then(|v| v.parse().ok())
}

/// `key > lower AND key <= upper`, each side only when given.
pub(super) fn range_condition(
    table: &TableProgress,
    lower: Option<&Vec<String>>,
    upper: Option<&Vec<String>>,
) -> String {
    let conditions: Vec<String> = [(">", lower), ("<=", upper)]
        .into_iter()
        .filter_map(|(op, values)| values.map(|v| key_compare(table, op, v)))
        .collect();
    if conditions.is_empty() {
        "true".to_owned()
    } else {
        conditions.join(" AND ")
    }
}
