//! `runs/{run_id}/progress.json`: an in-flight run.
//!
//! Written when the run starts (create-if-absent) and replaced with If-Match as chunks
//! land. Everything a killed slice had not recorded here is redone by the next slice
//! under the same chunk names, so a resumed run loses and duplicates nothing.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::checkpoint::{GapRange, TableIdentity};
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
    /// The server's `system_identifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<String>,
    pub database: String,
    pub settings: ExportSettings,
    pub tables: Vec<TableProgress>,
    pub sequences: Vec<SequenceValue>,
    /// The schema as pg_dump wrote it, in the snapshot of slice `schema_slice`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_dump: Option<SchemaDump>,
    #[serde(default)]
    pub schema_slice: u32,
    /// The snapshot each slice read in, in slice order.
    #[serde(default)]
    pub slice_snapshots: Vec<SliceSnapshot>,
    /// The consistency pass of a run that spanned slices (absent until every table's
    /// ranges are exported, and for runs that finish in one slice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass: Option<ConsistencyPass>,
    /// Every table's data is of this slice's snapshot: the backup is one point in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_in_slice: Option<u32>,
    /// Why the run could not converge on one snapshot (it is sealed as inconsistent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inconsistent: Option<String>,
    /// `append` tables are fingerprinted whole in this run (a deep check).
    #[serde(default)]
    pub deep: bool,
    /// The export is fanned out: workers of other invocations claim its ranges as work
    /// items in the store (`--concurrency` above 1), and the slices fold them in.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fan_out: bool,
    /// Slices run so far (the first is 1).
    pub slices: u32,
    /// Store requests made by all slices so far.
    pub store_requests: u64,
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// The snapshot one slice read in, and where the server's WAL stood then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceSnapshot {
    pub slice: u32,
    pub snapshot: PgSnapshot,
    /// `pg_current_wal_lsn()` (on a standby, the last replayed LSN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    pub taken_at: DateTime<Utc>,
}

/// The consistency pass: rounds that bring every table to one slice's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyPass {
    /// Rounds started so far; a round runs within one slice.
    pub round: u32,
    /// The slice whose snapshot the current round brings every table to.
    pub slice: u32,
}

/// The parent's live key set of a `changes` table, as an incremental compares with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ParentKeys {
    /// One key-set chunk with its text hash: the same text is the same key set.
    Chunk { chunk: ChunkRef },
    /// No key set: the parent's live keys are the keys of the chain's rows, `rows` of
    /// them. A table read whole with no row changed since the parent and as many rows
    /// has exactly those keys (a row not changed since was live and the same then).
    OfRows { rows: u64 },
}

/// A table's export state before a pass round started on it, to return to if the round
/// does not finish (its chunks so far, key set, fingerprint, scope and gaps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassBase {
    pub chunks: Vec<ChunkRef>,
    pub key_chunks: Vec<ChunkRef>,
    pub fingerprint: Fingerprint,
    pub exported_rows: u64,
    pub scope: ExportScope,
    pub gaps: Vec<GapRange>,
    #[serde(default)]
    pub key_fingerprint: Fingerprint,
    #[serde(default)]
    pub truth: Option<AppendTruth>,
    #[serde(default)]
    pub keys_of_rows: bool,
}

/// An `append` table's recorded truth: the key fingerprint of its rows at or below the
/// mark, and (on a deep check) the fingerprint of those rows whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendTruth {
    pub keys: Fingerprint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<Fingerprint>,
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
    /// `append`: rows with `after < key <= upto` (`after` absent: from the first key;
    /// `upto` absent: the table is empty), plus rows that fill earlier gaps.
    Appended {
        #[serde(default)]
        after: Option<i64>,
        #[serde(default)]
        upto: Option<i64>,
    },
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
    /// `changes` incremental: the parent's live key set, to tell that a key set read
    /// whole is the same one and need not be written again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_keys: Option<ParentKeys>,
    /// `changes` incremental: the live key set is the parent's, and that is the keys of
    /// the chain's rows — the manifest records no key set, and restore filters nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keys_of_rows: bool,
    /// `append`: the source's key fingerprint at the parent's snapshot (keys up to its
    /// cursor); with the keys this run exports it must give the source's keys of now.
    #[serde(default)]
    pub inherited_keys: Fingerprint,
    /// `append`: the keys this run exported.
    #[serde(default)]
    pub key_fingerprint: Fingerprint,
    /// `append`: what the source holds, computed by it in the backup's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth: Option<AppendTruth>,
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
    /// All of this table's data is of this slice's snapshot (set by the consistency pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_in_slice: Option<u32>,
    /// The state to return to if the pass round under way on this table does not finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_base: Option<PassBase>,
    /// Planner's row estimate, for splitting the table into lanes again.
    #[serde(default)]
    pub est_rows: f64,
    /// The table's identity when planned (for the checkpoint, and the pass's catalog check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<TableIdentity>,
    /// The generation of the table's work items in a fanned-out run: raised when the
    /// table is started again, so that items of its earlier export are not folded in.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub item_generation: u32,
    /// Why this table starts a new chain in an incremental run (exported whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_chain: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl TableProgress {
    /// The table's own rows in SQL (see [`TableName::own_rows`]).
    pub fn own_rows(&self) -> String {
        self.name.own_rows(self.schema.is_partitioned())
    }
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
