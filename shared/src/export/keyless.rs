//! Tables without a key: exported whole in one statement, cut into chunks as they stream.

use super::sql::{column_list, copy_err};
use super::state::{Delta, Shared};
use crate::chunk::ChunkSink;
use crate::db::copy::CopyLines;
use crate::db::Session;
use crate::format::progress::TableProgress;
use crate::format::ChunkKind;
use crate::run::RunError;

/// Exports a keyless table in one statement, cutting chunks as the rows stream by.
pub(super) async fn export_keyless(
    shared: &Shared,
    client: &Session<'_>,
    table: &TableProgress,
    t: usize,
) -> Result<Delta, RunError> {
    let select = format!(
        "SELECT {} FROM {}",
        column_list(&table.columns),
        table.own_rows()
    );
    let mut sink: Option<ChunkSink> = None;
    let mut delta = Delta::default();
    let limit_rows = shared.opts.settings.chunk_rows.max(1);
    let limit_bytes = shared.opts.settings.chunk_bytes.max(1);
    let streamed: Result<(), RunError> = async {
        let mut lines = CopyLines::start(client, &select).await.map_err(copy_err(
            table,
            client,
            "starting COPY",
        ))?;
        while let Some(line) =
            lines
                .next_line()
                .await
                .map_err(copy_err(table, client, "reading COPY data"))?
        {
            delta.fingerprint.add_line(&line);
            if sink.is_none() {
                let seq = shared.next_seq(t).await;
                sink = Some(shared.open_sink(&table.name, seq, ChunkKind::Rows));
            }
            if let Some(s) = sink.as_mut() {
                s.write_line(&line).await?;
                if s.rows() >= limit_rows || s.raw_bytes() >= limit_bytes {
                    if let Some(full) = sink.take() {
                        delta.chunks.push(shared.land(full, None).await?);
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = streamed {
        if let Some(s) = sink {
            s.abort().await;
        }
        return Err(e);
    }
    if let Some(last) = sink {
        delta.chunks.push(shared.land(last, None).await?);
    }
    Ok(delta)
}
