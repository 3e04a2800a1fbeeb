//! `check`: can Tidemark reach the database and use the store?
//!
//! The database check opens a session exactly as a backup would (same TLS, same pinned
//! settings) and asks the server its version and whether the session is encrypted. The
//! store check round-trips a probe object and proves that the store honours conditional
//! creates, which the run lease depends on. The pg_dump check finds the pg_dump a backup
//! would use, checks it is at least the server's major version, and dumps the schema of
//! one table through the TLS relay, as a backup does.

use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

use crate::db::relay::Relay;
use crate::db::{self, DbError, DbSettings, ServerInfo};
use crate::schema::{PgDump, Program, SchemaError};
use crate::store::{sha256_hex, StoreError, WriteCondition, WriteStore};

/// Result of the database check.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseCheck {
    /// `user@host:port/dbname`.
    pub target: String,
    pub sslmode: String,
    #[serde(flatten)]
    pub server: ServerInfo,
}

/// Result of the store check.
#[derive(Debug, Clone, Serialize)]
pub struct StoreCheck {
    pub location: String,
    pub probe_bytes: usize,
    pub conditional_writes: bool,
    pub requests: u32,
    pub millis: u64,
}

/// Connects and asks the server who it is.
///
/// # Errors
/// Whatever [`db::connect`] or [`db::probe`] report.
pub async fn check_database(settings: &DbSettings) -> Result<DatabaseCheck, DbError> {
    tracing::debug!(target = %settings, sslmode = %settings.sslmode, "checking the database");
    let client = db::connect(settings).await?;
    let server = db::probe(&client, settings).await?;
    if server.support == db::Support::TooOld {
        return Err(DbError::UnsupportedServer {
            target: settings.to_string(),
            detail: server.support.describe(server.version()),
        });
    }
    tracing::info!(target = %settings, version = %server.server_version, tls = server.tls, "database reachable");
    Ok(DatabaseCheck {
        target: settings.to_string(),
        sslmode: settings.sslmode.to_string(),
        server,
    })
}

/// Result of the pg_dump check.
#[derive(Debug, Clone, Serialize)]
pub struct PgDumpCheck {
    pub path: String,
    pub version: String,
    /// The server's major version, which pg_dump must be at least.
    pub server_major: u32,
    /// Whether a dump through the relay was tried (not when the database is unreachable).
    pub probed: bool,
    /// The table whose schema was dumped as a probe (none if the database has no table).
    pub probe_table: Option<String>,
    pub probe_bytes: usize,
    pub millis: u64,
}

/// Finds pg_dump (at `explicit` or on `PATH`), checks its version against the server's,
/// and dumps one table's schema through the relay.
///
/// # Errors
/// Not found, too old, or the dump failed (naming the relay's failure if it had one).
pub async fn check_pg_dump(
    settings: &DbSettings,
    explicit: Option<&std::path::Path>,
) -> Result<PgDumpCheck, SchemaError> {
    let started = Instant::now();
    let tool = PgDump::locate(explicit).await?;
    let client = db::connect(settings).await?;
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int4, \
                    (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
                       AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                       AND n.nspname NOT LIKE 'pg\\_%' ORDER BY n.nspname, c.relname LIMIT 1)",
            &[],
        )
        .await
        .map_err(|e| DbError::query("reading the server version", settings, e))?;
    let server: i32 = row.get(0);
    tool.check_server(server as u32)?;
    let probe_table: Option<String> = row.get(1);
    let mut args = vec!["--schema-only".to_owned()];
    match &probe_table {
        Some(table) => {
            args.push("-t".to_owned());
            args.push(table.clone());
        }
        None => args.push("--section=pre-data".to_owned()),
    }
    let relay = Relay::start(settings).await?;
    let dumped = tool.run(Program::PgDump, &relay, settings, &args).await?;
    tracing::info!(pg_dump = %tool.path.display(), version = tool.version, "pg_dump reachable through the relay");
    Ok(PgDumpCheck {
        path: tool.path.display().to_string(),
        version: tool.version,
        server_major: server as u32 / 10_000,
        probed: true,
        probe_table,
        probe_bytes: dumped.len(),
        millis: started.elapsed().as_millis() as u64,
    })
}

/// Only finds pg_dump and asks its version (when the database cannot be reached).
///
/// # Errors
/// Not found, or it does not run.
pub async fn locate_pg_dump(
    explicit: Option<&std::path::Path>,
) -> Result<PgDumpCheck, SchemaError> {
    let tool = PgDump::locate(explicit).await?;
    Ok(PgDumpCheck {
        path: tool.path.display().to_string(),
        version: tool.version,
        server_major: 0,
        probed: false,
        probe_table: None,
        probe_bytes: 0,
        millis: 0,
    })
}

const PROBE_BYTES: usize = 4096;

/// Writes a probe object (create-if-absent), proves a second create is refused, reads it
/// back byte for byte, deletes it and confirms it is gone.
///
/// # Errors
/// The first store operation that failed, or [`StoreError::ChecksumMismatch`] /
/// [`StoreError::PreconditionFailed`] when the store does not behave as promised.
pub async fn check_store(store: &dyn WriteStore) -> Result<StoreCheck, StoreError> {
    let started = Instant::now();
    let key = format!("probes/check-{}", uuid::Uuid::new_v4());
    tracing::debug!(store = %store.location(), %key, "checking the store");
    let payload = probe_payload(&key);
    let mut requests = 0;
    let result = async {
        let receipt = store
            .put(&key, payload.clone(), WriteCondition::IfAbsent)
            .await?;
        requests += 1;
        let conditional_writes = matches!(
            store
                .put(
                    &key,
                    Bytes::from_static(b"second"),
                    WriteCondition::IfAbsent
                )
                .await,
            Err(StoreError::PreconditionFailed { .. })
        );
        requests += 1;
        let read = store.read(&key).await?;
        requests += 1;
        let Some(read) = read else {
            return Err(StoreError::NotFound { key: key.clone() });
        };
        let actual = sha256_hex(&read.bytes);
        if actual != receipt.sha256 {
            return Err(StoreError::ChecksumMismatch {
                key: key.clone(),
                expected: receipt.sha256,
                actual,
            });
        }
        Ok(conditional_writes)
    }
    .await;
    // Always try to clean up, even after a failure half-way.
    let deleted = store.delete(&key).await;
    requests += 1;
    let conditional_writes = result?;
    deleted?;
    if store.head(&key).await?.is_some() {
        return Err(StoreError::S3 {
            operation: "DeleteObject",
            location: format!("{}/{key}", store.location()),
            message: "the probe is still there after a delete".into(),
            kind: crate::error::ErrorKind::Fatal,
            source: None,
        });
    }
    requests += 1;
    if !conditional_writes {
        return Err(StoreError::PreconditionFailed { key: format!(
            "{key} (the store accepted a second create-if-absent: it ignores If-None-Match, so runs could not exclude each other)"
        ) });
    }
    tracing::info!(store = %store.location(), requests, "store usable");
    Ok(StoreCheck {
        location: store.location(),
        probe_bytes: payload.len(),
        conditional_writes,
        requests,
        millis: started.elapsed().as_millis() as u64,
    })
}

/// Deterministic, incompressible-looking bytes derived from the key.
fn probe_payload(key: &str) -> Bytes {
    let mut out = Vec::with_capacity(PROBE_BYTES);
    let mut block = sha256_hex(key.as_bytes());
    while out.len() < PROBE_BYTES {
        out.extend_from_slice(block.as_bytes());
        block = sha256_hex(block.as_bytes());
    }
    out.truncate(PROBE_BYTES);
    Bytes::from(out)
}
