//! Verify: prove a backup restorable by restoring it into a scratch database and
//! comparing every table with what the source held at the backup's snapshot.
//!
//! The comparison is against the manifest's per-table row count and content fingerprint,
//! which the export computed from the source's own COPY output, never from the chunks,
//! and against the schema pg_dump recorded in the backup's snapshot: the scratch database
//! is dumped with the same object selection and compared object by object
//! ([`crate::schema::compare`]).
//! The scratch database is `tidemark_verify_<id>_<unix time>` on the verification server;
//! it is dropped when the check ends, failure included, and scratch databases left by a
//! crashed verification (older than a few hours) are swept first. The result goes to
//! `verifications/{id}.json`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

mod fingerprints;
pub use self::fingerprints::{fingerprints_as_landed, table_fingerprints, PART_BLOCKS};
use crate::db::{self, DbError, DbSettings};
use crate::error::{Classified, ErrorKind};
use crate::format::manifest::{Manifest, TableEntry};
use crate::format::verification::VerifyState;
pub use crate::format::verification::{TableVerification, Verification, VerificationSummary};
use crate::format::{
    quote_ident, read_doc, write_doc, Fingerprint, FormatError, TableName, FORMAT_VERSION,
};
use crate::repo::{verification_key, verify_state_key};
use crate::restore::{
    self, BackupSelector, RestoreError, RestoreMeter, RestoreOptions, ResumePoint,
};
use crate::schema::compare::{self, SchemaCheck};
use crate::schema::{PgDump, SchemaError};
use crate::store::{ReadStore, WriteCondition, WriteStore};
use tokio_postgres::Client;

/// Prefix of every scratch database name.
pub const SCRATCH_PREFIX: &str = "tidemark_verify_";

/// How to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Which backup; `None`: the newest backup not verified yet (or the newest).
    pub backup: Option<BackupSelector>,
    /// Scratch databases older than this are left from a crash and dropped.
    pub stale_after: Duration,
    /// Tables loaded at once ([`VerifySettings::workers`]).
    pub workers: usize,
    /// For [`verify_slice`]: start no new table after this instant; the next slice
    /// continues in the same scratch database.
    pub deadline: Option<Instant>,
    /// The pg_dump that dumps the restored schema (`None`: the one on `PATH`).
    pub pg_dump: Option<std::path::PathBuf>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            deadline: None,
            backup: None,
            stale_after: Duration::from_secs(3 * 3600),
            workers: crate::config::DEFAULT_WORKERS,
            pg_dump: None,
        }
    }
}

/// Where verification restores, and with how many connections: the verify settings a
/// user gives, declared once. The CLI flattens this struct into `verify`; the verify
/// function reads it from its environment with [`crate::config::from_env`].
#[derive(Debug, Clone, clap::Args)]
pub struct VerifySettings {
    /// The verification server (default: the source server); a scratch database is
    /// created and dropped there.
    #[arg(
        long,
        env = "TIDEMARK_SCRATCH_URL",
        hide_env_values = true,
        value_name = "URL",
        conflicts_with = "scratch_secret_id",
        value_parser = db::secret
    )]
    pub scratch_url: Option<SecretString>,
    /// The verification server as a Secrets Manager secret (RDS format) instead of a URL.
    #[arg(long, env = "TIDEMARK_SCRATCH_SECRET_ID", value_name = "ID")]
    pub scratch_secret_id: Option<String>,
    /// Tables loaded at once.
    #[arg(long, env = "TIDEMARK_WORKERS", default_value_t = crate::config::DEFAULT_WORKERS, value_parser = crate::config::parse_workers)]
    pub workers: usize,
}

impl Default for VerifySettings {
    /// The defaults the attributes above declare.
    fn default() -> Self {
        crate::config::defaults()
    }
}

impl VerifySettings {
    /// Where the scratch database goes: the scratch URL or secret, with the source's CA
    /// bundle (and, for a secret, its sslmode); `None`: on the source's own server.
    pub fn scratch_source(&self, source: &db::DatabaseSource) -> Option<db::DatabaseSource> {
        let url = self
            .scratch_url
            .as_ref()
            .filter(|u| !u.expose_secret().trim().is_empty());
        let secret_id = self
            .scratch_secret_id
            .clone()
            .filter(|s| !s.trim().is_empty());
        match (url, secret_id) {
            (Some(url), _) => Some(db::DatabaseSource {
                url: Some(url.clone()),
                ca_file: source.ca_file.clone(),
                ..Default::default()
            }),
            (None, Some(secret_id)) => Some(db::DatabaseSource {
                secret_id: Some(secret_id),
                ca_file: source.ca_file.clone(),
                sslmode: source.sslmode,
                ..Default::default()
            }),
            (None, None) => None,
        }
    }
}

/// Errors that stop a verification from producing a result at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("verify compares the restored schema with pg_dump: {0}")]
    Schema(#[from] SchemaError),
}

impl Classified for VerifyError {
    fn kind(&self) -> ErrorKind {
        match self {
            VerifyError::Schema(e) => e.kind(),
            VerifyError::Restore(e) => e.kind(),
            VerifyError::Db(e) => e.kind(),
            VerifyError::Format(e) => e.kind(),
        }
    }
}

/// What one slice of a verification did.
#[derive(Debug, Clone, Serialize)]
pub struct VerifySlice {
    pub backup_id: String,
    /// The verification is finished; `record` holds its result.
    pub done: bool,
    pub record: Option<Verification>,
    pub tables: usize,
    pub tables_done: usize,
}

/// Verifies a backup to the end: restore into a scratch database, compare, record, drop.
///
/// `server` reaches the verification server (any database on it; the scratch database is
/// created beside it). A backup that fails verification is an `Ok` with `ok: false`.
///
/// # Errors
/// Unknown backup, unreachable server, store errors: no result could be produced.
pub async fn verify(
    store: Arc<dyn WriteStore>,
    server: &DbSettings,
    opts: &VerifyOptions,
) -> Result<Verification, VerifyError> {
    let whole = VerifyOptions {
        deadline: None,
        ..opts.clone()
    };
    loop {
        if let Some(record) = verify_slice(store.clone(), server, &whole).await?.record {
            return Ok(record);
        }
    }
}

/// One time-boxed slice of a verification: restores tables until `opts.deadline`, keeps
/// its place in `runs/verify-{id}/state.json`, and compares once every table is loaded.
///
/// # Errors
/// As [`verify`].
pub async fn verify_slice(
    store: Arc<dyn WriteStore>,
    server: &DbSettings,
    opts: &VerifyOptions,
) -> Result<VerifySlice, VerifyError> {
    let started = Instant::now();
    let selector = match &opts.backup {
        Some(s) => s.clone(),
        None => next_unverified(store.as_ref()).await?,
    };
    let manifest = match restore::load_manifest(store.as_ref(), &selector).await {
        Ok(m) => m,
        // A modified manifest is a failed verification of that backup, recorded as such.
        Err(e @ RestoreError::ManifestModified { .. }) => {
            let BackupSelector::Id(backup_id) = &selector else {
                return Err(e.into());
            };
            let record = failed(backup_id, crate::error_chain(&e), started);
            return record_verification(store.as_ref(), record).await;
        }
        Err(e) => return Err(e.into()),
    };
    // A backup sealed as mixing moments is not a state the source was ever in.
    if let Some(reason) = manifest.consistency.as_ref().and_then(|c| c.reason.clone()) {
        let error = format!("backup {} is not one point in time: {reason}", manifest.id);
        let record = failed(&manifest.id, error, started);
        return record_verification(store.as_ref(), record).await;
    }
    // Find pg_dump before creating anything: without it the schema cannot be compared.
    let tool = PgDump::locate(opts.pg_dump.as_deref()).await?;
    let admin = db::connect(server).await?;
    let key = verify_state_key(&manifest.id);
    let (mut state, resumable) =
        scratch_state(store.as_ref(), &admin, server, &manifest, opts).await?;
    let scratch = server.with_dbname(&state.scratch);
    let meter = Arc::new(RestoreMeter::default());
    if !state.restored && resumable {
        // A slice that died after the restore finished (the mark is committed with the
        // post-data section) leaves only the comparison to do.
        let client = db::connect(&scratch).await?;
        state.restored = restore::is_marked_finished(&client)
            .await
            .map_err(|e| DbError::query("reading the scratch database's state", server, e))?;
    }
    let mut outcome: Result<(), VerifyError> = Ok(());
    // Tables read back while the restore goes on (each as soon as its load commits).
    let mut read_early = HashMap::new();
    if !state.restored {
        let (landed, reports) = tokio::sync::mpsc::unbounded_channel();
        let reading = fingerprints_as_landed(&scratch, &manifest.tables, reports, opts.workers);
        let restoring = restore_scratch(
            store.clone(),
            &manifest,
            &scratch,
            &mut state,
            opts,
            &meter,
            landed,
        );
        let (restored, read) = tokio::join!(restoring, reading);
        read_early = read;
        match restored {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(
                    backup_id = manifest.id,
                    tables_done = state.resume.loaded.len(),
                    "verification slice ends; the next continues"
                );
                return Ok(VerifySlice {
                    backup_id: manifest.id.clone(),
                    done: false,
                    record: None,
                    tables: manifest.tables.len(),
                    tables_done: state.resume.loaded.len(),
                });
            }
            Err(e) => outcome = Err(e),
        }
    }
    let outcome = match outcome {
        Ok(()) => {
            let store = store.as_ref();
            let read = Readback {
                workers: opts.workers,
                early: &read_early,
            };
            compare(store, &manifest, &scratch, &tool, &state, started, &read).await
        }
        Err(e) => Err(e),
    };
    // Finished, one way or the other: always drop the scratch database.
    if let Err(e) = drop_scratch(&admin, &state.scratch).await {
        tracing::warn!(scratch = state.scratch, error = %e, "could not drop the scratch database; the next verification sweeps it");
    }
    let record = match outcome {
        Ok(record) => record,
        Err(e) if !e.is_retryable() => {
            let mut record = failed(&manifest.id, crate::error_chain(&e), started);
            record.restore_seconds = state.restore_seconds;
            record.rows = state.rows;
            record.bytes = meter.bytes.load(Ordering::Relaxed);
            record
        }
        Err(e) => {
            store.delete(&key).await.map_err(FormatError::from)?;
            return Err(e);
        }
    };
    let finished = record_verification(store.as_ref(), record).await?;
    store.delete(&key).await.map_err(FormatError::from)?;
    if let Some(record) = &finished.record {
        tracing::info!(
            backup_id = record.backup_id,
            ok = record.ok,
            restore_seconds = record.restore_seconds,
            "verification finished"
        );
    }
    Ok(finished)
}

/// Restores the backup into the scratch database until the deadline, recording how far
/// it got, telling `landed` each table whose rows are in; returns whether the restore is
/// finished. A failed restore's figures stay in `state` for the record.
async fn restore_scratch(
    store: Arc<dyn WriteStore>,
    manifest: &Manifest,
    scratch: &DbSettings,
    state: &mut VerifyState,
    opts: &VerifyOptions,
    meter: &Arc<RestoreMeter>,
    landed: tokio::sync::mpsc::UnboundedSender<TableName>,
) -> Result<bool, VerifyError> {
    let started = Instant::now();
    let restore_opts = RestoreOptions {
        settings: crate::restore::RestoreSettings {
            workers: opts.workers,
            ..crate::restore::RestoreSettings::default()
        },
        resume: Some(state.resume.clone()),
        deadline: opts.deadline,
        mark_finished: true,
        meter: Some(meter.clone()),
        landed: Some(landed),
    };
    match restore::restore(store.clone(), manifest, scratch, &restore_opts).await {
        Ok(report) => {
            state.restore_seconds += report.seconds;
            state.rows += report.rows;
            state.resume.schema_applied = report.schema_applied;
            state.resume.loaded.extend(report.completed);
            state.restored = report.done;
            let key = verify_state_key(&manifest.id);
            write_doc(store.as_ref(), &key, state, WriteCondition::Always).await?;
            Ok(report.done)
        }
        Err(e) => {
            // What the restore got done before it failed is part of the record.
            state.restore_seconds += started.elapsed().as_secs_f64();
            state.rows += meter.rows.load(Ordering::Relaxed);
            Err(e.into())
        }
    }
}

/// Writes the verification record of a backup: the slice that does is the last.
async fn record_verification(
    store: &dyn WriteStore,
    record: Verification,
) -> Result<VerifySlice, VerifyError> {
    let key = verification_key(&record.backup_id);
    write_doc(store, &key, &record, WriteCondition::Always).await?;
    Ok(VerifySlice {
        backup_id: record.backup_id.clone(),
        done: true,
        tables: record.tables.len(),
        tables_done: record.tables.len(),
        record: Some(record),
    })
}

async fn drop_scratch(admin: &Client, scratch: &str) -> Result<(), tokio_postgres::Error> {
    let sql = format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(scratch)
    );
    admin.batch_execute(&sql).await
}

/// The verification state this slice continues, and whether its scratch database exists:
/// an earlier slice's, if it got as far as applying the schema; else a new scratch
/// database (a half-made one is dropped first).
async fn scratch_state(
    store: &dyn WriteStore,
    admin: &Client,
    server: &DbSettings,
    manifest: &Manifest,
    opts: &VerifyOptions,
) -> Result<(VerifyState, bool), VerifyError> {
    let key = verify_state_key(&manifest.id);
    let previous = read_doc::<VerifyState>(store, &key).await?.map(|(s, _)| s);
    let resumable = match &previous {
        Some(state) => admin
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&state.scratch],
            )
            .await
            .map_err(|e| DbError::query("looking for the scratch database", server, e))?
            .is_some(),
        None => false,
    };
    match previous {
        Some(state) if resumable && state.resume.schema_applied => return Ok((state, true)),
        // A slice killed before it recorded the schema as applied left a scratch database
        // in an unknown state: drop it and start again.
        Some(stale) if resumable => drop_scratch(admin, &stale.scratch)
            .await
            .map_err(|e| DbError::query("dropping a stale scratch database", server, e))?,
        _ => {}
    }
    sweep_stale(admin, server, opts.stale_after).await?;
    let scratch = format!(
        "{SCRATCH_PREFIX}{}_{}",
        manifest
            .id
            .to_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        Utc::now().timestamp()
    );
    // From template0: nothing but what the backup restores is in it.
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {} TEMPLATE template0",
            quote_ident(&scratch)
        ))
        .await
        .map_err(|e| DbError::query("creating the scratch database", server, e))?;
    tracing::info!(
        backup_id = manifest.id,
        scratch,
        "verification restore started"
    );
    let state = VerifyState {
        version: FORMAT_VERSION,
        backup_id: manifest.id.clone(),
        scratch,
        resume: ResumePoint::default(),
        restored: false,
        restore_seconds: 0.0,
        rows: 0,
    };
    // Recorded at once, so a slice killed from here on leaves a scratch database the next
    // slice finds (and reuses or drops), never an orphan.
    write_doc(store, &key, &state, WriteCondition::Always).await?;
    Ok((state, resumable))
}

fn failed(backup_id: &str, error: String, started: Instant) -> Verification {
    Verification {
        version: FORMAT_VERSION,
        backup_id: backup_id.to_owned(),
        ok: false,
        verified_at: Utc::now(),
        restore_seconds: 0.0,
        seconds: started.elapsed().as_secs_f64(),
        bytes: 0,
        rows: 0,
        tables: Vec::new(),
        schema: None,
        error: Some(error),
    }
}

/// How the restored tables are read back: over `workers` connections, except those
/// `early` holds (read as they landed).
#[derive(Debug, Clone, Copy)]
struct Readback<'a> {
    workers: usize,
    early: &'a HashMap<usize, Fingerprint>,
}

/// Compares the scratch database with the backup's recorded truth: every table's row
/// count and fingerprint, and the schema object by object.
async fn compare(
    store: &dyn ReadStore,
    manifest: &Manifest,
    scratch: &DbSettings,
    tool: &PgDump,
    state: &VerifyState,
    started: Instant,
    read: &Readback<'_>,
) -> Result<Verification, VerifyError> {
    let (tables, schema) = compare_read(store, manifest, scratch, tool, read).await?;
    Ok(Verification {
        version: FORMAT_VERSION,
        backup_id: manifest.id.clone(),
        ok: tables.iter().all(|t| t.ok) && schema.ok,
        verified_at: Utc::now(),
        restore_seconds: state.restore_seconds,
        seconds: started.elapsed().as_secs_f64(),
        bytes: manifest.bytes(),
        rows: state.rows.max(manifest.rows()),
        tables,
        schema: Some(schema),
        error: None,
    })
}

/// Compares a restored database with a backup's recorded truth: each table's row count
/// and content fingerprint (read back over `workers` connections), and, at the same time,
/// the schema (dumped with the object selection the backup's own dump used). Also usable
/// on a database restored by hand.
///
/// # Errors
/// Query errors, pg_dump failures, unreadable schema objects.
pub async fn compare_restored(
    store: &dyn ReadStore,
    manifest: &Manifest,
    restored: &DbSettings,
    tool: &PgDump,
    workers: usize,
) -> Result<(Vec<TableVerification>, SchemaCheck), VerifyError> {
    let early = HashMap::new();
    let read = Readback {
        workers,
        early: &early,
    };
    compare_read(store, manifest, restored, tool, &read).await
}

/// [`compare_restored`], with the tables `read.early` holds already read back.
async fn compare_read(
    store: &dyn ReadStore,
    manifest: &Manifest,
    restored: &DbSettings,
    tool: &PgDump,
    read: &Readback<'_>,
) -> Result<(Vec<TableVerification>, SchemaCheck), VerifyError> {
    let tables = &manifest.tables;
    let missing: Vec<usize> = (0..tables.len())
        .filter(|i| !read.early.contains_key(i))
        .collect();
    let rest: Vec<TableEntry> = missing.iter().map(|&i| tables[i].clone()).collect();
    let fingerprints = async {
        let mut all: Vec<Fingerprint> = (0..tables.len())
            .map(|i| read.early.get(&i).copied().unwrap_or_default())
            .collect();
        if !rest.is_empty() {
            let sums = table_fingerprints(restored, &rest, read.workers, PART_BLOCKS).await?;
            for (&i, sum) in missing.iter().zip(sums) {
                all[i] = sum;
            }
        }
        Ok::<_, RestoreError>(all)
    };
    let schema = compare_schema(store, manifest, restored, tool);
    let (fingerprints, schema) = tokio::join!(fingerprints, schema);
    let tables = manifest
        .tables
        .iter()
        .zip(fingerprints?)
        .map(|(entry, actual)| TableVerification {
            name: entry.name.clone(),
            ok: actual == entry.fingerprint,
            expected: entry.fingerprint,
            actual: Some(actual),
            of: entry.fingerprint_of,
        })
        .collect();
    Ok((tables, schema?))
}

/// The restored schema against the one the backup recorded, and its large objects
/// against their recorded count and fingerprint.
async fn compare_schema(
    store: &dyn ReadStore,
    manifest: &Manifest,
    restored: &DbSettings,
    tool: &PgDump,
) -> Result<SchemaCheck, VerifyError> {
    let Some(dump) = &manifest.schema_dump else {
        return Ok(SchemaCheck {
            ok: false,
            objects: 0,
            differences: vec!["the backup has no recorded schema to compare with".into()],
        });
    };
    let recorded_pre = crate::schema::load_script(store, &dump.pre_data).await?;
    let recorded_post = crate::schema::load_script(store, &dump.post_data).await?;
    let (pre, post) = compare::dump_sections(tool, restored, &dump.selection).await?;
    let mut check = compare::compare(&[&recorded_pre, &recorded_post], &[&pre, &post]);
    // Large objects: the source's count and fingerprint in the backup's snapshot.
    let expected = dump.large_objects_fingerprint.unwrap_or_default();
    let client = db::connect(restored).await.map_err(RestoreError::from)?;
    let actual = crate::schema::capture::large_object_fingerprint(&client)
        .await
        .map_err(|e| {
            RestoreError::from(DbError::query("fingerprinting large objects", restored, e))
        })?;
    check.objects += expected.rows as usize;
    if actual != expected {
        check.ok = false;
        check.differences.push(format!(
            "different: LARGE OBJECTS ({} in the backup, {} restored, or their contents or comments differ)",
            expected.rows, actual.rows
        ));
    }
    Ok(check)
}

/// The newest backup without a verification record (the newest backup if all have one).
async fn next_unverified(store: &dyn WriteStore) -> Result<BackupSelector, VerifyError> {
    let backups = crate::repo::backups::manifests(store).await?;
    for backup in backups.iter().rev() {
        let record = verification_key(&backup.id);
        if store
            .head(&record)
            .await
            .map_err(FormatError::from)?
            .is_none()
        {
            return Ok(BackupSelector::Id(backup.id.clone()));
        }
    }
    match backups.last() {
        Some(b) => Ok(BackupSelector::Id(b.id.clone())),
        None => Err(VerifyError::Restore(RestoreError::NoBackups)),
    }
}

/// Drops scratch databases whose name says they are older than `stale_after`.
async fn sweep_stale(
    admin: &tokio_postgres::Client,
    server: &DbSettings,
    stale_after: Duration,
) -> Result<(), DbError> {
    let rows = admin
        .query(
            "SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)",
            &[&SCRATCH_PREFIX],
        )
        .await
        .map_err(|e| DbError::query("listing scratch databases", server, e))?;
    let now = Utc::now().timestamp();
    for row in rows {
        let name: String = row.get(0);
        let created = name.rsplit('_').next().and_then(|t| t.parse::<i64>().ok());
        if created.is_some_and(|t| now - t > stale_after.as_secs() as i64) {
            tracing::warn!(
                scratch = name,
                "dropping a scratch database left by a crashed verification"
            );
            admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&name)
                ))
                .await
                .map_err(|e| DbError::query("dropping a stale scratch database", server, e))?;
        }
    }
    Ok(())
}

/// The verification record of a backup, if any.
///
/// # Errors
/// Store and format errors.
pub async fn read_verification(
    store: &dyn WriteStore,
    backup_id: &str,
) -> Result<Option<Verification>, FormatError> {
    Ok(
        read_doc::<Verification>(store, &verification_key(backup_id))
            .await?
            .map(|(v, _)| v),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Fingerprint;

    #[test]
    fn the_scratch_server_is_the_one_named_with_the_sources_tls_settings() {
        let source = db::DatabaseSource {
            ca_file: Some("/etc/rds.pem".into()),
            sslmode: Some(db::SslMode::VerifyFull),
            ..Default::default()
        };
        let none = VerifySettings::default();
        assert_eq!(none.workers, crate::config::DEFAULT_WORKERS);
        assert!(none.scratch_source(&source).is_none());

        let by_secret = VerifySettings {
            scratch_secret_id: Some("scratch".into()),
            ..VerifySettings::default()
        };
        let scratch = by_secret.scratch_source(&source).expect("named");
        assert_eq!(scratch.secret_id.as_deref(), Some("scratch"));
        assert_eq!(
            (scratch.ca_file, scratch.sslmode),
            (source.ca_file.clone(), source.sslmode)
        );
    }
    use crate::format::TableName;

    #[test]
    fn the_summary_stays_small_whatever_the_table_count() {
        let table = |i: usize, ok: bool| TableVerification {
            name: TableName::new("public", format!("table_with_a_long_name_{i:05}")),
            ok,
            expected: Fingerprint { rows: 10, sum: 1 },
            actual: Some(Fingerprint {
                rows: 10,
                sum: if ok { 1 } else { 2 },
            }),
            of: crate::format::FingerprintOf::default(),
        };
        let record = Verification {
            version: 2,
            backup_id: "20261122T060000Z-3f9a1c".into(),
            ok: false,
            verified_at: Utc::now(),
            restore_seconds: 1.0,
            seconds: 2.0,
            bytes: 3,
            rows: 4,
            tables: (0..5000).map(|i| table(i, i % 3 != 0)).collect(),
            schema: None,
            error: Some("x".repeat(100_000)),
        };
        let whole = serde_json::to_vec(&record).map(|v| v.len()).unwrap_or(0);
        let summary = serde_json::to_vec(&record.summary())
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        assert!(whole > 256 * 1024, "the record itself is big: {whole}");
        assert!(summary < 4096, "summary of 5,000 tables: {summary} bytes");
        let s = record.summary();
        assert_eq!(
            (s.tables, s.tables_failed, s.failed_tables.len()),
            (5000, 1667, 10)
        );
        assert_eq!(s.record, "verifications/20261122T060000Z-3f9a1c.json");
    }
}
