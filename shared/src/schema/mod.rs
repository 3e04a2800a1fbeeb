//! The schema of a backup: every object pg_dump knows, captured in the backup's snapshot
//! and restored in pg_restore's order.
//!
//! Tidemark does not write DDL. At export, `pg_dump --section=pre-data` and
//! `--section=post-data` run with `--snapshot` set to the export's snapshot (through the
//! [TLS relay](crate::db::relay)), and `pg_dumpall --globals-only --no-role-passwords`
//! records roles; the three plain-SQL scripts are stored zstd-compressed beside the chunks
//! and referenced by the manifest with SHA-256 and size ([`capture`]). Restore runs
//! pre-data, loads the data, then runs post-data — indexes, constraints, foreign keys,
//! triggers, rules, policies, and `REFRESH MATERIALIZED VIEW` of the materialized views
//! that were populated ([`apply`]). Verify dumps the restored database the same way and
//! compares it with the recorded script, object by object ([`compare`]).
//!
//! - [`script`]: splitting pg_dump's plain output into settings, meta-commands, entries.
//! - [`tool`]: finding `pg_dump` and running it through the relay.

pub mod apply;
pub mod capture;
pub mod compare;
pub mod script;
pub mod tool;

use std::path::PathBuf;

use crate::db::DbError;
use crate::error::{Classified, ErrorKind};
use crate::format::manifest::StoredObject;
use crate::store::{ReadStore, StoreError};

pub use self::script::{Entry, Item, Script, ScriptError, Statement};
pub use self::tool::{PgDump, Program};

/// Errors of schema capture, reading and comparison.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("pg_dump not found: looked in {looked}; install the PostgreSQL client tools (at least the server's major version, e.g. apt install postgresql-client-18) or set TIDEMARK_PG_DUMP")]
    PgDumpNotFound { looked: String },
    #[error("pg_dump {version} at {} is older than the server (PostgreSQL {server_major}): pg_dump must be at least the server's major version; install pg_dump {server_major} or newer and point TIDEMARK_PG_DUMP at it", path.display())]
    PgDumpTooOld {
        path: PathBuf,
        version: String,
        server_major: u32,
    },
    #[error("{}", crate::db::Support::TooOld.describe(crate::db::ServerVersion(*.server)))]
    ServerTooOld { server: u32 },
    #[error("{program} ({}) failed: {detail}", path.display())]
    PgDumpFailed {
        program: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("schema object {key} cannot be split into statements: {source}")]
    Script {
        key: String,
        #[source]
        source: ScriptError,
    },
    #[error("schema object {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("schema object {key} is missing from the store")]
    Missing { key: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl Classified for SchemaError {
    fn kind(&self) -> ErrorKind {
        match self {
            SchemaError::PgDumpFailed { detail, .. } if crate::db::transient_text(detail) => {
                ErrorKind::Transient
            }
            SchemaError::Script { .. }
            | SchemaError::Corrupt { .. }
            | SchemaError::Missing { .. } => ErrorKind::Corrupt,
            SchemaError::PgDumpNotFound { .. }
            | SchemaError::PgDumpTooOld { .. }
            | SchemaError::ServerTooOld { .. }
            | SchemaError::PgDumpFailed { .. } => ErrorKind::Fatal,
            SchemaError::Store(e) => e.kind(),
            SchemaError::Db(e) => e.kind(),
        }
    }
}

/// Reads a stored schema object, checks its SHA-256 and size before decompressing it,
/// and splits it.
///
/// # Errors
/// [`SchemaError::Missing`], [`SchemaError::Corrupt`] (checksum, size or zstd), script
/// errors, store errors.
pub async fn load_script(
    store: &dyn ReadStore,
    object: &StoredObject,
) -> Result<Script, SchemaError> {
    let text = load_text(store, object).await?;
    Script::parse(&text).map_err(|source| SchemaError::Script {
        key: object.key.clone(),
        source,
    })
}

/// The text of a stored schema object, checked as [`load_script`] does.
///
/// # Errors
/// As [`load_script`].
pub async fn load_text(
    store: &dyn ReadStore,
    object: &StoredObject,
) -> Result<String, SchemaError> {
    let corrupt = |detail: String| SchemaError::Corrupt {
        key: object.key.clone(),
        detail,
    };
    let stored = store
        .read(&object.key)
        .await?
        .ok_or_else(|| SchemaError::Missing {
            key: object.key.clone(),
        })?;
    let actual = crate::store::sha256_hex(&stored.bytes);
    if actual != object.sha256 {
        return Err(corrupt(format!(
            "sha256 {actual}, manifest says {}",
            object.sha256
        )));
    }
    let mut raw = Vec::with_capacity(object.raw_bytes as usize);
    let mut decoder = zstd::stream::read::Decoder::new(stored.bytes.as_ref())
        .map_err(|e| corrupt(format!("cannot decompress: {e}")))?;
    std::io::copy(
        &mut std::io::Read::take(&mut decoder, object.raw_bytes + 1),
        &mut raw,
    )
    .map_err(|e| corrupt(format!("cannot decompress: {e}")))?;
    if raw.len() as u64 != object.raw_bytes {
        return Err(corrupt(format!(
            "{} bytes after decompression, manifest says {}",
            raw.len(),
            object.raw_bytes
        )));
    }
    String::from_utf8(raw).map_err(|_| corrupt("not UTF-8 text".into()))
}
