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
    /// SHA-256 of the stored bytes of this document, with this checksum's 64 hex digits
    /// written as zeros: any later edit of the stored manifest is detected and named by
    /// restore and verify, and a newer build's fields or order change nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// The key that opens the checksum's value in a stored manifest.
const CHECKSUM_FIELD: &[u8] = b"\"checksum\": \"";
const SUM_LEN: usize = 64;

/// Where the checksum's 64 hex digits are in stored manifest bytes (the field is the
/// document's last, so the last occurrence).
fn checksum_position(bytes: &[u8]) -> Option<usize> {
    let at = bytes
        .windows(CHECKSUM_FIELD.len())
        .rposition(|w| w == CHECKSUM_FIELD)?
        + CHECKSUM_FIELD.len();
    let digits = bytes.get(at..at + SUM_LEN)?;
    (digits.iter().all(u8::is_ascii_hexdigit) && bytes.get(at + SUM_LEN) == Some(&b'"'))
        .then_some(at)
}

impl Manifest {
    /// The bytes to store: pretty JSON whose `checksum` is the SHA-256 of these very
    /// bytes with the checksum's digits as zeros.
    pub fn to_sealed_bytes(&self) -> Vec<u8> {
        let placeholder = Manifest {
            checksum: Some("0".repeat(SUM_LEN)),
            ..self.clone()
        };
        let mut bytes = serde_json::to_vec_pretty(&placeholder).unwrap_or_default();
        let sum = crate::store::sha256_hex(&bytes);
        if let Some(at) = checksum_position(&bytes) {
            bytes[at..at + SUM_LEN].copy_from_slice(sum.as_bytes());
        }
        bytes
    }

    /// Whether stored `bytes` (which parsed as `self`) are as sealed. Format version 2
    /// manifests must carry a checksum of their stored bytes; a version 1 manifest
    /// without one (from a build that did not write one) passes, and one with a checksum
    /// of its re-serialisation is checked that way.
    pub fn is_intact(&self, bytes: &[u8]) -> bool {
        let Some(at) = checksum_position(bytes) else {
            return self.version < 2 && self.checksum.is_none();
        };
        let mut zeroed = bytes.to_vec();
        zeroed[at..at + SUM_LEN].fill(b'0');
        if crate::store::sha256_hex(&zeroed).as_bytes() == &bytes[at..at + SUM_LEN] {
            return true;
        }
        self.version < 2 && self.checksum.as_deref() == Some(self.checksum_v1().as_str())
    }

    /// Format version 1's checksum: of the re-serialised document without it.
    fn checksum_v1(&self) -> String {
        let unsealed = Manifest {
            checksum: None,
            ..self.clone()
        };
        let body = serde_json::to_vec_pretty(&unsealed).unwrap_or_default();
        crate::store::sha256_hex(&body)
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

/// Writes a manifest as sealed bytes (see [`Manifest::to_sealed_bytes`]).
///
/// # Errors
/// Store errors, e.g. [`crate::store::StoreError::PreconditionFailed`].
pub async fn write_manifest(
    store: &dyn crate::store::WriteStore,
    manifest: &Manifest,
    condition: crate::store::WriteCondition,
) -> Result<crate::store::PutReceipt, super::FormatError> {
    Ok(store
        .put(
            &crate::repo::manifest_key(&manifest.id),
            bytes::Bytes::from(manifest.to_sealed_bytes()),
            condition,
        )
        .await?)
}

/// Reads a manifest and checks that its stored bytes are as sealed; `None` if absent.
///
/// # Errors
/// Store and parse errors; [`super::FormatError::Invalid`] naming the key when the
/// bytes were modified after sealing.
pub async fn read_manifest(
    store: &dyn crate::store::ReadStore,
    backup_id: &str,
) -> Result<Option<Manifest>, super::FormatError> {
    let key = crate::repo::manifest_key(backup_id);
    let Some(object) = store.read(&key).await? else {
        return Ok(None);
    };
    let manifest: Manifest = super::parse_doc(&key, &object.bytes)?;
    if !manifest.is_intact(&object.bytes) {
        return Err(super::FormatError::Invalid {
            key,
            reason: "modified after it was sealed (checksum mismatch)".into(),
        });
    }
    Ok(Some(manifest))
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
    /// Large objects in the database at the snapshot.
    #[serde(default)]
    pub large_objects: u64,
    /// The large objects, as `pg_dump --data-only -b --exclude-table-data='*.*'` writes them
    /// in the backup's snapshot: each object's contents, owner, comment and privileges.
    /// None when the database has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub large_objects_script: Option<StoredObject>,
    /// Count and fingerprint of the large objects (oid, MD5 of the contents, comment),
    /// computed by the source in the backup's snapshot; verify compares the restore's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub large_objects_fingerprint: Option<super::Fingerprint>,
    /// The same with each object's owner and grants: when the next backup finds the same,
    /// it keeps this backup's `large_objects_script` instead of dumping them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub large_objects_state: Option<super::Fingerprint>,
}

impl SchemaDump {
    /// The stored objects of the schema.
    pub fn objects(&self) -> impl Iterator<Item = &StoredObject> {
        [&self.pre_data, &self.post_data]
            .into_iter()
            .chain(self.globals.as_ref())
            .chain(self.large_objects_script.as_ref())
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
    /// Schema scripts: SHA-256 of the script's text without pg_dump's per-run `\restrict`
    /// key. The next backup whose script has the same keeps this object instead of storing
    /// its own copy (so the object may lie under an earlier backup's prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_sha256: Option<String>,
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
    /// Stored bytes of the chunks the table restores from (rows and key sets).
    pub fn stored_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .chain(&self.key_chunks)
            .map(|c| c.bytes)
            .sum()
    }

    /// Chunks the table restores from (rows and key sets).
    pub fn chunk_count(&self) -> u64 {
        (self.chunks.len() + self.key_chunks.len()) as u64
    }

    /// The table's own rows in SQL (see [`TableName::own_rows`]).
    pub fn own_rows(&self) -> String {
        self.name.own_rows(self.schema.is_partitioned())
    }

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

impl TableSchema {
    /// A declaratively partitioned table (its rows live in its partitions).
    pub fn is_partitioned(&self) -> bool {
        self.kind == "partitioned"
    }
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
        assert!(
            m.is_intact(V1_MINIMAL.as_bytes()),
            "no checksum: nothing to check"
        );
    }

    /// A manifest sealed by this build (format version 2), kept as it was stored: every
    /// later build must read it and find it intact.
    const V2_SEALED: &str = include_str!("fixtures/manifest-v2.json");

    #[test]
    fn a_sealed_v2_manifest_stays_readable_and_intact() {
        let m: Manifest = super::super::parse_doc("manifests/x.json", V2_SEALED.as_bytes())
            .expect("the v2 fixture parses");
        assert!(m.is_intact(V2_SEALED.as_bytes()));
        assert_eq!(m.tables.len(), 1);
        // Any edit of the stored bytes is caught, even one a re-serialisation would hide.
        let reordered = V2_SEALED.replacen("\"version\": 2,", "\"version\":  2,", 1);
        assert_ne!(reordered, V2_SEALED);
        assert!(!m.is_intact(reordered.as_bytes()));
        let edited = V2_SEALED.replacen("\"rows\": 3", "\"rows\": 4", 1);
        let e: Manifest =
            super::super::parse_doc("manifests/x.json", edited.as_bytes()).expect("parses");
        assert!(!e.is_intact(edited.as_bytes()));
        // Removing the checksum of a version 2 manifest does not make it pass.
        let stripped: serde_json::Value = serde_json::from_str(V2_SEALED).expect("json");
        let mut stripped = stripped;
        stripped.as_object_mut().expect("object").remove("checksum");
        let stripped = serde_json::to_vec_pretty(&stripped).expect("json");
        let s: Manifest = super::super::parse_doc("manifests/x.json", &stripped).expect("parses");
        assert_eq!(s.version, 2);
        assert!(!s.is_intact(&stripped));
    }

    #[test]
    fn sealing_covers_the_stored_bytes_and_tolerates_unknown_fields() {
        let m: Manifest =
            super::super::parse_doc("manifests/x.json", V1_MINIMAL.as_bytes()).expect("parses");
        let bytes = m.to_sealed_bytes();
        let back: Manifest =
            super::super::parse_doc("manifests/x.json", &bytes).expect("parses back");
        assert!(back.is_intact(&bytes));
        // A newer writer's field, inside the checksummed bytes, changes nothing for us.
        let text = String::from_utf8(bytes).expect("utf8");
        let unsealed = text.replacen("{", "{\n  \"from_the_future\": [1, 2],", 1);
        let placeholder = {
            let at = checksum_position(unsealed.as_bytes()).expect("checksum");
            let mut b = unsealed.clone().into_bytes();
            b[at..at + SUM_LEN].fill(b'0');
            let sum = crate::store::sha256_hex(&b);
            b[at..at + SUM_LEN].copy_from_slice(sum.as_bytes());
            b
        };
        let future: Manifest =
            super::super::parse_doc("manifests/x.json", &placeholder).expect("parses");
        assert!(future.is_intact(&placeholder));
    }

    #[test]
    fn a_format_1_checksum_is_still_checked() {
        let mut m: Manifest =
            super::super::parse_doc("manifests/x.json", V1_MINIMAL.as_bytes()).expect("parses");
        m.checksum = Some(m.checksum_v1());
        let stored = serde_json::to_vec_pretty(&m).expect("json");
        assert!(m.is_intact(&stored));
        let mut edited = m.clone();
        edited.totals.rows = 9;
        let stored = serde_json::to_vec_pretty(&edited).expect("json");
        assert!(!edited.is_intact(&stored));
    }
}
