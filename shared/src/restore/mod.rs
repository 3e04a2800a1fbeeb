//! Restore: one code path for `tidemark restore` and for verification restores, in
//! pg_restore's order.
//!
//! 1. Check everything that can be checked before writing: the manifest's own checksum,
//!    the schema scripts' checksums, that every chunk exists with its recorded size, that
//!    the target can take the backup (no table of it exists, schemas the backup creates
//!    are absent or empty, every extension it needs is available) — or, with `data_only`,
//!    that the target tables exist and are empty unless `clean`.
//! 2. Pre-data: the backup's pg_dump pre-data script (types, domains, functions,
//!    tables, views, ...), in one transaction ([`crate::schema::apply`]).
//! 3. Data: tables load in parallel. Each chunk streams from the store through a SHA-256
//!    check and zstd into `COPY FROM STDIN` (`load`); a `changes` chain lands in one
//!    set-based merge: the newest version of each key, only keys in the live key set.
//!    As soon as a table is in, its loading worker builds its indexes and key
//!    constraints (`indexes`), while the other workers go on loading.
//! 4. Post-data: the rest of it — foreign keys, triggers, rules, policies, comments,
//!    the indexes of partitioned tables, and `REFRESH MATERIALIZED VIEW` of the views that
//!    were populated — in one transaction; then sequences are set to their recorded values.
//!
//! Like `pg_restore --no-owner --no-privileges` by default; `with_privileges` restores
//! owners and grants, `create_roles` first creates missing roles from the backup's
//! globals. `data_only` loads into an existing schema (`data_only`).

mod data_only;
mod error;
mod indexes;
mod large_objects;
mod load;
mod preflight;
mod roles;
mod run;
mod sequences;
mod tables;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio_postgres::Client;

use crate::format::manifest::Manifest;
use crate::format::{FormatError, TableName};
use crate::repo::manifest_key;
use crate::store::ReadStore;

pub use self::data_only::Method as DataOnlyMethod;

pub use self::error::{FailedTables, RestoreError};
pub use self::run::restore;
pub use crate::format::verification::ResumePoint;

/// Which backup: the newest, or one by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupSelector {
    Latest,
    Id(String),
}

impl std::str::FromStr for BackupSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" => Err("empty backup id (use latest or an id from tidemark list)".into()),
            "latest" => Ok(BackupSelector::Latest),
            id if id.contains('/') => Err(format!("not a backup id: {id:?}")),
            id => Ok(BackupSelector::Id(id.to_owned())),
        }
    }
}

/// The restore settings a user gives, declared once: each field's flag, variable and
/// default are here. The CLI flattens this struct into `restore`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreSettings {
    /// Only these tables (comma-separated); empty: all.
    #[arg(long, value_delimiter = ',', value_parser = crate::config::parse_name)]
    pub tables: Vec<String>,
    /// Load into existing tables (schema from migrations) instead of creating them.
    #[arg(long)]
    pub data_only: bool,
    /// With --data-only: empty the target tables first.
    #[arg(long, requires = "data_only")]
    pub clean: bool,
    /// Tables loaded at once.
    #[arg(long, env = "TIDEMARK_WORKERS", default_value_t = crate::config::DEFAULT_WORKERS, value_parser = crate::config::parse_workers)]
    pub workers: usize,
    /// Restore owners and grants too (default: like pg_restore --no-owner
    /// --no-privileges, everything owned by the restoring role).
    #[arg(long, conflicts_with = "data_only")]
    pub with_privileges: bool,
    /// First create the roles the backup names that the target lacks (from its
    /// pg_dumpall --globals-only, without passwords).
    #[arg(long = "roles", conflicts_with = "data_only")]
    pub create_roles: bool,
    /// Restore into a server of an older major version than the backup's source (refused
    /// by default); objects the older server cannot create then fail by name.
    #[arg(long)]
    pub allow_older_target: bool,
    /// Move a sequence that the source held behind its column's largest key past that
    /// key (by default the restore keeps every sequence exactly as the source had it,
    /// and names such a sequence in a warning).
    #[arg(long)]
    pub advance_sequences: bool,
    /// Stop at the first table that fails to load. A --data-only restore otherwise loads
    /// every other table, then lists the failed ones and exits non-zero; a whole restore
    /// always stops at the first failure.
    #[arg(long)]
    pub exit_on_error: bool,
}

impl Default for RestoreSettings {
    /// The defaults the attributes above declare.
    fn default() -> Self {
        crate::config::defaults()
    }
}

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// What the user chose: tables, data-only, workers, privileges, ...
    pub settings: RestoreSettings,
    /// Live counters for a progress display.
    pub meter: Option<Arc<RestoreMeter>>,
    /// Continue a time-boxed restore (verification slices).
    pub resume: Option<ResumePoint>,
    /// Start no new table after this instant; the report says what completed.
    pub deadline: Option<Instant>,
    /// Mark the target database as completely restored (a comment on the database, in
    /// the post-data transaction), so that a verification slice that dies afterwards
    /// knows (see [`is_marked_finished`]).
    pub mark_finished: bool,
    /// Told each table of a schema restore whose rows are final — its load committed,
    /// before its indexes are built — as soon as they are, so verify reads it back while
    /// the other tables load. Nothing the restore does afterwards (index and constraint
    /// builds, the rest of post-data, sequences, large objects) changes a table's rows.
    /// The channel closes when the restore and these options are dropped.
    pub landed: Option<tokio::sync::mpsc::UnboundedSender<TableName>>,
}

const FINISHED_MARK: &str = "tidemark: restore finished";

/// Whether a restore with `mark_finished` completed into the database `client` is on.
///
/// # Errors
/// The query's error.
pub async fn is_marked_finished(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce(shobj_description(oid, 'pg_database'), '') = $1 \
             FROM pg_database WHERE datname = current_database()",
            &[&FINISHED_MARK],
        )
        .await?;
    Ok(row.get(0))
}

/// Live counters of a restore.
#[derive(Debug, Default)]
pub struct RestoreMeter {
    pub tables_total: AtomicUsize,
    pub tables_done: AtomicUsize,
    pub chunks_done: AtomicU64,
    /// Stored bytes read.
    pub bytes: AtomicU64,
    /// Rows committed.
    pub rows: AtomicU64,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup_id: String,
    pub target: String,
    pub tables: usize,
    pub rows: u64,
    /// Stored (compressed) bytes read.
    pub bytes: u64,
    pub chunks: u64,
    pub seconds: f64,
    /// Everything is restored (false only when a deadline stopped the restore).
    pub done: bool,
    /// Tables this call loaded completely.
    pub completed: Vec<TableName>,
    /// The pre-data script is applied (by this call or an earlier one).
    pub schema_applied: bool,
    /// Schema objects (pg_dump entries) created.
    pub schema_objects: usize,
    /// How a data-only restore kept constraints and triggers quiet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_only: Option<String>,
    /// What was left out or could not be restored, and why.
    pub warnings: Vec<String>,
}

/// Reads the selected backup's manifest and checks its checksum.
///
/// # Errors
/// [`RestoreError::NoBackups`], [`RestoreError::UnknownBackup`],
/// [`RestoreError::ManifestModified`].
pub async fn load_manifest(
    store: &dyn ReadStore,
    selector: &BackupSelector,
) -> Result<Manifest, RestoreError> {
    let id = match selector {
        BackupSelector::Id(id) => id.clone(),
        BackupSelector::Latest => crate::repo::backups::latest_id(store)
            .await?
            .ok_or(RestoreError::NoBackups)?,
    };
    let key = manifest_key(&id);
    let manifest = crate::format::manifest::read_manifest(store, &id)
        .await
        .map_err(|e| match e {
            FormatError::Invalid { key, .. } => RestoreError::ManifestModified { key },
            other => other.into(),
        })?
        .ok_or_else(|| RestoreError::UnknownBackup(id.clone()))?;
    if manifest.id != id {
        return Err(RestoreError::ManifestModified { key });
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse() {
        assert_eq!("latest".parse(), Ok(BackupSelector::Latest));
        assert_eq!(
            "20261122T120000Z-0a1b2c".parse(),
            Ok(BackupSelector::Id("20261122T120000Z-0a1b2c".into()))
        );
        assert!("".parse::<BackupSelector>().is_err());
        assert!("../x".parse::<BackupSelector>().is_err());
    }
}
