//! `runs/prune/journal.json`: what a prune in flight is deleting, so that the next prune
//! finishes what a killed one started.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneJournal {
    pub version: u32,
    /// Keys still to delete, manifests first.
    pub delete: Vec<String>,
}
