//! Manifest: seal a finished run into `manifests/{id}.json`, the commit point.
//!
//! Only once the manifest exists does the backup exist. Then the checkpoint advances,
//! the run's progress document goes, and the lease is released. Each step is
//! idempotent: sealing a sealed run returns the same backup and finishes what a killed
//! seal left undone.

use serde::Serialize;

use crate::export::table_shape;
use crate::format::checkpoint::{Checkpoint, TableCheckpoint};
use crate::format::manifest::{Consistency, Manifest, RunTotals, TableEntry};
use crate::format::progress::{ExportScope, RunProgress};
use crate::format::{
    read_doc, write_doc, BackupKind, FormatError, PgSnapshot, TableMode, FORMAT_VERSION,
};
use crate::format::{ChunkRef, FingerprintOf};
use crate::lease;
use crate::repo::{items_prefix, manifest_key, progress_key, slices_prefix, CHECKPOINT_KEY};
use crate::run::RunError;
use crate::store::{CountingStore, StoreError, WriteCondition, WriteStore};

/// What sealing returned: the JSON the manifest Lambda returns.
#[derive(Debug, Clone, Serialize)]
pub struct SealReport {
    pub backup_id: String,
    pub kind: BackupKind,
    pub parent: Option<String>,
    /// `false` if the run was already sealed.
    pub created: bool,
    pub tables: usize,
    pub rows: u64,
    pub bytes: u64,
    pub store_requests: u64,
    /// The source database's name.
    pub database: String,
    /// From the run's first slice to its seal.
    pub duration_seconds: f64,
    /// Whether the backup is one point in time (the database as of `snapshot_at`).
    pub consistent: bool,
    pub snapshot_at: Option<chrono::DateTime<chrono::Utc>>,
    pub lsn: Option<String>,
    /// Consistency-pass rounds the run took (0: it finished in one slice).
    pub pass_rounds: u32,
}

impl SealReport {
    fn of(manifest: &Manifest, created: bool) -> Self {
        Self {
            backup_id: manifest.id.clone(),
            kind: manifest.kind,
            parent: manifest.parent.clone(),
            created,
            tables: manifest.tables.len(),
            rows: manifest.rows(),
            bytes: manifest.bytes(),
            store_requests: manifest.store_requests,
            database: manifest.database.clone(),
            duration_seconds: (manifest.created_at - manifest.started_at)
                .to_std()
                .unwrap_or_default()
                .as_secs_f64(),
            consistent: manifest.is_consistent(),
            snapshot_at: manifest.consistency.as_ref().map(|c| c.snapshot_at),
            lsn: manifest.consistency.as_ref().and_then(|c| c.lsn.clone()),
            pass_rounds: manifest.consistency.as_ref().map_or(0, |c| c.pass_rounds),
        }
    }
}

/// Seals run `run_id`.
///
/// # Errors
/// [`RunError::NoSuchRun`], [`RunError::NotFinished`], [`RunError::Locked`] (another run
/// holds the lease), store errors.
pub async fn seal_run(
    store: std::sync::Arc<dyn WriteStore>,
    run_id: &str,
    holder: &str,
) -> Result<SealReport, RunError> {
    let counting = CountingStore::new(store);
    let store: &dyn WriteStore = &counting;
    if let Some((manifest, _)) = read_doc::<Manifest>(store, &manifest_key(run_id)).await? {
        finish_after_manifest(store, &manifest, None).await?;
        return Ok(SealReport::of(&manifest, false));
    }
    let Some((progress, _)) = read_doc::<RunProgress>(store, &progress_key(run_id)).await? else {
        return Err(RunError::NoSuchRun {
            run_id: run_id.to_owned(),
        });
    };
    let left = progress.tables.iter().filter(|t| !t.done).count();
    if left > 0 {
        return Err(RunError::NotFinished {
            run_id: run_id.to_owned(),
            left,
        });
    }
    if progress.consistent_in_slice.is_none() && progress.inconsistent.is_none() {
        return Err(RunError::NotConsistentYet {
            run_id: run_id.to_owned(),
        });
    }
    lease::acquire(store, run_id, "backup", holder, lease::DEFAULT_TTL).await?;
    let mut manifest = build_manifest(&progress);
    manifest.store_requests = progress.store_requests + counting.count() + 4;
    // Sealed as it is written: the checksum covers the stored bytes.
    match crate::format::manifest::write_manifest(store, &manifest, WriteCondition::IfAbsent).await
    {
        Ok(_) => {}
        // A concurrent seal won: use its manifest.
        Err(FormatError::Store(StoreError::PreconditionFailed { .. })) => {
            if let Some(existing) = crate::format::manifest::read_manifest(store, run_id).await? {
                manifest = existing;
            }
        }
        Err(e) => return Err(e.into()),
    }
    finish_after_manifest(store, &manifest, Some(&progress)).await?;
    tracing::info!(backup_id = manifest.id, kind = %manifest.kind, rows = manifest.rows(), bytes = manifest.bytes(), "backup sealed");
    Ok(SealReport::of(&manifest, true))
}

/// Advances the checkpoint (unless a newer backup already did), drops the progress
/// document and releases the lease.
async fn finish_after_manifest(
    store: &dyn WriteStore,
    manifest: &Manifest,
    progress: Option<&RunProgress>,
) -> Result<(), RunError> {
    let current = read_doc::<Checkpoint>(store, CHECKPOINT_KEY).await?;
    // Never move the checkpoint back (sealing an older run again is harmless). Ids that
    // share a second do not sort by time, so compare times.
    let behind = current
        .as_ref()
        .is_none_or(|(c, _)| c.backup_id != manifest.id && c.created_at < manifest.created_at);
    if behind {
        let read;
        let progress = match progress {
            Some(p) => Some(p),
            None => {
                read = read_doc::<RunProgress>(store, &progress_key(&manifest.id)).await?;
                read.as_ref().map(|(p, _)| p)
            }
        };
        if let Some(progress) = progress {
            let previous_runs_since_deep = current.as_ref().map_or(0, |(c, _)| c.runs_since_deep);
            write_doc(
                store,
                CHECKPOINT_KEY,
                &build_checkpoint(progress, manifest, previous_runs_since_deep),
                WriteCondition::Always,
            )
            .await?;
        }
    }
    let fanned_out = match progress {
        Some(p) => p.fan_out,
        None => read_doc::<RunProgress>(store, &progress_key(&manifest.id))
            .await?
            .is_some_and(|(p, _)| p.fan_out),
    };
    if fanned_out {
        // The workers' items and slices are in the manifest now; the progress goes last,
        // so that a seal that dies before it cleans up again when repeated.
        let mut keys = Vec::new();
        for prefix in [items_prefix(&manifest.id), slices_prefix(&manifest.id)] {
            keys.extend(store.list(&prefix).await?.into_iter().map(|o| o.key));
        }
        store.delete_many(&keys).await?;
    }
    store.delete(&progress_key(&manifest.id)).await?;
    lease::release(store, &manifest.id).await?;
    Ok(())
}

fn build_manifest(progress: &RunProgress) -> Manifest {
    let mut totals = RunTotals {
        slices: progress.slices,
        ..RunTotals::default()
    };
    let tables = progress
        .tables
        .iter()
        .map(|t| {
            // A key set unchanged since the parent is the parent's chunk: not this run's.
            let own = |c: &&ChunkRef| c.run_id == progress.run_id;
            for c in t.chunks.iter().chain(&t.key_chunks).filter(own) {
                totals.chunks += 1;
                totals.bytes += c.bytes;
                totals.raw_bytes += c.raw_bytes;
            }
            totals.rows += t.exported_rows;
            // What verify compares with: computed by the source in the backup's snapshot.
            let (fingerprint, fingerprint_of) = match (&t.scope, &t.truth) {
                (ExportScope::Appended { .. }, Some(truth)) => match truth.rows {
                    Some(rows) => (rows, FingerprintOf::Rows),
                    None => (truth.keys, FingerprintOf::Keys),
                },
                _ => (t.fingerprint, FingerprintOf::Rows),
            };
            TableEntry {
                name: t.name.clone(),
                mode: t.mode,
                schema: t.schema.clone(),
                columns: t.columns.clone(),
                key: t.key.clone(),
                fingerprint,
                fingerprint_of,
                chunks: t.inherited.iter().chain(&t.chunks).cloned().collect(),
                key_chunks: t.key_chunks.clone(),
                key_set: matches!(t.scope, ExportScope::Changed { .. }) && !t.keys_of_rows,
                exported_rows: t.exported_rows,
                new_chain: t.new_chain.clone(),
            }
        })
        .collect();
    let mut chain = progress.chain.clone();
    chain.push(progress.run_id.clone());
    let (snapshot, consistency) = moment(progress);
    let mut warnings = progress.warnings.clone();
    if let Some(reason) = &consistency.reason {
        warnings.push(format!(
            "this backup is NOT one point in time (its tables are of different moments): {reason}; it fails verification"
        ));
    }
    Manifest {
        version: FORMAT_VERSION,
        id: progress.run_id.clone(),
        kind: progress.kind,
        parent: progress.parent.clone(),
        chain,
        started_at: progress.started_at,
        created_at: chrono::Utc::now(),
        snapshot,
        consistency: Some(consistency),
        server_version: progress.server_version.clone(),
        database: progress.database.clone(),
        tables,
        sequences: progress.sequences.clone(),
        schema_dump: progress.schema_dump.clone(),
        totals,
        store_requests: progress.store_requests,
        warnings,
        checksum: None,
    }
}

/// The snapshot a run's backup is of, and whether it is one: the slice snapshot every
/// table was brought to, or (when the run gave up) its first, which no table's data is
/// older than.
fn moment(progress: &RunProgress) -> (PgSnapshot, Consistency) {
    let rounds = progress.pass.as_ref().map_or(0, |p| p.round);
    let slice_snapshot = |slice: u32| progress.slice_snapshots.iter().find(|s| s.slice == slice);
    match progress.consistent_in_slice {
        Some(slice) => {
            let taken = slice_snapshot(slice);
            (
                taken.map_or_else(|| progress.snapshot.clone(), |s| s.snapshot.clone()),
                Consistency {
                    consistent: true,
                    snapshot_at: taken.map_or(progress.started_at, |s| s.taken_at),
                    lsn: taken.and_then(|s| s.lsn.clone()),
                    slice,
                    pass_rounds: rounds,
                    reason: None,
                },
            )
        }
        None => {
            let first = slice_snapshot(1);
            (
                progress.snapshot.clone(),
                Consistency {
                    consistent: false,
                    snapshot_at: first.map_or(progress.started_at, |s| s.taken_at),
                    lsn: first.and_then(|s| s.lsn.clone()),
                    slice: 1,
                    pass_rounds: rounds,
                    reason: Some(
                        progress
                            .inconsistent
                            .clone()
                            .unwrap_or_else(|| "the run did not converge on one snapshot".into()),
                    ),
                },
            )
        }
    }
}

fn build_checkpoint(
    progress: &RunProgress,
    manifest: &Manifest,
    previous_runs_since_deep: u32,
) -> Checkpoint {
    Checkpoint {
        version: FORMAT_VERSION,
        backup_id: manifest.id.clone(),
        kind: manifest.kind,
        created_at: manifest.created_at,
        // What the next incremental counts changes from: the backup's one moment, or
        // the run's first snapshot if it has none (older than all of its data).
        snapshot: manifest.snapshot.clone(),
        system_identifier: progress.system_identifier.clone(),
        runs_since_deep: if progress.deep || progress.kind == BackupKind::Full {
            0
        } else {
            previous_runs_since_deep + 1
        },
        tables: progress
            .tables
            .iter()
            .map(|t| {
                let append = t.mode == TableMode::Append;
                TableCheckpoint {
                    name: t.name.clone(),
                    mode: t.mode,
                    shape: table_shape(&t.columns, &t.schema),
                    append_cursor: match (append, &t.scope) {
                        (true, ExportScope::Appended { upto, .. }) => *upto,
                        _ => None,
                    },
                    gaps: if append { t.gaps.clone() } else { Vec::new() },
                    key_fingerprint: if append {
                        t.truth.map(|truth| truth.keys)
                    } else {
                        None
                    },
                    identity: t.identity.clone(),
                }
            })
            .collect(),
    }
}

/// One line of `tidemark list`.
#[derive(Debug, Clone, Serialize)]
pub struct BackupSummary {
    pub id: String,
    pub kind: BackupKind,
    pub parent: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub tables: usize,
    pub rows: u64,
    pub bytes: u64,
    pub chain_length: usize,
    /// Stored bytes this run wrote (the rest comes from its chain).
    pub run_bytes: u64,
    /// Store requests the run made.
    pub store_requests: u64,
    /// The last verification's result; `None` if never verified.
    pub verified: Option<bool>,
    /// The moment the backup is of, and its WAL position (absent in older manifests).
    pub snapshot_at: Option<chrono::DateTime<chrono::Utc>>,
    pub lsn: Option<String>,
    /// False for a backup sealed as mixing moments.
    pub consistent: bool,
    /// `append` tables whose recorded truth is their keys only: updates to their rows are
    /// neither exported nor seen by verification (a deep backup checks them whole).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys_only: Vec<crate::format::TableName>,
}

/// Every sealed backup, oldest first (by creation time).
///
/// # Errors
/// Store and format errors (naming the manifest).
pub async fn list_backups(store: &dyn WriteStore) -> Result<Vec<BackupSummary>, RunError> {
    let mut verified = std::collections::HashMap::new();
    for object in store.list(crate::repo::VERIFICATIONS).await? {
        if let Some((record, _)) =
            read_doc::<crate::format::verification::Verification>(store, &object.key).await?
        {
            verified.insert(record.backup_id, record.ok);
        }
    }
    let manifests = crate::repo::backups::manifests(store).await?;
    Ok(manifests
        .into_iter()
        .map(|m| BackupSummary {
            rows: m.rows(),
            bytes: m.bytes(),
            tables: m.tables.len(),
            chain_length: m.chain.len(),
            store_requests: m.store_requests,
            run_bytes: m.totals.bytes,
            verified: verified.get(&m.id).copied(),
            snapshot_at: m.consistency.as_ref().map(|c| c.snapshot_at),
            lsn: m.consistency.as_ref().and_then(|c| c.lsn.clone()),
            consistent: m.is_consistent(),
            keys_only: m
                .tables
                .iter()
                .filter(|t| t.fingerprint_of == FingerprintOf::Keys)
                .map(|t| t.name.clone())
                .collect(),
            id: m.id,
            kind: m.kind,
            parent: m.parent,
            created_at: m.created_at,
        })
        .collect())
}
