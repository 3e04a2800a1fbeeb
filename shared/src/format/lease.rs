//! `lock`: the lease that makes runs exclusive.
//!
//! Taken with a create-if-absent write, renewed and released with If-Match on the tag the
//! holder last wrote, and free for anyone to take over (again with If-Match) once
//! `expires_at` has passed, so a holder that died never blocks the next run for long.
//! A holder on this machine whose process is gone is dead at once (see
//! [`HolderProcess`]), so a resumed run after a crash does not wait out the lease.

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
    /// The holder's process, where it can be told (Linux), so a taker on the same
    /// machine can see that it is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<HolderProcess>,
}

/// A process, told apart from any other the same machine ever ran: host name, kernel
/// boot, PID namespace (containers), PID and the process's start time since boot (PIDs
/// are reused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderProcess {
    pub host: String,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// The PID namespace, e.g. `pid:[4026531836]`.
    pub pid_namespace: String,
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks from boot to the process's start.
    pub start_ticks: u64,
}
