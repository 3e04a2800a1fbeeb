//! The catalog: which tables a backup covers, their definitions, keys and modes.
//!
//! Tables are every ordinary and partitioned table of the configured schemas (partitions
//! are exported through their root, once), or an explicit list. Names follow `pg_dump
//! -t`: an unquoted name is folded to lower case, a double-quoted one is taken as is.

use std::collections::BTreeMap;

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
    let mut out = Vec::with_capacity(chosen.len());
    for name in chosen {
        let Some((oid, relkind)) = all.get(&name).cloned() else {
            continue;
        };
        let mut table = describe(client, name, oid, &relkind).await?;
        if let Some(mode) = overrides.get(&table.name) {
            check_mode(&table, *mode)?;
            table.mode = *mode;
        }
        out.push(table);
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

/// Reads one table's definition, key, size and identity.
async fn describe(
    client: &Session<'_>,
    name: TableName,
    oid: u32,
    relkind: &str,
) -> Result<CatalogTable, CatalogError> {
    let columns = read_columns(client, oid).await?;
    let key = read_key(client, oid).await?;
    let indexes = read_indexes(client, oid).await?;
    let checks = read_constraints(client, oid, Constraints::Check).await?;
    let foreign_keys = read_constraints(client, oid, Constraints::ForeignKey).await?;
    let partitioned = relkind == "p";
    let (partition_key, partitions) = if partitioned {
        read_partitioning(client, oid).await?
    } else {
        (None, Vec::new())
    };
    let (heap_bytes, est_rows) = read_size(client, oid).await?;
    let mode = if key.is_empty() {
        TableMode::Snapshot
    } else {
        TableMode::Changes
    };
    let identity = read_identity(client, oid, &key).await?;
    Ok(CatalogTable {
        columns: columns
            .iter()
            .filter(|c| c.generated.is_none())
            .map(|c| c.name.clone())
            .collect(),
        schema: TableSchema {
            kind: if partitioned { "partitioned" } else { "table" }.to_owned(),
            columns,
            primary_key: key.iter().map(|(n, _)| n.clone()).collect(),
            indexes,
            checks,
            foreign_keys,
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
    })
}

/// The table's columns, generated ones with their expression.
async fn read_columns(client: &Session<'_>, oid: u32) -> Result<Vec<ColumnDef>, CatalogError> {
    Ok(client
        .query(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    pg_get_expr(d.adbin, d.adrelid), a.attgenerated::text, a.attidentity::text \
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(q(client, "reading columns"))?
        .into_iter()
        .map(|r| {
            let expr: Option<String> = r.get(3);
            // 's' stored (12+), 'v' virtual (18+): neither is loaded by COPY FROM.
            let generated = !r.get::<_, String>(4).is_empty();
            let identity = match r.get::<_, String>(5).as_str() {
                "a" => Some("always".to_owned()),
                "d" => Some("by default".to_owned()),
                _ => None,
            };
            ColumnDef {
                name: r.get(0),
                type_name: r.get(1),
                not_null: r.get(2),
                default: if generated { None } else { expr.clone() },
                generated: if generated { expr } else { None },
                identity,
            }
        })
        .collect())
}

/// The primary key's key columns (not its INCLUDE columns) and their types, in order.
async fn read_key(client: &Session<'_>, oid: u32) -> Result<Vec<(String, String)>, CatalogError> {
    Ok(client
        .query(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) \
             FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary AND k.ord <= i.indnkeyatts ORDER BY k.ord",
            &[&oid],
        )
        .await
        .map_err(q(client, "reading the primary key"))?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The table's indexes, with the constraints they back.
async fn read_indexes(client: &Session<'_>, oid: u32) -> Result<Vec<IndexDef>, CatalogError> {
    Ok(client
        .query(
            "SELECT ic.relname, pg_get_indexdef(i.indexrelid), con.conname, pg_get_constraintdef(con.oid) \
             FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
             LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid \
               AND con.contype IN ('p', 'u', 'x') \
             WHERE i.indrelid = $1 ORDER BY ic.relname",
            &[&oid],
        )
        .await
        .map_err(q(client, "reading indexes"))?
        .into_iter()
        .map(|r| IndexDef {
            name: r.get(0),
            definition: r.get(1),
            constraint: r.get::<_, Option<String>>(2).map(|name| ConstraintDef {
                name,
                definition: r.get::<_, Option<String>>(3).unwrap_or_default(),
            }),
        })
        .collect())
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
    oid: u32,
    which: Constraints,
) -> Result<Vec<ConstraintDef>, CatalogError> {
    let (sql, what) = match which {
        Constraints::Check => (
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = $1 AND contype = 'c' ORDER BY conname",
            "reading check constraints",
        ),
        Constraints::ForeignKey => (
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = $1 AND contype = 'f' AND conparentid = 0 ORDER BY conname",
            "reading foreign keys",
        ),
    };
    Ok(client
        .query(sql, &[&oid])
        .await
        .map_err(q(client, what))?
        .into_iter()
        .map(|r| ConstraintDef {
            name: r.get(0),
            definition: r.get(1),
        })
        .collect())
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

/// Heap bytes and estimated rows of the table and its partitions.
async fn read_size(client: &Session<'_>, oid: u32) -> Result<(i64, f64), CatalogError> {
    let size = client
        .query_one(
            // pg_partition_tree lists nothing for an ordinary table: count the table
            // itself as well as any partitions.
            "SELECT coalesce(sum(pg_relation_size(c.oid)), 0)::int8, \
                    coalesce(sum(greatest(c.reltuples, 0)), 0)::float8 \
             FROM pg_class c \
             WHERE c.oid = $1 OR c.oid IN (SELECT relid FROM pg_partition_tree($1::oid::regclass))",
            &[&oid],
        )
        .await
        .map_err(q(client, "reading the table size"))?;
    Ok((size.get(0), size.get(1)))
}

/// What tells this table apart from another of the same name.
async fn read_identity(
    client: &Session<'_>,
    oid: u32,
    key: &[(String, String)],
) -> Result<TableIdentity, CatalogError> {
    let identity = TableIdentity {
        oid,
        columns: client
            .query(
                "SELECT attnum, attname::text, \
                        CASE WHEN attisdropped THEN '' ELSE format_type(atttypid, atttypmod) END, \
                        attcollation, attisdropped \
                 FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 ORDER BY attnum",
                &[&oid],
            )
            .await
            .map_err(q(client, "reading column identities"))?
            .iter()
            .map(|r| ColumnIdentity {
                attnum: r.get(0),
                name: r.get(1),
                type_name: r.get(2),
                collation: r.get(3),
                dropped: r.get(4),
            })
            .collect(),
        key: key.iter().map(|(n, _)| n.clone()).collect(),
        partitions: client
            .query(
                "SELECT c.oid, n.nspname::text, c.relname::text, \
                        coalesce(pg_get_expr(c.relpartbound, c.oid), '') \
                 FROM pg_partition_tree($1::oid::regclass) t \
                 JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE t.level > 0 ORDER BY 2, 3",
                &[&oid],
            )
            .await
            .map_err(q(client, "reading partition identities"))?
            .iter()
            .map(|r| PartitionIdentity {
                oid: r.get(0),
                name: TableName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                bound: r.get(3),
            })
            .collect(),
    };
    Ok(identity)
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
