//! What can go wrong in a restore, and which tables failed.

use crate::db::{DbError, ServerVersion};
use crate::format::{FormatError, TableName};
use crate::schema::apply::ApplyError;
use crate::schema::SchemaError;
use crate::store::StoreError;

/// Errors of restore; each names the backup, table or object concerned.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no backups in the store")]
    NoBackups,
    /// A bug, not a failure of the database or the store: never retried.
    #[error("a restore worker died: {detail} (a bug in Tidemark: please report it)")]
    WorkerPanicked { detail: String },
    #[error("unknown backup {0} (tidemark list shows the backups)")]
    UnknownBackup(String),
    #[error("manifest {key} was modified after it was written (checksum mismatch)")]
    ManifestModified { key: String },
    #[error("backup {backup} has no table {table}")]
    UnknownTable { backup: String, table: String },
    #[error("backup {backup} has no schema dump (it was taken before Tidemark captured schemas with pg_dump): restore it with --data-only into tables you create")]
    NoSchemaDump { backup: String },
    #[error("backup {backup} has no globals (roles were not captured when it was taken); restore without --roles")]
    NoGlobals { backup: String },
    #[error("target already has table {0}; restore into an empty database, or use --data-only")]
    TargetTableExists(TableName),
    #[error("target schema {0} already holds objects; restore into an empty database, or use --data-only")]
    TargetSchemaNotEmpty(String),
    #[error("the target server lacks extension(s) {} that the backup needs (not in pg_available_extensions); install them there first", .0.join(", "))]
    MissingExtensions(Vec<String>),
    #[error("the target already holds {count} of the backup's large objects (oid {first} first); restore into a database without them, or pass --clean with --data-only to replace them")]
    TargetLargeObjectsExist { count: usize, first: u32 },
    #[error("target has no table {0}; --data-only loads into existing tables")]
    TargetTableMissing(TableName),
    #[error("target table {0} already holds rows; pass --clean to empty it first")]
    TargetNotEmpty(TableName),
    #[error("tables {} reference each other through foreign keys that are not DEFERRABLE: a role that is not a superuser cannot load them without violating one; restore as a superuser, or make those constraints DEFERRABLE", .tables.join(", "))]
    ForeignKeyCycle { tables: Vec<String> },
    #[error("backup {backup} was taken on PostgreSQL {source_version} and the target runs PostgreSQL {target_version}: a restore into an older major version is refused, because the schema may use what {target_major} lacks; restore into PostgreSQL {source_major} or newer, or pass --allow-older-target to try (objects the target cannot create then fail by name)", source_major = .source_version.major(), target_major = .target_version.major())]
    OlderTarget {
        backup: String,
        source_version: ServerVersion,
        target_version: ServerVersion,
    },
    #[error("the target runs PostgreSQL {target}: {detail}")]
    UnsupportedTarget {
        target: ServerVersion,
        detail: String,
    },
    #[error("chunk {key} is missing from the store")]
    ChunkMissing { key: String },
    #[error("chunk {key} is corrupt: {detail}")]
    ChunkCorrupt { key: String, detail: String },
    #[error("reading chunk {key} from the store failed: {detail}")]
    ChunkUnreadable { key: String, detail: String },
    #[error("restoring {table}: {detail}")]
    Table {
        table: TableName,
        detail: String,
        retryable: bool,
    },
    #[error("{cause}; the restore stopped with {loaded} of {tables} tables loaded and without the post-data schema (indexes, constraints, triggers): {state}")]
    Incomplete {
        cause: Box<RestoreError>,
        loaded: usize,
        tables: usize,
        /// What the target holds.
        state: &'static str,
    },
    #[error("{} of {total} tables failed to load (each rolled back; every other table was loaded): {}", .failed.iter().map(|f| f.tables.len()).sum::<usize>(), .failed.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    TablesFailed {
        failed: Vec<FailedTables>,
        total: usize,
    },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl RestoreError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            RestoreError::Table { retryable, .. } => *retryable,
            RestoreError::ChunkUnreadable { .. } => true,
            RestoreError::Incomplete { cause, .. } => cause.is_retryable(),
            RestoreError::Apply(e) => e.retryable,
            RestoreError::Schema(e) => e.is_retryable(),
            RestoreError::Db(e) => e.is_retryable(),
            RestoreError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }

    pub(super) fn table(table: &TableName, err: DbError) -> Self {
        RestoreError::Table {
            table: table.clone(),
            retryable: err.is_retryable(),
            detail: err.to_string(),
        }
    }

    /// The error that stopped the restore, inside what the restore says about the target.
    pub fn root(&self) -> &RestoreError {
        match self {
            RestoreError::Incomplete { cause, .. } => cause.root(),
            other => other,
        }
    }

    /// Whether the backup itself is at fault (a changed byte, a missing object), as
    /// opposed to the target or the network.
    pub fn is_backup_damage(&self) -> bool {
        if let RestoreError::Incomplete { cause, .. } = self {
            return cause.is_backup_damage();
        }
        matches!(
            self,
            RestoreError::ManifestModified { .. }
                | RestoreError::ChunkMissing { .. }
                | RestoreError::ChunkCorrupt { .. }
                | RestoreError::Schema(SchemaError::Corrupt { .. } | SchemaError::Missing { .. })
        )
    }
}

/// Tables of a `--data-only` restore that failed to load together (one group: a table,
/// or tables whose foreign keys form a cycle), rolled back, and the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedTables {
    pub tables: Vec<TableName>,
    pub error: String,
}

impl std::fmt::Display for FailedTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.tables.iter().map(ToString::to_string).collect();
        write!(f, "{}: {}", names.join(", "), self.error)
    }
}
