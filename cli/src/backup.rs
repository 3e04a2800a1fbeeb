//! `tidemark backup | export | manifest | list`.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tidemark_core::catalog::TableSelection;
use tidemark_core::config::{parse_size, parse_table_mode};
use tidemark_core::db::DbSettings;
use tidemark_core::error_chain;
use tidemark_core::export::{self, ExportMeter, ExportOptions};
use tidemark_core::format::{FingerprintOf, TableMode};
use tidemark_core::manifest;
use tidemark_core::restore::{self, BackupSelector, RestoreMeter, RestoreOptions};
use tidemark_core::verify::{self, VerifyOptions};

use crate::GlobalArgs;

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
    #[arg(long, env = "TIDEMARK_WORKERS", default_value_t = 2)]
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
    #[command(flatten)]
    selection: SelectionArgs,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Which backup: latest or an id.
    #[arg(long, default_value = "latest", value_parser = parse_selector)]
    backup: BackupSelector,
    /// The database to restore into (postgres://...).
    #[arg(
        long,
        env = "TIDEMARK_TARGET_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    target_url: String,
    /// Load into existing tables (schema from migrations) instead of creating them.
    #[arg(long)]
    data_only: bool,
    /// With --data-only: empty the target tables first.
    #[arg(long, requires = "data_only")]
    clean: bool,
    /// Only these tables (comma-separated).
    #[arg(long, value_delimiter = ',')]
    tables: Vec<String>,
    /// Tables loaded at once.
    #[arg(long, env = "TIDEMARK_WORKERS", default_value_t = 2)]
    workers: usize,
    /// Restore owners and grants too (default: like pg_restore --no-owner
    /// --no-privileges, everything owned by the restoring role).
    #[arg(long, conflicts_with = "data_only")]
    with_privileges: bool,
    /// First create the roles the backup names that the target lacks (from its
    /// pg_dumpall --globals-only, without passwords).
    #[arg(long, conflicts_with = "data_only")]
    roles: bool,
    /// Restore into a server of an older major version than the backup's source (refused
    /// by default); objects the older server cannot create then fail by name.
    #[arg(long)]
    allow_older_target: bool,
    /// Move a sequence that the source held behind its column's largest key past that
    /// key (by default the restore keeps every sequence exactly as the source had it,
    /// and names such a sequence in a warning).
    #[arg(long)]
    advance_sequences: bool,
    /// Stop at the first table that fails to load. A --data-only restore otherwise loads
    /// every other table, then lists the failed ones and exits non-zero; a whole restore
    /// always stops at the first failure.
    #[arg(long)]
    exit_on_error: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Which backup: latest or an id (default: the newest not verified yet).
    #[arg(long, value_parser = parse_selector)]
    backup: Option<BackupSelector>,
    /// The verification server (default: the source server); a scratch database is
    /// created and dropped there.
    #[arg(
        long,
        env = "TIDEMARK_SCRATCH_URL",
        hide_env_values = true,
        value_name = "URL",
        conflicts_with = "scratch_secret_id"
    )]
    scratch_url: Option<String>,
    /// The verification server as a Secrets Manager secret (RDS format) instead of a URL.
    #[arg(long, env = "TIDEMARK_SCRATCH_SECRET_ID", value_name = "ID")]
    scratch_secret_id: Option<String>,
    /// Tables loaded at once.
    #[arg(long, env = "TIDEMARK_WORKERS", default_value_t = 2)]
    workers: usize,
}

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
    let values = [
        ("TIDEMARK_KEEP_LAST", &args.keep_last),
        ("TIDEMARK_KEEP_HOURLY", &args.keep_hourly),
        ("TIDEMARK_KEEP_DAILY", &args.keep_daily),
        ("TIDEMARK_KEEP_WEEKLY", &args.keep_weekly),
        ("TIDEMARK_KEEP_MONTHLY", &args.keep_monthly),
        ("TIDEMARK_KEEP_YEARLY", &args.keep_yearly),
        ("TIDEMARK_KEEP_WITHIN", &args.keep_within),
        ("TIDEMARK_MAX_TOTAL_SIZE", &args.max_total_size),
        ("TIDEMARK_TIMEZONE", &args.timezone),
    ];
    // The flags go through the same parser as the Lambda's environment.
    let lookup = |name: &str| {
        values
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| (*v).clone())
    };
    // Errors name the variable; on the command line, name the flag.
    let policy = tidemark_core::config::retention_policy_from_env(&lookup).map_err(|e| match e
        .split_once(": ")
    {
        Some((var, rest)) if var.starts_with("TIDEMARK_") => format!(
            "--{}: {rest}",
            var.trim_start_matches("TIDEMARK_")
                .to_lowercase()
                .replace('_', "-")
        ),
        _ => e,
    })?;
    let grace = humantime_duration(&args.grace)?;
    let store = global.open_store().await?;
    let opts = tidemark_core::prune::PruneOptions {
        policy,
        grace,
        dry_run: args.dry_run,
        ..Default::default()
    };
    let report = tidemark_core::prune::prune(store, &opts)
        .await
        .map_err(|e| error_chain(&e))?;
    if global.json {
        println!("{}", json(&report)?);
        return Ok(());
    }
    for b in &report.plan.backups {
        let reasons: Vec<String> = b.reasons.iter().map(ToString::to_string).collect();
        println!(
            "{} {:<26} {}{}",
            if b.keep { "keep  " } else { "remove" },
            b.id,
            reasons.join(", "),
            if b.over_size_cap {
                " (over the size cap)"
            } else {
                ""
            }
        );
    }
    println!(
        "{} {} objects ({}){}",
        if report.dry_run {
            "would delete"
        } else {
            "deleted"
        },
        report.plan.delete.len(),
        human_bytes(report.plan.delete_bytes),
        if report.plan.dead_runs.is_empty() {
            String::new()
        } else {
            format!(
                ", including leftovers of dead runs {}",
                report.plan.dead_runs.join(", ")
            )
        }
    );
    if report.plan.incomplete_uploads > 0 {
        println!(
            "{} {} unfinished uploads of killed writers",
            if report.dry_run {
                "would abort"
            } else {
                "aborted"
            },
            report.plan.incomplete_uploads
        );
    }
    Ok(())
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    tidemark_core::config::parse_duration(s).map_err(|e| format!("--grace: {e}"))
}

fn parse_selector(s: &str) -> Result<BackupSelector, String> {
    s.parse()
}

#[derive(Args, Debug)]
pub struct ManifestArgs {
    /// The run to seal.
    #[arg(long = "run", value_name = "RUN_ID")]
    run_id: String,
}

fn options(global: &GlobalArgs, sel: &SelectionArgs) -> ExportOptions {
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
        workers: sel.workers.max(1),
        ..ExportOptions::default()
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, String> {
    serde_json::to_string_pretty(value).map_err(|e| e.to_string())
}

pub async fn export(global: &GlobalArgs, args: &ExportArgs) -> Result<(), String> {
    let store = global.open_store().await?;
    let db = global
        .database()
        .resolve()
        .await
        .map_err(|e| error_chain(&e))?;
    let mut opts = options(global, &args.selection);
    opts.run_id = args.run_id.clone();
    opts.full = args.full;
    opts.deadline = args
        .max_seconds
        .map(|s| Instant::now() + Duration::from_secs(s));
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

/// Slices `tidemark backup` starts again, one after another, after a slice failed with
/// an error that can pass (about a minute of waiting in all).
const SLICE_RETRIES: u32 = 4;

pub async fn backup(global: &GlobalArgs, args: &BackupArgs) -> Result<(), String> {
    let store = global.open_store().await?;
    let db = global
        .database()
        .resolve()
        .await
        .map_err(|e| error_chain(&e))?;
    let meter = Arc::new(ExportMeter::default());
    let mut opts = options(global, &args.selection);
    opts.full = args.full;
    opts.meter = Some(meter.clone());
    let shown = meter.clone();
    let bar = spinner(move || {
        format!(
            "tables {}/{}  rows {}  read {}  stored {}",
            shown.tables_done.load(Ordering::Relaxed),
            shown.tables_total.load(Ordering::Relaxed),
            shown.rows.load(Ordering::Relaxed),
            human_bytes(shown.raw_bytes.load(Ordering::Relaxed)),
            human_bytes(shown.bytes.load(Ordering::Relaxed)),
        )
    });
    let result = async {
        let mut run_id = None;
        let mut failures = 0u32;
        loop {
            opts.run_id = run_id.clone();
            match export::export_slice(store.clone(), &db, &opts).await {
                Ok(report) => {
                    failures = 0;
                    run_id = Some(report.run_id.clone());
                    if report.done {
                        break;
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
        let run_id = run_id.unwrap_or_default();
        manifest::seal_run(store.clone(), &run_id, &opts.holder)
            .await
            .map_err(|e| error_chain(&e))
    }
    .await;
    finish_spinner(bar);
    let report = result?;
    if global.json {
        println!("{}", json(&report)?);
    } else {
        eprintln!(
            "{} backup {} sealed: {} tables, {} rows, {} stored{}",
            report.kind,
            report.backup_id,
            report.tables,
            report.rows,
            human_bytes(report.bytes),
            report
                .parent
                .as_ref()
                .map(|p| format!(", parent {p}"))
                .unwrap_or_default()
        );
        if !report.consistent {
            eprintln!(
                "WARNING: backup {} is NOT one point in time (its tables are of different moments); it will fail verification",
                report.backup_id
            );
        }
        println!("{}", report.backup_id);
    }
    Ok(())
}

pub async fn list(global: &GlobalArgs) -> Result<(), String> {
    let store = global.open_store().await?;
    let backups = manifest::list_backups(store.as_ref())
        .await
        .map_err(|e| error_chain(&e))?;
    if global.json {
        println!("{}", json(&backups)?);
        return Ok(());
    }
    // A failure newer than the newest backup means the schedule is not producing backups.
    let failure = tidemark_core::failure::last_failure(store.as_ref())
        .await
        .map_err(|e| error_chain(&e))?
        .filter(|f| backups.last().is_none_or(|b| f.failed_at > b.created_at));
    if let Some(f) = &failure {
        println!(
            "last run FAILED at {} ({}, run {}): {}",
            f.failed_at.format("%Y-%m-%d %H:%M:%S UTC"),
            f.error,
            f.run_id.as_deref().unwrap_or("-"),
            f.cause
        );
    }
    if backups.is_empty() {
        println!("no backups in {}", store.location());
        return Ok(());
    }
    println!(
        "{:<26} {:<11} {:<26} {:<20} {:<20} {:<14} {:>6} {:>12} {:>10} {:<8}",
        "ID",
        "KIND",
        "PARENT",
        "CREATED (UTC)",
        "AS OF (UTC)",
        "LSN",
        "TABLES",
        "ROWS",
        "BYTES",
        "VERIFIED"
    );
    for b in &backups {
        let as_of = match (b.consistent, b.snapshot_at) {
            (false, _) => "MIXED MOMENTS".to_owned(),
            (true, Some(at)) => at.format("%Y-%m-%d %H:%M:%S").to_string(),
            (true, None) => "-".to_owned(),
        };
        println!(
            "{:<26} {:<11} {:<26} {:<20} {:<20} {:<14} {:>6} {:>12} {:>10} {:<8}",
            b.id,
            b.kind.to_string(),
            b.parent.as_deref().unwrap_or("-"),
            b.created_at.format("%Y-%m-%d %H:%M:%S"),
            as_of,
            b.lsn.as_deref().unwrap_or("-"),
            b.tables,
            b.rows,
            human_bytes(b.bytes),
            match b.verified {
                Some(true) => "ok",
                Some(false) => "FAILED",
                None => "-",
            }
        );
    }
    if let Some(newest) = backups.last().filter(|b| !b.keys_only.is_empty()) {
        let names: Vec<String> = newest.keys_only.iter().map(ToString::to_string).collect();
        println!(
            "note: append table(s) {} are backed up by new keys only: rows updated after they were exported are not in the backup, and verification compares their keys (backup --deep, or TIDEMARK_DEEP_EVERY, fingerprints them whole)",
            names.join(", ")
        );
    }
    Ok(())
}

fn url_settings(url: &str, what: &str) -> Result<DbSettings, String> {
    DbSettings::from_url(&url.to_owned().into()).map_err(|e| format!("{what}: {e}"))
}

pub async fn restore(global: &GlobalArgs, args: &RestoreArgs) -> Result<(), String> {
    let store = global.open_store().await?;
    let mut target = url_settings(&args.target_url, "--target-url")?;
    if let Some(ca) = &global.ca_file {
        target.ca_file = Some(ca.clone());
    }
    let manifest = restore::load_manifest(store.as_ref(), &args.backup)
        .await
        .map_err(|e| error_chain(&e))?;
    let meter = Arc::new(RestoreMeter::default());
    let opts = RestoreOptions {
        tables: args.tables.clone(),
        data_only: args.data_only,
        clean: args.clean,
        workers: args.workers.max(1),
        meter: Some(meter.clone()),
        with_privileges: args.with_privileges,
        create_roles: args.roles,
        allow_older_target: args.allow_older_target,
        advance_sequences: args.advance_sequences,
        exit_on_error: args.exit_on_error,
        ..RestoreOptions::default()
    };
    let bar = spinner(move || {
        format!(
            "tables {}/{}  chunks {}  read {}",
            meter.tables_done.load(Ordering::Relaxed),
            meter.tables_total.load(Ordering::Relaxed),
            meter.chunks_done.load(Ordering::Relaxed),
            human_bytes(meter.bytes.load(Ordering::Relaxed)),
        )
    });
    let result = restore::restore(store, &manifest, &target, &opts).await;
    finish_spinner(bar);
    let report = result.map_err(|e| error_chain(&e))?;
    if global.json {
        println!("{}", json(&report)?);
    } else {
        if let Some(method) = &report.data_only {
            println!("{method}");
        }
        for warning in &report.warnings {
            println!("warning: {warning}");
        }
        println!(
            "restored backup {} into {}: {} tables, {} rows, {} schema objects in {:.1} s",
            report.backup_id,
            report.target,
            report.tables,
            report.rows,
            report.schema_objects,
            report.seconds
        );
    }
    Ok(())
}

pub async fn verify(global: &GlobalArgs, args: &VerifyArgs) -> Result<(), String> {
    let store = global.open_store().await?;
    let mut server = match (&args.scratch_url, &args.scratch_secret_id) {
        (Some(url), _) => url_settings(url, "--scratch-url")?,
        (None, Some(secret_id)) => tidemark_core::db::DatabaseSource {
            secret_id: Some(secret_id.clone()),
            sslmode: global.sslmode,
            ..Default::default()
        }
        .resolve()
        .await
        .map_err(|e| error_chain(&e))?,
        (None, None) => global
            .database()
            .resolve()
            .await
            .map_err(|e| error_chain(&e))?,
    };
    if let Some(ca) = &global.ca_file {
        server.ca_file = Some(ca.clone());
    }
    let opts = VerifyOptions {
        backup: args.backup.clone(),
        workers: args.workers.max(1),
        pg_dump: global.pg_dump.clone(),
        ..VerifyOptions::default()
    };
    let bar = spinner(|| "restoring into a scratch database".to_owned());
    let result = verify::verify(store, &server, &opts).await;
    finish_spinner(bar);
    let record = result.map_err(|e| error_chain(&e))?;
    if global.json {
        println!("{}", json(&record)?);
    } else {
        println!(
            "backup {}: verification {} (restore {:.1} s, {} rows, {}, {} schema objects)",
            record.backup_id,
            if record.ok { "ok" } else { "FAILED" },
            record.restore_seconds,
            record.rows,
            human_bytes(record.bytes),
            record.schema.as_ref().map_or(0, |s| s.objects)
        );
        if let Some(error) = &record.error {
            println!("  {error}");
        }
        if let Some(schema) = &record.schema {
            for difference in &schema.differences {
                println!("  schema {difference}");
            }
        }
        for t in record.tables.iter().filter(|t| !t.ok) {
            println!(
                "  table {}: expected {} rows (fingerprint {:016x}{}), restored {}",
                t.name,
                t.expected.rows,
                t.expected.sum,
                if t.of == FingerprintOf::Keys {
                    " of its keys"
                } else {
                    ""
                },
                t.actual
                    .map(|a| format!("{} rows (fingerprint {:016x})", a.rows, a.sum))
                    .unwrap_or_else(|| "nothing".into())
            );
        }
        let keys_only: Vec<String> = record
            .tables
            .iter()
            .filter(|t| t.of == FingerprintOf::Keys)
            .map(|t| t.name.to_string())
            .collect();
        if !keys_only.is_empty() {
            println!(
                "  note: append table(s) {} were compared by key only: updates to their rows are not in an append backup (backup --deep checks them whole)",
                keys_only.join(", ")
            );
        }
    }
    if record.ok {
        Ok(())
    } else {
        Err(format!("backup {} failed verification", record.backup_id))
    }
}

type Spinner = Option<(ProgressBar, tokio::task::JoinHandle<()>)>;

/// A spinner line on a terminal (none otherwise) showing `message()`.
fn spinner(message: impl Fn() -> String + Send + 'static) -> Spinner {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let shown = bar.clone();
    let ticker = tokio::spawn(async move {
        loop {
            shown.set_message(message());
            shown.tick();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Some((bar, ticker))
}

fn finish_spinner(spinner: Spinner) {
    if let Some((bar, ticker)) = spinner {
        ticker.abort();
        bar.finish_and_clear();
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
