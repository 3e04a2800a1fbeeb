//! `state/last-failure.json`: the last backup run that failed, as the state machine's
//! failure step recorded it. Overwritten by each failure; a failure older than the newest
//! backup is history, a newer one means the schedule is not producing backups.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The failure document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub version: u32,
    /// The run that failed, if it had started (a first slice that failed has none).
    #[serde(default)]
    pub run_id: Option<String>,
    /// Who ran it: the Step Functions execution ARN, or a host.
    #[serde(default)]
    pub execution: Option<String>,
    /// The error name (`Tidemark.Fatal`, `States.Timeout`, ...).
    pub error: String,
    /// What the failing step said, shortened to a few KiB.
    pub cause: String,
    pub failed_at: DateTime<Utc>,
    /// Whether this failure released the run's lease.
    pub lease_released: bool,
}
