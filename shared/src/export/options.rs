//! How a slice runs ([`ExportOptions`]) and what it reports ([`SliceReport`], [`ExportMeter`]).

use crate::catalog::TableSelection;
use crate::format::BackupKind;
use crate::lease;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a slice runs.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Continue this run; `None` continues the run in flight or starts a new one.
    pub run_id: Option<String>,
    /// Start a new chain (only for a new run).
    pub full: bool,
    pub selection: TableSelection,
    /// Most rows in one chunk.
    pub chunk_rows: u64,
    /// Target size of one chunk's COPY text, before compression.
    pub chunk_bytes: u64,
    pub zstd_level: i32,
    /// How long an `append` gap is probed for late commits.
    pub gap_ttl: Duration,
    /// Database connections exporting at once.
    pub workers: usize,
    /// Start no new range after this instant (the caller leaves its own safety margin).
    pub deadline: Option<Instant>,
    /// Who holds the lease (host:pid, Lambda request id).
    pub holder: String,
    pub lease_ttl: Duration,
    /// Least time between two progress writes. The default, 0, records a range as it
    /// finishes whenever writing the progress costs little next to the work it saves (see
    /// `flush_if_due`), so a killed slice loses only the ranges it had in flight.
    pub progress_interval: Duration,
    /// Live counters for a progress display.
    pub meter: Option<Arc<ExportMeter>>,
    /// The pg_dump that captures the schema (`None`: the one on `PATH`).
    pub pg_dump: Option<std::path::PathBuf>,
    /// Consistency-pass rounds a run spanning slices tries before it is sealed as not one
    /// point in time.
    pub max_pass_rounds: u32,
    /// Fingerprint `append` tables whole in this run (a deep check): updates to their rows,
    /// which `append` mode does not export, show up in verification.
    pub deep: bool,
    /// A deep check every this many backups of a chain (0: only when `deep`).
    pub deep_every: u32,
    /// A consistency-pass round must finish within one slice to count, so it may run past
    /// `deadline` up to this instant (the invocation's hard limit, less what finishing the
    /// slice needs); `None`: no limit.
    pub pass_deadline: Option<Instant>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            run_id: None,
            full: false,
            selection: TableSelection::default(),
            chunk_rows: 1_000_000,
            chunk_bytes: 64 * 1024 * 1024,
            zstd_level: 1,
            gap_ttl: Duration::from_secs(3600),
            workers: crate::config::DEFAULT_WORKERS,
            deadline: None,
            holder: lease::default_holder(),
            lease_ttl: lease::DEFAULT_TTL,
            progress_interval: Duration::ZERO,
            meter: None,
            pg_dump: None,
            max_pass_rounds: 3,
            pass_deadline: None,
            deep: false,
            deep_every: 0,
        }
    }
}

/// Live counters of a slice, for progress bars.
#[derive(Debug, Default)]
pub struct ExportMeter {
    pub tables_total: AtomicUsize,
    pub tables_done: AtomicUsize,
    pub rows: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub bytes: AtomicU64,
    pub chunks: AtomicU64,
}

/// What a slice did: the JSON the export Lambda returns.
#[derive(Debug, Clone, Serialize)]
pub struct SliceReport {
    pub run_id: String,
    /// All tables exported: the run is ready to seal.
    pub done: bool,
    pub kind: BackupKind,
    pub parent: Option<String>,
    /// The backup is already sealed (this slice did nothing).
    pub sealed: bool,
    pub slice: u32,
    pub tables: usize,
    pub tables_done: usize,
    /// The consistency pass's round, once it has started.
    pub pass_round: Option<u32>,
    /// Once the run is ready to seal: whether it is one point in time.
    pub consistent: Option<bool>,
    pub chunks: u64,
    pub rows: u64,
    pub bytes: u64,
    pub raw_bytes: u64,
    pub store_requests: u64,
    pub seconds: f64,
}
