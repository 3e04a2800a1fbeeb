//! Chunks: zstd-compressed PostgreSQL COPY text, streamed to the store.
//!
//! A [`ChunkSink`] takes COPY text lines and streams them through zstd into
//! [`WriteStore::upload`] on a task of its own, so compression and upload overlap the
//! database read, and memory stays at a few buffers whatever the chunk size. A sink that
//! is dropped or aborted before [`ChunkSink::finish`] makes its upload fail, so a
//! half-written chunk never appears under its key.
//!
//! Anyone can restore a chunk by hand:
//! `zstd -dc 000001.copy.zst | psql "$URL" -c "\copy public.articles (cols) FROM STDIN"`.

use std::io;
use std::sync::Arc;

use async_compression::tokio::bufread::ZstdEncoder;
use async_compression::Level;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::io::StreamReader;

use crate::format::{ChunkKind, ChunkRef, KeyRange, TableName};
use crate::store::{PutReceipt, StoreError, WriteStore};

/// Bytes gathered before they are handed to the compressor.
const BATCH_BYTES: usize = 128 * 1024;

/// Object key of a chunk: `chunks/{run}/{schema.table}/{seq}.copy.zst` (rows) or
/// `.../{seq}.keys.copy.zst` (live key set).
pub fn chunk_key(run_id: &str, table: &TableName, seq: u32, kind: ChunkKind) -> String {
    let suffix = match kind {
        ChunkKind::Rows => "copy.zst",
        ChunkKind::Keys => "keys.copy.zst",
    };
    format!("chunks/{run_id}/{}/{seq:06}.{suffix}", table.key_segment())
}

enum Piece {
    Data(Bytes),
    End,
}

/// Turns the channel into a byte stream that ends only on an explicit [`Piece::End`]:
/// a producer that vanishes without one makes the stream (and so the upload) fail.
fn piece_stream(rx: mpsc::Receiver<Piece>) -> impl Stream<Item = io::Result<Bytes>> {
    futures_util::stream::unfold((rx, false), |(mut rx, ended)| async move {
        if ended {
            return None;
        }
        match rx.recv().await {
            Some(Piece::Data(b)) => Some((Ok(b), (rx, false))),
            Some(Piece::End) => None,
            None => Some((
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "chunk abandoned before it was finished",
                )),
                (rx, true),
            )),
        }
    })
}

/// One chunk being written.
pub struct ChunkSink {
    key: String,
    kind: ChunkKind,
    run_id: String,
    tx: Option<mpsc::Sender<Piece>>,
    upload: Option<JoinHandle<Result<PutReceipt, StoreError>>>,
    buf: BytesMut,
    rows: u64,
    raw_bytes: u64,
}

impl std::fmt::Debug for ChunkSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkSink")
            .field("key", &self.key)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl ChunkSink {
    /// Starts streaming a chunk to `key`.
    pub fn open(
        store: Arc<dyn WriteStore>,
        key: String,
        kind: ChunkKind,
        run_id: &str,
        zstd_level: i32,
    ) -> Self {
        let (tx, rx) = mpsc::channel(4);
        let upload_key = key.clone();
        let upload = tokio::spawn(async move {
            let mut encoder = ZstdEncoder::with_quality(
                StreamReader::new(Box::pin(piece_stream(rx))),
                Level::Precise(zstd_level),
            );
            store.upload(&upload_key, &mut encoder).await
        });
        Self {
            key,
            kind,
            run_id: run_id.to_owned(),
            tx: Some(tx),
            upload: Some(upload),
            buf: BytesMut::with_capacity(BATCH_BYTES),
            rows: 0,
            raw_bytes: 0,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes
    }

    /// Appends one COPY text line (with its newline).
    ///
    /// # Errors
    /// The upload's error, if it has already failed.
    pub async fn write_line(&mut self, line: &[u8]) -> Result<(), StoreError> {
        self.buf.extend_from_slice(line);
        self.rows += 1;
        self.raw_bytes += line.len() as u64;
        if self.buf.len() >= BATCH_BYTES {
            self.send_batch().await?;
        }
        Ok(())
    }

    async fn send_batch(&mut self) -> Result<(), StoreError> {
        let batch = self.buf.split().freeze();
        let sent = match &self.tx {
            Some(tx) => tx.send(Piece::Data(batch)).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The upload ended early: report why.
            Err(self
                .join()
                .await
                .err()
                .unwrap_or_else(|| self.io_error("upload ended early")))
        }
    }

    fn io_error(&self, message: &str) -> StoreError {
        StoreError::Io {
            operation: "upload",
            key: self.key.clone(),
            source: io::Error::other(message.to_owned()),
        }
    }

    async fn join(&mut self) -> Result<PutReceipt, StoreError> {
        match self.upload.take() {
            Some(handle) => handle
                .await
                .map_err(|e| self.io_error(&format!("upload task failed: {e}")))?,
            None => Err(self.io_error("upload already joined")),
        }
    }

    /// Completes the chunk and returns its reference.
    ///
    /// # Errors
    /// The upload's error; nothing is left under the key then.
    pub async fn finish(mut self, range: Option<KeyRange>) -> Result<ChunkRef, StoreError> {
        if !self.buf.is_empty() {
            self.send_batch().await?;
        }
        if let Some(tx) = self.tx.take() {
            // A send error means the upload already failed; join() reports it.
            let _ = tx.send(Piece::End).await;
        }
        let receipt = self.join().await?;
        Ok(ChunkRef {
            key: self.key.clone(),
            kind: self.kind,
            run_id: self.run_id.clone(),
            rows: self.rows,
            bytes: receipt.size,
            raw_bytes: self.raw_bytes,
            sha256: receipt.sha256,
            range,
        })
    }

    /// Abandons the chunk: its upload fails and leaves nothing behind.
    pub async fn abort(mut self) {
        self.tx.take();
        let _ = self.join().await;
    }
}

/// Splits a stream of byte blocks into lines. PostgreSQL sends one COPY row per message,
/// so a block is usually exactly one line; partial lines are carried over all the same.
#[derive(Debug, Default)]
pub struct LineSplitter {
    carry: BytesMut,
}

impl LineSplitter {
    /// Calls `each` for every complete line in `block` (after any carried-over part).
    pub fn push<E>(
        &mut self,
        block: &[u8],
        mut each: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut rest = block;
        if !self.carry.is_empty() {
            match memchr_newline(rest) {
                Some(i) => {
                    self.carry.extend_from_slice(&rest[..=i]);
                    let line = self.carry.split();
                    each(&line)?;
                    rest = &rest[i + 1..];
                }
                None => {
                    self.carry.extend_from_slice(rest);
                    return Ok(());
                }
            }
        }
        while let Some(i) = memchr_newline(rest) {
            each(&rest[..=i])?;
            rest = &rest[i + 1..];
        }
        self.carry.extend_from_slice(rest);
        Ok(())
    }

    /// Bytes of an unfinished last line (COPY output always ends with a newline, so a
    /// non-empty remainder means the stream was cut).
    pub fn remainder(&self) -> usize {
        self.carry.len()
    }
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

/// The `index`-th tab-separated field of a COPY text line (without the newline), still
/// in COPY escaping.
pub fn copy_field(line: &[u8], index: usize) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.split(|&b| b == b'\t').nth(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_blocks() {
        let mut splitter = LineSplitter::default();
        let mut lines: Vec<Vec<u8>> = Vec::new();
        for block in [&b"a\tb\nc"[..], b"d\te", b"f\n", b"g\nh\n"] {
            splitter
                .push::<()>(block, |l| {
                    lines.push(l.to_vec());
                    Ok(())
                })
                .ok();
        }
        assert_eq!(
            lines,
            vec![
                b"a\tb\n".to_vec(),
                b"cd\tef\n".to_vec(),
                b"g\n".to_vec(),
                b"h\n".to_vec()
            ]
        );
        assert_eq!(splitter.remainder(), 0);
    }

    #[test]
    fn copy_fields_split_on_raw_tabs() {
        let line = b"42\tit\\ts a\t\\N\n";
        assert_eq!(copy_field(line, 0), Some(&b"42"[..]));
        assert_eq!(copy_field(line, 1), Some(&b"it\\ts a"[..]));
        assert_eq!(copy_field(line, 2), Some(&b"\\N"[..]));
        assert_eq!(copy_field(line, 3), None);
    }

    #[test]
    fn chunk_keys_are_deterministic() {
        let t = TableName::new("public", "Order Lines");
        assert_eq!(
            chunk_key("r1", &t, 7, ChunkKind::Rows),
            "chunks/r1/public.Order%20Lines/000007.copy.zst"
        );
        assert_eq!(
            chunk_key("r1", &t, 7, ChunkKind::Keys),
            "chunks/r1/public.Order%20Lines/000007.keys.copy.zst"
        );
    }
}
