//! `tidemark prune`: apply the retention policy and delete what no kept backup needs.

use crate::output::{bytes, json};
use crate::GlobalArgs;
use clap::Args;
use std::time::Duration;
use tidemark_core::config::{named, parse_count, parse_keep_within, parse_size, parse_timezone};
use tidemark_core::error_chain;
use tidemark_core::prune::PruneReport;
use tidemark_core::retention::RetentionPolicy;

/// Retention rules; with none, the default policy (daily 7, weekly 4, monthly 12).
#[derive(Args)]
pub struct PruneArgs {
    /// Keep the last N backups.
    #[arg(long, env = "TIDEMARK_KEEP_LAST", value_name = "N")]
    keep_last: Option<String>,
    /// Keep the newest backup of each of the last N hours.
    #[arg(long, env = "TIDEMARK_KEEP_HOURLY", value_name = "N")]
    keep_hourly: Option<String>,
    /// Keep the newest backup of each of the last N days.
    #[arg(long, env = "TIDEMARK_KEEP_DAILY", value_name = "N")]
    keep_daily: Option<String>,
    /// Keep the newest backup of each of the last N ISO weeks.
    #[arg(long, env = "TIDEMARK_KEEP_WEEKLY", value_name = "N")]
    keep_weekly: Option<String>,
    /// Keep the newest backup of each of the last N months.
    #[arg(long, env = "TIDEMARK_KEEP_MONTHLY", value_name = "N")]
    keep_monthly: Option<String>,
    /// Keep the newest backup of each of the last N years.
    #[arg(long, env = "TIDEMARK_KEEP_YEARLY", value_name = "N")]
    keep_yearly: Option<String>,
    /// Keep every backup younger than this (e.g. 30d, 12h).
    #[arg(long, env = "TIDEMARK_KEEP_WITHIN", value_name = "DURATION")]
    keep_within: Option<String>,
    /// Drop the oldest kept backups beyond this total (e.g. 500GiB); never the newest.
    #[arg(long, env = "TIDEMARK_MAX_TOTAL_SIZE", value_name = "SIZE")]
    max_total_size: Option<String>,
    /// Time zone of the calendar buckets (default UTC), e.g. Europe/Paris.
    #[arg(long, env = "TIDEMARK_TIMEZONE", value_name = "TZ")]
    timezone: Option<String>,
    /// Leftovers of dead runs younger than this are kept.
    #[arg(
        long,
        env = "TIDEMARK_PRUNE_GRACE",
        default_value = "24h",
        value_name = "DURATION"
    )]
    grace: String,
    /// Print the plan; delete nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn prune(global: &GlobalArgs, args: &PruneArgs) -> Result<(), String> {
    let opts = tidemark_core::prune::PruneOptions {
        policy: policy(args)?,
        grace: humantime_duration(&args.grace)?,
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

/// The retention policy the flags (or their variables) describe; an error names the flag.
fn policy(args: &PruneArgs) -> Result<RetentionPolicy, String> {
    let mut policy = RetentionPolicy::empty();
    policy.keep_last = named("--keep-last", args.keep_last.as_deref(), parse_count)?;
    policy.keep_hourly = named("--keep-hourly", args.keep_hourly.as_deref(), parse_count)?;
    policy.keep_daily = named("--keep-daily", args.keep_daily.as_deref(), parse_count)?;
    policy.keep_weekly = named("--keep-weekly", args.keep_weekly.as_deref(), parse_count)?;
    policy.keep_monthly = named("--keep-monthly", args.keep_monthly.as_deref(), parse_count)?;
    policy.keep_yearly = named("--keep-yearly", args.keep_yearly.as_deref(), parse_count)?;
    policy.keep_within = named(
        "--keep-within",
        args.keep_within.as_deref(),
        parse_keep_within,
    )?;
    policy.max_total_size = named(
        "--max-total-size",
        args.max_total_size.as_deref(),
        parse_size,
    )?;
    if let Some(zone) = named("--timezone", args.timezone.as_deref(), parse_timezone)? {
        policy.timezone = zone;
    }
    Ok(policy.or_default_rules())
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

pub(super) fn humantime_duration(s: &str) -> Result<Duration, String> {
    tidemark_core::config::parse_duration(s).map_err(|e| format!("--grace: {e}"))
}
