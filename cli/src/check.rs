//! `tidemark check`: can this configuration reach the database, pg_dump and the store?

use std::process::ExitCode;

use serde_json::json;
use tidemark_core::check::{self, DatabaseCheck, PgDumpCheck, StoreCheck};
use tidemark_core::db::Support;
use tidemark_core::error_chain;
use tidemark_core::store::{self, StoreUrl};

use crate::GlobalArgs;

/// Runs the checks and prints one line each (or JSON); fails when any check fails.
pub(crate) async fn check(global: &GlobalArgs) -> ExitCode {
    let database = async {
        let settings = global.database.resolve().await?;
        check::check_database(&settings).await
    }
    .await
    .map_err(|e| error_chain(&e));
    // Probing pg_dump needs the database; without it, only find the tool.
    let pg_dump = async {
        if database.is_err() {
            return check::locate_pg_dump(global.pg_dump.as_deref())
                .await
                .map_err(|e| error_chain(&e));
        }
        let settings = global
            .database
            .resolve()
            .await
            .map_err(|e| error_chain(&e))?;
        check::check_pg_dump(&settings, global.pg_dump.as_deref())
            .await
            .map_err(|e| error_chain(&e))
    }
    .await;
    let store = async {
        let store = global.open_store().await?;
        check::check_store(store.as_ref())
            .await
            .map_err(|e| error_chain(&e))
    }
    .await;

    // A directory store holds the database's data: it should be its owner's only.
    let exposed = match global.store.store.as_deref().map(str::parse::<StoreUrl>) {
        Some(Ok(StoreUrl::Local(path))) => store::readable_by_others(&path)
            .unwrap_or(false)
            .then_some(path),
        _ => None,
    };
    let ok = database.is_ok() && pg_dump.is_ok() && store.is_ok();
    if global.json {
        let report = json!({
            "ok": ok,
            "database": outcome_json(&database),
            "pg_dump": outcome_json(&pg_dump),
            "store": outcome_json(&store),
            "store_readable_by_others": exposed.is_some(),
        });
        println!("{report:#}");
    } else {
        println!("{}", database_line(&database));
        println!("{}", pg_dump_line(&pg_dump));
        println!("{}", store_line(&store));
        if let Some(path) = &exposed {
            println!(
                "store     warn  {} can be read by other users of this machine; it holds the database's data: chmod -R go-rwx {}",
                path.display(),
                path.display()
            );
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn outcome_json<T: serde::Serialize>(outcome: &Result<T, String>) -> serde_json::Value {
    match outcome {
        Ok(value) => {
            let mut v = serde_json::to_value(value).unwrap_or_default();
            if let Some(map) = v.as_object_mut() {
                map.insert("ok".into(), true.into());
            }
            v
        }
        Err(error) => json!({ "ok": false, "error": error }),
    }
}

fn database_line(outcome: &Result<DatabaseCheck, String>) -> String {
    match outcome {
        Ok(db) => format!(
            "database  {}PostgreSQL {} at {}, TLS {} (sslmode {}); {}",
            if db.server.support == Support::Supported {
                "ok    "
            } else {
                "warn  "
            },
            db.server.server_version,
            db.target,
            if db.server.tls { "on" } else { "off" },
            db.sslmode,
            db.server.support.describe(db.server.version())
        ),
        Err(e) => format!("database  FAIL  {e}"),
    }
}

fn pg_dump_line(outcome: &Result<PgDumpCheck, String>) -> String {
    match outcome {
        Ok(p) if !p.probed => format!(
            "pg_dump   --    pg_dump {} at {}; not probed (the database check failed)",
            p.version, p.path
        ),
        Ok(p) => format!(
            "pg_dump   ok    pg_dump {} at {} (server {}); dumped the schema of {} through the TLS relay in {} ms",
            p.version,
            p.path,
            p.server_major,
            p.probe_table.as_deref().unwrap_or("the database"),
            p.millis
        ),
        Err(e) => format!("pg_dump   FAIL  {e}"),
    }
}

fn store_line(outcome: &Result<StoreCheck, String>) -> String {
    match outcome {
        Ok(s) => format!(
            "store     ok    {}: {}-byte probe created (second create refused), read back, deleted; {} requests in {} ms",
            s.location, s.probe_bytes, s.requests, s.millis
        ),
        Err(e) => format!("store     FAIL  {e}"),
    }
}
