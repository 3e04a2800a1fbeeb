//! Restore: one code path for `tidemark restore` and for verification restores.
//!
//! 1. Check everything that can be checked before writing: the manifest's own checksum,
//!    that every chunk exists, that target tables are absent (or, with `data_only`, present
//!    and empty unless `clean`).
//! 2. Create schemas, sequences and tables from the manifest (columns, types, NOT NULL,
//!    defaults, generated and identity columns, partitions) — no keys or indexes yet.
//! 3. Load tables in parallel, one transaction per table. Each chunk streams from the
//!    store through a SHA-256 check and zstd into `COPY FROM STDIN`; a chunk whose bytes
//!    do not match the manifest rolls its table back and is named in the error. A
//!    `changes` chain loads into a staging table and lands in one set-based merge: the
//!    newest version of each key, and only keys in the live key set.
//! 4. Build primary keys, indexes and checks after the data (as pg_restore does), then
//!    set sequences to their recorded values.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use async_compression::tokio::bufread::ZstdDecoder;
use bytes::{Bytes, BytesMut};
use futures_util::{pin_mut, SinkExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader, ReadBuf};
use tokio_postgres::Client;

use crate::catalog::parse_table_name;
use crate::db::{self, DbError, DbSettings};
use crate::format::manifest::{Manifest, TableEntry};
use crate::format::{
    manifest_key, quote_ident, quote_literal, read_doc, ChunkRef, FormatError, TableMode, TableName,
};
use crate::store::{ReadStore, StoreError};

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
#[derive(Debug, Clone)]
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
    /// Continue a time-boxed restore: the tables given may exist half-loaded from an
    /// earlier slice, so they are dropped and created again.
    pub resume: bool,
    /// Start no new table or chunk after this instant; the report says what completed.
    pub deadline: Option<Instant>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            resume: false,
            deadline: None,
            tables: Vec::new(),
            data_only: false,
            clean: false,
            workers: 2,
            meter: None,
        }
    }
}

/// Live counters of a restore.
#[derive(Debug, Default)]
pub struct RestoreMeter {
    pub tables_total: AtomicUsize,
    pub tables_done: AtomicUsize,
    pub chunks_done: AtomicU64,
    pub bytes: AtomicU64,
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
    /// Every selected table is loaded (false only when a deadline stopped the restore).
    pub done: bool,
    /// Tables completely loaded, keys and indexes included.
    pub completed: Vec<TableName>,
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
    #[error("target already has table {0}; restore into an empty database, or use --data-only")]
    TargetTableExists(TableName),
    #[error("target has no table {0}; --data-only loads into existing tables")]
    TargetTableMissing(TableName),
    #[error("target table {0} already holds rows; pass --clean to empty it first")]
    TargetNotEmpty(TableName),
    #[error("chunk {key} is missing from the store")]
    ChunkMissing { key: String },
    #[error("chunk {key} is corrupt: {detail}")]
    ChunkCorrupt { key: String, detail: String },
    #[error("restoring {table}: {detail}")]
    Table {
        table: TableName,
        detail: String,
        retryable: bool,
    },
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
    let (manifest, _) = read_doc::<Manifest>(store, &key)
        .await
        .map_err(|e| match e {
            FormatError::Invalid { key, .. } => RestoreError::ManifestModified { key },
            other => other.into(),
        })?
        .ok_or_else(|| RestoreError::UnknownBackup(id.clone()))?;
    if !manifest.is_intact() || manifest.id != id {
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

/// Restores `manifest` into the database `target` names.
///
/// # Errors
/// Preflight errors (nothing written), chunk errors naming the object, database errors.
pub async fn restore(
    store: Arc<dyn ReadStore>,
    manifest: &Manifest,
    target: &DbSettings,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let tables = select_tables(manifest, &opts.tables)?;
    let admin = db::connect(target).await?;
    preflight(store.as_ref(), &admin, target, &tables, opts).await?;
    if opts.resume && !opts.data_only {
        let names: Vec<String> = tables.iter().map(|t| t.name.quoted()).collect();
        if !names.is_empty() {
            admin
                .batch_execute(&format!(
                    "DROP TABLE IF EXISTS {} CASCADE",
                    names.join(", ")
                ))
                .await
                .map_err(|e| DbError::query("dropping half-loaded tables", target, e))?;
        }
    }
    if !opts.data_only {
        create_schema(&admin, target, manifest, &tables).await?;
    }
    let completed = Arc::new(std::sync::Mutex::new(Vec::new()));

    let meter = opts.meter.clone().unwrap_or_default();
    meter.tables_total.store(tables.len(), Ordering::Relaxed);
    // Tables whose chunks are independent (a new table, no chain merge) load chunk by
    // chunk on all connections at once; the rest load whole, in one transaction.
    let tables = Arc::new(tables);
    let mut jobs = std::collections::VecDeque::new();
    let remaining: Arc<Vec<AtomicUsize>> = Arc::new(
        tables
            .iter()
            .map(|t| AtomicUsize::new(t.chunks.len()))
            .collect(),
    );
    for (t, entry) in tables.iter().enumerate() {
        // A time-boxed restore works table by table, so that each slice completes some.
        if opts.data_only
            || opts.deadline.is_some()
            || needs_merge(entry)
            || entry.chunks.is_empty()
        {
            jobs.push_back(Job::Table(t));
        } else {
            jobs.extend((0..entry.chunks.len()).map(|c| Job::Chunk(t, c)));
        }
    }
    let worker_count = opts.workers.max(1).min(jobs.len().max(1));
    let queue = Arc::new(std::sync::Mutex::new(jobs));
    let rows = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..worker_count {
        let completed = completed.clone();
        let (queue, store, target, meter, rows, tables, remaining) = (
            queue.clone(),
            store.clone(),
            target.clone(),
            meter.clone(),
            rows.clone(),
            tables.clone(),
            remaining.clone(),
        );
        let opts = opts.clone();
        workers.spawn(async move {
            let client = db::connect(&target).await?;
            // Every connection finishes at least one job, so each slice makes progress.
            let mut worked = false;
            loop {
                if worked && opts.deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                worked = true;
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some(job) = next else { break };
                let t = match job {
                    Job::Table(t) => {
                        let loaded =
                            load_table(store.as_ref(), &client, &target, &tables[t], &opts, &meter)
                                .await?;
                        rows.fetch_add(loaded, Ordering::Relaxed);
                        t
                    }
                    Job::Chunk(t, c) => {
                        let entry = &tables[t];
                        let copy = format!(
                            "COPY {} ({}) FROM STDIN",
                            entry.name.quoted(),
                            list(&entry.columns)
                        );
                        let loaded =
                            copy_chunk(store.as_ref(), &client, &copy, &entry.chunks[c], &meter)
                                .await
                                .map_err(|e| with_table(&entry.name, e))?;
                        rows.fetch_add(loaded, Ordering::Relaxed);
                        if remaining[t].fetch_sub(1, Ordering::AcqRel) != 1 {
                            continue;
                        }
                        t
                    }
                };
                if !opts.data_only {
                    build_indexes(&client, &target, &tables[t]).await?;
                }
                if let Ok(mut done) = completed.lock() {
                    done.push(tables[t].name.clone());
                }
                meter.tables_done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, RestoreError>(())
        });
    }
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        let result = joined.unwrap_or_else(|e| {
            Err(RestoreError::Table {
                table: TableName::new("", ""),
                detail: format!("restore worker failed: {e}"),
                retryable: false,
            })
        });
        if let Err(e) = result {
            if first_error.is_none() {
                first_error = Some(e);
                workers.abort_all();
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let completed: Vec<TableName> = completed.lock().map(|c| c.clone()).unwrap_or_default();
    let done = completed.len() == tables.len();
    if done {
        if !opts.data_only {
            add_foreign_keys(&admin, target, &tables).await?;
        }
        set_sequences(&admin, target, manifest, &tables, opts.data_only).await?;
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
        rows: rows.load(Ordering::Relaxed),
        bytes,
        chunks,
        seconds: started.elapsed().as_secs_f64(),
        done,
        completed,
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

/// A unit of restore work.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// A whole table in one transaction.
    Table(usize),
    /// One chunk of a new table (its own transaction).
    Chunk(usize, usize),
}

/// A `changes` chain needs the staging merge; everything else is plain COPY.
fn needs_merge(entry: &TableEntry) -> bool {
    let runs: std::collections::BTreeSet<&str> =
        entry.chunks.iter().map(|c| c.run_id.as_str()).collect();
    entry.mode == TableMode::Changes
        && !entry.key.is_empty()
        && (runs.len() > 1 || !entry.key_chunks.is_empty())
}

/// Names the table in an error that could not know it.
fn with_table(table: &TableName, e: RestoreError) -> RestoreError {
    match e {
        RestoreError::Table {
            detail, retryable, ..
        } => RestoreError::Table {
            table: table.clone(),
            detail,
            retryable,
        },
        other => other,
    }
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

async fn preflight(
    store: &dyn ReadStore,
    client: &Client,
    target: &DbSettings,
    tables: &[TableEntry],
    opts: &RestoreOptions,
) -> Result<(), RestoreError> {
    for entry in tables {
        let exists: bool = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&entry.name.quoted()],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| {
                RestoreError::table(
                    &entry.name,
                    DbError::query("checking the target", target, e),
                )
            })?;
        match (opts.data_only, exists) {
            (false, true) if opts.resume => {}
            (false, true) => return Err(RestoreError::TargetTableExists(entry.name.clone())),
            (true, false) => return Err(RestoreError::TargetTableMissing(entry.name.clone())),
            (true, true) if !opts.clean => {
                let has_rows: bool = client
                    .query_one(
                        &format!("SELECT EXISTS (SELECT 1 FROM {})", entry.name.quoted()),
                        &[],
                    )
                    .await
                    .and_then(|r| r.try_get(0))
                    .map_err(|e| {
                        RestoreError::table(
                            &entry.name,
                            DbError::query("checking the target", target, e),
                        )
                    })?;
                if has_rows {
                    return Err(RestoreError::TargetNotEmpty(entry.name.clone()));
                }
            }
            _ => {}
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
    Ok(())
}

fn column_sql(column: &crate::format::manifest::ColumnDef) -> String {
    let mut sql = format!("{} {}", quote_ident(&column.name), column.type_name);
    if let Some(expr) = &column.generated {
        sql.push_str(&format!(" GENERATED ALWAYS AS ({expr}) STORED"));
    } else if let Some(identity) = &column.identity {
        sql.push_str(&format!(
            " GENERATED {} AS IDENTITY",
            identity.to_uppercase()
        ));
    } else if let Some(default) = &column.default {
        sql.push_str(&format!(" DEFAULT {default}"));
    }
    if column.not_null {
        sql.push_str(" NOT NULL");
    }
    sql
}

fn is_identity_sequence(
    manifest_tables: &[TableEntry],
    owner: &Option<(TableName, String)>,
) -> bool {
    owner.as_ref().is_some_and(|(table, column)| {
        manifest_tables.iter().any(|t| {
            &t.name == table
                && t.schema
                    .columns
                    .iter()
                    .any(|c| &c.name == column && c.identity.is_some())
        })
    })
}

/// Schemas, sequences and tables (with partitions), in one transaction.
async fn create_schema(
    client: &Client,
    target: &DbSettings,
    manifest: &Manifest,
    tables: &[TableEntry],
) -> Result<(), RestoreError> {
    let mut sql = String::from("BEGIN;\n");
    let mut schemas: Vec<&str> = tables.iter().map(|t| t.name.schema.as_str()).collect();
    schemas.sort_unstable();
    schemas.dedup();
    for schema in schemas {
        sql.push_str(&format!(
            "CREATE SCHEMA IF NOT EXISTS {};\n",
            quote_ident(schema)
        ));
    }
    let sequences: Vec<_> = manifest
        .sequences
        .iter()
        .filter(|s| wanted_sequence(s, tables, manifest.tables.len()))
        .collect();
    for seq in &sequences {
        if is_identity_sequence(tables, &seq.owned_by) {
            continue;
        }
        sql.push_str(&format!(
            "CREATE SEQUENCE IF NOT EXISTS {} AS {} INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} {};\n",
            seq.name.quoted(),
            seq.data_type,
            seq.increment_by,
            seq.min_value,
            seq.max_value,
            seq.start_value,
            if seq.cycle { "CYCLE" } else { "NO CYCLE" }
        ));
    }
    for entry in tables {
        let columns: Vec<String> = entry.schema.columns.iter().map(column_sql).collect();
        sql.push_str(&format!(
            "CREATE TABLE {} ({})",
            entry.name.quoted(),
            columns.join(", ")
        ));
        if let Some(key) = &entry.schema.partition_key {
            sql.push_str(&format!(" PARTITION BY {key}"));
        }
        sql.push_str(";\n");
        for part in &entry.schema.partitions {
            sql.push_str(&format!(
                "CREATE TABLE {} PARTITION OF {} {}",
                part.name.quoted(),
                part.parent.quoted(),
                part.bound
            ));
            if let Some(key) = &part.partition_key {
                sql.push_str(&format!(" PARTITION BY {key}"));
            }
            sql.push_str(";\n");
        }
    }
    for seq in &sequences {
        if let Some((table, column)) = &seq.owned_by {
            if !is_identity_sequence(tables, &seq.owned_by)
                && tables.iter().any(|t| &t.name == table)
            {
                sql.push_str(&format!(
                    "ALTER SEQUENCE {} OWNED BY {}.{};\n",
                    seq.name.quoted(),
                    table.quoted(),
                    quote_ident(column)
                ));
            }
        }
    }
    sql.push_str("COMMIT;");
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| DbError::query("creating tables", target, e).into())
        .inspect_err(|_: &RestoreError| tracing::debug!(%sql, "schema DDL failed"))
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

/// An `AsyncRead` that hashes and counts what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: AsyncRead + Unpin> AsyncRead for HashingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                this.hasher.update(fresh);
                this.bytes += fresh.len() as u64;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// Streams one chunk into `COPY {target} ({columns}) FROM STDIN`, checking its SHA-256.
/// Returns the rows COPY loaded.
async fn copy_chunk(
    store: &dyn ReadStore,
    client: &Client,
    copy_sql: &str,
    chunk: &ChunkRef,
    meter: &RestoreMeter,
) -> Result<u64, RestoreError> {
    let corrupt = |detail: String| RestoreError::ChunkCorrupt {
        key: chunk.key.clone(),
        detail,
    };
    let object = store.get(&chunk.key).await.map_err(|e| match e {
        StoreError::NotFound { key } => RestoreError::ChunkMissing { key },
        other => other.into(),
    })?;
    let hashing = HashingReader {
        inner: object.body,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let mut decoder = ZstdDecoder::new(BufReader::new(hashing));
    decoder.multiple_members(true);
    let sink = client
        .copy_in::<_, Bytes>(copy_sql)
        .await
        .map_err(|e| RestoreError::Table {
            table: TableName::new("", ""),
            detail: format!("{copy_sql}: {e}"),
            retryable: false,
        })?;
    pin_mut!(sink);
    let mut buf = BytesMut::with_capacity(256 * 1024);
    loop {
        buf.reserve(256 * 1024);
        let n = decoder
            .read_buf(&mut buf)
            .await
            .map_err(|e| corrupt(format!("cannot decompress: {e}")))?;
        if n == 0 {
            break;
        }
        if buf.len() >= 128 * 1024 {
            sink.send(buf.split().freeze()).await.map_err(|e| {
                corrupt(format!("COPY refused its data: {}", crate::error_chain(&e)))
            })?;
        }
    }
    // Hash whatever the decoder left unread, so the whole object is checked.
    let mut reader = decoder.into_inner().into_inner();
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .await
        .map_err(|e| corrupt(format!("cannot read: {e}")))?;
    let actual = hex::encode(reader.hasher.finalize());
    if actual != chunk.sha256 {
        // Dropping the sink aborts the COPY; the table's transaction rolls back.
        return Err(corrupt(format!(
            "sha256 {actual}, manifest says {}",
            chunk.sha256
        )));
    }
    if !buf.is_empty() {
        sink.send(buf.split().freeze())
            .await
            .map_err(|e| corrupt(format!("COPY refused its data: {}", crate::error_chain(&e))))?;
    }
    let rows = sink
        .finish()
        .await
        .map_err(|e| corrupt(format!("COPY refused its data: {}", crate::error_chain(&e))))?;
    meter.chunks_done.fetch_add(1, Ordering::Relaxed);
    meter.bytes.fetch_add(reader.bytes, Ordering::Relaxed);
    Ok(rows)
}

fn list(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Loads one table in one transaction; returns its row count.
async fn load_table(
    store: &dyn ReadStore,
    client: &Client,
    target: &DbSettings,
    entry: &TableEntry,
    opts: &RestoreOptions,
    meter: &RestoreMeter,
) -> Result<u64, RestoreError> {
    let name = entry.name.quoted();
    let q = |what: &'static str| {
        move |e: tokio_postgres::Error| {
            RestoreError::table(&entry.name, DbError::query(what, target, e))
        }
    };
    client
        .batch_execute("BEGIN")
        .await
        .map_err(q("starting the load"))?;
    let result = async {
        if opts.data_only && opts.clean {
            client.batch_execute(&format!("TRUNCATE {name}")).await.map_err(q("emptying the table"))?;
        }
        let cols = list(&entry.columns);
        let with_table = |e: RestoreError| with_table(&entry.name, e);
        if !needs_merge(entry) {
            let mut rows = 0;
            for chunk in &entry.chunks {
                rows += copy_chunk(store, client, &format!("COPY {name} ({cols}) FROM STDIN"), chunk, meter).await.map_err(with_table)?;
            }
            return Ok(rows);
        }
        let keys = list(&entry.key);
        client
            .batch_execute(&format!(
                "CREATE TEMP TABLE tidemark_stage ON COMMIT DROP AS SELECT {cols} FROM {name} WITH NO DATA; \
                 ALTER TABLE tidemark_stage ADD COLUMN tidemark_seq int NOT NULL DEFAULT 0"
            ))
            .await
            .map_err(q("creating the staging table"))?;
        for (i, chunk) in entry.chunks.iter().enumerate() {
            client
                .batch_execute(&format!("ALTER TABLE tidemark_stage ALTER COLUMN tidemark_seq SET DEFAULT {i}"))
                .await
                .map_err(q("staging a chunk"))?;
            copy_chunk(store, client, &format!("COPY tidemark_stage ({cols}) FROM STDIN"), chunk, meter).await.map_err(with_table)?;
        }
        let mut filter = String::new();
        if !entry.key_chunks.is_empty() {
            client
                .batch_execute(&format!("CREATE TEMP TABLE tidemark_live ON COMMIT DROP AS SELECT {keys} FROM {name} WITH NO DATA"))
                .await
                .map_err(q("creating the key set table"))?;
            for chunk in &entry.key_chunks {
                copy_chunk(store, client, &format!("COPY tidemark_live ({keys}) FROM STDIN"), chunk, meter).await.map_err(with_table)?;
            }
            filter = format!("WHERE ({keys}) IN (SELECT {keys} FROM tidemark_live)");
        }
        let merged = client
            .execute(
                &format!(
                    "INSERT INTO {name} ({cols}) OVERRIDING SYSTEM VALUE \
                     SELECT {cols} FROM (SELECT DISTINCT ON ({keys}) * FROM tidemark_stage ORDER BY {keys}, tidemark_seq DESC) s {filter}"
                ),
                &[],
            )
            .await
            .map_err(q("merging the chain"))?;
        Ok(merged)
    }
    .await;
    match result {
        Ok(rows) => {
            client
                .batch_execute("COMMIT")
                .await
                .map_err(q("committing the load"))?;
            tracing::debug!(table = %entry.name, rows, "table loaded");
            Ok(rows)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Primary key, unique and other indexes, and checks, after the data.
async fn build_indexes(
    client: &Client,
    target: &DbSettings,
    entry: &TableEntry,
) -> Result<(), RestoreError> {
    let name = entry.name.quoted();
    let mut sql = Vec::new();
    for index in &entry.schema.indexes {
        match &index.constraint {
            Some(c) => sql.push(format!(
                "ALTER TABLE {name} ADD CONSTRAINT {} {}",
                quote_ident(&c.name),
                c.definition
            )),
            None => sql.push(index.definition.clone()),
        }
    }
    for check in &entry.schema.checks {
        sql.push(format!(
            "ALTER TABLE {name} ADD CONSTRAINT {} {}",
            quote_ident(&check.name),
            check.definition
        ));
    }
    for statement in sql {
        client.batch_execute(&statement).await.map_err(|e| {
            RestoreError::table(&entry.name, DbError::query("building indexes", target, e))
        })?;
    }
    Ok(())
}

/// Foreign keys last, once every table they may reference is loaded. A key that
/// references a table this restore did not create (a `--tables` subset) is skipped.
async fn add_foreign_keys(
    client: &Client,
    target: &DbSettings,
    tables: &[TableEntry],
) -> Result<(), RestoreError> {
    for entry in tables {
        for fk in &entry.schema.foreign_keys {
            let sql = format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {}",
                entry.name.quoted(),
                quote_ident(&fk.name),
                fk.definition
            );
            if let Err(e) = client.batch_execute(&sql).await {
                let missing_table =
                    e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE);
                if missing_table && tables.len() > 1 {
                    tracing::warn!(table = %entry.name, constraint = fk.name, "foreign key references a table not restored; skipped");
                    continue;
                }
                return Err(RestoreError::table(
                    &entry.name,
                    DbError::query("adding foreign keys", target, e),
                ));
            }
        }
    }
    Ok(())
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
        // Identity sequences get their names from the table; look them up by column.
        let regclass = match &seq.owned_by {
            Some((table, column)) if is_identity_sequence(tables, &seq.owned_by) => {
                format!(
                    "pg_get_serial_sequence({}, {})",
                    quote_literal(&table.quoted()),
                    quote_literal(column)
                )
            }
            _ => quote_literal(&seq.name.quoted()),
        };
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

    #[test]
    fn column_definitions() {
        use crate::format::manifest::ColumnDef;
        let col =
            |generated: Option<&str>, identity: Option<&str>, default: Option<&str>| ColumnDef {
                name: "Id".into(),
                type_name: "bigint".into(),
                not_null: true,
                default: default.map(Into::into),
                generated: generated.map(Into::into),
                identity: identity.map(Into::into),
            };
        assert_eq!(
            column_sql(&col(None, Some("always"), None)),
            "\"Id\" bigint GENERATED ALWAYS AS IDENTITY NOT NULL"
        );
        assert_eq!(
            column_sql(&col(Some("a * 2"), None, None)),
            "\"Id\" bigint GENERATED ALWAYS AS (a * 2) STORED NOT NULL"
        );
        assert_eq!(
            column_sql(&col(None, None, Some("nextval('s'::regclass)"))),
            "\"Id\" bigint DEFAULT nextval('s'::regclass) NOT NULL"
        );
    }
}
