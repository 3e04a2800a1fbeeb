//! `tidemark restore`: restore a backup into a database.

use crate::output::{bytes, finish, json, spinner};
use crate::GlobalArgs;
use clap::Args;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tidemark_core::config::{parse_workers, DEFAULT_WORKERS};
use tidemark_core::db::DbSettings;
use tidemark_core::error_chain;
use tidemark_core::restore::{self, BackupSelector, RestoreMeter, RestoreOptions};

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
    #[arg(long, env = "TIDEMARK_WORKERS", default_value_t = DEFAULT_WORKERS, value_parser = parse_workers)]
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

pub(super) fn parse_selector(s: &str) -> Result<BackupSelector, String> {
    s.parse()
}

fn url_settings(url: &str, what: &str) -> Result<DbSettings, String> {
    DbSettings::from_url(&url.to_owned().into()).map_err(|e| format!("{what}: {e}"))
}

pub async fn restore(global: &GlobalArgs, args: &RestoreArgs) -> Result<(), String> {
    let store = global.open_store().await?;
    let mut target = url_settings(&args.target_url, "--target-url")?;
    if let Some(ca) = &global.database.ca_file {
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
        workers: args.workers,
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
            bytes(meter.bytes.load(Ordering::Relaxed)),
        )
    });
    let result = restore::restore(store, &manifest, &target, &opts).await;
    finish(bar);
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
