//! Reading `COPY (…) TO STDOUT` line by line: the one routine export and verify read rows
//! with, and the fingerprint of a query computed from it.

use std::collections::VecDeque;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::TryStreamExt;
use tokio_postgres::{Client, CopyOutStream};

use crate::chunk::LineSplitter;
use crate::format::Fingerprint;

/// Why reading a COPY failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    /// The stream ended in the middle of a row (COPY output always ends with a newline).
    #[error("COPY output ended in the middle of a row")]
    Cut,
}

/// The lines of one `COPY (select) TO STDOUT`, each with its newline.
pub struct CopyLines {
    stream: Pin<Box<CopyOutStream>>,
    splitter: LineSplitter,
    pending: VecDeque<Bytes>,
}

impl std::fmt::Debug for CopyLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyLines")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl CopyLines {
    /// Starts `COPY ({select}) TO STDOUT`.
    ///
    /// # Errors
    /// The server's refusal of the statement.
    pub async fn start(client: &Client, select: &str) -> Result<Self, CopyError> {
        let stream = client
            .copy_out(&format!("COPY ({select}) TO STDOUT"))
            .await?;
        Ok(Self {
            stream: Box::pin(stream),
            splitter: LineSplitter::default(),
            pending: VecDeque::new(),
        })
    }

    /// The next line; `None` at the end of the output.
    ///
    /// # Errors
    /// A lost connection or a failed query; [`CopyError::Cut`] for output that ends in the
    /// middle of a line.
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, CopyError> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Ok(Some(line));
            }
            match self.stream.try_next().await? {
                Some(block) => self.pending.extend(self.splitter.feed(block)),
                None if self.splitter.remainder() > 0 => return Err(CopyError::Cut),
                None => return Ok(None),
            }
        }
    }
}

/// The fingerprint of `select`'s rows in COPY text.
///
/// # Errors
/// As [`CopyLines::next_line`].
pub async fn fingerprint(client: &Client, select: &str) -> Result<Fingerprint, CopyError> {
    let mut lines = CopyLines::start(client, select).await?;
    let mut fingerprint = Fingerprint::default();
    while let Some(line) = lines.next_line().await? {
        fingerprint.add_line(&line);
    }
    Ok(fingerprint)
}
