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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{parse_count, parse_duration, parse_keep_within, parse_size, parse_timezone};
use crate::error::{Classified, ErrorKind};
use crate::format::journal::PruneJournal;
use crate::format::manifest::Manifest;
use crate::format::{read_doc, write_doc, FormatError, FORMAT_VERSION};
use crate::lease;
use crate::repo::backups;
use crate::repo::{chunk_prefix, manifest_key, Key, RunOf, PRUNE_JOURNAL_KEY, RUNS, VERIFICATIONS};
use crate::retention::{self, BackupFacts, EmptyPolicy, KeepReason, RetentionPolicy};
use crate::run::RunError;
use crate::store::{CountingStore, PendingUpload, StoreError, WriteCondition, WriteStore};
use crate::verify::Verification;

/// The prune settings a user gives, declared once: each field's flag, environment
/// variable and default are here. The CLI flattens this struct into `prune`; the prune
/// function reads the same struct from its environment ([`crate::config::from_env`]) and
/// lets its event override the policy fields. With no `keep` rule at all, the policy is
/// the documented default (daily 7, weekly 4, monthly 12).
#[derive(Debug, Clone, clap::Args)]
pub struct PruneSettings {
    /// Keep the last N backups.
    #[arg(long, env = "TIDEMARK_KEEP_LAST", value_name = "N", value_parser = parse_count)]
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the last N hours.
    #[arg(long, env = "TIDEMARK_KEEP_HOURLY", value_name = "N", value_parser = parse_count)]
    pub keep_hourly: Option<u32>,
    /// Keep the newest backup of each of the last N days.
    #[arg(long, env = "TIDEMARK_KEEP_DAILY", value_name = "N", value_parser = parse_count)]
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the last N ISO weeks.
    #[arg(long, env = "TIDEMARK_KEEP_WEEKLY", value_name = "N", value_parser = parse_count)]
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the last N months.
    #[arg(long, env = "TIDEMARK_KEEP_MONTHLY", value_name = "N", value_parser = parse_count)]
    pub keep_monthly: Option<u32>,
    /// Keep the newest backup of each of the last N years.
    #[arg(long, env = "TIDEMARK_KEEP_YEARLY", value_name = "N", value_parser = parse_count)]
    pub keep_yearly: Option<u32>,
    /// Keep every backup younger than this (e.g. 30d, 12h).
    #[arg(long, env = "TIDEMARK_KEEP_WITHIN", value_name = "DURATION", value_parser = parse_keep_within)]
    pub keep_within: Option<Duration>,
    /// Drop the oldest kept backups beyond this total (e.g. 500GiB); never the newest.
    #[arg(long, env = "TIDEMARK_MAX_TOTAL_SIZE", value_name = "SIZE", value_parser = parse_size)]
    pub max_total_size: Option<u64>,
    /// Time zone of the calendar buckets (default UTC), e.g. Europe/Paris.
    #[arg(long, env = "TIDEMARK_TIMEZONE", value_name = "TZ", value_parser = parse_timezone)]
    pub timezone: Option<chrono_tz::Tz>,
    /// Leftovers of dead runs younger than this are kept.
    #[arg(
        long,
        env = "TIDEMARK_PRUNE_GRACE",
        default_value = "24h",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub grace: Duration,
}

impl Default for PruneSettings {
    /// The defaults the attributes above declare.
    fn default() -> Self {
        crate::config::defaults()
    }
}

impl PruneSettings {
    /// The retention policy these settings describe (the default rules when none is set).
    pub fn policy(&self) -> RetentionPolicy {
        let mut policy = RetentionPolicy::empty();
        policy.keep_last = self.keep_last;
        policy.keep_hourly = self.keep_hourly;
        policy.keep_daily = self.keep_daily;
        policy.keep_weekly = self.keep_weekly;
        policy.keep_monthly = self.keep_monthly;
        policy.keep_yearly = self.keep_yearly;
        policy.keep_within = self.keep_within;
        policy.max_total_size = self.max_total_size;
        if let Some(zone) = self.timezone {
            policy.timezone = zone;
        }
        policy.or_default_rules()
    }
}

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
            grace: PruneSettings::default().grace,
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

impl Classified for PruneError {
    fn kind(&self) -> ErrorKind {
        match self {
            PruneError::Policy(_) => ErrorKind::Fatal,
            PruneError::Run(e) => e.kind(),
            PruneError::Store(e) => e.kind(),
            PruneError::Format(e) => e.kind(),
        }
    }
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
    let manifests: BTreeMap<String, Manifest> = backups::manifests(store)
        .await?
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();
    let verifications = verification_records(store).await?;
    let facts: Vec<BackupFacts> = manifests
        .values()
        .map(|m| BackupFacts {
            id: m.id.clone(),
            created_at: m.created_at,
            bytes: m.totals.bytes,
            verified: verifications.get(&m.id).is_some_and(|(_, ok)| *ok),
        })
        .collect();
    let decisions = retention::plan(&facts, &opts.policy, opts.now)?;
    let kept: BTreeSet<&str> = decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.id.as_str())
        .collect();
    let mut deletions = Deletions {
        referenced: manifests
            .values()
            .filter(|m| kept.contains(m.id.as_str()))
            .flat_map(|m| m.referenced_keys())
            .collect(),
        first: Vec::new(),
        rest: BTreeSet::new(),
        bytes: 0,
    };
    for d in decisions.iter().filter(|d| !d.keep) {
        deletions.first.push(manifest_key(&d.id));
        if let Some((key, _)) = verifications.get(&d.id) {
            deletions.rest.insert(key.clone());
        }
        if let Some(m) = manifests.get(&d.id) {
            for c in m.all_chunks() {
                deletions.add(&c.key, c.bytes);
            }
        }
        // Objects of that run nobody lists (ranges a killed slice redid under new names).
        deletions.add_leftovers(store, &d.id).await?;
    }
    // Verification records of backups that no longer exist.
    for (id, (key, _)) in &verifications {
        if !manifests.contains_key(id) {
            deletions.rest.insert(key.clone());
        }
    }
    let live = match lease::current(store).await? {
        Some((l, _)) if lease::is_live(&l, opts.now) => Some(l.run_id),
        _ => None,
    };
    let mut dead_runs = Vec::new();
    for (run, keys) in dead_run_documents(store, &manifests, live.as_deref(), opts).await? {
        deletions.rest.extend(keys);
        if let RunOf::Backup(run_id) = &run {
            deletions.add_leftovers(store, run_id).await?;
        }
        dead_runs.push(run.to_string());
    }
    // What an interrupted prune had planned and not finished.
    if let Some((journal, _)) = read_doc::<PruneJournal>(store, PRUNE_JOURNAL_KEY).await? {
        for key in journal.delete {
            let is_manifest = matches!(Key::parse(&key), Key::Manifest(_));
            if !deletions.referenced.contains(key.as_str()) && !is_manifest {
                deletions.rest.insert(key);
            }
        }
    }
    let uploads = abandoned_uploads(store, live.as_deref(), opts).await?;
    let chunks_kept = deletions.referenced.len();
    let (delete, delete_bytes) = deletions.into_order();
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
        chunks_kept,
        incomplete_uploads: uploads.len(),
        uploads,
    })
}

/// What a prune deletes: manifests first, then the rest; never a referenced object.
struct Deletions<'a> {
    /// Objects a kept backup needs.
    referenced: BTreeSet<&'a str>,
    first: Vec<String>,
    rest: BTreeSet<String>,
    bytes: u64,
}

impl Deletions<'_> {
    /// Deletes `key` (of `bytes`) unless a kept backup needs it.
    fn add(&mut self, key: &str, bytes: u64) {
        if !self.referenced.contains(key) && self.rest.insert(key.to_owned()) {
            self.bytes += bytes;
        }
    }

    /// Every object under the run's prefix that no kept backup needs.
    async fn add_leftovers(
        &mut self,
        store: &dyn WriteStore,
        run_id: &str,
    ) -> Result<(), PruneError> {
        for object in store.list(&chunk_prefix(run_id)).await? {
            self.add(&object.key, object.size);
        }
        Ok(())
    }

    /// The keys to delete in order (manifests first), and their bytes.
    fn into_order(mut self) -> (Vec<String>, u64) {
        for key in &self.first {
            self.rest.remove(key);
        }
        let mut delete = self.first;
        delete.extend(self.rest);
        (delete, self.bytes)
    }
}

/// Each verification record's key and result, by backup id.
async fn verification_records(
    store: &dyn WriteStore,
) -> Result<BTreeMap<String, (String, bool)>, PruneError> {
    let mut out = BTreeMap::new();
    for object in store.list(VERIFICATIONS).await? {
        if let Some((v, _)) = read_doc::<Verification>(store, &object.key).await? {
            out.insert(v.backup_id, (object.key, v.ok));
        }
    }
    Ok(out)
}

/// The documents under `runs/` of dead runs: no manifest, not the live lease's, untouched
/// for the grace period. Prune's own journal is never one.
async fn dead_run_documents(
    store: &dyn WriteStore,
    manifests: &BTreeMap<String, Manifest>,
    live: Option<&str>,
    opts: &PruneOptions,
) -> Result<BTreeMap<RunOf, Vec<String>>, PruneError> {
    let mut runs: BTreeMap<RunOf, (Vec<String>, Duration)> = BTreeMap::new();
    for object in store.list(RUNS).await? {
        let Some(run) = Key::parse(&object.key).run() else {
            continue;
        };
        if run == RunOf::Prune {
            continue;
        }
        let entry = runs
            .entry(run)
            .or_insert_with(|| (Vec::new(), Duration::MAX));
        entry.0.push(object.key.clone());
        entry.1 = entry.1.min(age(opts.now, object.last_modified));
    }
    let is_live = |run: &RunOf| match run {
        RunOf::Backup(id) => live == Some(id.as_str()),
        RunOf::Verify(id) => live == Some(id.as_str()) || live == Some(run.to_string().as_str()),
        RunOf::Prune => true,
    };
    Ok(runs
        .into_iter()
        .filter(|(run, (_, youngest))| {
            let sealed = matches!(run, RunOf::Backup(id) if manifests.contains_key(id));
            !sealed && !is_live(run) && *youngest >= opts.grace
        })
        .map(|(run, (keys, _))| (run, keys))
        .collect())
}

/// Multipart uploads left unfinished past the grace period, except the live run's.
async fn abandoned_uploads(
    store: &dyn WriteStore,
    live: Option<&str>,
    opts: &PruneOptions,
) -> Result<Vec<PendingUpload>, PruneError> {
    let live_chunks = live.map(chunk_prefix);
    Ok(store
        .incomplete_uploads("")
        .await?
        .into_iter()
        .filter(|u| age(opts.now, u.initiated) >= opts.grace)
        .filter(|u| {
            live_chunks
                .as_deref()
                .is_none_or(|prefix| !u.key.starts_with(prefix))
        })
        .collect())
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
            let journal = PruneJournal {
                version: FORMAT_VERSION,
                delete: plan.delete.clone(),
            };
            write_doc(store, PRUNE_JOURNAL_KEY, &journal, WriteCondition::Always).await?;
            let manifests: Vec<String> = plan
                .delete
                .iter()
                .filter(|k| matches!(Key::parse(k), Key::Manifest(_)))
                .cloned()
                .collect();
            let others: Vec<String> = plan
                .delete
                .iter()
                .filter(|k| !matches!(Key::parse(k), Key::Manifest(_)))
                .cloned()
                .collect();
            store.delete_many(&manifests).await?;
            store.delete_many(&others).await?;
            store.delete(PRUNE_JOURNAL_KEY).await?;
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
