//! `state/checkpoint.json`: the cursors as of the last sealed backup.
//!
//! Written only by the manifest step, after the manifest exists, so it never runs ahead
//! of what is sealed. An incremental run reads it to know what "since the parent" means
//! for each table; the chunks themselves are listed in the parent's manifest.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{BackupKind, Fingerprint, PgSnapshot, TableMode, TableName};

/// The checkpoint document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// The newest sealed backup: the parent of the next incremental.
    pub backup_id: String,
    pub kind: BackupKind,
    pub created_at: DateTime<Utc>,
    /// The snapshot at which that backup's run started.
    pub snapshot: PgSnapshot,
    pub tables: Vec<TableCheckpoint>,
}

/// Where one table stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCheckpoint {
    pub name: TableName,
    pub mode: TableMode,
    /// Exported columns and their types (`name type`): a change forces a whole export.
    pub shape: Vec<String>,
    /// `append`: the highest key exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append_cursor: Option<i64>,
    /// `append`: key ranges that were empty when passed, to probe again for late commits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<GapRange>,
    /// `append`: rows and fingerprint of everything exported so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
}

/// Keys `from..=to` that no visible row had when the export passed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapRange {
    pub from: i64,
    pub to: i64,
    /// When the gap was first seen; it is probed until a TTL after this.
    pub seen_at: DateTime<Utc>,
}
