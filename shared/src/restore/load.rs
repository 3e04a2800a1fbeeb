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
use crate::format::{quote_ident, ChunkRef, TableMode, TableName};
use crate::schema::apply::server_message;
use crate::store::{ReadStore, StoreError};

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

pub(super) fn column_list(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A database error while loading `table`: the server's own words.
pub(super) fn load_error(table: &TableName, what: &str, e: &tokio_postgres::Error) -> RestoreError {
    let retryable = e
        .as_db_error()
        .map(|db| {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
        })
        .unwrap_or(true);
    RestoreError::Table {
        table: table.clone(),
        detail: format!("{what}: {}", server_message(e)),
        retryable,
    }
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
    let mut decoder = ZstdDecoder::new(BufReader::new(hashing));
    decoder.multiple_members(true);
    let what = format!("loading chunk {}", chunk.key);
    let sink = client
        .copy_in::<_, Bytes>(copy_sql)
        .await
        .map_err(|e| load_error(table, &what, &e))?;
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
        Some(Stop::Database(e)) => return Err(load_error(table, &what, &e)),
        None => {}
    }
    if !buf.is_empty() {
        sink.send(buf.split().freeze())
            .await
            .map_err(|e| load_error(table, &what, &e))?;
    }
    let rows = sink
        .finish()
        .await
        .map_err(|e| load_error(table, &what, &e))?;
    meter.chunks_done.fetch_add(1, Ordering::Relaxed);
    meter.bytes.fetch_add(reader.bytes, Ordering::Relaxed);
    Ok(rows)
}

/// A `changes` chain needs the staging merge; everything else is plain COPY.
pub(super) fn needs_merge(entry: &TableEntry) -> bool {
    let runs: std::collections::BTreeSet<&str> =
        entry.chunks.iter().map(|c| c.run_id.as_str()).collect();
    entry.mode == TableMode::Changes
        && !entry.key.is_empty()
        && (runs.len() > 1 || !entry.key_chunks.is_empty())
}

/// How [`load_into`] lands the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Landing {
    /// COPY straight into the table.
    Direct,
    /// COPY into a staging table, then one `INSERT ... SELECT` (one statement, so that
    /// a non-deferrable self-referencing foreign key sees every row at once).
    Staged,
}

/// Loads a table's chunks inside the caller's transaction; returns the rows landed.
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
    if !needs_merge(entry) && landing == Landing::Direct {
        let mut rows = 0;
        for chunk in &entry.chunks {
            rows += copy_chunk(
                store,
                client,
                &entry.name,
                &format!("COPY {name} ({cols}) FROM STDIN"),
                chunk,
                meter,
            )
            .await?;
        }
        return Ok(rows);
    }
    // Staging holds the exported columns, plus (for a chain) the chunk each row came
    // from, so that the newest version of a key wins.
    let merge = needs_merge(entry);
    client
        .batch_execute(&format!(
            "CREATE TEMP TABLE tidemark_stage ON COMMIT DROP AS SELECT {cols} FROM {name} WITH NO DATA"
        ))
        .await
        .map_err(q("creating the staging table"))?;
    if merge {
        client
            .batch_execute(
                "ALTER TABLE tidemark_stage ADD COLUMN tidemark_seq int NOT NULL DEFAULT 0",
            )
            .await
            .map_err(q("creating the staging table"))?;
    }
    for (i, chunk) in entry.chunks.iter().enumerate() {
        if merge {
            client
                .batch_execute(&format!(
                    "ALTER TABLE tidemark_stage ALTER COLUMN tidemark_seq SET DEFAULT {i}"
                ))
                .await
                .map_err(q("staging a chunk"))?;
        }
        copy_chunk(
            store,
            client,
            &entry.name,
            &format!("COPY tidemark_stage ({cols}) FROM STDIN"),
            chunk,
            meter,
        )
        .await?;
    }
    let source = if merge {
        let keys = column_list(&entry.key);
        let mut filter = String::new();
        if !entry.key_chunks.is_empty() {
            client
                .batch_execute(&format!(
                    "CREATE TEMP TABLE tidemark_live ON COMMIT DROP AS SELECT {keys} FROM {name} WITH NO DATA"
                ))
                .await
                .map_err(q("creating the key set table"))?;
            for chunk in &entry.key_chunks {
                copy_chunk(
                    store,
                    client,
                    &entry.name,
                    &format!("COPY tidemark_live ({keys}) FROM STDIN"),
                    chunk,
                    meter,
                )
                .await?;
            }
            filter = format!("WHERE ({keys}) IN (SELECT {keys} FROM tidemark_live)");
        }
        format!(
            "(SELECT DISTINCT ON ({keys}) * FROM tidemark_stage ORDER BY {keys}, tidemark_seq DESC) s {filter}"
        )
    } else {
        "tidemark_stage".to_owned()
    };
    let landed = client
        .execute(
            &format!(
                "INSERT INTO {name} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM {source}"
            ),
            &[],
        )
        .await
        .map_err(|e| load_error(&entry.name, "landing the rows", &e))?;
    Ok(landed)
}
