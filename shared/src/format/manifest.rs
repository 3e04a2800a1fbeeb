//! `manifests/{backup_id}.json`: a sealed backup. A backup exists iff its manifest does.
//!
//! Self-contained: the schema of every table, sequence values, and every chunk needed to
//! restore this backup (its chain included), with checksums, so restoring or keeping
//! one backup never needs another manifest.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{BackupKind, ChunkRef, Fingerprint, FingerprintOf, PgSnapshot, TableMode, TableName};

/// The manifest document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub id: String,
    pub kind: BackupKind,
    #[serde(default)]
    pub parent: Option<String>,
    /// Backup ids whose chunks this backup uses, root (the full) first, this one last.
    #[serde(default)]
    pub chain: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// The one snapshot the backup is of (see `consistency`).
    pub snapshot: PgSnapshot,
    /// Whether the backup is one point in time, and which (absent in older manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    pub server_version: String,
    pub database: String,
    pub tables: Vec<TableEntry>,
    #[serde(default)]
    pub sequences: Vec<SequenceValue>,
    /// The whole schema as pg_dump wrote it in the backup's snapshot (absent in backups
    /// taken before schema capture existed: those restore with `--data-only` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_dump: Option<SchemaDump>,
    /// What this run itself wrote.
    pub totals: RunTotals,
    /// Store requests the whole run made (all slices and the seal).
    #[serde(default)]
    pub store_requests: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// SHA-256 of this document as written with `checksum` absent: any later edit of
    /// the manifest is detected and named by restore and verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

impl Manifest {
    /// The checksum this manifest's content should carry.
    pub fn compute_checksum(&self) -> String {
        let unsealed = Manifest {
            checksum: None,
            ..self.clone()
        };
        let body = serde_json::to_vec_pretty(&unsealed).unwrap_or_default();
        crate::store::sha256_hex(&body)
    }

    /// Sets [`Manifest::checksum`]; done once, just before the manifest is written.
    pub fn seal(mut self) -> Self {
        self.checksum = Some(self.compute_checksum());
        self
    }

    /// Whether the content still matches its checksum (a manifest without one, from a
    /// build that did not write it, passes).
    pub fn is_intact(&self) -> bool {
        self.checksum
            .as_ref()
            .is_none_or(|c| *c == self.compute_checksum())
    }

    /// Rows in the backup (sum of the tables' source row counts).
    pub fn rows(&self) -> u64 {
        self.tables.iter().map(|t| t.fingerprint.rows).sum()
    }

    /// Stored bytes of every chunk this backup needs (its chain included).
    pub fn bytes(&self) -> u64 {
        self.tables
            .iter()
            .flat_map(|t| t.chunks.iter().chain(&t.key_chunks))
            .map(|c| c.bytes)
            .sum()
    }

    /// Every chunk this backup needs.
    pub fn all_chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        self.tables
            .iter()
            .flat_map(|t| t.chunks.iter().chain(&t.key_chunks))
    }

    /// Every object this backup needs: its chunks and its schema objects.
    pub fn referenced_keys(&self) -> impl Iterator<Item = &str> {
        self.all_chunks().map(|c| c.key.as_str()).chain(
            self.schema_dump
                .iter()
                .flat_map(|d| d.objects().map(|o| o.key.as_str())),
        )
    }
}

/// The schema of a backup as `pg_dump` wrote it, in the backup's snapshot: plain SQL,
/// zstd-compressed, split as `pg_restore` orders a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaDump {
    /// The pg_dump that wrote it, e.g. `18.6`.
    pub pg_dump_version: String,
    /// `server_version_num` of the source, e.g. `150018`.
    pub server_version_num: u32,
    /// The object selection given to pg_dump (`-n`, `-e`, `-T` switches); verify dumps the
    /// restored database with the same switches to compare like with like.
    pub selection: Vec<String>,
    /// `--section=pre-data`: types, functions, tables, views, ... (no data).
    pub pre_data: StoredObject,
    /// `--section=post-data`: indexes, constraints, triggers, rules, policies, and the
    /// `REFRESH MATERIALIZED VIEW` of every populated materialized view.
    pub post_data: StoredObject,
    /// `pg_dumpall --globals-only --no-role-passwords`: roles and tablespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub globals: Option<StoredObject>,
    /// Large objects in the database at the snapshot (their contents are not backed up).
    #[serde(default)]
    pub large_objects: u64,
}

impl SchemaDump {
    /// The stored objects of the schema.
    pub fn objects(&self) -> impl Iterator<Item = &StoredObject> {
        [&self.pre_data, &self.post_data]
            .into_iter()
            .chain(self.globals.as_ref())
    }
}

/// One stored object that is not a chunk: its key, sizes and SHA-256 (of the stored bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredObject {
    pub key: String,
    /// Stored (compressed) bytes.
    pub bytes: u64,
    /// Bytes before compression.
    pub raw_bytes: u64,
    pub sha256: String,
}

/// The moment a backup restores to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consistency {
    /// Restoring the backup gives the database exactly as it was at `snapshot`. When
    /// false the backup mixes moments: it is sealed so, warned about, and fails
    /// verification.
    pub consistent: bool,
    /// When that snapshot was taken.
    pub snapshot_at: DateTime<Utc>,
    /// The server's WAL position then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// The slice whose snapshot it is, and the consistency-pass rounds it took (0: the
    /// run finished in one slice).
    pub slice: u32,
    pub pass_rounds: u32,
    /// Why the backup is not one point in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Manifest {
    /// False only for a backup sealed as mixing moments (older manifests say nothing).
    pub fn is_consistent(&self) -> bool {
        self.consistency.as_ref().is_none_or(|c| c.consistent)
    }
}

/// What the run wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunTotals {
    pub chunks: u64,
    pub rows: u64,
    pub bytes: u64,
    pub raw_bytes: u64,
    pub slices: u32,
}

/// One table of a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableEntry {
    pub name: TableName,
    pub mode: TableMode,
    pub schema: TableSchema,
    /// Exported columns, the column order of every rows chunk.
    pub columns: Vec<String>,
    /// Key columns, the column order of every keys chunk.
    #[serde(default)]
    pub key: Vec<String>,
    /// Row count and fingerprint of the source table at the backup's snapshot, computed
    /// by the source: of its rows, or (`fingerprint_of: keys`, `append` tables between
    /// deep checks) of its keys.
    pub fingerprint: Fingerprint,
    #[serde(default, skip_serializing_if = "FingerprintOf::is_rows")]
    pub fingerprint_of: FingerprintOf,
    /// Rows chunks to apply in order; for `changes` tables a later version of a key
    /// replaces an earlier one.
    pub chunks: Vec<ChunkRef>,
    /// The live key set (incremental `changes` tables): keys absent here are deleted.
    #[serde(default)]
    pub key_chunks: Vec<ChunkRef>,
    /// The table has a live key set (`key_chunks`), even if it is empty: every row of an
    /// emptied table is deleted. Without one, the rows chunks need no filtering.
    #[serde(default)]
    pub key_set: bool,
    /// Rows this run exported for the table.
    #[serde(default)]
    pub exported_rows: u64,
    /// In an incremental: why this table was exported whole, starting a new chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_chain: Option<String>,
}

impl TableEntry {
    /// Whether rows must be filtered by the live key set (older manifests said so by
    /// having key chunks).
    pub fn has_key_set(&self) -> bool {
        self.key_set || !self.key_chunks.is_empty()
    }
}

/// A table's definition, enough to recreate it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TableSchema {
    /// `table` or `partitioned`.
    pub kind: String,
    pub columns: Vec<ColumnDef>,
    #[serde(default)]
    pub primary_key: Vec<String>,
    /// Indexes and the constraints they back, as `pg_get_indexdef` / `pg_get_constraintdef`.
    #[serde(default)]
    pub indexes: Vec<IndexDef>,
    /// CHECK constraints.
    #[serde(default)]
    pub checks: Vec<ConstraintDef>,
    /// FOREIGN KEY constraints (restored after every table is loaded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign_keys: Vec<ConstraintDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionDef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    /// `format_type` text, e.g. `character varying(200)`.
    pub type_name: String,
    pub not_null: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Expression of a `GENERATED ALWAYS AS (...) STORED` column (not exported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated: Option<String>,
    /// `always` or `by default` for identity columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexDef {
    pub name: String,
    /// `CREATE [UNIQUE] INDEX ...`.
    pub definition: String,
    /// If the index backs a constraint: its name and `pg_get_constraintdef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<ConstraintDef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConstraintDef {
    pub name: String,
    pub definition: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionDef {
    pub name: TableName,
    pub parent: TableName,
    /// `FOR VALUES ...` or `DEFAULT`.
    pub bound: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
}

/// A sequence's state at the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceValue {
    pub name: TableName,
    pub data_type: String,
    pub start_value: i64,
    pub increment_by: i64,
    pub min_value: i64,
    pub max_value: i64,
    pub cycle: bool,
    /// `setval(name, last_value, is_called)` restores it.
    pub last_value: i64,
    pub is_called: bool,
    /// `table.column` the sequence belongs to (serial or identity), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned_by: Option<(TableName, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest as the first format version wrote it, with only required fields: newer
    /// builds must keep reading it.
    const V1_MINIMAL: &str = r#"{
      "version": 1, "id": "20261122T120000Z-0a1b2c", "kind": "full",
      "started_at": "2026-11-22T12:00:00Z", "created_at": "2026-11-22T12:00:05Z",
      "snapshot": {"xmin": 750, "xmax": 752, "xip": [750]},
      "server_version": "15.18", "database": "app",
      "tables": [{
        "name": {"schema": "public", "name": "articles"}, "mode": "append",
        "schema": {"kind": "table", "columns": [
          {"name": "id", "type_name": "bigint", "not_null": true}]},
        "columns": ["id"],
        "fingerprint": {"rows": 1, "sum": "00000000000000ff"},
        "chunks": [{"key": "chunks/20261122T120000Z-0a1b2c/public.articles/000001.copy.zst",
                    "kind": "rows", "run_id": "20261122T120000Z-0a1b2c", "rows": 1,
                    "bytes": 20, "raw_bytes": 2, "sha256": "ab"}]
      }],
      "totals": {"chunks": 1, "rows": 1, "bytes": 20, "raw_bytes": 2, "slices": 1},
      "some_future_field": {"ignored": true}
    }"#;

    #[test]
    fn a_minimal_v1_manifest_still_reads() {
        let m: Manifest = super::super::parse_doc("manifests/x.json", V1_MINIMAL.as_bytes())
            .expect("v1 manifest parses");
        assert_eq!(m.tables[0].fingerprint.sum, 0xff);
        assert!(m.parent.is_none() && m.sequences.is_empty() && m.tables[0].key_chunks.is_empty());
        assert_eq!((m.rows(), m.bytes()), (1, 20));
        assert!(m.is_intact(), "no checksum: nothing to check");
    }

    #[test]
    fn an_edit_breaks_the_checksum() {
        let m: Manifest =
            super::super::parse_doc("manifests/x.json", V1_MINIMAL.as_bytes()).expect("parses");
        let sealed = m.seal();
        assert!(sealed.is_intact());
        let text = serde_json::to_string_pretty(&sealed).expect("json");
        let back: Manifest = serde_json::from_str(&text).expect("parses");
        assert!(
            back.is_intact(),
            "a written and re-read manifest stays intact"
        );
        let edited: Manifest =
            serde_json::from_str(&text.replacen("\"rows\": 1", "\"rows\": 2", 1)).expect("parses");
        assert!(!edited.is_intact());
    }
}
