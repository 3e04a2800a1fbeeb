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
    /// The snapshot that backup is of: an incremental counts changes from its xmin.
    pub snapshot: PgSnapshot,
    /// The server's `system_identifier` (`pg_control_system()`): a chain continues only on
    /// the same server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<String>,
    /// Backups since `append` tables were last fingerprinted whole (for `--deep-every`).
    #[serde(default)]
    pub runs_since_deep: u32,
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
    /// `append`: the source's key fingerprint of the rows up to the cursor, at the
    /// backup's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<Fingerprint>,
    /// What makes the table the same table: a chain link is trusted only if it is equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<TableIdentity>,
}

/// A table's identity, independent of where its data lies on disk: its oid, every column
/// slot (dropped ones too: a column dropped and added again is another column), its key,
/// and its partitions with their bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableIdentity {
    pub oid: u32,
    pub columns: Vec<ColumnIdentity>,
    pub key: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionIdentity>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnIdentity {
    pub attnum: i16,
    pub name: String,
    /// `format_type`, e.g. `character varying(20)`.
    pub type_name: String,
    pub collation: u32,
    #[serde(default)]
    pub dropped: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionIdentity {
    pub oid: u32,
    pub name: TableName,
    pub bound: String,
}

impl TableIdentity {
    /// What differs from `earlier`, said for the manifest (`None`: the same table).
    pub fn change_from(&self, earlier: &TableIdentity) -> Option<String> {
        if self.oid != earlier.oid {
            return Some(format!(
                "it is another table under the same name (oid {}, was {})",
                self.oid, earlier.oid
            ));
        }
        if self.columns != earlier.columns {
            return Some("its columns changed (added, dropped, retyped or re-collated)".into());
        }
        if self.key != earlier.key {
            return Some("its primary key changed".into());
        }
        if self.partitions != earlier.partitions {
            return Some(
                "its partitions changed (attached, detached, replaced or re-bounded)".into(),
            );
        }
        None
    }
}

/// Keys `from..=to` that no visible row had when the export passed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapRange {
    pub from: i64,
    pub to: i64,
    /// When the gap was first seen; it is probed until a TTL after this.
    pub seen_at: DateTime<Utc>,
}
