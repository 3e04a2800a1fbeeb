//! Prune: apply the retention policy, then delete what no kept backup needs.
//!
//! Plan, then apply. [`plan_prune`] reads the manifests (and verification records),
//! decides with [`crate::retention::plan`], and lists what to delete: the manifests and
//! verification records of removed backups, their chunks that no kept manifest
//! references (reachability: a full that a kept incremental needs keeps its chunks by
//! construction), and leftovers of dead runs (no manifest, no live lease, older than the
//! grace period). Store requests grow with the manifests and the objects deleted, never
//! with the size of the bucket. `--dry-run` prints exactly that plan.
//!
//! [`prune`] takes the lease (so it never races a backup), writes the plan as a journal,
//! deletes manifests first (a backup stops existing before any of its chunks go), then
//! the rest in batches, then the journal. A prune that dies half-way is finished by the
//! next one from its journal.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::format::manifest::Manifest;
use crate::format::{chunk_prefix, read_doc, write_doc, FormatError, FORMAT_VERSION};
use crate::lease;
use crate::retention::{self, BackupFacts, EmptyPolicy, KeepReason, RetentionPolicy};
use crate::run::RunError;
use crate::store::{CountingStore, PendingUpload, StoreError, WriteCondition, WriteStore};
use crate::verify::Verification;

const JOURNAL_KEY: &str = "runs/prune/journal.json";

/// How to prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub policy: RetentionPolicy,
    /// Leftovers of dead runs younger than this are left alone (default 24 h).
    pub grace: Duration,
    /// Plan only; delete nothing.
    pub dry_run: bool,
    pub holder: String,
    pub now: DateTime<Utc>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            policy: RetentionPolicy::default(),
            grace: Duration::from_secs(24 * 3600),
            dry_run: false,
            holder: lease::default_holder(),
            now: Utc::now(),
        }
    }
}

/// One backup in the plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedBackup {
    pub id: String,
    pub created_at: DateTime<Utc>,
    pub keep: bool,
    pub reasons: Vec<KeepReason>,
    pub over_size_cap: bool,
}

/// What a prune keeps and deletes.
#[derive(Debug, Clone, Serialize)]
pub struct PrunePlan {
    pub backups: Vec<PlannedBackup>,
    /// Every object to delete, manifests first.
    pub delete: Vec<String>,
    /// Stored bytes those objects hold (as far as listings and manifests tell).
    pub delete_bytes: u64,
    /// Runs whose leftovers are deleted (no manifest, no live lease, past the grace).
    pub dead_runs: Vec<String>,
    /// Chunks the kept backups reference.
    pub chunks_kept: usize,
    /// Unfinished multipart uploads (a killed writer's, billed until aborted) older than
    /// the grace period and not of a live run: aborted by the prune.
    pub incomplete_uploads: usize,
    /// Those uploads.
    #[serde(skip)]
    pub uploads: Vec<PendingUpload>,
}

/// What [`prune`] did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub plan: PrunePlan,
    pub dry_run: bool,
    pub deleted: usize,
    pub store_requests: u64,
}

/// Most removed backups a [`PruneSummary`] names.
const SUMMARY_REMOVED: usize = 20;

/// What a prune did, in a size that does not grow with the store (the Lambda result; Step
/// Functions caps a task result at 256 KiB): counts, and the first removed backups.
#[derive(Debug, Clone, Serialize)]
pub struct PruneSummary {
    pub dry_run: bool,
    /// Objects deleted (0 in a dry run).
    pub deleted: usize,
    /// Objects the plan deletes.
    pub to_delete: usize,
    pub delete_bytes: u64,
    pub backups_kept: usize,
    pub backups_removed: usize,
    /// The first removed backups (at most twenty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    pub dead_runs: usize,
    pub chunks_kept: usize,
    pub incomplete_uploads: usize,
    pub store_requests: u64,
}

impl PruneReport {
    /// The report's summary.
    pub fn summary(&self) -> PruneSummary {
        let removed: Vec<&PlannedBackup> = self.plan.backups.iter().filter(|b| !b.keep).collect();
        PruneSummary {
            dry_run: self.dry_run,
            deleted: self.deleted,
            to_delete: self.plan.delete.len(),
            delete_bytes: self.plan.delete_bytes,
            backups_kept: self.plan.backups.len() - removed.len(),
            backups_removed: removed.len(),
            removed: removed
                .iter()
                .take(SUMMARY_REMOVED)
                .map(|b| b.id.clone())
                .collect(),
            dead_runs: self.plan.dead_runs.len(),
            chunks_kept: self.plan.chunks_kept,
            incomplete_uploads: self.plan.incomplete_uploads,
            store_requests: self.store_requests,
        }
    }
}

/// Errors of prune.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Policy(#[from] EmptyPolicy),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl PruneError {
    pub fn is_retryable(&self) -> bool {
        match self {
            PruneError::Run(e) => e.is_retryable(),
            PruneError::Store(e) | PruneError::Format(FormatError::Store(e)) => e.is_retryable(),
            _ => false,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    version: u32,
    delete: Vec<String>,
}

fn age(now: DateTime<Utc>, when: Option<SystemTime>) -> Duration {
    let then: DateTime<Utc> = when.map(DateTime::from).unwrap_or(now);
    (now - then).to_std().unwrap_or_default()
}

/// Computes what a prune would keep and delete. Reads only.
///
/// # Errors
/// [`PruneError::Policy`] for an empty policy; store and format errors.
pub async fn plan_prune(
    store: &dyn WriteStore,
    opts: &PruneOptions,
) -> Result<PrunePlan, PruneError> {
    let mut manifests: BTreeMap<String, Manifest> = BTreeMap::new();
    for object in store.list("manifests/").await? {
        if let Some((m, _)) = read_doc::<Manifest>(store, &object.key).await? {
            manifests.insert(m.id.clone(), m);
        }
    }
    let mut verified: HashMap<String, bool> = HashMap::new();
    let mut verification_keys: HashMap<String, String> = HashMap::new();
    for object in store.list("verifications/").await? {
        if let Some((v, _)) = read_doc::<Verification>(store, &object.key).await? {
            verified.insert(v.backup_id.clone(), v.ok);
            verification_keys.insert(v.backup_id, object.key);
        }
    }
    let facts: Vec<BackupFacts> = manifests
        .values()
        .map(|m| BackupFacts {
            id: m.id.clone(),
            created_at: m.created_at,
            bytes: m.totals.bytes,
            verified: verified.get(&m.id).copied().unwrap_or(false),
        })
        .collect();
    let decisions = retention::plan(&facts, &opts.policy, opts.now)?;
    let kept: BTreeSet<&str> = decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.id.as_str())
        .collect();
    let referenced: BTreeSet<&str> = manifests
        .values()
        .filter(|m| kept.contains(m.id.as_str()))
        .flat_map(|m| m.referenced_keys())
        .collect();

    let mut first = Vec::new();
    let mut rest = BTreeSet::new();
    let mut delete_bytes = 0u64;
    for d in decisions.iter().filter(|d| !d.keep) {
        first.push(crate::format::manifest_key(&d.id));
        if let Some(key) = verification_keys.get(&d.id) {
            rest.insert(key.clone());
        }
        if let Some(m) = manifests.get(&d.id) {
            for c in m.all_chunks() {
                if !referenced.contains(c.key.as_str()) && rest.insert(c.key.clone()) {
                    delete_bytes += c.bytes;
                }
            }
        }
        // Objects of that run nobody lists (ranges a killed slice redid under new names).
        for object in store.list(&chunk_prefix(&d.id)).await? {
            if !referenced.contains(object.key.as_str()) && rest.insert(object.key.clone()) {
                delete_bytes += object.size;
            }
        }
    }
    // Verification records of backups that no longer exist.
    for (id, key) in &verification_keys {
        if !manifests.contains_key(id) {
            rest.insert(key.clone());
        }
    }

    // Dead runs: progress or verify state with no manifest, no live lease, past the grace.
    let live = match lease::current(store).await? {
        Some((l, _)) if lease::is_live(&l, opts.now) => Some(l.run_id),
        _ => None,
    };
    let mut runs: BTreeMap<String, (Vec<String>, Duration)> = BTreeMap::new();
    for object in store.list("runs/").await? {
        let Some(run) = object
            .key
            .strip_prefix("runs/")
            .and_then(|k| k.split('/').next())
        else {
            continue;
        };
        if run == "prune" {
            continue;
        }
        let entry = runs
            .entry(run.to_owned())
            .or_insert_with(|| (Vec::new(), Duration::MAX));
        entry.0.push(object.key.clone());
        entry.1 = entry.1.min(age(opts.now, object.last_modified));
    }
    let mut dead_runs = Vec::new();
    for (run, (keys, youngest)) in runs {
        let export_run = run.strip_prefix("verify-").is_none();
        let sealed = export_run && manifests.contains_key(&run);
        let is_live = live.as_deref() == Some(run.as_str())
            || run
                .strip_prefix("verify-")
                .is_some_and(|id| live.as_deref() == Some(id));
        if sealed || is_live || youngest < opts.grace {
            continue;
        }
        rest.extend(keys);
        if export_run {
            for object in store.list(&chunk_prefix(&run)).await? {
                if !referenced.contains(object.key.as_str()) && rest.insert(object.key.clone()) {
                    delete_bytes += object.size;
                }
            }
        }
        dead_runs.push(run);
    }
    // What an interrupted prune had planned and not finished.
    if let Some((journal, _)) = read_doc::<Journal>(store, JOURNAL_KEY).await? {
        for key in journal.delete {
            let is_manifest = key.starts_with("manifests/");
            let still_kept = key
                .strip_prefix("manifests/")
                .and_then(|k| k.strip_suffix(".json"))
                .is_some_and(|id| kept.contains(id));
            if !referenced.contains(key.as_str()) && !still_kept && !is_manifest {
                rest.insert(key);
            }
        }
    }
    for key in &first {
        rest.remove(key);
    }
    let live_chunks = live.as_deref().map(chunk_prefix);
    let uploads: Vec<PendingUpload> = store
        .incomplete_uploads("")
        .await?
        .into_iter()
        .filter(|u| age(opts.now, u.initiated) >= opts.grace)
        .filter(|u| {
            live_chunks
                .as_deref()
                .is_none_or(|prefix| !u.key.starts_with(prefix))
        })
        .collect();
    let mut delete = first;
    delete.extend(rest);
    Ok(PrunePlan {
        backups: decisions
            .into_iter()
            .map(|d| PlannedBackup {
                id: d.id,
                created_at: d.created_at,
                keep: d.keep,
                reasons: d.reasons,
                over_size_cap: d.over_size_cap,
            })
            .collect(),
        delete,
        delete_bytes,
        dead_runs,
        chunks_kept: referenced.len(),
        incomplete_uploads: uploads.len(),
        uploads,
    })
}

/// Plans and (unless `dry_run`) applies a prune under the lease.
///
/// # Errors
/// [`RunError::Locked`] (inside [`PruneError::Run`]) while a backup runs; plan errors;
/// store errors (a partial prune is finished by the next one).
pub async fn prune(
    store: Arc<dyn WriteStore>,
    opts: &PruneOptions,
) -> Result<PruneReport, PruneError> {
    let renewals = store.clone();
    let counting = CountingStore::new(store);
    let store: &dyn WriteStore = &counting;
    if opts.dry_run {
        let plan = plan_prune(store, opts).await?;
        return Ok(PruneReport {
            deleted: 0,
            dry_run: true,
            store_requests: counting.count(),
            plan,
        });
    }
    let run_id = format!("prune-{}", opts.now.format("%Y%m%dT%H%M%SZ"));
    let held = lease::acquire(store, &run_id, "prune", &opts.holder, lease::DEFAULT_TTL).await?;
    let heartbeat = lease::Heartbeat::start(renewals, held, lease::DEFAULT_TTL);
    let result = async {
        let plan = plan_prune(store, opts).await?;
        if !plan.delete.is_empty() {
            let journal = Journal {
                version: FORMAT_VERSION,
                delete: plan.delete.clone(),
            };
            write_doc(store, JOURNAL_KEY, &journal, WriteCondition::Always).await?;
            let manifests: Vec<String> = plan
                .delete
                .iter()
                .filter(|k| k.starts_with("manifests/"))
                .cloned()
                .collect();
            let others: Vec<String> = plan
                .delete
                .iter()
                .filter(|k| !k.starts_with("manifests/"))
                .cloned()
                .collect();
            store.delete_many(&manifests).await?;
            store.delete_many(&others).await?;
            store.delete(JOURNAL_KEY).await?;
        }
        for upload in &plan.uploads {
            store.abort_upload(upload).await?;
        }
        tracing::info!(
            kept = plan.backups.iter().filter(|b| b.keep).count(),
            deleted = plan.delete.len(),
            bytes = plan.delete_bytes,
            uploads_aborted = plan.uploads.len(),
            "prune finished"
        );
        Ok::<_, PruneError>(plan)
    }
    .await;
    drop(heartbeat);
    lease::release(store, &run_id).await?;
    let plan = result?;
    Ok(PruneReport {
        deleted: plan.delete.len(),
        dry_run: false,
        store_requests: counting.count(),
        plan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;
    use bytes::Bytes;

    #[tokio::test]
    async fn the_summary_stays_small_whatever_the_objects_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LocalStore::open(dir.path()).expect("store"));
        let dead = "20200101T000000Z-dead00";
        store
            .put(
                &format!("runs/{dead}/progress.json"),
                Bytes::from_static(b"{}"),
                WriteCondition::Always,
            )
            .await
            .expect("progress");
        for i in 0..3000 {
            store
                .put(
                    &format!("chunks/{dead}/public.table_{i:05}/000001-001.copy.zst"),
                    Bytes::from_static(b"x"),
                    WriteCondition::Always,
                )
                .await
                .expect("chunk");
        }
        let report = prune(
            store,
            &PruneOptions {
                policy: RetentionPolicy {
                    keep_last: Some(1),
                    ..RetentionPolicy::default()
                },
                grace: Duration::ZERO,
                ..PruneOptions::default()
            },
        )
        .await
        .expect("prune");
        assert_eq!(report.deleted, 3001);
        let whole = serde_json::to_vec(&report).map(|v| v.len()).unwrap_or(0);
        let summary = serde_json::to_vec(&report.summary())
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        assert!(whole > 150_000, "the full report lists every key: {whole}");
        assert!(summary < 1024, "summary: {summary} bytes");
        assert_eq!(report.summary().dead_runs, 1);
    }
}
