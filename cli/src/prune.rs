//! `tidemark prune`: apply the retention policy and delete what no kept backup needs.

use crate::output::{bytes, json};
use crate::GlobalArgs;
use clap::Args;
use tidemark_core::error_chain;
use tidemark_core::prune::{PruneReport, PruneSettings};

/// Retention rules; with none, the default policy (daily 7, weekly 4, monthly 12).
#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    settings: PruneSettings,
    /// Print the plan; delete nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn prune(global: &GlobalArgs, args: &PruneArgs) -> Result<(), String> {
    let opts = tidemark_core::prune::PruneOptions {
        policy: args.settings.policy(),
        grace: args.settings.grace,
        dry_run: args.dry_run,
        ..Default::default()
    };
    let store = global.open_store().await?;
    let report = tidemark_core::prune::prune(store, &opts)
        .await
        .map_err(|e| error_chain(&e))?;
    if global.json {
        println!("{}", json(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// One line per backup (kept or removed, and why), then what was or would be deleted.
fn print_report(report: &PruneReport) {
    for b in &report.plan.backups {
        let reasons: Vec<String> = b.reasons.iter().map(ToString::to_string).collect();
        let over = if b.over_size_cap {
            " (over the size cap)"
        } else {
            ""
        };
        let verb = if b.keep { "keep  " } else { "remove" };
        println!("{verb} {:<26} {}{over}", b.id, reasons.join(", "));
    }
    let dead = if report.plan.dead_runs.is_empty() {
        String::new()
    } else {
        format!(
            ", including leftovers of dead runs {}",
            report.plan.dead_runs.join(", ")
        )
    };
    let verb = if report.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    println!(
        "{verb} {} objects ({}){dead}",
        report.plan.delete.len(),
        bytes(report.plan.delete_bytes)
    );
    if report.plan.incomplete_uploads > 0 {
        let verb = if report.dry_run {
            "would abort"
        } else {
            "aborted"
        };
        println!(
            "{verb} {} unfinished uploads of killed writers",
            report.plan.incomplete_uploads
        );
    }
}
