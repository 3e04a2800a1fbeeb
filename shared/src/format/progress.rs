//! `runs/{run_id}/progress.json`: an in-flight run.
//!
//! Written when the run starts (create-if-absent) and replaced with If-Match as chunks
//! land. Everything a killed slice had not recorded here is redone by the next slice
//! under the same chunk names, so a resumed run loses and duplicates nothing.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::checkpoint::GapRange;
use super::manifest::{SchemaDump, SequenceValue, TableSchema};
use super::{BackupKind, ChunkRef, Fingerprint, PgSnapshot, TableMode, TableName};

/// The progress document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunProgress {
    pub version: u32,
    pub run_id: String,
    pub kind: BackupKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Backup ids of the chain this run extends, root first (empty for a full backup).
    #[serde(default)]
    pub chain: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub snapshot: PgSnapshot,
    pub server_version: String,
    pub database: String,
    pub settings: ExportSettings,
    pub tables: Vec<TableProgress>,
    pub sequences: Vec<SequenceValue>,
    /// The schema as pg_dump wrote it in the first slice's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_dump: Option<SchemaDump>,
    /// Slices run so far (the first is 1).
    pub slices: u32,
    /// Store requests made by all slices so far.
    pub store_requests: u64,
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// Chunk bounds the run was started with (a resumed slice keeps them, so chunk names
/// and contents stay the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSettings {
    pub chunk_rows: u64,
    pub chunk_bytes: u64,
    pub zstd_level: i32,
    /// Seconds an `append` gap is probed before it is given up.
    pub gap_ttl_secs: u64,
}

/// What this run exports of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExportScope {
    /// Every row.
    Whole,
    /// `changes`: rows whose `xmin` is at or after the parent's snapshot xmin, plus the
    /// live key set.
    Changed { since_xmin: u64 },
    /// `append`: rows with `after < key <= upto`, plus rows that fill earlier gaps.
    Appended { after: i64, upto: i64 },
}

/// Where one table's export stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableProgress {
    pub name: TableName,
    pub mode: TableMode,
    pub schema: TableSchema,
    /// Exported columns, in COPY order (generated columns are left out).
    pub columns: Vec<String>,
    /// Key columns (the primary key), empty for a keyless table.
    pub key: Vec<String>,
    pub scope: ExportScope,
    /// Chunks of the parent chain this backup still needs, in apply order.
    #[serde(default)]
    pub inherited: Vec<ChunkRef>,
    /// `append`: the parent's fingerprint, to which new rows add.
    #[serde(default)]
    pub inherited_fingerprint: Fingerprint,
    /// `append`: earlier gaps still to probe.
    #[serde(default)]
    pub gaps_to_probe: Vec<GapRange>,
    /// `append`: gaps for the next checkpoint (new ones and those still unfilled).
    #[serde(default)]
    pub gaps: Vec<GapRange>,
    /// Rows per key-range chunk (from the table's average row width).
    pub rows_per_chunk: u64,
    /// Disjoint key ranges that workers export at once, in key order (one for a small or
    /// keyless table).
    #[serde(default)]
    pub lanes: Vec<Lane>,
    pub gaps_probed: bool,
    pub done: bool,
    /// Chunks this run wrote, in apply order.
    #[serde(default)]
    pub chunks: Vec<ChunkRef>,
    /// Live key set chunks (`changes` incremental).
    #[serde(default)]
    pub key_chunks: Vec<ChunkRef>,
    pub next_seq: u32,
    /// Rows and fingerprint of the table as of the export (for `changes` incremental:
    /// of every live row, accumulated over the ranges).
    pub fingerprint: Fingerprint,
    /// Rows written to chunks by this run.
    pub exported_rows: u64,
    /// The slice in which this table's export started (a restart resets it).
    #[serde(default)]
    pub started_in_slice: u32,
}

/// One key range of a table that one worker exports, range after range.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Lane {
    /// Exclusive lower bound (text forms of the key columns); `None` from the start.
    #[serde(default)]
    pub after: Option<Vec<String>>,
    /// Inclusive upper bound; `None` to the end.
    #[serde(default)]
    pub until: Option<Vec<String>>,
    /// The last key exported in this lane.
    #[serde(default)]
    pub cursor: Option<Vec<String>>,
    pub done: bool,
}
