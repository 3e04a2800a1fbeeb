//! `tidemark backup`: export slices until the run is done, then seal it.

use crate::output::{bytes, finish, json, spinner};
use crate::GlobalArgs;
use clap::Args;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark_core::db::DbSettings;
use tidemark_core::error::Classified;
use tidemark_core::export::{self, ExportMeter, ExportOptions, ExportSettings};
use tidemark_core::manifest::SealReport;
use tidemark_core::store::DynStore;
use tidemark_core::{error_chain, manifest};

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Start a new chain (export every table whole).
    #[arg(long)]
    full: bool,
    /// Continue this run (one a killed `tidemark backup` or `tidemark export` slices left
    /// in flight) instead of starting one; its kind is the run's own.
    #[arg(long, value_name = "ID", conflicts_with = "full")]
    run: Option<String>,
    /// Bound each slice (and each worker) as a Lambda timeout would: it starts no new
    /// range after this many seconds, and a consistency-pass round must finish within
    /// them to count. Without it a slice runs until the run is exported.
    #[arg(long, env = "TIDEMARK_SLICE_SECONDS", value_name = "SECONDS", value_parser = parse_slice_seconds)]
    slice_seconds: Option<Duration>,
    #[command(flatten)]
    settings: ExportSettings,
}

/// A slice's length in seconds (fractions allowed), above 0.
fn parse_slice_seconds(v: &str) -> Result<Duration, String> {
    match v.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= 1e7 => {
            Ok(Duration::from_secs_f64(secs))
        }
        _ => Err(format!("{v:?} is not a number of seconds above 0")),
    }
}

pub(super) fn options(global: &GlobalArgs, settings: &ExportSettings) -> ExportOptions {
    ExportOptions {
        pg_dump: global.pg_dump.clone(),
        settings: settings.clone(),
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
    let mut opts = options(global, &args.settings);
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
        opts.run_id = args.run.clone();
        let run_id = export_run(store.clone(), &db, &mut opts, args.slice_seconds).await?;
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

/// Export slices, one after another, until the run is done (`opts.run_id`: continuing
/// that run); returns its id. A slice
/// that fans the run out is followed by `concurrency` workers at once, each with its own
/// connections, snapshot and deadline, sharing the run only through the store as the
/// state machine's Map iterations do.
async fn export_run(
    store: DynStore,
    db: &DbSettings,
    opts: &mut ExportOptions,
    slice_seconds: Option<Duration>,
) -> Result<String, String> {
    let mut run_id = opts.run_id.clone();
    let mut failures = 0u32;
    loop {
        opts.run_id = run_id.clone();
        let (deadline, pass_deadline) = slice_deadlines(slice_seconds);
        opts.deadline = deadline;
        opts.pass_deadline = pass_deadline;
        let step = match export::export_slice(store.clone(), db, opts).await {
            Ok(report) if report.done => return Ok(report.run_id),
            Ok(report) if report.fan_out => {
                run_id = Some(report.run_id.clone());
                run_workers(&store, db, opts, &report.run_id, slice_seconds).await
            }
            Ok(report) => {
                run_id = Some(report.run_id.clone());
                Ok(())
            }
            Err(e) => Err(e),
        };
        match step {
            Ok(()) => failures = 0,
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

/// The deadlines of a slice or worker bounded to `slice_seconds` from now.
fn slice_deadlines(slice_seconds: Option<Duration>) -> (Option<Instant>, Option<Instant>) {
    let end = slice_seconds.map(|s| Instant::now() + s);
    (end, end)
}

/// Runs `opts.settings.concurrency` workers of a fanned-out run at once, each bounded to
/// `slice_seconds`, and waits for all of them; returns the first error (what each
/// recorded of its items stays recorded for the next workers).
async fn run_workers(
    store: &DynStore,
    db: &DbSettings,
    opts: &ExportOptions,
    run_id: &str,
    slice_seconds: Option<Duration>,
) -> Result<(), tidemark_core::run::RunError> {
    let mut workers = tokio::task::JoinSet::new();
    for slot in 0..opts.settings.concurrency.max(1) {
        let mut worker = opts.clone();
        worker.run_id = Some(run_id.to_owned());
        worker.worker_slot = slot;
        (worker.deadline, worker.pass_deadline) = slice_deadlines(slice_seconds);
        let (store, db) = (store.clone(), db.clone());
        workers.spawn(async move { export::export_worker(store, &db, &worker).await });
    }
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok(report)) => tracing::debug!(
                worker = report.worker,
                items_done = report.items_done,
                rows = report.rows,
                "export worker finished"
            ),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(tidemark_core::run::RunError::WorkerPanicked {
                    run_id: run_id.to_owned(),
                    detail: e.to_string(),
                });
            }
        }
    }
    first_error.map_or(Ok(()), Err)
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
