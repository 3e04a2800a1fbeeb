//! Loading a table's chunks: store → SHA-256 → zstd → `COPY FROM STDIN`, and the chain
//! merge of `changes` tables.
//!
//! Three failures are told apart, because they mean different things to an operator: the
//! chunk's bytes differ from the manifest's checksum or do not decompress (the chunk is
//! corrupt), the store's stream broke while reading (try again), or the database refused
//! the rows (a constraint, a type, a permission: the server's message is shown, and the
//! chunk is not called corrupt). When the database refuses the rows, the rest of the
//! chunk is still read and hashed, so a corrupt chunk is named as such even if it made
//! COPY fail first.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use async_compression::tokio::bufread::ZstdDecoder;
use bytes::{Bytes, BytesMut};
use futures_util::{pin_mut, SinkExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader, ReadBuf};
use tokio_postgres::Client;

use super::{RestoreError, RestoreMeter};
use crate::db::{DbError, DbSettings};
use crate::format::manifest::TableEntry;
use crate::format::{column_list, quote_ident, ChunkRef, TableMode, TableName};
use crate::store::{ReadStore, StoreError};

/// Bytes read from the store at a time.
const READ_BYTES: usize = 1024 * 1024;

/// An `AsyncRead` that hashes and counts what passes through, and remembers whether the
/// underlying stream (the store) failed.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    failed: Option<String>,
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
            Poll::Ready(Err(e)) => {
                this.failed.get_or_insert_with(|| e.to_string());
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Why streaming a chunk into COPY stopped.
enum Stop {
    Decompress(std::io::Error),
    Database(tokio_postgres::Error),
}

/// `COPY relation (columns) FROM STDIN`; with no columns (a table that has none, or only
/// generated ones) no list at all, as pg_dump writes it: COPY then takes every column that
/// is not generated, which is none, and each empty line is one row.
pub(super) fn copy_from_stdin(relation: &str, columns: &[String], freeze: bool) -> String {
    let with = if freeze { " WITH (FREEZE)" } else { "" };
    if columns.is_empty() {
        format!("COPY {relation} FROM STDIN{with}")
    } else {
        format!(
            "COPY {relation} ({}) FROM STDIN{with}",
            column_list(columns)
        )
    }
}

/// ` (a, b)` for an `INSERT INTO t (a, b) SELECT ...`, nothing for no columns.
fn insert_columns(columns: &[String]) -> String {
    if columns.is_empty() {
        String::new()
    } else {
        format!(" ({})", column_list(columns))
    }
}

/// Creates `tidemark_chunk`, the empty temporary table a chain's chunk is merged through:
/// the target's exported columns, or, when the key has generated columns (which chunks
/// do not hold), a copy of the target with its generation expressions, so that the key
/// is computed on the way in exactly as the target computes it.
fn chunk_table_sql(entry: &TableEntry, if_not_exists: bool) -> String {
    let exists = if if_not_exists { "IF NOT EXISTS " } else { "" };
    let name = entry.name.quoted();
    if entry.key.iter().all(|k| entry.columns.contains(k)) {
        format!(
            "CREATE TEMP TABLE {exists}tidemark_chunk ON COMMIT DROP AS SELECT {} FROM {name} WITH NO DATA",
            column_list(&entry.columns)
        )
    } else {
        format!(
            "CREATE TEMP TABLE {exists}tidemark_chunk (LIKE {name} INCLUDING GENERATED) ON COMMIT DROP"
        )
    }
}

/// A database error while loading `table`: the server's own words.
pub(super) fn load_error(table: &TableName, what: &str, e: tokio_postgres::Error) -> RestoreError {
    RestoreError::table(table, DbError::statement(what, e))
}

/// Streams one chunk into `copy_sql` (a `COPY ... FROM STDIN`), checking its SHA-256.
/// Returns the rows COPY loaded.
pub(super) async fn copy_chunk(
    store: &dyn ReadStore,
    client: &Client,
    table: &TableName,
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
        failed: None,
    };
    // Big reads: a local store's file reads each go through tokio's blocking pool, and
    // 8 KiB ones (BufReader's default) made the thread handoffs cost more CPU than zstd.
    let mut decoder = ZstdDecoder::new(BufReader::with_capacity(READ_BYTES, hashing));
    decoder.multiple_members(true);
    let what = format!("loading chunk {}", chunk.key);
    let sink = client
        .copy_in::<_, Bytes>(copy_sql)
        .await
        .map_err(|e| load_error(table, &what, e))?;
    pin_mut!(sink);
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let stopped: Option<Stop> = loop {
        buf.reserve(256 * 1024);
        match decoder.read_buf(&mut buf).await {
            Ok(0) => break None,
            Ok(_) => {}
            Err(e) => break Some(Stop::Decompress(e)),
        }
        if buf.len() >= 128 * 1024 {
            if let Err(e) = sink.send(buf.split().freeze()).await {
                break Some(Stop::Database(e));
            }
        }
    };
    // Hash whatever is left unread, so the whole object is checked whatever happened.
    let mut reader = decoder.into_inner().into_inner();
    let mut rest = Vec::new();
    let drained = reader.read_to_end(&mut rest).await;
    if let Some(cause) = reader.failed.take() {
        // The store's stream broke: nothing is known about the chunk's bytes.
        return Err(RestoreError::ChunkUnreadable {
            key: chunk.key.clone(),
            detail: cause,
        });
    }
    if let Err(e) = drained {
        return Err(RestoreError::ChunkUnreadable {
            key: chunk.key.clone(),
            detail: e.to_string(),
        });
    }
    let actual = hex::encode(reader.hasher.finalize());
    if actual != chunk.sha256 {
        // Dropping the sink aborts the COPY; the caller rolls its transaction back.
        return Err(corrupt(format!(
            "sha256 {actual}, manifest says {}",
            chunk.sha256
        )));
    }
    match stopped {
        Some(Stop::Decompress(e)) => return Err(corrupt(format!("cannot decompress: {e}"))),
        Some(Stop::Database(e)) => return Err(load_error(table, &what, e)),
        None => {}
    }
    if !buf.is_empty() {
        sink.send(buf.split().freeze())
            .await
            .map_err(|e| load_error(table, &what, e))?;
    }
    let rows = sink
        .finish()
        .await
        .map_err(|e| load_error(table, &what, e))?;
    meter.chunks_done.fetch_add(1, Ordering::Relaxed);
    meter.bytes.fetch_add(reader.bytes, Ordering::Relaxed);
    Ok(rows)
}

/// A `changes` chain needs the merge; everything else is plain COPY.
pub(super) fn needs_merge(entry: &TableEntry) -> bool {
    let runs: std::collections::BTreeSet<&str> =
        entry.chunks.iter().map(|c| c.run_id.as_str()).collect();
    entry.mode == TableMode::Changes
        && !entry.key.is_empty()
        && (runs.len() > 1 || entry.has_key_set())
}

/// How [`load_into`] lands the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Landing {
    /// Into the table, chunk by chunk.
    Direct,
    /// Into a table emptied in the loading transaction, chunk by chunk with `COPY ...
    /// FREEZE`: the rows are written frozen (and, from PostgreSQL 14, all-visible), so
    /// no later VACUUM rewrites the table. A merged chain lands its base that way and
    /// merges the rest onto it ([`merge_onto_base`]).
    Fresh,
    /// Into a staging table, then one `INSERT ... SELECT` (one statement, so that a
    /// non-deferrable self-referencing foreign key sees every row at once).
    Staged,
}

/// Prepares a table that this restore created for its load in the transaction `client`
/// has open: emptied there (`TRUNCATE ONLY`, a no-op on the new empty table) so that
/// its chunks can be copied with `FREEZE`. A partitioned table (PostgreSQL refuses
/// `COPY FREEZE` into one), a `changes` chain with no base chunks to copy straight in
/// ([`base_chunks`]: a manifest from before they were marked) or a table this role may
/// not truncate lands [`Landing::Direct`] instead.
pub(super) async fn fresh_landing(
    client: &Client,
    entry: &TableEntry,
) -> Result<Landing, RestoreError> {
    if entry.schema.is_partitioned() || (needs_merge(entry) && base_chunks(entry) == 0) {
        return Ok(Landing::Direct);
    }
    let name = entry.name.quoted();
    let may: bool = client
        .query_one(
            "SELECT has_table_privilege($1::text::regclass, 'TRUNCATE')",
            &[&name],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| load_error(&entry.name, "checking the TRUNCATE privilege", e))?;
    if !may {
        return Ok(Landing::Direct);
    }
    client
        .batch_execute(&format!("TRUNCATE ONLY {name}"))
        .await
        .map_err(|e| load_error(&entry.name, "emptying the new table", e))?;
    Ok(Landing::Fresh)
}

/// Loads a table's chunks inside the caller's transaction; returns the rows landed.
///
/// A `changes` chain landing [`Landing::Fresh`] goes through [`merge_onto_base`].
/// Otherwise it is merged newest chunk first: each chunk is staged in a temporary
/// table shaped exactly like the target (so any table PostgreSQL allows, 1,600 columns
/// included, fits), and lands only the rows whose key no newer chunk had and, when the
/// backup has a live key set, whose key is in it (an emptied table's set is empty).
pub(super) async fn load_into(
    store: &dyn ReadStore,
    client: &Client,
    target: &DbSettings,
    entry: &TableEntry,
    landing: Landing,
    meter: &RestoreMeter,
) -> Result<u64, RestoreError> {
    let name = entry.name.quoted();
    let q = |what: &'static str| {
        move |e: tokio_postgres::Error| {
            RestoreError::table(&entry.name, DbError::query(what, target, e))
        }
    };
    let cols = column_list(&entry.columns);
    let copy = |table: &str| copy_from_stdin(table, &entry.columns, false);
    let merge = needs_merge(entry);
    if merge && landing == Landing::Fresh {
        return merge_onto_base(store, client, entry, meter).await;
    }
    if !merge && landing != Landing::Staged {
        let straight = copy_from_stdin(&name, &entry.columns, landing == Landing::Fresh);
        let mut rows = 0;
        for chunk in &entry.chunks {
            rows += copy_chunk(store, client, &entry.name, &straight, chunk, meter).await?;
        }
        return Ok(rows);
    }
    let shaped = |table: &str, columns: &str| temp_like(table, columns, &name);
    // Where merged rows go: the table, or a staging table landed in one statement.
    let into = match landing {
        Landing::Direct | Landing::Fresh => name.clone(),
        Landing::Staged => {
            client
                .batch_execute(&shaped("tidemark_stage", &cols))
                .await
                .map_err(q("creating the staging table"))?;
            "tidemark_stage".to_owned()
        }
    };
    if merge {
        let keys = column_list(&entry.key);
        client
            .batch_execute(&format!(
                "{}; CREATE INDEX ON tidemark_seen ({keys}); {}",
                shaped("tidemark_seen", &keys),
                chunk_table_sql(entry, false)
            ))
            .await
            .map_err(q("creating the merge tables"))?;
        let tables = MergeTables {
            seen: "tidemark_seen".to_owned(),
            live: entry.has_key_set().then(|| "tidemark_live".to_owned()),
        };
        if let Some(live) = &tables.live {
            client
                .batch_execute(&format!(
                    "{}; CREATE INDEX ON {live} ({keys})",
                    shaped(live, &keys)
                ))
                .await
                .map_err(q("creating the key set table"))?;
            for chunk in &entry.key_chunks {
                load_key_chunk(store, client, entry, &tables, chunk, meter).await?;
            }
            analyse_key_set(client, entry, &tables).await?;
        }
        let mut landed = 0;
        for chunk in entry.chunks.iter().rev() {
            landed += merge_chunk(store, client, entry, &into, &tables, chunk, meter).await?;
        }
        if landing != Landing::Staged {
            return Ok(landed);
        }
    } else {
        for chunk in &entry.chunks {
            copy_chunk(store, client, &entry.name, &copy(&into), chunk, meter).await?;
        }
    }
    let landed = client
        .execute(
            &format!(
                "INSERT INTO {name}{} OVERRIDING SYSTEM VALUE SELECT {cols} FROM {into}",
                insert_columns(&entry.columns)
            ),
            &[],
        )
        .await
        .map_err(|e| load_error(&entry.name, "landing the rows", e))?;
    Ok(landed)
}

/// How many of a chain's first chunks copy straight into its table: the first-read
/// chunks of the run the chain starts with, which hold each key at most once.
pub(super) fn base_chunks(entry: &TableEntry) -> usize {
    let Some(first) = entry.chunks.first() else {
        return 0;
    };
    entry
        .chunks
        .iter()
        .take_while(|c| c.first_read && c.run_id == first.run_id)
        .count()
}

/// Lands a `changes` chain into a table created in this transaction: its base chunks
/// ([`base_chunks`]) straight in with `COPY ... FREEZE`; the newer chunks merged newest
/// first into a temporary table (a key's newest version, live keys only); then the base
/// rows they supersede deleted and theirs inserted; then, with a live key set, the base
/// rows whose key is not live deleted. A chain of small incrementals costs about what its
/// full does, instead of every row passing through a merge. Returns the rows landed.
async fn merge_onto_base(
    store: &dyn ReadStore,
    client: &Client,
    entry: &TableEntry,
    meter: &RestoreMeter,
) -> Result<u64, RestoreError> {
    let fail =
        |what: &'static str| move |e: tokio_postgres::Error| load_error(&entry.name, what, e);
    let name = entry.name.quoted();
    // Deletes never reach an inheritance child's rows.
    let own = entry.own_rows();
    let keys = column_list(&entry.key);
    let base = base_chunks(entry);
    let straight = copy_from_stdin(&name, &entry.columns, true);
    let mut rows = 0;
    for chunk in &entry.chunks[..base] {
        rows += copy_chunk(store, client, &entry.name, &straight, chunk, meter).await?;
    }
    let tables = MergeTables {
        seen: "tidemark_seen".to_owned(),
        live: entry.has_key_set().then(|| "tidemark_live".to_owned()),
    };
    let newer = &entry.chunks[base..];
    let shaped = |table: &str| temp_like(table, &keys, &name);
    let mut setup = format!(
        "{}; {}",
        shaped(&tables.seen),
        chunk_table_sql(entry, false)
    );
    if !newer.is_empty() {
        setup.push_str(
            "; CREATE TEMP TABLE tidemark_newer ON COMMIT DROP AS SELECT * FROM tidemark_chunk",
        );
    }
    if let Some(live) = &tables.live {
        setup.push_str(&format!("; {}", shaped(live)));
    }
    client
        .batch_execute(&setup)
        .await
        .map_err(fail("creating the merge tables"))?;
    if let Some(live) = &tables.live {
        for chunk in &entry.key_chunks {
            load_key_chunk(store, client, entry, &tables, chunk, meter).await?;
        }
        // Built once the keys are in: cheaper than keeping it up to date while they load.
        client
            .batch_execute(&format!("CREATE INDEX ON {live} ({keys})"))
            .await
            .map_err(fail("indexing the key set"))?;
        analyse_key_set(client, entry, &tables).await?;
    }
    if !newer.is_empty() {
        client
            .batch_execute(&format!("CREATE INDEX ON {} ({keys})", tables.seen))
            .await
            .map_err(fail("creating the merge tables"))?;
        let mut landed = 0;
        for chunk in newer.iter().rev() {
            landed += merge_chunk(
                store,
                client,
                entry,
                "tidemark_newer",
                &tables,
                chunk,
                meter,
            )
            .await?;
        }
        let seen = &tables.seen;
        client
            .batch_execute(&format!("ANALYZE {seen}"))
            .await
            .map_err(fail("analysing the seen keys"))?;
        let superseded = client
            .execute(
                &format!(
                    "DELETE FROM {own} t USING (SELECT DISTINCT {keys} FROM {seen}) s WHERE {}",
                    key_join(entry, "t", "s"),
                ),
                &[],
            )
            .await
            .map_err(fail("removing the rows newer chunks replace"))?;
        client
            .execute(
                &format!(
                    "INSERT INTO {name}{} OVERRIDING SYSTEM VALUE SELECT {cols} FROM tidemark_newer",
                    insert_columns(&entry.columns),
                    cols = column_list(&entry.columns),
                ),
                &[],
            )
            .await
            .map_err(fail("landing the newer rows"))?;
        rows = rows.saturating_sub(superseded) + landed;
    }
    if let Some(live) = &tables.live {
        let gone = client
            .execute(
                &format!(
                    "DELETE FROM {own} t WHERE NOT EXISTS (SELECT 1 FROM {live} l WHERE {})",
                    key_join(entry, "l", "t")
                ),
                &[],
            )
            .await
            .map_err(fail("removing the rows deleted since the base"))?;
        rows = rows.saturating_sub(gone);
    }
    Ok(rows)
}

/// `CREATE TEMP TABLE` of `columns` of `relation`, empty, dropped at commit.
fn temp_like(table: &str, columns: &str, relation: &str) -> String {
    format!(
        "CREATE TEMP TABLE {table} ON COMMIT DROP AS SELECT {columns} FROM {relation} WITH NO DATA"
    )
}

/// `a.k = b.k AND ...` over the table's key columns.
fn key_join(entry: &TableEntry, a: &str, b: &str) -> String {
    entry
        .key
        .iter()
        .map(|k| format!("{a}.{k} = {b}.{k}", k = quote_ident(k)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The tables a chain's merge keeps: the keys landed so far, and the live key set (when
/// the backup has one).
pub(super) struct MergeTables {
    pub seen: String,
    pub live: Option<String>,
}

/// Adds one chunk of the live key set to `tables.live` (the caller analyses it).
pub(super) async fn load_key_chunk(
    store: &dyn ReadStore,
    client: &Client,
    entry: &TableEntry,
    tables: &MergeTables,
    chunk: &ChunkRef,
    meter: &RestoreMeter,
) -> Result<(), RestoreError> {
    let Some(live) = &tables.live else {
        return Ok(());
    };
    let keys = column_list(&entry.key);
    copy_chunk(
        store,
        client,
        &entry.name,
        &format!("COPY {live} ({keys}) FROM STDIN"),
        chunk,
        meter,
    )
    .await
    .map(|_| ())
}

/// `ANALYZE` of the live key set, once loaded.
pub(super) async fn analyse_key_set(
    client: &Client,
    entry: &TableEntry,
    tables: &MergeTables,
) -> Result<(), RestoreError> {
    let Some(live) = &tables.live else {
        return Ok(());
    };
    client
        .batch_execute(&format!("ANALYZE {live}"))
        .await
        .map_err(|e| load_error(&entry.name, "analysing the key set", e))
}

/// Merges one chunk of a chain (called newest chunk first): copies it into
/// `tidemark_chunk` (an empty temporary table shaped like the target), lands into `into`
/// the rows whose key no newer chunk had and, with a key set, whose key is live, adds its
/// keys to the seen ones and empties `tidemark_chunk` again. Returns the rows landed.
pub(super) async fn merge_chunk(
    store: &dyn ReadStore,
    client: &Client,
    entry: &TableEntry,
    into: &str,
    tables: &MergeTables,
    chunk: &ChunkRef,
    meter: &RestoreMeter,
) -> Result<u64, RestoreError> {
    let fail =
        |what: &'static str| move |e: tokio_postgres::Error| load_error(&entry.name, what, e);
    let cols = column_list(&entry.columns);
    let keys = column_list(&entry.key);
    let seen = &tables.seen;
    copy_chunk(
        store,
        client,
        &entry.name,
        &copy_from_stdin("tidemark_chunk", &entry.columns, false),
        chunk,
        meter,
    )
    .await?;
    client
        .batch_execute("ANALYZE tidemark_chunk")
        .await
        .map_err(fail("analysing a chunk"))?;
    let live = match &tables.live {
        Some(live) => format!(
            " AND EXISTS (SELECT 1 FROM {live} l WHERE {})",
            key_join(entry, "l", "c")
        ),
        None => String::new(),
    };
    let landed = client
        .execute(
            &format!(
                "INSERT INTO {into}{} OVERRIDING SYSTEM VALUE SELECT {cols} FROM tidemark_chunk c \
                 WHERE NOT EXISTS (SELECT 1 FROM {seen} s WHERE {}){live}",
                insert_columns(&entry.columns),
                key_join(entry, "s", "c")
            ),
            &[],
        )
        .await
        .map_err(fail("merging a chunk"))?;
    client
        .batch_execute(&format!(
            "INSERT INTO {seen} SELECT {keys} FROM tidemark_chunk; TRUNCATE tidemark_chunk"
        ))
        .await
        .map_err(fail("merging a chunk"))?;
    Ok(landed)
}

/// The merge tables of a chain merged one step per transaction (a time-boxed restore):
/// regular tables in `schema`, named by `tag`, created once and kept across slices.
pub(super) async fn persistent_merge_tables(
    client: &Client,
    entry: &TableEntry,
    schema: &str,
    tag: &str,
) -> Result<MergeTables, RestoreError> {
    let name = entry.name.quoted();
    let keys = column_list(&entry.key);
    let tables = MergeTables {
        seen: format!("{schema}.seen_{tag}"),
        live: entry.has_key_set().then(|| format!("{schema}.live_{tag}")),
    };
    let mut setup = String::new();
    for (table, kind) in
        std::iter::once((&tables.seen, "seen")).chain(tables.live.iter().map(|l| (l, "live")))
    {
        setup.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {table} AS SELECT {keys} FROM {name} WITH NO DATA; \
             CREATE INDEX IF NOT EXISTS {kind}_{tag}_key ON {table} ({keys});"
        ));
    }
    client
        .batch_execute(&setup)
        .await
        .map_err(|e| load_error(&entry.name, "creating the merge tables", e))?;
    Ok(tables)
}

/// One step of a chain merged one step per transaction: a key-set chunk, or a data chunk
/// (merged into the table through a `tidemark_chunk` dropped at commit). Returns the rows
/// landed.
pub(super) async fn merge_step(
    store: &dyn ReadStore,
    client: &Client,
    entry: &TableEntry,
    tables: &MergeTables,
    chunk: &ChunkRef,
    is_key: bool,
    meter: &RestoreMeter,
) -> Result<u64, RestoreError> {
    if is_key {
        load_key_chunk(store, client, entry, tables, chunk, meter).await?;
        analyse_key_set(client, entry, tables).await?;
        return Ok(0);
    }
    let name = entry.name.quoted();
    client
        .batch_execute(&chunk_table_sql(entry, true))
        .await
        .map_err(|e| load_error(&entry.name, "creating the chunk table", e))?;
    let landed = merge_chunk(store, client, entry, &name, tables, chunk, meter).await?;
    client
        .batch_execute(&format!("ANALYZE {}", tables.seen))
        .await
        .map_err(|e| load_error(&entry.name, "analysing the seen keys", e))?;
    Ok(landed)
}
