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
    if !opts.allow_older_target {
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
    let check = |what: &'static str| move |e| DbError::query(what, target, e);
    let mut existing_schemas = HashSet::new();
    if let Some(scripts) = scripts.filter(|_| !resume.schema_applied) {
        let wanted = apply::extensions(&scripts.pre);
        let available: HashSet<String> = client
            .query(
                "SELECT name::text FROM pg_available_extensions WHERE name = ANY($1)",
                &[&wanted],
            )
            .await
            .map_err(check("checking the target's extensions"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let missing: Vec<String> = wanted
            .into_iter()
            .filter(|e| !available.contains(e))
            .collect();
        if !missing.is_empty() {
            return Err(RestoreError::MissingExtensions(missing));
        }
        let relations = restored_relations(tables);
        for table in apply::created_tables(&scripts.pre) {
            if !opts.tables.is_empty() && !relations.contains(&table) {
                continue;
            }
            let exists: bool = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(check("checking the target"))?;
            if exists {
                return Err(RestoreError::TargetTableExists(table));
            }
        }
        for schema in apply::created_schemas(&scripts.pre) {
            // Objects that belong to an extension do not count: the extension is
            // created IF NOT EXISTS.
            let row = client
                .query_opt(
                    "SELECT EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid                        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'))                      OR EXISTS (SELECT 1 FROM pg_proc p WHERE p.pronamespace = n.oid                        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'))                      OR EXISTS (SELECT 1 FROM pg_type t WHERE t.typnamespace = n.oid AND t.typrelid = 0 AND t.typelem = 0                        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'))                      FROM pg_namespace n WHERE n.nspname = $1",
                    &[&schema],
                )
                .await
                .map_err(check("checking the target"))?;
            match row {
                None => {}
                Some(r) if r.get::<_, bool>(0) && opts.tables.is_empty() => {
                    return Err(RestoreError::TargetSchemaNotEmpty(schema))
                }
                Some(_) => {
                    existing_schemas.insert(schema);
                }
            }
        }
    }
    for entry in tables {
        if opts.data_only {
            let exists: bool = client
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL",
                    &[&entry.name.quoted()],
                )
                .await
                .and_then(|r| r.try_get(0))
                .map_err(|e| RestoreError::table(&entry.name, check("checking the target")(e)))?;
            if !exists {
                return Err(RestoreError::TargetTableMissing(entry.name.clone()));
            }
            if !opts.clean {
                let has_rows: bool = client
                    .query_one(
                        &format!("SELECT EXISTS (SELECT 1 FROM {})", entry.own_rows()),
                        &[],
                    )
                    .await
                    .and_then(|r| r.try_get(0))
                    .map_err(|e| {
                        RestoreError::table(&entry.name, check("checking the target")(e))
                    })?;
                if has_rows {
                    return Err(RestoreError::TargetNotEmpty(entry.name.clone()));
                }
            }
        }
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
    }
    Ok(existing_schemas)
}
