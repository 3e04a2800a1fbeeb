//! Stored formats: the JSON documents Tidemark keeps in the store, apart from the
//! operations on them.
//!
//! | document                      | type                               |
//! |-------------------------------|------------------------------------|
//! | the lease                     | [`lease::Lease`]                   |
//! | the checkpoint                | [`checkpoint::Checkpoint`]         |
//! | a run in flight               | [`progress::RunProgress`]          |
//! | a fanned-out run's work item  | [`item::WorkItem`]                 |
//! | a sealed backup               | [`manifest::Manifest`]             |
//! | a verification, one in flight | [`verification::Verification`], [`verification::VerifyState`] |
//! | a prune in flight             | [`journal::PruneJournal`]          |
//! | the last failure              | [`failure::FailureRecord`]         |
//!
//! Where each lives in the store is [`crate::repo`]'s to say.
//!
//! Every document has a `version`; readers accept every version up to
//! [`FORMAT_VERSION`], ignore fields they do not know, and refuse newer versions with an
//! error that says so.

pub mod checkpoint;
pub mod failure;
pub mod item;
pub mod journal;
pub mod lease;
pub mod manifest;
pub mod progress;
pub mod verification;

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Classified, ErrorKind};
use crate::store::{ETag, PutReceipt, ReadStore, StoreError, WriteCondition, WriteStore};

/// The newest document format this build writes and reads.
/// Version 2: manifests carry the schema as pg_dump wrote it (`schema_dump`); a build that
/// reads only version 1 would restore and prune without knowing those objects.
pub const FORMAT_VERSION: u32 = 2;

/// Errors reading or writing a stored document.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{key} is not a valid document: {reason}")]
    Invalid { key: String, reason: String },
    #[error("{key} has format version {found}; this tidemark reads up to {FORMAT_VERSION} (upgrade tidemark)")]
    TooNew { key: String, found: u32 },
}

impl Classified for FormatError {
    fn kind(&self) -> ErrorKind {
        match self {
            FormatError::Store(e) => e.kind(),
            FormatError::Invalid { .. } => ErrorKind::Corrupt,
            FormatError::TooNew { .. } => ErrorKind::Fatal,
        }
    }
}

#[derive(Deserialize)]
struct VersionProbe {
    version: u32,
}

/// Parses a stored document, checking its format version first.
///
/// # Errors
/// [`FormatError::Invalid`] or [`FormatError::TooNew`].
pub fn parse_doc<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, FormatError> {
    let invalid = |e: serde_json::Error| FormatError::Invalid {
        key: key.to_owned(),
        reason: e.to_string(),
    };
    let probe: VersionProbe = serde_json::from_slice(bytes).map_err(invalid)?;
    if probe.version > FORMAT_VERSION {
        return Err(FormatError::TooNew {
            key: key.to_owned(),
            found: probe.version,
        });
    }
    serde_json::from_slice(bytes).map_err(invalid)
}

/// Reads and parses a document, with its entity tag; `None` if absent.
///
/// # Errors
/// Store errors and parse errors, naming the key.
pub async fn read_doc<T: DeserializeOwned>(
    store: &dyn ReadStore,
    key: &str,
) -> Result<Option<(T, ETag)>, FormatError> {
    match store.read(key).await? {
        None => Ok(None),
        Some(object) => Ok(Some((parse_doc(key, &object.bytes)?, object.etag))),
    }
}

/// Serialises and writes a document under `condition`.
///
/// # Errors
/// Store errors, e.g. [`StoreError::PreconditionFailed`].
pub async fn write_doc<T: Serialize>(
    store: &dyn WriteStore,
    key: &str,
    doc: &T,
    condition: WriteCondition,
) -> Result<PutReceipt, FormatError> {
    let body = serde_json::to_vec_pretty(doc).map_err(|e| FormatError::Invalid {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(store.put(key, Bytes::from(body), condition).await?)
}

/// A table's schema-qualified name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// `"schema"."name"`, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// The table's own rows as a SQL relation: `ONLY "schema"."name"` for an ordinary
    /// table, so that an inheritance parent never reads (or truncates) its children's
    /// rows; a partitioned table as is, since its rows are its partitions' (which `ONLY`
    /// would hide, and `TRUNCATE ONLY` refuses).
    pub fn own_rows(&self, partitioned: bool) -> String {
        if partitioned {
            self.quoted()
        } else {
            format!("ONLY {}", self.quoted())
        }
    }

    /// `schema.name` as one object-key segment: bytes outside `[A-Za-z0-9_-]` are
    /// percent-encoded (so a `.` or `/` inside a name cannot be confused with structure).
    pub fn key_segment(&self) -> String {
        format!(
            "{}.{}",
            encode_segment(&self.schema),
            encode_segment(&self.name)
        )
    }
}

/// Shown as `schema.name`, quoting a part only where it needs quotes.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |s: &str| {
            let plain = s
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if plain {
                s.to_owned()
            } else {
                quote_ident(s)
            }
        };
        write!(f, "{}.{}", part(&self.schema), part(&self.name))
    }
}

fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Quotes an SQL identifier: `"` + name with `"` doubled + `"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"a", "b"`: quoted column names for a column list.
pub fn column_list(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Quotes an SQL string literal (standard_conforming_strings is pinned on).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// What a recorded fingerprint is of: every exported column of every row, or (for
/// `append` tables between deep checks) only the key of every row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FingerprintOf {
    #[default]
    Rows,
    Keys,
}

impl FingerprintOf {
    pub fn is_rows(&self) -> bool {
        *self == FingerprintOf::Rows
    }
}

/// How a table is exported, run after run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableMode {
    /// Rows inserted or updated since the parent, plus the live key set.
    Changes,
    /// Rows whose monotonically assigned key is past the cursor (insert-only tables).
    Append,
    /// The whole table every run.
    Snapshot,
}

impl TableMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TableMode::Changes => "changes",
            TableMode::Append => "append",
            TableMode::Snapshot => "snapshot",
        }
    }
}

impl fmt::Display for TableMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TableMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "changes" => Ok(TableMode::Changes),
            "append" => Ok(TableMode::Append),
            "snapshot" => Ok(TableMode::Snapshot),
            other => Err(format!(
                "unknown table mode {other:?} (use changes, append or snapshot)"
            )),
        }
    }
}

/// Full (a new chain) or incremental (changes since the parent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Full,
    Incremental,
}

impl fmt::Display for BackupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
        })
    }
}

/// A PostgreSQL snapshot as `pg_current_snapshot()` shows it (64-bit transaction ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgSnapshot {
    /// Oldest transaction still running: everything older is committed or aborted.
    pub xmin: u64,
    /// First transaction id not yet assigned.
    pub xmax: u64,
    /// Transactions running at the snapshot.
    pub xip: Vec<u64>,
}

impl FromStr for PgSnapshot {
    type Err = String;

    /// Parses `xmin:xmax:xip,xip`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("not a snapshot: {s:?}");
        let mut parts = s.split(':');
        let xmin = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let xmax = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let xip = match parts.next() {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse().map_err(|_| bad()))
                .collect::<Result<_, _>>()?,
        };
        Ok(Self { xmin, xmax, xip })
    }
}

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkKind {
    /// Table rows (the exported columns).
    Rows,
    /// The key columns of every live row (the live key set of a `changes` table).
    Keys,
}

/// The key range `(after, upto]` a chunk covers; `None` bounds are open. Values are the
/// key columns' text forms.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upto: Option<Vec<String>>,
}

/// One chunk object: `zstd(COPY text)` of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub key: String,
    pub kind: ChunkKind,
    /// The run that wrote it.
    pub run_id: String,
    pub rows: u64,
    /// Stored (compressed) size.
    pub bytes: u64,
    /// Size of the COPY text before compression.
    pub raw_bytes: u64,
    /// SHA-256 of the stored object, lowercase hex.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<KeyRange>,
    /// Key-set chunks: SHA-256 of the COPY text before compression, so that a later run
    /// whose live key set is the same text refers to this chunk instead of writing it
    /// again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_sha256: Option<String>,
    /// Rows written while the run read its table the first time (not by a consistency
    /// pass): the first-read chunks of one run cover disjoint key ranges, so no key is in
    /// two of them, and a restore copies them straight into the table. (`false` in
    /// manifests written before this was recorded.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub first_read: bool,
}

/// Row count and order-independent content fingerprint of a set of rows: the wrapping
/// 64-bit sum of XXH3-64 of each row's COPY text line (with its newline), under the
/// pinned session settings. Equal sets of rows give equal fingerprints on any server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fingerprint {
    pub rows: u64,
    #[serde(with = "hex_u64")]
    pub sum: u64,
}

impl Fingerprint {
    /// Adds one COPY text line (including its trailing newline).
    pub fn add_line(&mut self, line: &[u8]) {
        self.rows += 1;
        self.sum = self.sum.wrapping_add(xxhash_rust::xxh3::xxh3_64(line));
    }

    /// Adds an integer key, as the COPY line `SELECT key` would give.
    pub fn add_key(&mut self, key: i64) {
        use std::io::Write;
        let mut line = [0u8; 24];
        let mut cursor = std::io::Cursor::new(&mut line[..]);
        let _ = writeln!(cursor, "{key}");
        let len = cursor.position() as usize;
        self.add_line(&line[..len]);
    }

    /// The fingerprint of the union of two disjoint row sets.
    pub fn combine(self, other: Fingerprint) -> Fingerprint {
        Fingerprint {
            rows: self.rows + other.rows,
            sum: self.sum.wrapping_add(other.sum),
        }
    }
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_keys_fingerprint_like_their_copy_lines() {
        let mut by_key = Fingerprint::default();
        let mut by_line = Fingerprint::default();
        for k in [i64::MIN, -1, 0, 7, i64::MAX] {
            by_key.add_key(k);
            by_line.add_line(format!("{k}\n").as_bytes());
        }
        assert_eq!(by_key, by_line);
    }

    #[test]
    fn names_quote_and_encode() {
        let t = TableName::new("Sales Data", "order.lines/\"x\"");
        assert_eq!(t.quoted(), "\"Sales Data\".\"order.lines/\"\"x\"\"\"");
        assert_eq!(t.own_rows(false), format!("ONLY {}", t.quoted()));
        assert_eq!(t.own_rows(true), t.quoted());
        assert_eq!(t.key_segment(), "Sales%20Data.order%2Elines%2F%22x%22");
        assert_eq!(
            TableName::new("public", "articles").to_string(),
            "public.articles"
        );
        assert_eq!(
            TableName::new("public", "Mixed").to_string(),
            "public.\"Mixed\""
        );
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn snapshots_parse() {
        let s: PgSnapshot = "100:105:100,102".parse().expect("parses");
        assert_eq!(
            s,
            PgSnapshot {
                xmin: 100,
                xmax: 105,
                xip: vec![100, 102]
            }
        );
        let empty: PgSnapshot = "7:7:".parse().expect("parses");
        assert!(empty.xip.is_empty());
        assert!("x:1:".parse::<PgSnapshot>().is_err());
    }

    #[test]
    fn fingerprints_ignore_order() {
        let lines: [&[u8]; 3] = [b"1\ta\n", b"2\tb\n", b"3\t\\N\n"];
        let mut forward = Fingerprint::default();
        let mut backward = Fingerprint::default();
        for l in lines {
            forward.add_line(l);
        }
        for l in lines.iter().rev() {
            backward.add_line(l);
        }
        assert_eq!(forward, backward);
        let mut other = Fingerprint::default();
        other.add_line(b"1\tA\n");
        assert_ne!(forward.combine(other), forward);
        let json = serde_json::to_string(&forward).expect("json");
        assert_eq!(
            serde_json::from_str::<Fingerprint>(&json).expect("back"),
            forward
        );
    }

    #[test]
    fn newer_versions_are_refused_by_name() {
        let err = parse_doc::<serde_json::Value>("manifests/x.json", br#"{"version": 99}"#)
            .expect_err("too new");
        assert!(err.to_string().contains("manifests/x.json") && err.to_string().contains("99"));
    }
}
