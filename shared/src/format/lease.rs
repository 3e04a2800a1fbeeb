//! `lock`: the lease that makes runs exclusive.
//!
//! Taken with a create-if-absent write, renewed and released with If-Match on the tag the
//! holder last wrote, and free for anyone to take over (again with If-Match) once
//! `expires_at` has passed, so a holder that died never blocks the next run for long.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The lease document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub version: u32,
    /// The run (or prune) holding the lease.
    pub run_id: String,
    /// What holds it: `backup` or `prune`.
    pub operation: String,
    /// Who holds it: host and process, or the Lambda request id.
    pub holder: String,
    pub acquired_at: DateTime<Utc>,
    pub renewed_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}
