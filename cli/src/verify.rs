//! `tidemark verify`: restore a backup into a scratch database and compare it with the
//! source's own truth.

use crate::output::{bytes, finish, json, spinner};
use crate::restore::parse_selector;
use crate::GlobalArgs;
use clap::Args;
use tidemark_core::db::DbSettings;
use tidemark_core::error_chain;
use tidemark_core::format::FingerprintOf;
use tidemark_core::restore::BackupSelector;
use tidemark_core::verify::{self, Verification, VerifyOptions, VerifySettings};

#[derive(Args)]
pub struct VerifyArgs {
    /// Which backup: latest or an id (default: the newest not verified yet).
    #[arg(long, value_parser = parse_selector)]
    backup: Option<BackupSelector>,
    #[command(flatten)]
    settings: VerifySettings,
}

pub async fn verify(global: &GlobalArgs, args: &VerifyArgs) -> Result<(), String> {
    let store = global.open_store().await?;
    let server = scratch_server(global, args).await?;
    let opts = VerifyOptions {
        backup: args.backup.clone(),
        workers: args.settings.workers,
        pg_dump: global.pg_dump.clone(),
        ..VerifyOptions::default()
    };
    let bar = spinner(|| "restoring into a scratch database".to_owned());
    let result = verify::verify(store, &server, &opts).await;
    finish(bar);
    let record = result.map_err(|e| error_chain(&e))?;
    if global.json {
        println!("{}", json(&record)?);
    } else {
        print_record(&record);
    }
    if record.ok {
        Ok(())
    } else {
        Err(format!("backup {} failed verification", record.backup_id))
    }
}

/// The server the scratch database goes on: `--scratch-url`, `--scratch-secret-id`, or
/// the source's.
async fn scratch_server(global: &GlobalArgs, args: &VerifyArgs) -> Result<DbSettings, String> {
    match args.settings.scratch_source(&global.database) {
        Some(scratch) => scratch
            .resolve()
            .await
            .map_err(|e| format!("the verification server: {}", error_chain(&e))),
        None => global.resolve_database().await,
    }
}

/// The outcome in a line, then each difference found.
fn print_record(record: &Verification) {
    println!(
        "backup {}: verification {} (restore {:.1} s, {} rows, {}, {} schema objects)",
        record.backup_id,
        if record.ok { "ok" } else { "FAILED" },
        record.restore_seconds,
        record.rows,
        bytes(record.bytes),
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
        let of = if t.of == FingerprintOf::Keys {
            " of its keys"
        } else {
            ""
        };
        let actual = t
            .actual
            .map(|a| format!("{} rows (fingerprint {:016x})", a.rows, a.sum))
            .unwrap_or_else(|| "nothing".into());
        println!(
            "  table {}: expected {} rows (fingerprint {:016x}{of}), restored {actual}",
            t.name, t.expected.rows, t.expected.sum
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
