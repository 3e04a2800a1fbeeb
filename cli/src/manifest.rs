//! `tidemark manifest`: seal a finished run (what the manifest Lambda does).

use crate::output::json;
use crate::GlobalArgs;
use clap::Args;
use tidemark_core::{error_chain, manifest};

#[derive(Args, Debug)]
pub struct ManifestArgs {
    /// The run to seal.
    #[arg(long = "run", value_name = "RUN_ID")]
    run_id: String,
}

pub async fn manifest(global: &GlobalArgs, args: &ManifestArgs) -> Result<(), String> {
    let store = global.open_store().await?;
    let holder = tidemark_core::lease::default_holder();
    let report = manifest::seal_run(store, &args.run_id, &holder)
        .await
        .map_err(|e| error_chain(&e))?;
    if !report.consistent {
        eprintln!(
            "WARNING: backup {} is NOT one point in time (its tables are of different moments); it will fail verification",
            report.backup_id
        );
    }
    println!("{}", json(&report)?);
    Ok(())
}
