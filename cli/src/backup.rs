//! `tidemark backup`: export slices until the run is done, then seal it.

use crate::output::{bytes, finish, json, spinner};
use crate::GlobalArgs;
use clap::Args;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
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
    #[command(flatten)]
    settings: ExportSettings,
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
