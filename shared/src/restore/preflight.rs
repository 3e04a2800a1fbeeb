//! Everything checked before anything is written: the tables asked for, the target's
//! version, its emptiness, the chunks and scripts in the store.

use super::error::RestoreError;
use super::run::{restored_relations, Scripts};
use super::{RestoreOptions, ResumePoint};
use crate::catalog::parse_table_name;
use crate::db::{self, DbError, DbSettings, ServerVersion, Support};
use crate::format::manifest::{Manifest, TableEntry};
use crate::schema::apply;
use crate::store::ReadStore;
use std::collections::HashSet;
use tokio_postgres::Client;

pub(super) fn select_tables(
    manifest: &Manifest,
    wanted: &[String],
) -> Result<Vec<TableEntry>, RestoreError> {
    if wanted.is_empty() {
        return Ok(manifest.tables.clone());
    }
    let mut out = Vec::new();
    for raw in wanted {
        let unknown = || RestoreError::UnknownTable {
            backup: manifest.id.clone(),
            table: raw.clone(),
        };
        let (schema, name) = parse_table_name(raw).map_err(|_| unknown())?;
        let found: Vec<&TableEntry> = manifest
            .tables
            .iter()
            .filter(|t| t.name.name == name && schema.as_ref().is_none_or(|s| &t.name.schema == s))
            .collect();
        match found.as_slice() {
            [one] => {
                if !out.iter().any(|t: &TableEntry| t.name == one.name) {
                    out.push((*one).clone());
                }
            }
            _ => return Err(unknown()),
        }
    }
    Ok(out)
}

/// The source's server version, as the backup recorded it.
pub(super) fn source_version(manifest: &Manifest) -> Option<ServerVersion> {
    manifest
        .schema_dump
        .as_ref()
        .map(|d| ServerVersion(d.server_version_num))
        .or_else(|| ServerVersion::parse(&manifest.server_version))
}

/// Preflight: the target must be a supported server, and not of an older major than the
/// backup's source unless `allow_older_target`; returns the warning for such a restore.
pub(super) async fn check_target_version(
    client: &Client,
    target: &DbSettings,
    manifest: &Manifest,
    opts: &RestoreOptions,
) -> Result<Option<String>, RestoreError> {
    let server = db::probe(client, target).await?;
    let target_version = server.version();
    if server.support == Support::TooOld {
        return Err(RestoreError::UnsupportedTarget {
            target: target_version,
            detail: server.support.describe(target_version),
        });
    }
    let Some(source) = source_version(manifest) else {
        return Ok(None);
    };
    if target_version.major() >= source.major() {
        return Ok(None);
    }
    if !opts.settings.allow_older_target {
        return Err(RestoreError::OlderTarget {
            backup: manifest.id.clone(),
            source_version: source,
            target_version,
        });
    }
    Ok(Some(format!(
        "restored a backup of PostgreSQL {source} into PostgreSQL {target_version}, an older major (--allow-older-target)"
    )))
}

/// Checks what can be checked before anything is written; returns the schemas the
/// backup creates that already exist, empty, in the target (their `CREATE SCHEMA` is
/// skipped).
pub(super) async fn preflight(
    store: &dyn ReadStore,
    client: &Client,
    target: &DbSettings,
    tables: &[TableEntry],
    scripts: Option<&Scripts>,
    opts: &RestoreOptions,
    resume: &ResumePoint,
) -> Result<HashSet<String>, RestoreError> {
    let mut existing_schemas = HashSet::new();
    if let Some(scripts) = scripts.filter(|_| !resume.schema_applied) {
        check_extensions(client, target, scripts).await?;
        check_new_tables(client, target, tables, scripts, opts).await?;
        existing_schemas = existing_empty_schemas(client, target, scripts, opts).await?;
    }
    for entry in tables {
        if opts.settings.data_only {
            check_data_only_target(client, target, entry, opts).await?;
        }
        check_chunks(store, entry).await?;
    }
    Ok(existing_schemas)
}

fn check<'a>(
    target: &'a DbSettings,
    what: &'static str,
) -> impl Fn(tokio_postgres::Error) -> DbError + 'a {
    move |e| DbError::query(what, target, e)
}

/// Every extension the schema creates is available on the target.
async fn check_extensions(
    client: &Client,
    target: &DbSettings,
    scripts: &Scripts,
) -> Result<(), RestoreError> {
    let wanted = apply::extensions(&scripts.pre);
    let available: HashSet<String> = client
        .query(
            "SELECT name::text FROM pg_available_extensions WHERE name = ANY($1)",
            &[&wanted],
        )
        .await
        .map_err(check(target, "checking the target's extensions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<String> = wanted
        .into_iter()
        .filter(|e| !available.contains(e))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RestoreError::MissingExtensions(missing))
    }
}

/// No table the schema creates (of those restored) exists in the target yet.
async fn check_new_tables(
    client: &Client,
    target: &DbSettings,
    tables: &[TableEntry],
    scripts: &Scripts,
    opts: &RestoreOptions,
) -> Result<(), RestoreError> {
    let relations = restored_relations(tables);
    for table in apply::created_tables(&scripts.pre) {
        if !opts.settings.tables.is_empty() && !relations.contains(&table) {
            continue;
        }
        if exists(client, target, &table.quoted()).await? {
            return Err(RestoreError::TargetTableExists(table));
        }
    }
    Ok(())
}

/// Does the relation `quoted` exist in the target?
async fn exists(client: &Client, target: &DbSettings, quoted: &str) -> Result<bool, DbError> {
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quoted])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(check(target, "checking the target"))
}

/// The schemas the backup creates that exist in the target holding nothing of their own;
/// a schema holding objects is an error (unless only some tables are restored).
async fn existing_empty_schemas(
    client: &Client,
    target: &DbSettings,
    scripts: &Scripts,
    opts: &RestoreOptions,
) -> Result<HashSet<String>, RestoreError> {
    let mut existing = HashSet::new();
    for schema in apply::created_schemas(&scripts.pre) {
        // Objects that belong to an extension do not count: the extension is
        // created IF NOT EXISTS.
        let row = client
            .query_opt(SCHEMA_SQL, &[&schema])
            .await
            .map_err(check(target, "checking the target"))?;
        match row {
            None => {}
            Some(r) if r.get::<_, bool>(0) && opts.settings.tables.is_empty() => {
                return Err(RestoreError::TargetSchemaNotEmpty(schema))
            }
            Some(_) => {
                existing.insert(schema);
            }
        }
    }
    Ok(existing)
}

/// A data-only restore loads into tables that exist and (without `--clean`) are empty.
async fn check_data_only_target(
    client: &Client,
    target: &DbSettings,
    entry: &TableEntry,
    opts: &RestoreOptions,
) -> Result<(), RestoreError> {
    let in_table = |e| RestoreError::table(&entry.name, e);
    if !exists(client, target, &entry.name.quoted())
        .await
        .map_err(in_table)?
    {
        return Err(RestoreError::TargetTableMissing(entry.name.clone()));
    }
    if opts.settings.clean {
        return Ok(());
    }
    let has_rows: bool = client
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM {})", entry.own_rows()),
            &[],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| in_table(check(target, "checking the target")(e)))?;
    if has_rows {
        return Err(RestoreError::TargetNotEmpty(entry.name.clone()));
    }
    Ok(())
}

/// Every chunk of the table is in the store at the size the manifest records.
async fn check_chunks(store: &dyn ReadStore, entry: &TableEntry) -> Result<(), RestoreError> {
    for chunk in entry.chunks.iter().chain(&entry.key_chunks) {
        match store.head(&chunk.key).await? {
            None => {
                return Err(RestoreError::ChunkMissing {
                    key: chunk.key.clone(),
                })
            }
            Some(meta) if meta.size != chunk.bytes => {
                return Err(RestoreError::ChunkCorrupt {
                    key: chunk.key.clone(),
                    detail: format!(
                        "{} bytes in the store, {} in the manifest",
                        meta.size, chunk.bytes
                    ),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Does a schema hold objects of its own (not an extension's)? No row: it does not exist.
const SCHEMA_SQL: &str = "SELECT EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid                        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'))                      OR EXISTS (SELECT 1 FROM pg_proc p WHERE p.pronamespace = n.oid                        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'))                      OR EXISTS (SELECT 1 FROM pg_type t WHERE t.typnamespace = n.oid AND t.typrelid = 0 AND t.typelem = 0                        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'))                      FROM pg_namespace n WHERE n.nspname = $1";
