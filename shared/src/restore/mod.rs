//! Restore: one code path for `tidemark restore` and for verification restores, in
//! pg_restore's order.
//!
//! 1. Check everything that can be checked before writing: the manifest's own checksum,
//!    the schema scripts' checksums, that every chunk exists with its recorded size, that
//!    the target can take the backup (no table of it exists, schemas the backup creates
//!    are absent or empty, every extension it needs is available) — or, with `data_only`,
//!    that the target tables exist and are empty unless `clean`.
//! 2. Pre-data: the backup's pg_dump pre-data script (types, domains, functions,
//!    tables, views, ...), in one transaction ([`crate::schema::apply`]).
//! 3. Data: tables load in parallel. Each chunk streams from the store through a SHA-256
//!    check and zstd into `COPY FROM STDIN` ([`load`]); a `changes` chain lands in one
//!    set-based merge: the newest version of each key, only keys in the live key set.
//! 4. Post-data: indexes, constraints, foreign keys, triggers, rules, policies, comments,
//!    and `REFRESH MATERIALIZED VIEW` of the views that were populated, in one
//!    transaction; then sequences are set to their recorded values.
//!
//! Like `pg_restore --no-owner --no-privileges` by default; `with_privileges` restores
//! owners and grants, `create_roles` first creates missing roles from the backup's
//! globals. `data_only` loads into an existing schema ([`data_only`]).

mod data_only;
mod load;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio_postgres::Client;

use self::data_only::Method;
use self::load::{load_error, load_into, needs_merge, Landing};
use crate::catalog::parse_table_name;
use crate::db::{self, DbError, DbSettings, ServerVersion, Support};
use crate::error_chain;
use crate::format::manifest::{Manifest, TableEntry};
use crate::format::{manifest_key, quote_ident, quote_literal, ChunkRef, FormatError, TableName};
use crate::schema::apply::{self, ApplyError, ApplyOptions, Decision, SubsetPlan};
use crate::schema::{self, SchemaError, Script};
use crate::store::{ReadStore, StoreError};

pub use self::data_only::Method as DataOnlyMethod;

/// Which backup: the newest, or one by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupSelector {
    Latest,
    Id(String),
}

impl std::str::FromStr for BackupSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" => Err("empty backup id (use latest or an id from tidemark list)".into()),
            "latest" => Ok(BackupSelector::Latest),
            id if id.contains('/') => Err(format!("not a backup id: {id:?}")),
            id => Ok(BackupSelector::Id(id.to_owned())),
        }
    }
}

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Restore only these tables (names as for `--tables`); empty: all.
    pub tables: Vec<String>,
    /// Load into tables that already exist (schema from migrations).
    pub data_only: bool,
    /// With `data_only`: empty the target tables first.
    pub clean: bool,
    /// Tables loaded at once.
    pub workers: usize,
    /// Live counters for a progress display.
    pub meter: Option<Arc<RestoreMeter>>,
    /// Continue a time-boxed restore (verification slices).
    pub resume: Option<ResumePoint>,
    /// Start no new table after this instant; the report says what completed.
    pub deadline: Option<Instant>,
    /// Restore owners and grants (`ALTER ... OWNER TO`, `GRANT`), as pg_restore does
    /// without `--no-owner --no-privileges`.
    pub with_privileges: bool,
    /// Create the roles the backup's globals name that the target lacks, first.
    pub create_roles: bool,
    /// Mark the target database as completely restored (a comment on the database, in
    /// the post-data transaction), so that a verification slice that dies afterwards
    /// knows (see [`is_marked_finished`]).
    pub mark_finished: bool,
    /// Restore into a server of an older major version than the backup's source (refused
    /// otherwise): objects the older server cannot create then fail by name.
    pub allow_older_target: bool,
    /// Move a sequence that the source held behind its column's largest key past that
    /// key (off by default: a restore equals the source, and such a sequence is only
    /// named in a warning).
    pub advance_sequences: bool,
    /// With `data_only`: stop at the first table that fails (by default every other
    /// table is loaded, then the failed ones are listed).
    pub exit_on_error: bool,
}

const FINISHED_MARK: &str = "tidemark: restore finished";

/// Whether a restore with `mark_finished` completed into the database `client` is on.
///
/// # Errors
/// The query's error.
pub async fn is_marked_finished(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce(shobj_description(oid, 'pg_database'), '') = $1 \
             FROM pg_database WHERE datname = current_database()",
            &[&FINISHED_MARK],
        )
        .await?;
    Ok(row.get(0))
}

/// Where a time-boxed restore stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ResumePoint {
    /// The pre-data script is applied.
    pub schema_applied: bool,
    /// Tables completely loaded.
    pub loaded: Vec<TableName>,
}

/// Live counters of a restore.
#[derive(Debug, Default)]
pub struct RestoreMeter {
    pub tables_total: AtomicUsize,
    pub tables_done: AtomicUsize,
    pub chunks_done: AtomicU64,
    /// Stored bytes read.
    pub bytes: AtomicU64,
    /// Rows committed.
    pub rows: AtomicU64,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup_id: String,
    pub target: String,
    pub tables: usize,
    pub rows: u64,
    /// Stored (compressed) bytes read.
    pub bytes: u64,
    pub chunks: u64,
    pub seconds: f64,
    /// Everything is restored (false only when a deadline stopped the restore).
    pub done: bool,
    /// Tables this call loaded completely.
    pub completed: Vec<TableName>,
    /// The pre-data script is applied (by this call or an earlier one).
    pub schema_applied: bool,
    /// Schema objects (pg_dump entries) created.
    pub schema_objects: usize,
    /// How a data-only restore kept constraints and triggers quiet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_only: Option<String>,
    /// What was left out or could not be restored, and why.
    pub warnings: Vec<String>,
}

/// Errors of restore; each names the backup, table or object concerned.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no backups in the store")]
    NoBackups,
    #[error("unknown backup {0} (tidemark list shows the backups)")]
    UnknownBackup(String),
    #[error("manifest {key} was modified after it was written (checksum mismatch)")]
    ManifestModified { key: String },
    #[error("backup {backup} has no table {table}")]
    UnknownTable { backup: String, table: String },
    #[error("backup {backup} has no schema dump (it was taken before Tidemark captured schemas with pg_dump): restore it with --data-only into tables you create")]
    NoSchemaDump { backup: String },
    #[error("backup {backup} has no globals (roles were not captured when it was taken); restore without --roles")]
    NoGlobals { backup: String },
    #[error("target already has table {0}; restore into an empty database, or use --data-only")]
    TargetTableExists(TableName),
    #[error("target schema {0} already holds objects; restore into an empty database, or use --data-only")]
    TargetSchemaNotEmpty(String),
    #[error("the target server lacks extension(s) {} that the backup needs (not in pg_available_extensions); install them there first", .0.join(", "))]
    MissingExtensions(Vec<String>),
    #[error("the target already holds {count} of the backup's large objects (oid {first} first); restore into a database without them, or pass --clean with --data-only to replace them")]
    TargetLargeObjectsExist { count: usize, first: u32 },
    #[error("target has no table {0}; --data-only loads into existing tables")]
    TargetTableMissing(TableName),
    #[error("target table {0} already holds rows; pass --clean to empty it first")]
    TargetNotEmpty(TableName),
    #[error("tables {} reference each other through foreign keys that are not DEFERRABLE: a role that is not a superuser cannot load them without violating one; restore as a superuser, or make those constraints DEFERRABLE", .tables.join(", "))]
    ForeignKeyCycle { tables: Vec<String> },
    #[error("backup {backup} was taken on PostgreSQL {source_version} and the target runs PostgreSQL {target_version}: a restore into an older major version is refused, because the schema may use what {target_major} lacks; restore into PostgreSQL {source_major} or newer, or pass --allow-older-target to try (objects the target cannot create then fail by name)", source_major = .source_version.major(), target_major = .target_version.major())]
    OlderTarget {
        backup: String,
        source_version: ServerVersion,
        target_version: ServerVersion,
    },
    #[error("the target runs PostgreSQL {target}: {detail}")]
    UnsupportedTarget {
        target: ServerVersion,
        detail: String,
    },
    #[error("chunk {key} is missing from the store")]
    ChunkMissing { key: String },
    #[error("chunk {key} is corrupt: {detail}")]
    ChunkCorrupt { key: String, detail: String },
    #[error("reading chunk {key} from the store failed: {detail}")]
    ChunkUnreadable { key: String, detail: String },
    #[error("restoring {table}: {detail}")]
    Table {
        table: TableName,
        detail: String,
        retryable: bool,
    },
    #[error("{cause}; the restore stopped with {loaded} of {tables} tables loaded and without the post-data schema (indexes, constraints, triggers): {state}")]
    Incomplete {
        cause: Box<RestoreError>,
        loaded: usize,
        tables: usize,
        /// What the target holds.
        state: &'static str,
    },
    #[error("{} of {total} tables failed to load (each rolled back; every other table was loaded): {}", .failed.iter().map(|f| f.tables.len()).sum::<usize>(), .failed.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    TablesFailed {
        failed: Vec<FailedTables>,
        total: usize,
    },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl RestoreError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            RestoreError::Table { retryable, .. } => *retryable,
            RestoreError::ChunkUnreadable { .. } => true,
            RestoreError::Incomplete { cause, .. } => cause.is_retryable(),
            RestoreError::Apply(e) => e.retryable,
            RestoreError::Schema(e) => e.is_retryable(),
            RestoreError::Db(e) => e.is_retryable(),
            RestoreError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }

    fn table(table: &TableName, err: DbError) -> Self {
        RestoreError::Table {
            table: table.clone(),
            retryable: err.is_retryable(),
            detail: err.to_string(),
        }
    }

    /// The error that stopped the restore, inside what the restore says about the target.
    pub fn root(&self) -> &RestoreError {
        match self {
            RestoreError::Incomplete { cause, .. } => cause.root(),
            other => other,
        }
    }

    /// Whether the backup itself is at fault (a changed byte, a missing object), as
    /// opposed to the target or the network.
    pub fn is_backup_damage(&self) -> bool {
        if let RestoreError::Incomplete { cause, .. } = self {
            return cause.is_backup_damage();
        }
        matches!(
            self,
            RestoreError::ManifestModified { .. }
                | RestoreError::ChunkMissing { .. }
                | RestoreError::ChunkCorrupt { .. }
                | RestoreError::Schema(SchemaError::Corrupt { .. } | SchemaError::Missing { .. })
        )
    }
}

/// Reads the selected backup's manifest and checks its checksum.
///
/// # Errors
/// [`RestoreError::NoBackups`], [`RestoreError::UnknownBackup`],
/// [`RestoreError::ManifestModified`].
pub async fn load_manifest(
    store: &dyn ReadStore,
    selector: &BackupSelector,
) -> Result<Manifest, RestoreError> {
    let id = match selector {
        BackupSelector::Id(id) => id.clone(),
        BackupSelector::Latest => latest_backup_id(store)
            .await?
            .ok_or(RestoreError::NoBackups)?,
    };
    let key = manifest_key(&id);
    let manifest = crate::format::manifest::read_manifest(store, &id)
        .await
        .map_err(|e| match e {
            FormatError::Invalid { key, .. } => RestoreError::ManifestModified { key },
            other => other.into(),
        })?
        .ok_or_else(|| RestoreError::UnknownBackup(id.clone()))?;
    if manifest.id != id {
        return Err(RestoreError::ManifestModified { key });
    }
    Ok(manifest)
}

/// The id of the newest backup (manifests are named by id; ids start with their time).
async fn latest_backup_id(store: &dyn ReadStore) -> Result<Option<String>, RestoreError> {
    let mut newest: Option<(std::time::SystemTime, String)> = None;
    for object in store.list("manifests/").await? {
        let Some(id) = object
            .key
            .strip_prefix("manifests/")
            .and_then(|k| k.strip_suffix(".json"))
        else {
            continue;
        };
        let when = object.last_modified.unwrap_or(std::time::UNIX_EPOCH);
        if newest
            .as_ref()
            .is_none_or(|(t, n)| (when, id) > (*t, n.as_str()))
        {
            newest = Some((when, id.to_owned()));
        }
    }
    Ok(newest.map(|(_, id)| id))
}

/// The schema scripts a restore runs.
struct Scripts {
    pre: Script,
    post: Script,
    globals: Option<Script>,
}

/// Restores `manifest` into the database `target` names.
///
/// # Errors
/// Preflight errors (nothing written), chunk errors naming the object, database errors
/// naming the table or schema object and the server's message.
pub async fn restore(
    store: Arc<dyn ReadStore>,
    manifest: &Manifest,
    target: &DbSettings,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let tables = select_tables(manifest, &opts.tables)?;
    let subset = !opts.tables.is_empty();
    let resume = opts.resume.clone().unwrap_or_default();
    let mut warnings = Vec::new();
    let scripts = if opts.data_only {
        None
    } else {
        let dump = manifest
            .schema_dump
            .as_ref()
            .ok_or_else(|| RestoreError::NoSchemaDump {
                backup: manifest.id.clone(),
            })?;
        let globals = match (&dump.globals, opts.create_roles) {
            (Some(g), true) => Some(schema::load_script(store.as_ref(), g).await?),
            (None, true) => {
                return Err(RestoreError::NoGlobals {
                    backup: manifest.id.clone(),
                })
            }
            (_, false) => None,
        };
        Some(Scripts {
            pre: schema::load_script(store.as_ref(), &dump.pre_data).await?,
            post: schema::load_script(store.as_ref(), &dump.post_data).await?,
            globals,
        })
    };
    let admin = db::connect(target).await?;
    if let Some(warning) = check_target_version(&admin, target, manifest, opts).await? {
        warnings.push(warning);
    }
    let existing_schemas = preflight(
        store.as_ref(),
        &admin,
        target,
        &tables,
        scripts.as_ref(),
        opts,
        &resume,
    )
    .await?;
    // The large objects, checked against the target before anything is written.
    let large_objects = match manifest
        .schema_dump
        .as_ref()
        .and_then(|d| d.large_objects_script.as_ref())
    {
        Some(object) if !subset => {
            let script = schema::load_script(store.as_ref(), object).await?;
            let present = present_large_objects(&admin, target, &script).await?;
            let replace = opts.resume.is_some() || (opts.data_only && opts.clean);
            if let (Some(first), false) = (present.first(), replace) {
                return Err(RestoreError::TargetLargeObjectsExist {
                    count: present.len(),
                    first: *first,
                });
            }
            Some(script)
        }
        _ => None,
    };
    // Settings the target knows: pg_dump's that it does not are left out.
    let known = apply::known_settings(&admin)
        .await
        .map_err(|e| DbError::query("reading the target's settings", target, e))?;
    let meter = opts.meter.clone().unwrap_or_default();
    meter.tables_total.store(tables.len(), Ordering::Relaxed);

    // Which pg_dump entries this restore applies.
    let subset_plan = match (&scripts, subset) {
        (Some(s), true) => Some(SubsetPlan::new(
            restored_relations(&tables),
            sequence_owners(manifest),
            &[&s.pre, &s.post],
        )),
        _ => None,
    };
    let decide = |entry: &schema::Entry| -> Decision {
        if entry.kind == "SCHEMA" && existing_schemas.contains(&entry.name) {
            return Decision::Skip(String::new());
        }
        match &subset_plan {
            Some(plan) => plan.decide(entry),
            None => Decision::Apply,
        }
    };
    let mut apply_opts = ApplyOptions {
        with_owners: opts.with_privileges,
        with_privileges: opts.with_privileges,
        finish_queries: Vec::new(),
        finish_with: None,
    };
    let mut schema_objects = 0;
    let mut schema_applied = resume.schema_applied;
    if let Some(scripts) = &scripts {
        if !resume.schema_applied {
            if let Some(globals) = &scripts.globals {
                let created = create_roles(&admin, target, globals).await?;
                if !created.is_empty() {
                    warnings.push(format!("created roles: {}", created.join(", ")));
                }
            }
            let applied = apply::apply(
                &admin,
                &scripts.pre,
                "pre-data",
                &apply_opts,
                &known,
                &decide,
            )
            .await?;
            schema_objects += applied.entries;
            warnings.extend(applied.warnings);
            schema_applied = true;
            if !subset {
                let covered = restored_relations(&tables);
                for table in apply::created_tables(&scripts.pre) {
                    if !covered.contains(&table) {
                        warnings.push(format!(
                            "table {table} is in the backup's schema but not among its tables: restored empty"
                        ));
                    }
                }
            }
        }
    }

    // Data.
    let pending: Vec<usize> = (0..tables.len())
        .filter(|&t| !resume.loaded.contains(&tables[t].name))
        .collect();
    let by_chunk = !opts.data_only && pending.iter().any(|&t| lands_by_chunk(&tables[t], opts));
    if by_chunk {
        admin
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {PROGRESS_SCHEMA}; \
                 CREATE TABLE IF NOT EXISTS {PROGRESS_SCHEMA}.chunks \
                 (tbl text NOT NULL, chunk text NOT NULL, PRIMARY KEY (tbl, chunk))"
            ))
            .await
            .map_err(|e| DbError::query("creating the chunk progress table", target, e))?;
    }
    let whole: Vec<String> = pending
        .iter()
        .filter(|&&t| !lands_by_chunk(&tables[t], opts))
        .map(|&t| tables[t].own_rows())
        .collect();
    if opts.resume.is_some() && !opts.data_only && !whole.is_empty() {
        // A slice that died mid-table left at most a rolled-back transaction; empty the
        // tables still to load anyway, so a load never lands twice. (Tables landed chunk
        // by chunk hold exactly the chunks their progress records: they resume.)
        admin
            .batch_execute(&format!("TRUNCATE {}", whole.join(", ")))
            .await
            .map_err(|e| DbError::query("emptying half-loaded tables", target, e))?;
    }
    let mut data_only_note = None;
    let mut failed_tables = Vec::new();
    let completed = if opts.data_only {
        let plan = data_only::plan(&admin, target, &tables).await?;
        data_only_note = Some(plan.describe());
        warnings.extend(plan.warnings.clone());
        if opts.clean {
            let names: Vec<String> = tables.iter().map(TableEntry::own_rows).collect();
            admin
                .batch_execute(&format!("TRUNCATE {}", names.join(", ")))
                .await
                .map_err(|e| DbError::query("emptying the target tables (--clean)", target, e))?;
        }
        let (completed, failed) =
            load_data_only(store.clone(), target, &tables, &plan, opts, &meter).await?;
        failed_tables = failed;
        completed
    } else {
        let completed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let loaded = load_tables(
            store.clone(),
            target,
            &tables,
            &pending,
            opts,
            &meter,
            &completed,
        )
        .await;
        let completed = completed.lock().map(|c| c.clone()).unwrap_or_default();
        if let Err(cause) = loaded {
            return Err(RestoreError::Incomplete {
                cause: Box::new(cause),
                loaded: resume.loaded.len() + completed.len(),
                tables: tables.len(),
                state: if by_chunk {
                    "a time-boxed restore lands big tables chunk by chunk, and a table still loading holds exactly the chunks recorded in tidemark_restore_progress.chunks; the next slice resumes it"
                } else {
                    "each table loads in one transaction, so the failed one was rolled back and none is half-loaded; drop the target database and restore again"
                },
            });
        }
        completed
    };
    let loaded = resume.loaded.len() + completed.len();
    let failed_count: usize = failed_tables.iter().map(|f| f.tables.len()).sum();
    let mut done = loaded + failed_count == tables.len();

    if done && by_chunk_any(&admin).await {
        admin
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {PROGRESS_SCHEMA} CASCADE"))
            .await
            .map_err(|e| DbError::query("dropping the chunk progress table", target, e))?;
    }
    if let (true, Some(script)) = (done, &large_objects) {
        let applied = restore_large_objects(&admin, target, script, &known, opts).await?;
        warnings.extend(applied);
    }
    if done {
        set_sequences(&admin, target, manifest, &tables, opts.data_only).await?;
        // Once the keys' indexes exist (post-data), or now if they already do.
        let catch_up = sequence_catch_up(manifest, &tables, opts.advance_sequences);
        if scripts.is_some() {
            apply_opts.finish_queries = catch_up;
        } else {
            let moved = apply::warning_queries(&admin, &catch_up)
                .await
                .map_err(|e| DbError::query("checking sequences against the data", target, e))?;
            warnings.extend(moved);
        }
        if opts.data_only {
            // As pg_restore --data-only does: refresh the materialized views that were
            // populated in the backup, now that their tables hold the data.
            if let Some(dump) = &manifest.schema_dump {
                let post = schema::load_script(store.as_ref(), &dump.post_data).await?;
                let refresh_only = |entry: &schema::Entry| {
                    if entry.kind == "MATERIALIZED VIEW DATA" {
                        Decision::Optional
                    } else {
                        Decision::Skip(String::new())
                    }
                };
                let applied = apply::apply(
                    &admin,
                    &post,
                    "materialized views",
                    &ApplyOptions::default(),
                    &known,
                    &refresh_only,
                )
                .await?;
                warnings.extend(applied.warnings);
            }
        }
        if let Some(scripts) = &scripts {
            if opts.mark_finished {
                apply_opts.finish_with = Some(format!(
                    "COMMENT ON DATABASE {} IS {}",
                    quote_ident(&target.dbname),
                    quote_literal(FINISHED_MARK)
                ));
            }
            let applied = apply::apply(
                &admin,
                &scripts.post,
                "post-data",
                &apply_opts,
                &known,
                &decide,
            )
            .await?;
            schema_objects += applied.entries;
            warnings.extend(applied.warnings);
        }
    } else {
        done = false;
    }
    for warning in &warnings {
        tracing::warn!(backup_id = manifest.id, "{warning}");
    }
    if !failed_tables.is_empty() {
        return Err(RestoreError::TablesFailed {
            failed: failed_tables,
            total: tables.len(),
        });
    }
    let bytes = tables
        .iter()
        .flat_map(|t| t.chunks.iter().chain(&t.key_chunks))
        .map(|c| c.bytes)
        .sum();
    let chunks = tables
        .iter()
        .map(|t| (t.chunks.len() + t.key_chunks.len()) as u64)
        .sum();
    let report = RestoreReport {
        backup_id: manifest.id.clone(),
        target: target.to_string(),
        tables: tables.len(),
        rows: meter.rows.load(Ordering::Relaxed),
        bytes,
        chunks,
        seconds: started.elapsed().as_secs_f64(),
        done,
        completed,
        schema_applied,
        schema_objects,
        data_only: data_only_note,
        warnings,
    };
    tracing::info!(
        backup_id = report.backup_id,
        target = report.target,
        rows = report.rows,
        seconds = report.seconds,
        "restore finished"
    );
    Ok(report)
}

/// The backup tables a restore covers and their partitions.
fn restored_relations(tables: &[TableEntry]) -> HashSet<TableName> {
    let mut out = HashSet::new();
    for t in tables {
        out.insert(t.name.clone());
        out.extend(t.schema.partitions.iter().map(|p| p.name.clone()));
    }
    out
}

fn sequence_owners(manifest: &Manifest) -> HashMap<TableName, TableName> {
    manifest
        .sequences
        .iter()
        .filter_map(|s| Some((s.name.clone(), s.owned_by.as_ref()?.0.clone())))
        .collect()
}

/// Schema of the table where a time-boxed restore records the chunks it has landed.
const PROGRESS_SCHEMA: &str = "tidemark_restore_progress";

/// Whether `entry` lands chunk by chunk, each chunk in its own transaction with its
/// progress record: in a time-boxed restore (verify's slices), a plain table of several
/// chunks or a `changes` chain to merge, so a table bigger than one slice finishes across
/// slices and a slice killed anywhere resumes inside it exactly. Everything else lands
/// whole in one transaction.
fn lands_by_chunk(entry: &TableEntry, opts: &RestoreOptions) -> bool {
    opts.deadline.is_some() && !opts.data_only && (needs_merge(entry) || entry.chunks.len() > 1)
}

/// Whether the chunk progress table exists in the target.
async fn by_chunk_any(client: &Client) -> bool {
    client
        .query_one(
            "SELECT to_regnamespace($1) IS NOT NULL",
            &[&PROGRESS_SCHEMA],
        )
        .await
        .and_then(|r| r.try_get::<_, bool>(0))
        .unwrap_or(false)
}

/// Loads the steps of `entry` that its progress records do not hold, each step in its own
/// transaction with its record: a plain table's chunks, or a chain's key-set chunks and
/// then its chunks newest first (merged against persistent merge tables). Stops between
/// steps at `deadline` once `worked`. Returns the rows landed and whether every step is in.
async fn load_by_chunk(
    store: &dyn ReadStore,
    client: &Client,
    entry: &TableEntry,
    deadline: Option<Instant>,
    worked: &mut bool,
    meter: &RestoreMeter,
) -> Result<(u64, bool), RestoreError> {
    let name = entry.name.to_string();
    let landed: HashSet<String> = client
        .query(
            &format!("SELECT chunk FROM {PROGRESS_SCHEMA}.chunks WHERE tbl = $1"),
            &[&name],
        )
        .await
        .map_err(|e| load_error(&entry.name, "reading the chunk progress", &e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let merge = if needs_merge(entry) {
        let tag = format!("t{}", &crate::store::sha256_hex(name.as_bytes())[..16]);
        Some(load::persistent_merge_tables(client, entry, PROGRESS_SCHEMA, &tag).await?)
    } else {
        None
    };
    // (chunk, is a key-set chunk)
    let steps: Vec<(&ChunkRef, bool)> = match &merge {
        Some(_) => entry
            .key_chunks
            .iter()
            .map(|c| (c, true))
            .chain(entry.chunks.iter().rev().map(|c| (c, false)))
            .collect(),
        None => entry.chunks.iter().map(|c| (c, false)).collect(),
    };
    let copy = load::copy_from_stdin(&entry.name.quoted(), &entry.columns);
    let mut rows = 0;
    for (chunk, is_key) in steps.into_iter().filter(|(c, _)| !landed.contains(&c.key)) {
        if *worked && deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok((rows, false));
        }
        rows += in_transaction(client, &entry.name, || async {
            let n = match &merge {
                Some(tables) => {
                    load::merge_step(store, client, entry, tables, chunk, is_key, meter).await?
                }
                None => load::copy_chunk(store, client, &entry.name, &copy, chunk, meter).await?,
            };
            client
                .execute(
                    &format!("INSERT INTO {PROGRESS_SCHEMA}.chunks VALUES ($1, $2)"),
                    &[&name, &chunk.key],
                )
                .await
                .map_err(|e| load_error(&entry.name, "recording the chunk", &e))?;
            Ok(n)
        })
        .await?;
        *worked = true;
    }
    Ok((rows, true))
}

/// Loads the `pending` tables of a schema restore, in parallel, each in one transaction
/// (a failure rolls its table back: no table is ever left half-loaded); adds each table
/// loaded to `completed`.
async fn load_tables(
    store: Arc<dyn ReadStore>,
    target: &DbSettings,
    tables: &[TableEntry],
    pending: &[usize],
    opts: &RestoreOptions,
    meter: &Arc<RestoreMeter>,
    completed: &Arc<std::sync::Mutex<Vec<TableName>>>,
) -> Result<(), RestoreError> {
    // The biggest tables first, so that the last one to finish is a small one.
    let mut jobs: Vec<usize> = pending.to_vec();
    jobs.sort_by_key(|&t| std::cmp::Reverse(tables[t].chunks.iter().map(|c| c.bytes).sum::<u64>()));
    let jobs: std::collections::VecDeque<usize> = jobs.into();
    let by_chunk: Arc<Vec<bool>> =
        Arc::new(tables.iter().map(|e| lands_by_chunk(e, opts)).collect());
    let tables: Arc<Vec<TableEntry>> = Arc::new(tables.to_vec());
    let worker_count = opts.workers.max(1).min(jobs.len().max(1));
    let queue = Arc::new(std::sync::Mutex::new(jobs));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..worker_count {
        let (queue, store, target, meter, tables, completed, by_chunk) = (
            queue.clone(),
            store.clone(),
            target.clone(),
            meter.clone(),
            tables.clone(),
            completed.clone(),
            by_chunk.clone(),
        );
        let deadline = opts.deadline;
        workers.spawn(async move {
            let client = db::connect(&target).await?;
            // Every connection lands at least one table (or chunk of a table landed chunk
            // by chunk), so each slice makes progress.
            let mut worked_chunk = false;
            loop {
                if worked_chunk && deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some(t) = next else { break };
                let entry = &tables[t];
                if by_chunk[t] {
                    let mut chunk_worked = worked_chunk;
                    let (rows, complete) = load_by_chunk(
                        store.as_ref(),
                        &client,
                        entry,
                        deadline,
                        &mut chunk_worked,
                        &meter,
                    )
                    .await?;
                    worked_chunk = chunk_worked;
                    meter.rows.fetch_add(rows, Ordering::Relaxed);
                    if !complete {
                        break;
                    }
                    if let Ok(mut done) = completed.lock() {
                        done.push(entry.name.clone());
                    }
                    meter.tables_done.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                worked_chunk = true;
                let rows = in_transaction(&client, &entry.name, || async {
                    load_into(
                        store.as_ref(),
                        &client,
                        &target,
                        entry,
                        Landing::Direct,
                        &meter,
                    )
                    .await
                })
                .await?;
                meter.rows.fetch_add(rows, Ordering::Relaxed);
                if let Ok(mut done) = completed.lock() {
                    done.push(entry.name.clone());
                }
                meter.tables_done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, RestoreError>(())
        });
    }
    join_all(workers).await
}

/// Waits for every worker; the first error wins and stops the others.
async fn join_all(
    workers: tokio::task::JoinSet<Result<(), RestoreError>>,
) -> Result<(), RestoreError> {
    crate::join_workers(workers, |e| RestoreError::Table {
        table: TableName::new("", ""),
        detail: format!("restore worker failed: {e}"),
        retryable: false,
    })
    .await
}

/// Runs `work` in a transaction on `client`: committed if it succeeds, rolled back if not.
async fn in_transaction<T, F, Fut>(
    client: &Client,
    table: &TableName,
    work: F,
) -> Result<T, RestoreError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, RestoreError>>,
{
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| load_error(table, "starting the load", &e))?;
    match work().await {
        Ok(value) => {
            client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| load_error(table, "committing the load", &e))?;
            Ok(value)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Loads into existing tables as the data-only plan says.
async fn load_data_only(
    store: Arc<dyn ReadStore>,
    target: &DbSettings,
    tables: &[TableEntry],
    plan: &data_only::Plan,
    opts: &RestoreOptions,
    meter: &Arc<RestoreMeter>,
) -> Result<(Vec<TableName>, Vec<FailedTables>), RestoreError> {
    let all = plan.method == Method::TriggersDisabled;
    // Superuser: independent tables, in parallel. Otherwise groups in order, one by one.
    let worker_count = if all { opts.workers.max(1) } else { 1 };
    let queue = Arc::new(std::sync::Mutex::new(
        plan.groups
            .iter()
            .cloned()
            .collect::<std::collections::VecDeque<_>>(),
    ));
    let completed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tables: Arc<Vec<TableEntry>> = Arc::new(tables.to_vec());
    let plan = Arc::new(plan.clone());
    let exit_on_error = opts.exit_on_error;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..worker_count.min(plan.groups.len().max(1)) {
        let (queue, store, target, meter, tables, plan, completed, failed) = (
            queue.clone(),
            store.clone(),
            target.clone(),
            meter.clone(),
            tables.clone(),
            plan.clone(),
            completed.clone(),
            failed.clone(),
        );
        workers.spawn(async move {
            let client = db::connect(&target).await?;
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some(group) = next else { break };
                let first = &tables[group[0]].name;
                let rows = in_transaction(&client, first, || async {
                    // A cycle (or a deferrable self-reference) is checked at commit.
                    if group.len() > 1 || !all {
                        client
                            .batch_execute("SET CONSTRAINTS ALL DEFERRED")
                            .await
                            .map_err(|e| load_error(first, "deferring constraints", &e))?;
                    }
                    let mut rows = 0;
                    let mut guards = Vec::new();
                    for &t in &group {
                        let entry = &tables[t];
                        if all || plan.owned.contains(&t) {
                            guards.push((
                                t,
                                data_only::disable_triggers(&client, &target, &entry.name, all)
                                    .await?,
                            ));
                        }
                        let landing = if plan.staged.contains(&t) {
                            Landing::Staged
                        } else {
                            Landing::Direct
                        };
                        rows += load_into(store.as_ref(), &client, &target, entry, landing, &meter)
                            .await?;
                    }
                    // Deferred checks fire now, with every table of the group loaded; a
                    // table's triggers can only be altered once none of its events wait.
                    client
                        .batch_execute("SET CONSTRAINTS ALL IMMEDIATE")
                        .await
                        .map_err(|e| load_error(first, "checking the deferred constraints", &e))?;
                    for (t, guard) in guards {
                        guard.restore(&client, &target, &tables[t].name).await?;
                    }
                    Ok(rows)
                })
                .await;
                // Like pg_restore: a table that fails is rolled back and listed, and
                // every other table is still loaded (unless --exit-on-error, or the
                // connection itself is gone).
                let rows = match rows {
                    Ok(rows) => rows,
                    Err(e) if exit_on_error || client.is_closed() => return Err(e),
                    Err(e) => {
                        tracing::warn!(table = %first, error = %error_chain(&e), "a table failed to load; going on with the others");
                        if let Ok(mut failed) = failed.lock() {
                            failed.push(FailedTables {
                                tables: group.iter().map(|&t| tables[t].name.clone()).collect(),
                                error: error_chain(&e),
                            });
                        }
                        continue;
                    }
                };
                meter.rows.fetch_add(rows, Ordering::Relaxed);
                meter.tables_done.fetch_add(group.len(), Ordering::Relaxed);
                if let Ok(mut done) = completed.lock() {
                    done.extend(group.iter().map(|&t| tables[t].name.clone()));
                }
            }
            Ok::<_, RestoreError>(())
        });
    }
    join_all(workers).await?;
    let completed = completed.lock().map(|c| c.clone()).unwrap_or_default();
    let failed = failed.lock().map(|f| f.clone()).unwrap_or_default();
    Ok((completed, failed))
}

/// Which of the large objects `script` creates the target already holds.
async fn present_large_objects(
    client: &Client,
    target: &DbSettings,
    script: &schema::Script,
) -> Result<Vec<u32>, RestoreError> {
    let oids: Vec<u32> = apply::large_objects(script);
    Ok(client
        .query(
            "SELECT oid FROM pg_largeobject_metadata WHERE oid = ANY($1) ORDER BY oid",
            &[&oids],
        )
        .await
        .map_err(|e| DbError::query("checking the target's large objects", target, e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Restores the backup's large objects (contents, comments; owners and privileges with
/// `with_privileges`) from its large-objects script, in one transaction. Objects of the
/// backup that the target already holds (the preflight allowed that only for
/// `--data-only --clean`, or an earlier slice of this restore) are replaced. A `--tables`
/// subset restores none (as `pg_restore -t`).
async fn restore_large_objects(
    client: &Client,
    target: &DbSettings,
    script: &schema::Script,
    known: &HashSet<String>,
    opts: &RestoreOptions,
) -> Result<Vec<String>, RestoreError> {
    let present = present_large_objects(client, target, script).await?;
    if !present.is_empty() {
        client
            .execute(
                "SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid = ANY($1)",
                &[&present],
            )
            .await
            .map_err(|e| DbError::query("replacing the target's large objects", target, e))?;
    }
    let decide = |entry: &schema::Entry| {
        if apply::is_large_object_entry(entry) {
            Decision::Apply
        } else {
            Decision::Skip(String::new())
        }
    };
    let applied = apply::apply(
        client,
        script,
        "large objects",
        &ApplyOptions {
            with_owners: opts.with_privileges,
            with_privileges: opts.with_privileges,
            ..ApplyOptions::default()
        },
        known,
        &decide,
    )
    .await?;
    Ok(applied.warnings)
}

/// Tables of a `--data-only` restore that failed to load together (one group: a table,
/// or tables whose foreign keys form a cycle), rolled back, and the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedTables {
    pub tables: Vec<TableName>,
    pub error: String,
}

impl std::fmt::Display for FailedTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.tables.iter().map(ToString::to_string).collect();
        write!(f, "{}: {}", names.join(", "), self.error)
    }
}

/// Creates the roles the globals script names that the target lacks (with their
/// attributes, settings and memberships); returns their names.
async fn create_roles(
    client: &Client,
    target: &DbSettings,
    globals: &Script,
) -> Result<Vec<String>, RestoreError> {
    let existing: HashSet<String> = client
        .query("SELECT rolname::text FROM pg_roles", &[])
        .await
        .map_err(|e| DbError::query("listing roles", target, e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let role_of = |s: &schema::Statement, verb: &str| -> Option<String> {
        let tokens = s.tokens();
        match tokens.as_slice() {
            [schema::script::Token::Word(v), schema::script::Token::Word(role), name, ..]
                if v == verb && role == "role" =>
            {
                match name {
                    schema::script::Token::Word(w) => Some(w.clone()),
                    schema::script::Token::Quoted(q) => Some(q.clone()),
                    _ => None,
                }
            }
            _ => None,
        }
    };
    let statements: Vec<&schema::Statement> = globals
        .entries()
        .flat_map(|e| e.statements.iter())
        .collect();
    let created: Vec<String> = statements
        .iter()
        .filter_map(|s| role_of(s, "create"))
        .filter(|r| !existing.contains(r))
        .collect();
    if created.is_empty() {
        return Ok(created);
    }
    let mut sql = vec!["BEGIN".to_owned()];
    for s in &statements {
        let for_new = role_of(s, "create")
            .or_else(|| role_of(s, "alter"))
            .is_some_and(|r| created.contains(&r));
        // Memberships of a new role: `GRANT a TO b ...` naming a created role.
        let grant = s.words(1).first().map(String::as_str) == Some("grant")
            && !s.text.to_uppercase().contains(" ON ")
            && s.tokens().iter().any(|t| match t {
                schema::script::Token::Word(w) | schema::script::Token::Quoted(w) => {
                    created.contains(w)
                }
                _ => false,
            });
        if for_new || grant {
            sql.push(s.text.trim_end_matches(';').to_owned());
        }
    }
    sql.push("COMMIT".to_owned());
    client.batch_execute(&sql.join(";\n")).await.map_err(|e| {
        RestoreError::Apply(ApplyError {
            section: "globals",
            object: format!("roles {}", created.join(", ")),
            detail: apply::server_message(&e),
            retryable: false,
        })
    })?;
    Ok(created)
}

fn select_tables(manifest: &Manifest, wanted: &[String]) -> Result<Vec<TableEntry>, RestoreError> {
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
fn source_version(manifest: &Manifest) -> Option<ServerVersion> {
    manifest
        .schema_dump
        .as_ref()
        .map(|d| ServerVersion(d.server_version_num))
        .or_else(|| ServerVersion::parse(&manifest.server_version))
}

/// Preflight: the target must be a supported server, and not of an older major than the
/// backup's source unless `allow_older_target`; returns the warning for such a restore.
async fn check_target_version(
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
async fn preflight(
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

/// Sequences a restore of `tables` sets: all of them for a whole restore, those owned
/// by a restored table for a subset.
fn wanted_sequence(
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
fn sequence_regclass(seq: &crate::format::manifest::SequenceValue) -> String {
    quote_literal(&seq.name.quoted())
}

/// For each restored serial or identity sequence, a query that finds whether the source
/// held it behind the keys its column holds (rows written with explicit keys, or a
/// sequence reset behind its data), so that `nextval` would return a key the data
/// already uses; each row it returns is a warning naming the sequence. With `advance`
/// (`--advance-sequences`) it also moves the sequence past those keys, within its
/// bounds; otherwise the sequence stays exactly as the source had it. Integer columns
/// only.
fn sequence_catch_up(manifest: &Manifest, tables: &[TableEntry], advance: bool) -> Vec<String> {
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

async fn set_sequences(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse() {
        assert_eq!("latest".parse(), Ok(BackupSelector::Latest));
        assert_eq!(
            "20261122T120000Z-0a1b2c".parse(),
            Ok(BackupSelector::Id("20261122T120000Z-0a1b2c".into()))
        );
        assert!("".parse::<BackupSelector>().is_err());
        assert!("../x".parse::<BackupSelector>().is_err());
    }
}
