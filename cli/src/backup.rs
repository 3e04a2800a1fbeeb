//! `tidemark backup`: export slices until the run is done, then seal it.

use crate::output::{bytes, finish, json, spinner};
use crate::GlobalArgs;
use clap::Args;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tidemark_core::catalog::TableSelection;
use tidemark_core::config::{parse_size, parse_table_mode, parse_workers, DEFAULT_WORKERS};
use tidemark_core::db::DbSettings;
use tidemark_core::error::Classified;
use tidemark_core::export::{self, ExportMeter, ExportOptions};
use tidemark_core::format::TableMode;
use tidemark_core::manifest::SealReport;
use tidemark_core::store::DynStore;
use tidemark_core::{error_chain, manifest};

/// Which tables, and how.
#[derive(Args, Debug, Clone)]
pub struct SelectionArgs {
    /// Schemas whose tables are backed up (comma-separated).
    #[arg(
        long,
        env = "TIDEMARK_SCHEMAS",
        value_delimiter = ',',
        default_value = "public"
    )]
    schemas: Vec<String>,
    /// Only these tables (a,b,sch.c; "Quoted"."Names" keep their case).
    #[arg(long, env = "TIDEMARK_TABLES", value_delimiter = ',')]
    tables: Vec<String>,
    /// Override a table's mode: NAME=changes|append|snapshot (repeatable or comma-separated).
    #[arg(long = "table-mode", env = "TIDEMARK_TABLE_MODES", value_delimiter = ',', value_name = "NAME=MODE", value_parser = parse_table_mode)]
    table_modes: Vec<(String, TableMode)>,
    /// Most rows in one chunk.
    #[arg(long, env = "TIDEMARK_CHUNK_ROWS", default_value_t = 1_000_000)]
    chunk_rows: u64,
    /// Target size of one chunk before compression (e.g. 64MiB).
    #[arg(long, env = "TIDEMARK_CHUNK_BYTES", default_value = "64MiB", value_parser = parse_size)]
    chunk_bytes: u64,
    /// Database connections exporting at once.
    #[arg(long, env = "TIDEMARK_WORKERS", default_value_t = DEFAULT_WORKERS, value_parser = parse_workers)]
    workers: usize,
    /// Seconds an `append` table's empty key ranges are probed again for late commits.
    #[arg(
        long = "gap-ttl",
        env = "TIDEMARK_GAP_TTL_SECS",
        default_value_t = 3600,
        value_name = "SECONDS"
    )]
    gap_ttl_secs: u64,
    /// Fingerprint `append` tables whole in this backup (a deep check: updates to their rows,
    /// which append mode does not export, then fail verification).
    #[arg(long)]
    deep: bool,
    /// A deep check every N backups of a chain (0: never, unless --deep).
    #[arg(
        long,
        env = "TIDEMARK_DEEP_EVERY",
        default_value_t = 0,
        value_name = "N"
    )]
    deep_every: u32,
    /// Consistency-pass rounds a run spanning slices tries before it is sealed as not one
    /// point in time.
    #[arg(long, env = "TIDEMARK_PASS_ROUNDS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pass_rounds: u32,
    /// zstd level (1 fastest .. 19 smallest); 1 keeps pace with COPY on small machines.
    #[arg(long, env = "TIDEMARK_ZSTD_LEVEL", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: i32,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Start a new chain (export every table whole).
    #[arg(long)]
    full: bool,
    #[command(flatten)]
    selection: SelectionArgs,
}

pub(super) fn options(global: &GlobalArgs, sel: &SelectionArgs) -> ExportOptions {
    ExportOptions {
        pg_dump: global.pg_dump.clone(),
        selection: TableSelection {
            schemas: sel.schemas.clone(),
            tables: sel.tables.clone(),
            modes: sel.table_modes.clone(),
        },
        chunk_rows: sel.chunk_rows,
        chunk_bytes: sel.chunk_bytes,
        zstd_level: sel.zstd_level,
        max_pass_rounds: sel.pass_rounds,
        gap_ttl: Duration::from_secs(sel.gap_ttl_secs),
        deep: sel.deep,
        deep_every: sel.deep_every,
        workers: sel.workers,
        ..ExportOptions::default()
    }
}

/// Slices `tidemark backup` starts again, one after another, after a slice failed with
/// an error that can pass (about a minute of waiting in all).
pub(super) const SLICE_RETRIES: u32 = 4;

pub async fn backup(global: &GlobalArgs, args: &BackupArgs) -> Result<(), String> {
    let store = global.open_store().await?;
    let db = global.resolve_database().await?;
    let meter = Arc::new(ExportMeter::default());
    let mut opts = options(global, &args.selection);
    opts.full = args.full;
    opts.meter = Some(meter.clone());
    let bar = spinner(move || {
        format!(
            "tables {}/{}  rows {}  read {}  stored {}",
            meter.tables_done.load(Ordering::Relaxed),
            meter.tables_total.load(Ordering::Relaxed),
            meter.rows.load(Ordering::Relaxed),
            bytes(meter.raw_bytes.load(Ordering::Relaxed)),
            bytes(meter.bytes.load(Ordering::Relaxed)),
        )
    });
    let result = async {
        let run_id = export_run(store.clone(), &db, &mut opts).await?;
        manifest::seal_run(store.clone(), &run_id, &opts.holder)
            .await
            .map_err(|e| error_chain(&e))
    }
    .await;
    finish(bar);
    let report = result?;
    if global.json {
        println!("{}", json(&report)?);
    } else {
        print_sealed(&report);
    }
    Ok(())
}

/// Export slices, one after another, until the run is done; returns its id.
async fn export_run(
    store: DynStore,
    db: &DbSettings,
    opts: &mut ExportOptions,
) -> Result<String, String> {
    let mut run_id = None;
    let mut failures = 0u32;
    loop {
        opts.run_id = run_id.clone();
        match export::export_slice(store.clone(), db, opts).await {
            Ok(report) => {
                failures = 0;
                run_id = Some(report.run_id.clone());
                if report.done {
                    return Ok(report.run_id);
                }
            }
            // A lost connection or snapshot, a store outage the retries did not
            // outlast: the slice saved its progress, so another one resumes the run.
            Err(e) if e.is_retryable() && failures < SLICE_RETRIES => {
                failures += 1;
                let delay = Duration::from_secs(2u64 << failures.min(4));
                tracing::warn!(
                    error = %error_chain(&e),
                    attempt = failures,
                    "the export slice failed; resuming the run in {} s",
                    delay.as_secs()
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(error_chain(&e)),
        }
    }
}

/// What was sealed, on stderr; the backup id alone on stdout (for scripts).
fn print_sealed(report: &SealReport) {
    let parent = report
        .parent
        .as_ref()
        .map(|p| format!(", parent {p}"))
        .unwrap_or_default();
    eprintln!(
        "{} backup {} sealed: {} tables, {} rows, {} stored{parent}",
        report.kind,
        report.backup_id,
        report.tables,
        report.rows,
        bytes(report.bytes)
    );
    if !report.consistent {
        eprintln!(
            "WARNING: backup {} is NOT one point in time (its tables are of different moments); it will fail verification",
            report.backup_id
        );
    }
    println!("{}", report.backup_id);
}
