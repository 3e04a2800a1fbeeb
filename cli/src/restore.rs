//! `tidemark restore`: restore a backup into a database.

use crate::output::{bytes, finish, json, spinner};
use crate::GlobalArgs;
use clap::Args;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tidemark_core::db::DbSettings;
use tidemark_core::error_chain;
use tidemark_core::restore::{self, BackupSelector, RestoreMeter, RestoreOptions, RestoreSettings};

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
    #[command(flatten)]
    settings: RestoreSettings,
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
        settings: args.settings.clone(),
        meter: Some(meter.clone()),
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
