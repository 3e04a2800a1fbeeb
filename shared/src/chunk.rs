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

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::io::StreamReader;

use crate::format::{ChunkKind, ChunkRef, KeyRange};
use crate::store::{PutReceipt, StoreError, WriteStore};

/// Bytes gathered before they are handed to the compressor's task.
const BATCH_BYTES: usize = 128 * 1024;

/// Bytes of COPY text per zstd frame. A chunk is a run of independent frames (one stream
/// to `zstd -d`, which reads concatenated frames as one): each is compressed in one shot
/// from a contiguous buffer, which level 1 does about a fifth faster than a streaming
/// compressor whose window wraps around its buffer, at the same size within 0.1% on the
/// bench's text (1 MiB is twice level 1's window).
const FRAME_BYTES: usize = 1024 * 1024;

enum Piece {
    Data(Bytes),
    End,
}

/// What [`frame_stream`] keeps between frames.
struct Frames {
    rx: mpsc::Receiver<Piece>,
    compressor: zstd::bulk::Compressor<'static>,
    text: BytesMut,
    /// Frames made so far (an empty chunk is still one frame).
    made: usize,
    ended: bool,
}

impl Frames {
    fn compress(&mut self) -> io::Result<Bytes> {
        self.made += 1;
        let frame = self.compressor.compress(&self.text)?;
        self.text.clear();
        Ok(Bytes::from(frame))
    }
}

/// Turns the channel's text into zstd frames of [`FRAME_BYTES`] each: a stream that ends
/// only on an explicit [`Piece::End`], so a producer that vanishes without one makes the
/// stream (and so the upload) fail.
fn frame_stream(
    rx: mpsc::Receiver<Piece>,
    level: i32,
) -> io::Result<impl Stream<Item = io::Result<Bytes>>> {
    let frames = Frames {
        rx,
        compressor: zstd::bulk::Compressor::new(level)?,
        text: BytesMut::with_capacity(FRAME_BYTES + BATCH_BYTES),
        made: 0,
        ended: false,
    };
    Ok(futures_util::stream::unfold(frames, |mut f| async move {
        if f.ended {
            return None;
        }
        loop {
            match f.rx.recv().await {
                Some(Piece::Data(b)) => {
                    f.text.extend_from_slice(&b);
                    if f.text.len() >= FRAME_BYTES {
                        let frame = f.compress();
                        return Some((frame, f));
                    }
                }
                Some(Piece::End) => {
                    f.ended = true;
                    if f.text.is_empty() && f.made > 0 {
                        return None;
                    }
                    let frame = f.compress();
                    return Some((frame, f));
                }
                None => {
                    f.ended = true;
                    let abandoned = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "chunk abandoned before it was finished",
                    );
                    return Some((Err(abandoned), f));
                }
            }
        }
    }))
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
    /// Key-set chunks: the hash of the text written ([`ChunkRef::text_sha256`]).
    text_sha: Option<Sha256>,
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
            let frames = frame_stream(rx, zstd_level).map_err(|source| StoreError::Io {
                operation: "upload",
                key: upload_key.clone(),
                source,
            })?;
            let mut body = StreamReader::new(Box::pin(frames));
            store.upload(&upload_key, &mut body).await
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
            text_sha: (kind == ChunkKind::Keys).then(Sha256::new),
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
        self.write_lines(line, 1).await
    }

    /// Appends `rows` whole COPY text lines at once.
    ///
    /// # Errors
    /// The upload's error, if it has already failed.
    pub async fn write_lines(&mut self, text: &[u8], rows: u64) -> Result<(), StoreError> {
        self.buf.extend_from_slice(text);
        if let Some(sha) = &mut self.text_sha {
            sha.update(text);
        }
        self.rows += rows;
        self.raw_bytes += text.len() as u64;
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
            text_sha256: self.text_sha.take().map(|sha| hex::encode(sha.finalize())),
            first_read: false,
        })
    }

    /// Abandons the chunk: its upload fails and leaves nothing behind.
    pub async fn abort(mut self) {
        self.tx.take();
        let _ = self.join().await;
    }
}

/// Splits a stream of byte blocks into lines. PostgreSQL sends one COPY row per message,
/// so a block is usually exactly one line, handed on without a copy; partial lines are
/// carried over all the same.
#[derive(Debug, Default)]
pub struct LineSplitter {
    carry: BytesMut,
}

impl LineSplitter {
    /// The complete lines of `block` (after any carried-over part), each with its newline.
    pub fn feed(&mut self, block: Bytes) -> Lines<'_> {
        Lines {
            splitter: self,
            block,
            pos: 0,
        }
    }

    /// Bytes of an unfinished last line (COPY output always ends with a newline, so a
    /// non-empty remainder means the stream was cut).
    pub fn remainder(&self) -> usize {
        self.carry.len()
    }
}

/// Iterator over the lines of one block; see [`LineSplitter::feed`].
#[derive(Debug)]
pub struct Lines<'s> {
    splitter: &'s mut LineSplitter,
    block: Bytes,
    pos: usize,
}

impl Iterator for Lines<'_> {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let rest = self.block.get(self.pos..)?;
        if rest.is_empty() {
            return None;
        }
        match memchr::memchr(b'\n', rest) {
            Some(i) => {
                let end = self.pos + i + 1;
                let line = if self.splitter.carry.is_empty() {
                    self.block.slice(self.pos..end)
                } else {
                    self.splitter
                        .carry
                        .extend_from_slice(&self.block[self.pos..end]);
                    self.splitter.carry.split().freeze()
                };
                self.pos = end;
                Some(line)
            }
            None => {
                self.splitter.carry.extend_from_slice(rest);
                self.pos = self.block.len();
                None
            }
        }
    }
}

/// The `index`-th tab-separated field of a COPY text line (without the newline), still
/// in COPY escaping.
pub fn copy_field(line: &[u8], index: usize) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.split(|&b| b == b'\t').nth(index)
}

/// The first `count` fields of a COPY text line, without the tab after them or the
/// newline (empty for `count` 0; the whole line, less its newline, if it has fewer).
pub fn leading_fields(line: &[u8], count: usize) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if count == 0 {
        return &[];
    }
    match memchr::memchr_iter(b'\t', line).nth(count - 1) {
        Some(end) => &line[..end],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_fields_cut_at_a_tab() {
        assert_eq!(leading_fields(b"a\tb\\tc\tk\n", 2), b"a\tb\\tc");
        assert_eq!(leading_fields(b"a\tb\n", 0), b"");
        assert_eq!(leading_fields(b"a\tb\n", 2), b"a\tb");
        assert_eq!(leading_fields(b"\t\n", 1), b"");
    }

    #[test]
    fn lines_split_across_blocks() {
        let mut splitter = LineSplitter::default();
        let mut lines: Vec<Bytes> = Vec::new();
        for block in [&b"a\tb\nc"[..], b"d\te", b"f\n", b"g\nh\n"] {
            lines.extend(splitter.feed(Bytes::copy_from_slice(block)));
        }
        let expected: Vec<&[u8]> = vec![b"a\tb\n", b"cd\tef\n", b"g\n", b"h\n"];
        assert_eq!(
            lines.iter().map(|l| l.as_ref()).collect::<Vec<_>>(),
            expected
        );
        assert_eq!(splitter.remainder(), 0);
        assert_eq!(splitter.feed(Bytes::from_static(b"cut")).count(), 0);
        assert_eq!(splitter.remainder(), 3);
    }

    #[test]
    fn copy_fields_split_on_raw_tabs() {
        let line = b"42\tit\\ts a\t\\N\n";
        assert_eq!(copy_field(line, 0), Some(&b"42"[..]));
        assert_eq!(copy_field(line, 1), Some(&b"it\\ts a"[..]));
        assert_eq!(copy_field(line, 2), Some(&b"\\N"[..]));
        assert_eq!(copy_field(line, 3), None);
    }
}
