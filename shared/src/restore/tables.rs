//! Loading the tables: in parallel, each in one transaction or chunk by chunk, and the
//! data-only variants.

use super::data_only::Method;
use super::error::{FailedTables, RestoreError};
use super::indexes::IndexBuilds;
use super::load::{fresh_landing, load_error, load_into, needs_merge, Landing};
use super::{data_only, load};
use super::{RestoreMeter, RestoreOptions};
use crate::db::{self, DbSettings};
use crate::error_chain;
use crate::format::manifest::TableEntry;
use crate::format::{ChunkRef, TableName};
use crate::store::ReadStore;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_postgres::{Client, Transaction};

/// Schema of the table where a time-boxed restore records the chunks it has landed.
pub(super) const PROGRESS_SCHEMA: &str = "tidemark_restore_progress";

/// Whether `entry` lands chunk by chunk, each chunk in its own transaction with its
/// progress record: in a time-boxed restore (verify's slices), a plain table of several
/// chunks or a `changes` chain to merge, so a table bigger than one slice finishes across
/// slices and a slice killed anywhere resumes inside it exactly. Everything else lands
/// whole in one transaction.
pub(super) fn lands_by_chunk(entry: &TableEntry, opts: &RestoreOptions) -> bool {
    opts.deadline.is_some()
        && !opts.settings.data_only
        && (needs_merge(entry) || entry.chunks.len() > 1)
}

/// Whether the chunk progress table exists in the target.
pub(super) async fn by_chunk_any(client: &Client) -> bool {
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
pub(super) async fn load_by_chunk(
    store: &dyn ReadStore,
    client: &mut Client,
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
        .map_err(|e| load_error(&entry.name, "reading the chunk progress", e))?
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
    let copy = load::copy_from_stdin(&entry.name.quoted(), &entry.columns, false);
    let mut rows = 0;
    for (chunk, is_key) in steps.into_iter().filter(|(c, _)| !landed.contains(&c.key)) {
        if *worked && deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok((rows, false));
        }
        let tx = begin(client, &entry.name).await?;
        let step = tx.client();
        rows += match &merge {
            Some(tables) => {
                load::merge_step(store, step, entry, tables, chunk, is_key, meter).await?
            }
            None => load::copy_chunk(store, step, &entry.name, &copy, chunk, meter).await?,
        };
        step.execute(
            &format!("INSERT INTO {PROGRESS_SCHEMA}.chunks VALUES ($1, $2)"),
            &[&name, &chunk.key],
        )
        .await
        .map_err(|e| load_error(&entry.name, "recording the chunk", e))?;
        commit(tx, &entry.name).await?;
        *worked = true;
    }
    Ok((rows, true))
}

/// Loads the `pending` tables of a schema restore, in parallel, each in one transaction
/// (a failure rolls its table back: no table is ever left half-loaded), and builds each
/// table's `indexes` once it is in; adds each table loaded to `completed`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn load_tables(
    store: Arc<dyn ReadStore>,
    target: &DbSettings,
    tables: &[TableEntry],
    pending: &[usize],
    opts: &RestoreOptions,
    meter: &Arc<RestoreMeter>,
    completed: &Arc<Mutex<Vec<TableName>>>,
    indexes: Option<Arc<IndexBuilds>>,
) -> Result<(), RestoreError> {
    // The biggest tables first, so that the last one to finish is a small one.
    let mut jobs: Vec<usize> = pending.to_vec();
    jobs.sort_by_key(|&t| std::cmp::Reverse(tables[t].chunks.iter().map(|c| c.bytes).sum::<u64>()));
    let worker_count = opts.settings.workers.max(1).min(jobs.len().max(1));
    let queue = Arc::new(Mutex::new(VecDeque::from(jobs)));
    let work = Arc::new(Work {
        store,
        target: target.clone(),
        by_chunk: tables.iter().map(|e| lands_by_chunk(e, opts)).collect(),
        tables: tables.to_vec(),
        deadline: opts.deadline,
        meter: meter.clone(),
        completed: completed.clone(),
        indexes,
        landed: opts.landed.clone(),
    });
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..worker_count {
        let (work, queue) = (work.clone(), queue.clone());
        workers.spawn(async move { work.land_tables(&queue).await });
    }
    join_all(workers).await
}

/// What the loading workers of one restore share.
struct Work {
    store: Arc<dyn ReadStore>,
    target: DbSettings,
    tables: Vec<TableEntry>,
    /// Per table: whether it lands chunk by chunk ([`lands_by_chunk`]).
    by_chunk: Vec<bool>,
    deadline: Option<Instant>,
    meter: Arc<RestoreMeter>,
    completed: Arc<Mutex<Vec<TableName>>>,
    /// The indexes to build as soon as each table is in (a schema restore).
    indexes: Option<Arc<IndexBuilds>>,
    /// Told each table whose load committed ([`RestoreOptions::landed`]).
    landed: Option<tokio::sync::mpsc::UnboundedSender<TableName>>,
}

impl Work {
    /// One worker of a schema restore: its own connection, tables from `queue` until it
    /// is empty or the deadline has passed.
    async fn land_tables(&self, queue: &Mutex<VecDeque<usize>>) -> Result<(), RestoreError> {
        let mut client = db::connect(&self.target).await?;
        // Every connection lands at least one table (or chunk of a table landed chunk by
        // chunk), so each slice makes progress.
        let mut worked = false;
        loop {
            if worked && self.deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let next = queue.lock().ok().and_then(|mut q| q.pop_front());
            let Some(t) = next else { break };
            let entry = &self.tables[t];
            let store = self.store.as_ref();
            let rows = if self.by_chunk[t] {
                let (rows, complete) = load_by_chunk(
                    store,
                    &mut client,
                    entry,
                    self.deadline,
                    &mut worked,
                    &self.meter,
                )
                .await?;
                if !complete {
                    self.meter.rows.fetch_add(rows, Ordering::Relaxed);
                    break;
                }
                rows
            } else {
                worked = true;
                let tx = begin(&mut client, &entry.name).await?;
                let landing = fresh_landing(tx.client(), entry).await?;
                let rows = load_into(
                    store,
                    tx.client(),
                    &self.target,
                    entry,
                    landing,
                    &self.meter,
                )
                .await?;
                commit(tx, &entry.name).await?;
                rows
            };
            if let Some(landed) = &self.landed {
                // A receiver that is gone only no longer wants to know.
                let _ = landed.send(entry.name.clone());
            }
            // Past the deadline, the post-data step builds them instead.
            let in_time = self.deadline.is_none_or(|d| Instant::now() < d);
            if let Some(indexes) = self.indexes.as_ref().filter(|_| in_time) {
                indexes.build(&client, &entry.name).await?;
            }
            self.landed(rows, [entry.name.clone()]);
        }
        Ok(())
    }

    /// One worker of a data-only restore: groups from `queue`, each in one transaction.
    /// Like pg_restore, a group that fails is rolled back and listed in `failed`, and
    /// every other group is still loaded (unless `exit_on_error`, or the connection
    /// itself is gone).
    async fn land_groups(
        &self,
        queue: &Mutex<VecDeque<Vec<usize>>>,
        plan: &data_only::Plan,
        failed: &Mutex<Vec<FailedTables>>,
        exit_on_error: bool,
    ) -> Result<(), RestoreError> {
        let mut client = db::connect(&self.target).await?;
        loop {
            let next = queue.lock().ok().and_then(|mut q| q.pop_front());
            let Some(group) = next else { break };
            let first = &self.tables[group[0]].name;
            let names = || group.iter().map(|&t| self.tables[t].name.clone());
            let loaded = async {
                let tx = begin(&mut client, first).await?;
                let rows = self.load_group(tx.client(), plan, &group).await?;
                commit(tx, first).await?;
                Ok::<_, RestoreError>(rows)
            };
            match loaded.await {
                Ok(rows) => self.landed(rows, names()),
                Err(e) if exit_on_error || client.is_closed() => return Err(e),
                Err(e) => {
                    tracing::warn!(table = %first, error = %error_chain(&e), "a table failed to load; going on with the others");
                    if let Ok(mut failed) = failed.lock() {
                        failed.push(FailedTables {
                            tables: names().collect(),
                            error: error_chain(&e),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Loads a group of tables into existing tables, in the caller's transaction: with
    /// constraints deferred when the tables reference each other, and with triggers
    /// disabled where the plan may.
    async fn load_group(
        &self,
        client: &Client,
        plan: &data_only::Plan,
        group: &[usize],
    ) -> Result<u64, RestoreError> {
        let all = plan.method == Method::TriggersDisabled;
        let first = &self.tables[group[0]].name;
        // A cycle (or a deferrable self-reference) is checked at commit.
        if group.len() > 1 || !all {
            client
                .batch_execute("SET CONSTRAINTS ALL DEFERRED")
                .await
                .map_err(|e| load_error(first, "deferring constraints", e))?;
        }
        let mut rows = 0;
        let mut guards = Vec::new();
        for &t in group {
            let entry = &self.tables[t];
            if all || plan.owned.contains(&t) {
                let guard = data_only::disable_triggers(client, &self.target, &entry.name, all);
                guards.push((t, guard.await?));
            }
            let landing = if plan.staged.contains(&t) {
                Landing::Staged
            } else {
                Landing::Direct
            };
            let store = self.store.as_ref();
            rows += load_into(store, client, &self.target, entry, landing, &self.meter).await?;
        }
        // Deferred checks fire now, with every table of the group loaded; a table's
        // triggers can only be altered once none of its events wait.
        client
            .batch_execute("SET CONSTRAINTS ALL IMMEDIATE")
            .await
            .map_err(|e| load_error(first, "checking the deferred constraints", e))?;
        for (t, guard) in guards {
            guard
                .restore(client, &self.target, &self.tables[t].name)
                .await?;
        }
        Ok(rows)
    }

    /// Counts landed tables and their rows.
    fn landed(&self, rows: u64, names: impl IntoIterator<Item = TableName>) {
        let names: Vec<TableName> = names.into_iter().collect();
        self.meter.rows.fetch_add(rows, Ordering::Relaxed);
        self.meter
            .tables_done
            .fetch_add(names.len(), Ordering::Relaxed);
        if let Ok(mut done) = self.completed.lock() {
            done.extend(names);
        }
    }
}

/// Waits for every worker; the first error wins and stops the others.
pub(super) async fn join_all(
    workers: tokio::task::JoinSet<Result<(), RestoreError>>,
) -> Result<(), RestoreError> {
    crate::join_workers(workers, |e| RestoreError::WorkerPanicked {
        detail: e.to_string(),
    })
    .await
}

/// Starts the transaction a table (or a chunk, or a group of tables) loads in. Dropped
/// without [`commit`] — an error anywhere in the load — it is rolled back (tokio-postgres
/// sends the ROLLBACK), so no table is ever left half-loaded.
pub(super) async fn begin<'c>(
    client: &'c mut Client,
    table: &TableName,
) -> Result<Transaction<'c>, RestoreError> {
    client
        .transaction()
        .await
        .map_err(|e| load_error(table, "starting the load", e))
}

/// Commits a load; a failed COMMIT is the load's error.
pub(super) async fn commit(tx: Transaction<'_>, table: &TableName) -> Result<(), RestoreError> {
    tx.commit()
        .await
        .map_err(|e| load_error(table, "committing the load", e))
}

/// Loads into existing tables as the data-only plan says.
pub(super) async fn load_data_only(
    store: Arc<dyn ReadStore>,
    target: &DbSettings,
    tables: &[TableEntry],
    plan: &data_only::Plan,
    opts: &RestoreOptions,
    meter: &Arc<RestoreMeter>,
) -> Result<(Vec<TableName>, Vec<FailedTables>), RestoreError> {
    // Superuser: independent tables, in parallel. Otherwise groups in order, one by one.
    let worker_count = if plan.method == Method::TriggersDisabled {
        opts.settings.workers.max(1)
    } else {
        1
    };
    let queue = Arc::new(Mutex::new(
        plan.groups.iter().cloned().collect::<VecDeque<_>>(),
    ));
    let completed = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let work = Arc::new(Work {
        store,
        target: target.clone(),
        tables: tables.to_vec(),
        by_chunk: Vec::new(),
        deadline: None,
        meter: meter.clone(),
        completed: completed.clone(),
        indexes: None,
        landed: None,
    });
    let plan = Arc::new(plan.clone());
    let exit_on_error = opts.settings.exit_on_error;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..worker_count.min(plan.groups.len().max(1)) {
        let (work, queue, plan, failed) =
            (work.clone(), queue.clone(), plan.clone(), failed.clone());
        workers.spawn(async move {
            work.land_groups(&queue, &plan, &failed, exit_on_error)
                .await
        });
    }
    join_all(workers).await?;
    let completed = completed.lock().map(|c| c.clone()).unwrap_or_default();
    let failed = failed.lock().map(|f| f.clone()).unwrap_or_default();
    Ok((completed, failed))
}
