//! The catalog: which tables a backup covers, their definitions, keys and modes.
//!
//! Tables are every ordinary and partitioned table of the configured schemas (partitions
//! are exported through their root, once), or an explicit list. Names follow `pg_dump
//! -t`: an unquoted name is folded to lower case, a double-quoted one is taken as is.

use std::collections::{BTreeMap, HashMap};

use tokio_postgres::Row;

use crate::config::{parse_name, parse_table_mode};
use crate::db::{DbError, Session};
use crate::error::{Classified, ErrorKind};
use crate::format::checkpoint::{ColumnIdentity, PartitionIdentity, TableIdentity};
use crate::format::manifest::{
    ColumnDef, ConstraintDef, IndexDef, PartitionDef, SequenceValue, TableSchema,
};
use crate::format::{TableMode, TableName};

/// Which tables to back up, and mode overrides: settings of export (flattened into
/// [`crate::export::ExportSettings`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TableSelection {
    /// Schemas whose tables are backed up (comma-separated).
    #[arg(
        long,
        env = "TIDEMARK_SCHEMAS",
        value_delimiter = ',',
        default_value = "public",
        value_parser = parse_name
    )]
    pub schemas: Vec<String>,
    /// Only these tables (a,b,sch.c; "Quoted"."Names" keep their case).
    #[arg(long, env = "TIDEMARK_TABLES", value_delimiter = ',', value_parser = parse_name)]
    pub tables: Vec<String>,
    /// Override a table's mode: NAME=changes|append|snapshot (repeatable or comma-separated).
    #[arg(long = "table-mode", env = "TIDEMARK_TABLE_MODES", value_delimiter = ',', value_name = "NAME=MODE", value_parser = parse_table_mode)]
    pub modes: Vec<(String, TableMode)>,
}

/// Errors of table discovery.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("invalid table name {0:?}")]
    InvalidName(String),
    #[error("unknown table {0} (not found in schemas {1})")]
    UnknownTable(String, String),
    #[error("table name {0} is ambiguous: it exists in schemas {1}; qualify it")]
    Ambiguous(String, String),
    #[error("table {table}: {reason}")]
    ModeNotPossible { table: TableName, reason: String },
    #[error("no tables to back up in schemas {0}")]
    NothingToBackUp(String),
}

impl Classified for CatalogError {
    fn kind(&self) -> ErrorKind {
        match self {
            CatalogError::Db(e) => e.kind(),
            CatalogError::InvalidName(_)
            | CatalogError::UnknownTable(..)
            | CatalogError::Ambiguous(..)
            | CatalogError::ModeNotPossible { .. }
            | CatalogError::NothingToBackUp(_) => ErrorKind::Fatal,
        }
    }
}

/// A table as discovered, with what the export needs.
#[derive(Debug, Clone)]
pub struct CatalogTable {
    pub name: TableName,
    pub oid: u32,
    pub mode: TableMode,
    pub schema: TableSchema,
    /// Exported columns (not generated), in table order.
    pub columns: Vec<String>,
    /// Primary key columns and their types: the index's key columns, not its `INCLUDE` ones.
    pub key: Vec<(String, String)>,
    /// Heap bytes and estimated rows (all partitions), for sizing chunks.
    pub heap_bytes: i64,
    pub est_rows: f64,
    /// What makes it the same table from one backup to the next.
    pub identity: TableIdentity,
}

/// Parses `name`, `schema.name`, with `"quoted"` parts.
///
/// # Errors
/// [`CatalogError::InvalidName`] for unbalanced quotes or too many parts.
pub fn parse_table_name(raw: &str) -> Result<(Option<String>, String), CatalogError> {
    let invalid = || CatalogError::InvalidName(raw.to_owned());
    let mut parts = Vec::new();
    let mut chars = raw.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(invalid()),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' || c == '"' {
                    break;
                }
                part.extend(c.to_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return Err(invalid());
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(_) => return Err(invalid()),
        }
    }
    match parts.len() {
        1 => Ok((None, parts.remove(0))),
        2 => {
            let name = parts.remove(1);
            Ok((Some(parts.remove(0)), name))
        }
        _ => Err(invalid()),
    }
}

fn q<'a>(
    client: &'a Session,
    what: &'static str,
) -> impl Fn(tokio_postgres::Error) -> CatalogError + 'a {
    move |e| CatalogError::Db(client.failed(what)(e))
}

/// Finds the selected tables and reads their definitions.
///
/// # Errors
/// [`CatalogError::UnknownTable`] naming a listed table that does not exist (nothing has
/// been written by then), mode errors, query errors.
pub async fn discover(
    client: &Session<'_>,
    selection: &TableSelection,
) -> Result<Vec<CatalogTable>, CatalogError> {
    let schemas = if selection.schemas.is_empty() {
        vec!["public".to_owned()]
    } else {
        selection.schemas.clone()
    };
    let rows = client
        .query(
            "SELECT c.oid, n.nspname, c.relname, c.relkind::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence <> 't' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
             ORDER BY 2, 3",
            &[],
        )
        .await
        .map_err(q(client, "listing tables"))?;
    let mut all: BTreeMap<TableName, (u32, String)> = BTreeMap::new();
    for row in rows {
        let name = TableName::new(row.get::<_, String>(1), row.get::<_, String>(2));
        all.insert(name, (row.get(0), row.get(3)));
    }
    let resolve = |raw: &str| resolve_table(&all, &schemas, raw);
    let chosen: Vec<TableName> = if selection.tables.is_empty() {
        all.keys()
            .filter(|t| schemas.contains(&t.schema))
            .cloned()
            .collect()
    } else {
        let mut v = Vec::new();
        for raw in &selection.tables {
            let t = resolve(raw)?;
            if !v.contains(&t) {
                v.push(t);
            }
        }
        v
    };
    let mut overrides = BTreeMap::new();
    for (raw, mode) in &selection.modes {
        overrides.insert(resolve(raw)?, *mode);
    }
    if chosen.is_empty() {
        return Err(CatalogError::NothingToBackUp(schemas.join(", ")));
    }
    let picked = chosen
        .into_iter()
        .filter_map(|name| all.remove(&name).map(|(oid, relkind)| (name, oid, relkind)))
        .collect();
    let mut out = describe(client, picked).await?;
    for table in &mut out {
        if let Some(mode) = overrides.get(&table.name) {
            check_mode(table, *mode)?;
            table.mode = *mode;
        }
    }
    Ok(out)
}

/// The table `raw` names among `all`: schema-qualified, or in exactly one of `schemas`.
fn resolve_table<V>(
    all: &BTreeMap<TableName, V>,
    schemas: &[String],
    raw: &str,
) -> Result<TableName, CatalogError> {
    let (schema, name) = parse_table_name(raw)?;
    if let Some(schema) = schema {
        let t = TableName::new(schema, name);
        return match all.contains_key(&t) {
            true => Ok(t),
            false => Err(CatalogError::UnknownTable(t.to_string(), t.schema.clone())),
        };
    }
    let mut found: Vec<TableName> = schemas
        .iter()
        .map(|s| TableName::new(s.clone(), name.clone()))
        .filter(|t| all.contains_key(t))
        .collect();
    match found.len() {
        0 => Err(CatalogError::UnknownTable(
            raw.to_owned(),
            schemas.join(", "),
        )),
        1 => Ok(found.remove(0)),
        _ => Err(CatalogError::Ambiguous(
            raw.to_owned(),
            found
                .iter()
                .map(|t| t.schema.clone())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

fn check_mode(table: &CatalogTable, mode: TableMode) -> Result<(), CatalogError> {
    let not_possible = |reason: &str| CatalogError::ModeNotPossible {
        table: table.name.clone(),
        reason: reason.to_owned(),
    };
    match mode {
        TableMode::Snapshot => Ok(()),
        TableMode::Changes if table.key.is_empty() => {
            Err(not_possible("changes mode needs a primary key"))
        }
        TableMode::Changes => Ok(()),
        TableMode::Append => match table.key.as_slice() {
            [(name, _)] if !table.columns.contains(name) => Err(not_possible(
                "append mode needs a primary key column that is not generated",
            )),
            [(_, ty)] if matches!(ty.as_str(), "smallint" | "integer" | "bigint") => Ok(()),
            _ => Err(not_possible(
                "append mode needs a single-column integer primary key (identity or serial)",
            )),
        },
    }
}

/// Reads the tables' definitions, keys, sizes and identities: one query per kind of fact
/// for all of them, not one per table (a database of hundreds of small tables is planned
/// in a dozen round trips).
async fn describe(
    client: &Session<'_>,
    tables: Vec<(TableName, u32, String)>,
) -> Result<Vec<CatalogTable>, CatalogError> {
    let oids: Vec<u32> = tables.iter().map(|(_, oid, _)| *oid).collect();
    let oids = oids.as_slice();
    let mut columns = read_columns(client, oids).await?;
    let mut keys = read_keys(client, oids).await?;
    let mut indexes = read_indexes(client, oids).await?;
    let mut checks = read_constraints(client, oids, Constraints::Check).await?;
    let mut foreign_keys = read_constraints(client, oids, Constraints::ForeignKey).await?;
    let mut sizes = read_sizes(client, oids).await?;
    let mut column_identities = read_column_identities(client, oids).await?;
    let mut partition_identities = read_partition_identities(client, oids).await?;
    let mut out = Vec::with_capacity(tables.len());
    for (name, oid, relkind) in tables {
        let columns = columns.remove(&oid).unwrap_or_default();
        let key = keys.remove(&oid).unwrap_or_default();
        let partitioned = relkind == "p";
        let (partition_key, partitions) = if partitioned {
            read_partitioning(client, oid).await?
        } else {
            (None, Vec::new())
        };
        let (heap_bytes, est_rows) = sizes
            .remove(&oid)
            .and_then(|mut s| s.pop())
            .unwrap_or_default();
        let mode = if key.is_empty() {
            TableMode::Snapshot
        } else {
            TableMode::Changes
        };
        let identity = TableIdentity {
            oid,
            columns: column_identities.remove(&oid).unwrap_or_default(),
            key: key.iter().map(|(n, _)| n.clone()).collect(),
            partitions: partition_identities.remove(&oid).unwrap_or_default(),
        };
        out.push(CatalogTable {
            columns: columns
                .iter()
                .filter(|c| c.generated.is_none())
                .map(|c| c.name.clone())
                .collect(),
            schema: TableSchema {
                kind: if partitioned { "partitioned" } else { "table" }.to_owned(),
                columns,
                primary_key: key.iter().map(|(n, _)| n.clone()).collect(),
                indexes: indexes.remove(&oid).unwrap_or_default(),
                checks: checks.remove(&oid).unwrap_or_default(),
                foreign_keys: foreign_keys.remove(&oid).unwrap_or_default(),
                partition_key,
                partitions,
            },
            name,
            oid,
            mode,
            key,
            heap_bytes,
            est_rows,
            identity,
        });
    }
    Ok(out)
}

/// Runs `sql`, whose `$1` is the tables' oids and whose first column is the oid of the
/// table a row is of, and groups what `each` makes of the rows by table, in the query's
/// order.
async fn per_table<T>(
    client: &Session<'_>,
    what: &'static str,
    sql: &str,
    oids: &[u32],
    each: impl Fn(&Row) -> T,
) -> Result<HashMap<u32, Vec<T>>, CatalogError> {
    let rows = client.query(sql, &[&oids]).await.map_err(q(client, what))?;
    let mut out: HashMap<u32, Vec<T>> = HashMap::new();
    for row in &rows {
        out.entry(row.get(0)).or_default().push(each(row));
    }
    Ok(out)
}

/// Each table's columns, generated ones with their expression.
async fn read_columns(
    client: &Session<'_>,
    oids: &[u32],
) -> Result<HashMap<u32, Vec<ColumnDef>>, CatalogError> {
    let sql = "SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                      pg_get_expr(d.adbin, d.adrelid), a.attgenerated::text, a.attidentity::text \
               FROM pg_attribute a \
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
               WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped \
               ORDER BY a.attrelid, a.attnum";
    per_table(client, "reading columns", sql, oids, |r| {
        let expr: Option<String> = r.get(4);
        // 's' stored (12+), 'v' virtual (18+): neither is loaded by COPY FROM.
        let generated = !r.get::<_, String>(5).is_empty();
        let identity = match r.get::<_, String>(6).as_str() {
            "a" => Some("always".to_owned()),
            "d" => Some("by default".to_owned()),
            _ => None,
        };
        ColumnDef {
            name: r.get(1),
            type_name: r.get(2),
            not_null: r.get(3),
            default: if generated { None } else { expr.clone() },
            generated: if generated { expr } else { None },
            identity,
        }
    })
    .await
}

/// Each table's primary key columns (the index's key columns, not its INCLUDE ones) and
/// their types, in order.
async fn read_keys(
    client: &Session<'_>,
    oids: &[u32],
) -> Result<HashMap<u32, Vec<(String, String)>>, CatalogError> {
    let sql = "SELECT i.indrelid, a.attname, format_type(a.atttypid, a.atttypmod) \
               FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) \
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
               WHERE i.indrelid = ANY($1) AND i.indisprimary AND k.ord <= i.indnkeyatts \
               ORDER BY i.indrelid, k.ord";
    per_table(client, "reading primary keys", sql, oids, |r| {
        (r.get(1), r.get(2))
    })
    .await
}

/// Each table's indexes, with the constraints they back.
async fn read_indexes(
    client: &Session<'_>,
    oids: &[u32],
) -> Result<HashMap<u32, Vec<IndexDef>>, CatalogError> {
    let sql = "SELECT i.indrelid, ic.relname, pg_get_indexdef(i.indexrelid), con.conname, \
                      pg_get_constraintdef(con.oid) \
               FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
               LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid \
                 AND con.contype IN ('p', 'u', 'x') \
               WHERE i.indrelid = ANY($1) ORDER BY i.indrelid, ic.relname";
    per_table(client, "reading indexes", sql, oids, |r| IndexDef {
        name: r.get(1),
        definition: r.get(2),
        constraint: r.get::<_, Option<String>>(3).map(|name| ConstraintDef {
            name,
            definition: r.get::<_, Option<String>>(4).unwrap_or_default(),
        }),
    })
    .await
}

/// Which constraints [`read_constraints`] reads.
#[derive(Debug, Clone, Copy)]
enum Constraints {
    Check,
    /// Foreign keys declared on the table itself (not those a partition inherits).
    ForeignKey,
}

async fn read_constraints(
    client: &Session<'_>,
    oids: &[u32],
    which: Constraints,
) -> Result<HashMap<u32, Vec<ConstraintDef>>, CatalogError> {
    let (sql, what) = match which {
        Constraints::Check => (
            "SELECT conrelid, conname, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = ANY($1) AND contype = 'c' ORDER BY conrelid, conname",
            "reading check constraints",
        ),
        Constraints::ForeignKey => (
            "SELECT conrelid, conname, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = ANY($1) AND contype = 'f' AND conparentid = 0 \
             ORDER BY conrelid, conname",
            "reading foreign keys",
        ),
    };
    per_table(client, what, sql, oids, |r| ConstraintDef {
        name: r.get(1),
        definition: r.get(2),
    })
    .await
}

/// A partitioned table's partition key and its partitions (the whole tree).
async fn read_partitioning(
    client: &Session<'_>,
    oid: u32,
) -> Result<(Option<String>, Vec<PartitionDef>), CatalogError> {
    let key: Option<String> = client
        .query_one("SELECT pg_get_partkeydef($1)", &[&oid])
        .await
        .map_err(q(client, "reading the partition key"))?
        .get(0);
    let parts = client
        .query(
            "SELECT n.nspname, c.relname, pn.nspname, pc.relname, \
                    pg_get_expr(c.relpartbound, c.oid), \
                    CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END \
             FROM pg_partition_tree($1::oid::regclass) t \
             JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_class pc ON pc.oid = t.parentrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace \
             WHERE t.level > 0 ORDER BY t.level, n.nspname, c.relname",
            &[&oid],
        )
        .await
        .map_err(q(client, "reading partitions"))?
        .into_iter()
        .map(|r| PartitionDef {
            name: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            parent: TableName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            bound: r.get(4),
            partition_key: r.get(5),
        })
        .collect();
    Ok((key, parts))
}

/// Each table's heap bytes and estimated rows, its partitions' included.
async fn read_sizes(
    client: &Session<'_>,
    oids: &[u32],
) -> Result<HashMap<u32, Vec<(i64, f64)>>, CatalogError> {
    // pg_partition_tree lists nothing for an ordinary table, and a partitioned table
    // itself at level 0: the union counts each relation once.
    let sql = "SELECT r.oid, coalesce(sum(pg_relation_size(c.oid)), 0)::int8, \
                      coalesce(sum(greatest(c.reltuples, 0)), 0)::float8 \
               FROM unnest($1::oid[]) r(oid) \
               CROSS JOIN LATERAL (SELECT r.oid UNION SELECT relid FROM pg_partition_tree(r.oid::regclass)) t(relid) \
               JOIN pg_class c ON c.oid = t.relid \
               GROUP BY r.oid";
    per_table(client, "reading table sizes", sql, oids, |r| {
        (r.get(1), r.get(2))
    })
    .await
}

/// Each table's columns as they tell it apart from another of the same name (dropped
/// ones included).
async fn read_column_identities(
    client: &Session<'_>,
    oids: &[u32],
) -> Result<HashMap<u32, Vec<ColumnIdentity>>, CatalogError> {
    let sql = "SELECT attrelid, attnum, attname::text, \
                      CASE WHEN attisdropped THEN '' ELSE format_type(atttypid, atttypmod) END, \
                      attcollation, attisdropped \
               FROM pg_attribute WHERE attrelid = ANY($1) AND attnum > 0 \
               ORDER BY attrelid, attnum";
    per_table(client, "reading column identities", sql, oids, |r| {
        ColumnIdentity {
            attnum: r.get(1),
            name: r.get(2),
            type_name: r.get(3),
            collation: r.get(4),
            dropped: r.get(5),
        }
    })
    .await
}

/// Each partitioned table's partitions, as they tell it apart from another tree.
async fn read_partition_identities(
    client: &Session<'_>,
    oids: &[u32],
) -> Result<HashMap<u32, Vec<PartitionIdentity>>, CatalogError> {
    let sql = "SELECT r.oid, c.oid, n.nspname::text, c.relname::text, \
                      coalesce(pg_get_expr(c.relpartbound, c.oid), '') \
               FROM unnest($1::oid[]) r(oid) \
               CROSS JOIN LATERAL pg_partition_tree(r.oid::regclass) t \
               JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE t.level > 0 ORDER BY 1, 3, 4";
    per_table(client, "reading partition identities", sql, oids, |r| {
        PartitionIdentity {
            oid: r.get(1),
            name: TableName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            bound: r.get(4),
        }
    })
    .await
}

/// Every sequence of `schemas`, with its value now (sequences are not transactional).
///
/// # Errors
/// Query errors.
pub async fn sequences(
    client: &Session<'_>,
    schemas: &[String],
) -> Result<Vec<SequenceValue>, CatalogError> {
    let schemas: Vec<String> = if schemas.is_empty() {
        vec!["public".to_owned()]
    } else {
        schemas.to_vec()
    };
    let rows = client
        .query(
            "SELECT s.schemaname::text, s.sequencename::text, s.data_type::regtype::text, \
                    s.start_value, s.increment_by, s.min_value, s.max_value, s.cycle, s.last_value, \
                    o.nspname::text, o.relname::text, o.attname::text \
             FROM pg_sequences s \
             LEFT JOIN LATERAL ( \
               SELECT tn.nspname, tc.relname, a.attname FROM pg_depend d \
               JOIN pg_class tc ON tc.oid = d.refobjid \
               JOIN pg_namespace tn ON tn.oid = tc.relnamespace \
               JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
               WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
                 AND d.deptype IN ('a', 'i') \
                 AND d.objid = (quote_ident(s.schemaname) || '.' || quote_ident(s.sequencename))::regclass \
               LIMIT 1) o ON true \
             WHERE s.schemaname = ANY($1) ORDER BY 1, 2",
            &[&schemas],
        )
        .await
        .map_err(q(client, "reading sequences"))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let last: Option<i64> = r.get(8);
            let owner: Option<String> = r.get(9);
            SequenceValue {
                name: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                data_type: r.get(2),
                start_value: r.get(3),
                increment_by: r.get(4),
                min_value: r.get(5),
                max_value: r.get(6),
                cycle: r.get(7),
                last_value: last.unwrap_or_else(|| r.get(3)),
                is_called: last.is_some(),
                owned_by: owner.map(|schema| {
                    (
                        TableName::new(schema, r.get::<_, String>(10)),
                        r.get::<_, String>(11),
                    )
                }),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_parse_like_pg_dump() {
        let p = |s| parse_table_name(s).ok();
        assert_eq!(p("Articles"), Some((None, "articles".into())));
        assert_eq!(
            p("sales.Orders"),
            Some((Some("sales".into()), "orders".into()))
        );
        assert_eq!(
            p("\"Mixed Case\".\"Order.Lines\"\"x\""),
            Some((Some("Mixed Case".into()), "Order.Lines\"x".into()))
        );
        for bad in ["", "a.b.c", "\"open", "a.", ".b", "a\"b\""] {
            assert!(parse_table_name(bad).is_err(), "{bad:?}");
        }
    }
}
