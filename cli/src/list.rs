//! `tidemark list`: the sealed backups, oldest first, and the last failure.

use crate::output::{bytes, json};
use crate::GlobalArgs;
use tidemark_core::{error_chain, manifest};

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
            bytes(b.bytes),
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
