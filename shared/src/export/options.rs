//! How a slice runs ([`ExportOptions`]) and what it reports ([`SliceReport`], [`ExportMeter`]).

use crate::catalog::TableSelection;
use crate::config::{parse_concurrency, parse_seconds, parse_size, parse_workers, DEFAULT_WORKERS};
use crate::format::BackupKind;
use crate::lease;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The export settings a user gives, declared once: each field's flag, environment
/// variable and default are here. The CLI flattens this struct into `backup` and
/// `export`; the export function reads the same struct from its environment
/// ([`crate::config::from_env`]).
#[derive(Debug, Clone, clap::Args)]
pub struct ExportSettings {
    /// Which tables, and how.
    #[command(flatten)]
    pub selection: TableSelection,
    /// Most rows in one chunk.
    #[arg(long, env = "TIDEMARK_CHUNK_ROWS", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk_rows: u64,
    /// Target size of one chunk before compression (e.g. 64MiB).
    #[arg(long, env = "TIDEMARK_CHUNK_BYTES", default_value = "64MiB", value_parser = parse_size)]
    pub chunk_bytes: u64,
    /// Database connections exporting at once.
    #[arg(long, env = "TIDEMARK_WORKERS", default_value_t = DEFAULT_WORKERS, value_parser = parse_workers)]
    pub workers: usize,
    /// Seconds an `append` table's empty key ranges are probed again for late commits.
    #[arg(
        long = "gap-ttl",
        env = "TIDEMARK_GAP_TTL_SECS",
        default_value = "3600",
        value_name = "SECONDS",
        value_parser = parse_seconds
    )]
    pub gap_ttl: Duration,
    /// Fingerprint `append` tables whole in this backup (a deep check: updates to their rows,
    /// which append mode does not export, then fail verification).
    #[arg(long)]
    pub deep: bool,
    /// A deep check every N backups of a chain (0: never, unless --deep).
    #[arg(
        long,
        env = "TIDEMARK_DEEP_EVERY",
        default_value_t = 0,
        value_name = "N"
    )]
    pub deep_every: u32,
    /// Consistency-pass rounds a run spanning slices tries before it is sealed as not one
    /// point in time.
    #[arg(long = "pass-rounds", env = "TIDEMARK_PASS_ROUNDS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_pass_rounds: u32,
    /// Workers that export at once, each in its own invocation (a Step Functions Map) or,
    /// from the CLI, its own slice with its own connections: above 1 the run's ranges are
    /// work items in the store that the workers claim, and a consistency pass brings
    /// their snapshots to one.
    #[arg(long, env = "TIDEMARK_CONCURRENCY", default_value_t = 1, value_parser = parse_concurrency)]
    pub concurrency: usize,
    /// zstd level (1 fastest .. 19 smallest); 1 keeps pace with COPY on small machines.
    #[arg(long, env = "TIDEMARK_ZSTD_LEVEL", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd_level: i32,
}

impl Default for ExportSettings {
    /// The defaults the attributes above declare.
    fn default() -> Self {
        crate::config::defaults()
    }
}

impl ExportSettings {
    /// Most key ranges (lanes) one big table is split into: one per connection of every
    /// worker that may export at once, so that a run fanned out over `concurrency` workers
    /// keeps them all busy even when one table holds most of the data.
    pub fn lanes(&self) -> usize {
        self.workers.max(1) * self.concurrency.max(1)
    }
}

/// How a slice runs.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Continue this run; `None` continues the run in flight or starts a new one.
    pub run_id: Option<String>,
    /// Start a new chain (only for a new run).
    pub full: bool,
    /// What the user chose: tables, chunk sizes, workers, checks.
    pub settings: ExportSettings,
    /// Start no new range after this instant (the caller leaves its own safety margin).
    pub deadline: Option<Instant>,
    /// Who holds the lease (host:pid, Lambda request id).
    pub holder: String,
    pub lease_ttl: Duration,
    /// Least time between two progress writes. A range is recorded as it finishes once this
    /// long has passed since the last write and writing costs little next to the work it
    /// saves (see `flush_if_due`), so a killed slice loses only the ranges it had in flight
    /// and at most this much finished work. The default, one second, keeps a run of many
    /// small tables (a no-change incremental finishes hundreds in a second) from rewriting
    /// the progress after every few of them; 0 records every range of any size.
    pub progress_interval: Duration,
    /// Live counters for a progress display.
    pub meter: Option<Arc<ExportMeter>>,
    /// The pg_dump that captures the schema (`None`: the one on `PATH`).
    pub pg_dump: Option<std::path::PathBuf>,
    /// A consistency-pass round must finish within one slice to count, so it may run past
    /// `deadline` up to this instant (the invocation's hard limit, less what finishing the
    /// slice needs); `None`: no limit.
    pub pass_deadline: Option<Instant>,
    /// A worker of a fanned-out run: its slot among the `concurrency` workers (where in
    /// the run's items it starts claiming).
    pub worker_slot: usize,
    /// When this process is certainly gone (a Lambda invocation's deadline, at which
    /// Lambda ends the sandbox): a worker's claims lapse then at the latest, so that a
    /// killed worker's items are taken over as soon as it is known dead, not a lease TTL
    /// later. `None`: the lease TTL alone.
    pub invocation_end: Option<Instant>,
}

/// [`ExportOptions::progress_interval`]'s default.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            run_id: None,
            full: false,
            settings: ExportSettings::default(),
            deadline: None,
            holder: lease::default_holder(),
            lease_ttl: lease::DEFAULT_TTL,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            meter: None,
            pg_dump: None,
            pass_deadline: None,
            worker_slot: 0,
            invocation_end: None,
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
    /// The run's ranges are left to its workers: run them (`export_worker`), then the
    /// next slice.
    pub fan_out: bool,
}
