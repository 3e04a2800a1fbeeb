//! The restored tables' fingerprints, read back over several connections.
//!
//! A table's fingerprint is a sum over its rows, so it can be read in parts: each
//! connection takes the next part — a small table whole, or one block range of a big
//! table (`ctid` ranges, which PostgreSQL 14 and newer scan directly; older servers read
//! each table whole) — and the parts of a table add up to its fingerprint. A single big
//! table is then read back at the speed of several connections, not one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::Client;

use crate::db::{self, copy, DbError, DbSettings};
use crate::format::manifest::TableEntry;
use crate::format::{quote_ident, Fingerprint, FingerprintOf, TableName};
use crate::restore::RestoreError;

/// Blocks per part of a big table (128 MiB of 8 kB pages); a table of fewer than twice
/// as many is read whole.
pub const PART_BLOCKS: i64 = 16_384;

/// The first server version with TID range scans.
const TID_RANGE_SCANS: i32 = 140_000;

/// One piece of reading: a table, or the blocks `[from, to)` of it (`to` `None`: to the
/// end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    table: usize,
    blocks: Option<(i64, Option<i64>)>,
}

/// The parts `tables` are read in, biggest tables first; `blocks` are each table's size
/// in blocks (`None`: not split, a partitioned table or an old server).
fn parts(blocks: &[Option<i64>], part_blocks: i64) -> Vec<Part> {
    let part_blocks = part_blocks.max(1);
    let mut order: Vec<usize> = (0..blocks.len()).collect();
    order.sort_by_key(|&t| std::cmp::Reverse(blocks[t].unwrap_or(0)));
    let mut out = Vec::new();
    for table in order {
        match blocks[table] {
            Some(size) if size >= 2 * part_blocks => {
                let mut from = 0;
                while from + part_blocks < size {
                    out.push(Part {
                        table,
                        blocks: Some((from, Some(from + part_blocks))),
                    });
                    from += part_blocks;
                }
                out.push(Part {
                    table,
                    blocks: Some((from, None)),
                });
            }
            _ => out.push(Part {
                table,
                blocks: None,
            }),
        }
    }
    out
}

/// The query that reads one part of `table`'s `columns`.
fn part_select(
    table: &TableEntry,
    columns: &[String],
    blocks: Option<(i64, Option<i64>)>,
) -> String {
    let cols = columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let select = format!("SELECT {cols} FROM {}", table.own_rows());
    match blocks {
        None => select,
        Some((from, None)) => format!("{select} WHERE ctid >= '({from},0)'::tid"),
        Some((from, Some(to))) => {
            format!("{select} WHERE ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid")
        }
    }
}

/// The columns a table's recorded fingerprint is of: its rows, or (an `append` table
/// between deep checks) its keys.
fn fingerprinted_columns(entry: &TableEntry) -> &[String] {
    match entry.fingerprint_of {
        FingerprintOf::Rows => &entry.columns,
        FingerprintOf::Keys => &entry.key,
    }
}

/// Each of `tables`' fingerprint in `restored`, read over `workers` connections, big
/// tables in parts of `part_blocks` blocks ([`PART_BLOCKS`]).
///
/// # Errors
/// Connection and query errors, naming the table.
pub async fn table_fingerprints(
    restored: &DbSettings,
    tables: &[TableEntry],
    workers: usize,
    part_blocks: i64,
) -> Result<Vec<Fingerprint>, RestoreError> {
    Readers::connect(restored, workers)
        .await?
        .fingerprints(tables, part_blocks)
        .await
}

/// Connections that read restored tables back — one that sizes the tables, `workers`
/// that read their parts — kept open from one call of [`Readers::fingerprints`] to the
/// next, so tables read back one batch at a time cost no new connections.
struct Readers {
    restored: DbSettings,
    admin: Client,
    /// Whether the server scans `ctid` ranges, so big tables can be read in parts.
    ranges: bool,
    readers: Vec<Arc<Client>>,
}

impl Readers {
    async fn connect(restored: &DbSettings, workers: usize) -> Result<Self, RestoreError> {
        let admin = db::connect(restored).await?;
        let version: i32 = admin
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| DbError::query("reading the server version", restored, e))?;
        let connecting = (0..workers.max(1)).map(|_| db::connect(restored));
        let readers = futures_util::future::try_join_all(connecting).await?;
        Ok(Self {
            restored: restored.clone(),
            admin,
            ranges: version >= TID_RANGE_SCANS,
            readers: readers.into_iter().map(Arc::new).collect(),
        })
    }

    /// Each of `tables`' fingerprint, big tables in parts of `part_blocks` blocks.
    async fn fingerprints(
        &self,
        tables: &[TableEntry],
        part_blocks: i64,
    ) -> Result<Vec<Fingerprint>, RestoreError> {
        let restored = &self.restored;
        let names: Vec<String> = tables.iter().map(|t| t.name.quoted()).collect();
        let sizes: Vec<Option<i64>> = if self.ranges {
            let rows = self
                .admin
                .query(
                    "SELECT pg_relation_size(n::regclass) / current_setting('block_size')::int \
                     FROM unnest($1::text[]) WITH ORDINALITY AS u(n, i) ORDER BY i",
                    &[&names],
                )
                .await
                .map_err(|e| DbError::query("reading the restored tables' sizes", restored, e))?;
            rows.iter()
                .zip(tables)
                .map(|(r, t)| (!t.schema.is_partitioned()).then(|| r.get::<_, i64>(0)))
                .collect()
        } else {
            vec![None; tables.len()]
        };
        let queue = Arc::new(Mutex::new(VecDeque::from(parts(&sizes, part_blocks))));
        let results = Arc::new(Mutex::new(vec![Fingerprint::default(); tables.len()]));
        let tables: Arc<Vec<TableEntry>> = Arc::new(tables.to_vec());
        let mut set = tokio::task::JoinSet::new();
        let count = queue.lock().map(|q| q.len()).unwrap_or(1);
        for client in self.readers.iter().take(count.max(1)) {
            let (queue, results, tables) = (queue.clone(), results.clone(), tables.clone());
            let (client, target) = (client.clone(), restored.to_string());
            set.spawn(async move {
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                    let Some(part) = next else { break };
                    let entry = &tables[part.table];
                    let select = part_select(entry, fingerprinted_columns(entry), part.blocks);
                    let sum = copy::fingerprint(&client, &select).await.map_err(|e| {
                        RestoreError::table(
                            &entry.name,
                            DbError::copy("computing the fingerprint", &target, e),
                        )
                    })?;
                    if let Ok(mut results) = results.lock() {
                        results[part.table] = results[part.table].combine(sum);
                    }
                }
                Ok(())
            });
        }
        crate::join_workers(set, |e| RestoreError::WorkerPanicked {
            detail: e.to_string(),
        })
        .await?;
        let results = results.lock().map(|r| r.clone()).unwrap_or_default();
        Ok(results)
    }
}

/// Reads back, while a restore goes on, each table it reports landed
/// ([`crate::restore::RestoreOptions::landed`]; the ones reported meanwhile together, over
/// one set of connections) and returns their fingerprints by index in `tables`. A failure
/// only leaves tables out (it is logged): the comparison reads whatever is missing once
/// the restore is done.
pub async fn fingerprints_as_landed(
    restored: &DbSettings,
    tables: &[TableEntry],
    mut landed: UnboundedReceiver<TableName>,
    workers: usize,
) -> HashMap<usize, Fingerprint> {
    let index: HashMap<&TableName, usize> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| (&t.name, i))
        .collect();
    let mut read = HashMap::new();
    let mut readers: Option<Readers> = None;
    while let Some(first) = landed.recv().await {
        let mut names = vec![first];
        while let Ok(more) = landed.try_recv() {
            names.push(more);
        }
        let picked: Vec<usize> = names
            .iter()
            .filter_map(|name| index.get(name).copied())
            .filter(|i| !read.contains_key(i))
            .collect();
        let entries: Vec<TableEntry> = picked.iter().map(|&i| tables[i].clone()).collect();
        let skipped = |e: RestoreError| {
            tracing::debug!(
                error = %crate::error_chain(&e),
                "could not read landed tables back during the restore; the comparison reads them after it"
            );
        };
        if readers.is_none() {
            match Readers::connect(restored, workers).await {
                Ok(open) => readers = Some(open),
                Err(e) => {
                    skipped(e);
                    continue;
                }
            }
        }
        let Some(open) = &readers else { continue };
        match open.fingerprints(&entries, PART_BLOCKS).await {
            Ok(sums) => read.extend(picked.into_iter().zip(sums)),
            Err(e) => {
                skipped(e);
                // Its connections may be what failed: the next batch opens new ones.
                readers = None;
            }
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_tables_are_read_in_block_ranges_that_cover_them_and_go_first() {
        let got = parts(
            &[
                Some(10),
                None,
                Some(2 * PART_BLOCKS + 5),
                Some(2 * PART_BLOCKS - 1),
            ],
            PART_BLOCKS,
        );
        let want = vec![
            Part {
                table: 2,
                blocks: Some((0, Some(PART_BLOCKS))),
            },
            Part {
                table: 2,
                blocks: Some((PART_BLOCKS, Some(2 * PART_BLOCKS))),
            },
            Part {
                table: 2,
                blocks: Some((2 * PART_BLOCKS, None)),
            },
            Part {
                table: 3,
                blocks: None,
            },
            Part {
                table: 0,
                blocks: None,
            },
            Part {
                table: 1,
                blocks: None,
            },
        ];
        assert_eq!(got, want);
    }
}
