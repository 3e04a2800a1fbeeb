//! What can go wrong in a restore, and which tables failed.

use crate::db::{DbError, ServerVersion};
use crate::error::{Classified, ErrorKind};
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
    #[error("restoring {table}: {source}")]
    Table {
        table: TableName,
        #[source]
        source: Box<DbError>,
    },
    #[error("{cause}; the restore stopped with {loaded} of {tables} tables loaded and without the post-data schema (foreign keys, triggers, and the indexes of the tables not loaded): {state}")]
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

impl Classified for RestoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            RestoreError::WorkerPanicked { .. } => ErrorKind::Bug,
            RestoreError::ChunkUnreadable { .. } => ErrorKind::Transient,
            RestoreError::ManifestModified { .. }
            | RestoreError::ChunkMissing { .. }
            | RestoreError::ChunkCorrupt { .. } => ErrorKind::Corrupt,
            RestoreError::NoBackups
            | RestoreError::UnknownBackup(_)
            | RestoreError::UnknownTable { .. }
            | RestoreError::NoSchemaDump { .. }
            | RestoreError::NoGlobals { .. }
            | RestoreError::TargetTableExists(_)
            | RestoreError::TargetSchemaNotEmpty(_)
            | RestoreError::MissingExtensions(_)
            | RestoreError::TargetLargeObjectsExist { .. }
            | RestoreError::TargetTableMissing(_)
            | RestoreError::TargetNotEmpty(_)
            | RestoreError::ForeignKeyCycle { .. }
            | RestoreError::OlderTarget { .. }
            | RestoreError::UnsupportedTarget { .. }
            | RestoreError::TablesFailed { .. } => ErrorKind::Fatal,
            RestoreError::Table { source, .. } => source.kind(),
            RestoreError::Incomplete { cause, .. } => cause.kind(),
            RestoreError::Apply(e) => e.kind(),
            RestoreError::Schema(e) => e.kind(),
            RestoreError::Db(e) => e.kind(),
            RestoreError::Store(e) => e.kind(),
            RestoreError::Format(e) => e.kind(),
        }
    }
}

impl RestoreError {
    pub(crate) fn table(table: &TableName, source: DbError) -> Self {
        RestoreError::Table {
            table: table.clone(),
            source: Box::new(source),
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
