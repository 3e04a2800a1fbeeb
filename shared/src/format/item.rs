//! `runs/{run_id}/items/...`: one work item of a run whose export is fanned out over many
//! workers, and `runs/{run_id}/slices/...`: the snapshot each worker read in.
//!
//! A worker claims an item by creating its document (create-if-absent) or by replacing a
//! released or expired claim (If-Match), records what it exported in it as it goes, and
//! releases it unfinished at its deadline; the run's coordinator folds finished items
//! into the progress document. Each item has its own document, so workers never contend
//! on one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::checkpoint::GapRange;
use super::progress::{Lane, SliceSnapshot};
use super::{ChunkRef, Fingerprint, TableName};

/// Which part of a table an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ItemPart {
    /// One lane (disjoint key range) of a keyed table.
    Lane { lane: usize },
    /// A keyless table, exported whole by one worker.
    Whole,
    /// Probing an `append` table's earlier gaps for late commits.
    Probe,
}

impl ItemPart {
    /// The part's name in its document's key.
    pub fn segment(self) -> String {
        match self {
            ItemPart::Lane { lane } => format!("lane-{lane:04}"),
            ItemPart::Whole => "whole".to_owned(),
            ItemPart::Probe => "probe".to_owned(),
        }
    }
}

/// Who is working on an item, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemHolder {
    /// The worker (invocation) holding it.
    pub worker: String,
    /// The worker's slice number (the snapshot it reads in).
    pub slice: u32,
    /// The claim lapses then unless renewed: another worker may take the item over.
    pub expires_at: DateTime<Utc>,
}

/// One work item's document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkItem {
    pub version: u32,
    pub run_id: String,
    pub table: TableName,
    /// The table's item generation when the item was made (a table the coordinator
    /// starts again gets new items).
    pub generation: u32,
    pub part: ItemPart,
    /// `None`: nobody holds it (new, released at a deadline, or done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<ItemHolder>,
    /// A lane's state: how far it is exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<Lane>,
    /// What was exported of the item so far, recorded by its holders.
    #[serde(default)]
    pub chunks: Vec<ChunkRef>,
    #[serde(default)]
    pub key_chunks: Vec<ChunkRef>,
    #[serde(default)]
    pub keys_of_rows: bool,
    #[serde(default)]
    pub fingerprint: Fingerprint,
    #[serde(default)]
    pub key_fingerprint: Fingerprint,
    #[serde(default)]
    pub gaps: Vec<GapRange>,
    /// The slices whose snapshots the recorded data is of.
    #[serde(default)]
    pub slices: Vec<u32>,
    pub done: bool,
    pub updated_at: DateTime<Utc>,
}

/// `runs/{run}/slices/{slice}.json`: the snapshot a worker of a fanned-out run read in,
/// created if absent so that each worker's slice number is its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSlice {
    pub version: u32,
    pub run_id: String,
    pub worker: String,
    pub snapshot: SliceSnapshot,
}
