//! `tidemark export`: one time-boxed slice of a backup run (what the export Lambda does).

use crate::backup::options;
use crate::output::json;
use crate::GlobalArgs;
use clap::Args;
use std::time::{Duration, Instant};
use tidemark_core::error_chain;
use tidemark_core::export;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Continue this run (default: the run in flight, or a new one).
    #[arg(long = "run", value_name = "RUN_ID")]
    run_id: Option<String>,
    /// Start a new chain.
    #[arg(long)]
    full: bool,
    /// Stop starting new work after this many seconds (a Lambda slice's budget).
    #[arg(long, value_name = "SECONDS")]
    max_seconds: Option<u64>,
    /// Run one worker of a fanned-out run (what one iteration of the state machine's Map
    /// does) in this slot, instead of a slice; needs --run.
    #[arg(long, value_name = "SLOT", requires = "run_id")]
    worker: Option<usize>,
    #[command(flatten)]
    settings: export::ExportSettings,
}

pub async fn export(global: &GlobalArgs, args: &ExportArgs) -> Result<(), String> {
    let store = global.open_store().await?;
    let db = global.resolve_database().await?;
    let mut opts = options(global, &args.settings);
    opts.run_id = args.run_id.clone();
    opts.full = args.full;
    opts.deadline = args
        .max_seconds
        .map(|s| Instant::now() + Duration::from_secs(s));
    if let Some(slot) = args.worker {
        opts.worker_slot = slot;
        let report = export::export_worker(store.clone(), &db, &opts)
            .await
            .map_err(|e| error_chain(&e))?;
        // The run keeps the lease for its next slice.
        tidemark_core::lease::detach(store.as_ref(), &report.run_id)
            .await
            .map_err(|e| error_chain(&e))?;
        println!("{}", json(&report)?);
        return Ok(());
    }
    let report = export::export_slice(store.clone(), &db, &opts)
        .await
        .map_err(|e| error_chain(&e))?;
    // This process ends its slice on purpose: the run keeps the lease for the next one.
    tidemark_core::lease::detach(store.as_ref(), &report.run_id)
        .await
        .map_err(|e| error_chain(&e))?;
    println!("{}", json(&report)?);
    Ok(())
}
