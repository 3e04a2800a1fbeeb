//! Capturing a backup's schema at export, in the export's snapshot.

use std::borrow::Cow;

use bytes::Bytes;
use tokio_postgres::Client;

use super::script::without_settings;
use super::{PgDump, Program, SchemaError};
use crate::db::relay::Relay;
use crate::db::{DbError, DbSettings};
use crate::format::manifest::{SchemaDump, StoredObject};
use crate::format::{quote_ident, Fingerprint};
use crate::store::{WriteCondition, WriteStore};

/// zstd level for schema scripts: they are small and read at every restore.
const SCRIPT_ZSTD_LEVEL: i32 = 9;

/// What to capture.
#[derive(Debug, Clone)]
pub struct CaptureRequest<'a> {
    pub tool: &'a PgDump,
    pub settings: &'a DbSettings,
    /// The exported snapshot (`pg_export_snapshot()`) of a transaction kept open meanwhile.
    pub snapshot_id: &'a str,
    pub run_id: &'a str,
    /// Schemas whose objects the backup covers (the selected tables' schemas and their
    /// partitions').
    pub schemas: &'a [String],
    /// The parent backup of an incremental run: each of its scripts is kept when this
    /// run's says the same, and its large-objects script when no large object changed since.
    pub parent: Option<&'a str>,
    /// The parent's schema, when the caller has its manifest at hand (otherwise it is read).
    pub parent_schema: Option<&'a SchemaDump>,
}

/// The pg_dump switches that select what a backup's schema holds.
///
/// When the backup covers every schema of the database (the usual case), none: pg_dump's
/// own whole-database output, which restores by hand into a fresh database. Otherwise the
/// covered schemas (`-n`), every extension (`-e`), and the schemas extensions live in
/// (their functions and types, not their tables). Large objects are left out (`-B`: a
/// pg_dump before 17 would put their bare definitions in pre-data): they have a script of
/// their own, with their contents (see [`capture`]). A pg_dump older than 14 has no `-e`:
/// it dumps the whole database.
pub async fn selection(
    client: &Client,
    settings: &DbSettings,
    tool: &PgDump,
    schemas: &[String],
) -> Result<Vec<String>, SchemaError> {
    let whole = vec!["-B".to_owned()];
    if tool.major < 14 {
        return Ok(whole);
    }
    // Schemas of the database that are not the system's or an extension's own.
    let uncovered = client
        .query(
            "SELECT n.nspname::text FROM pg_namespace n \
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' AND NOT (n.nspname = ANY($1)) \
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_namespace'::regclass \
                               AND d.objid = n.oid AND d.deptype = 'e')",
            &[&schemas],
        )
        .await
        .map_err(|e| DbError::query("listing schemas", settings, e))?;
    if uncovered.is_empty() {
        return Ok(whole);
    }
    let mut args = whole;
    for schema in schemas {
        args.push("-n".to_owned());
        args.push(quote_ident(schema));
    }
    let rows = client
        .query(
            "SELECT DISTINCT n.nspname::text FROM pg_extension e \
             JOIN pg_namespace n ON n.oid = e.extnamespace \
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| DbError::query("listing extension schemas", settings, e))?;
    for row in rows {
        let schema: String = row.get(0);
        if !schemas.contains(&schema) {
            args.push("-n".to_owned());
            args.push(quote_ident(&schema));
            args.push("-T".to_owned());
            args.push(format!("{}.*", quote_ident(&schema)));
        }
    }
    args.push("-e".to_owned());
    args.push("*".to_owned());
    Ok(args)
}

/// Runs pg_dump (pre-data and post-data, at once) and pg_dumpall in the request's
/// snapshot, checks that every script splits cleanly, and stores them.
///
/// # Errors
/// pg_dump failures (naming the relay's own failure when there is one), a script Tidemark
/// could not restore, store errors. A pg_dumpall failure is not an error: the backup is
/// taken without globals and the returned warning says why.
pub async fn capture(
    store: &dyn WriteStore,
    client: &Client,
    request: &CaptureRequest<'_>,
) -> Result<(SchemaDump, Vec<String>), SchemaError> {
    let settings = request.settings;
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int4, \
                    (SELECT count(*) FROM pg_largeobject_metadata)",
            &[],
        )
        .await
        .map_err(|e| DbError::query("reading the server version", settings, e))?;
    let server_version_num = row.get::<_, i32>(0) as u32;
    let large_objects = row.get::<_, i64>(1) as u64;
    request.tool.check_server(server_version_num)?;
    let selection = selection(client, settings, request.tool, request.schemas).await?;
    let parent = parent_schema(store, request).await;
    let parent = parent.as_deref();

    let relay = Relay::start(settings).await?;
    let (pre, post) = dump_sections(request, &relay, &selection).await?;
    // Session settings the source does not know (a newer pg_dump's) are left out of the
    // stored scripts, so each runs as stored on a server of the source's version.
    let known = super::apply::known_settings(client)
        .await
        .map_err(|e| DbError::query("reading the server's settings", settings, e))?;
    let keep = |name: &str| known.contains(name);
    let mut warnings = Vec::new();
    let globals = match dump_globals(request, &relay).await {
        Ok(text) => Some(text),
        Err(e) => {
            warnings.push(format!(
                "roles and tablespaces (pg_dumpall --globals-only) were not captured: {e}"
            ));
            None
        }
    };
    let objects = if large_objects > 0 {
        Some(dump_large_objects(client, request, parent, &relay).await?)
    } else {
        None
    };
    let token = uuid::Uuid::new_v4().simple().to_string();
    let key = |part: &str| crate::repo::schema_key(request.run_id, &token[..8], part);
    let pre_data = parent.map(|p| &p.pre_data);
    let pre_data = store_script(store, &key("pre-data"), pre, true, &keep, pre_data).await?;
    let post_data = parent.map(|p| &p.post_data);
    let post_data = store_script(store, &key("post-data"), post, true, &keep, post_data).await?;
    let globals = match globals {
        Some(text) => {
            let kept = parent.and_then(|p| p.globals.as_ref());
            Some(store_script(store, &key("globals"), text, false, &keep, kept).await?)
        }
        None => None,
    };
    // The fingerprints are small copies; the script (all the large objects' contents)
    // moves into the store without being copied.
    let large_objects_fingerprint = objects.as_ref().map(|o| o.fingerprint);
    let large_objects_state = objects.as_ref().map(|o| o.state);
    let large_objects_script = match objects.map(|o| o.script) {
        Some(LargeObjectsScript::Unchanged(kept)) => Some(kept),
        Some(LargeObjectsScript::Dumped(text)) => {
            let kept = parent.and_then(|p| p.large_objects_script.as_ref());
            let key = key("large-objects");
            Some(store_script(store, &key, text, true, &keep, kept).await?)
        }
        None => None,
    };
    tracing::info!(
        pg_dump = request.tool.version,
        pre_data_bytes = pre_data.raw_bytes,
        post_data_bytes = post_data.raw_bytes,
        "schema captured"
    );
    Ok((
        SchemaDump {
            pg_dump_version: request.tool.version.clone(),
            server_version_num,
            selection,
            pre_data,
            post_data,
            globals,
            large_objects,
            large_objects_script,
            large_objects_fingerprint,
            large_objects_state,
        },
        warnings,
    ))
}

/// The parent backup's schema: the request's, or read from its manifest (none when that
/// cannot be read: every script is then stored anew).
async fn parent_schema<'a>(
    store: &dyn WriteStore,
    request: &CaptureRequest<'a>,
) -> Option<Cow<'a, SchemaDump>> {
    if let Some(dump) = request.parent_schema {
        return Some(Cow::Borrowed(dump));
    }
    let id = request.parent?;
    match crate::format::manifest::read_manifest(store, id).await {
        Ok(manifest) => manifest.and_then(|m| m.schema_dump).map(Cow::Owned),
        Err(e) => {
            tracing::debug!(parent = id, error = %e, "parent manifest unreadable: storing every script");
            None
        }
    }
}

/// pg_dump's pre-data and post-data sections of the selection, both at once.
async fn dump_sections(
    request: &CaptureRequest<'_>,
    relay: &Relay,
    selection: &[String],
) -> Result<(Vec<u8>, Vec<u8>), SchemaError> {
    let section = |name: &str| {
        let mut args = vec![
            format!("--section={name}"),
            format!("--snapshot={}", request.snapshot_id),
        ];
        args.extend(selection.iter().cloned());
        args
    };
    let (pre_args, post_args) = (section("pre-data"), section("post-data"));
    let (tool, settings) = (request.tool, request.settings);
    let (pre, post) = tokio::join!(
        tool.run(Program::PgDump, relay, settings, &pre_args),
        tool.run(Program::PgDump, relay, settings, &post_args),
    );
    Ok((pre?, post?))
}

/// pg_dumpall's roles and tablespaces (no passwords).
async fn dump_globals(request: &CaptureRequest<'_>, relay: &Relay) -> Result<Vec<u8>, SchemaError> {
    let args = [
        "--globals-only".to_owned(),
        "--no-role-passwords".to_owned(),
        "-l".to_owned(),
        request.settings.dbname.clone(),
    ];
    request
        .tool
        .run(Program::PgDumpAll, relay, request.settings, &args)
        .await
}

/// The large objects' fingerprint (what verify compares), their state (what tells that
/// none changed) and their script.
struct LargeObjects {
    fingerprint: Fingerprint,
    state: Fingerprint,
    script: LargeObjectsScript,
}

enum LargeObjectsScript {
    /// The parent backup's: no large object changed since.
    Unchanged(StoredObject),
    /// pg_dump's, to be stored.
    Dumped(Vec<u8>),
}

/// Large objects: pg_dump writes them (contents, owner, comment, privileges) only with
/// data, so a data-only dump of no table's data. When none changed since the parent
/// backup (same oids, contents, comments, owners and grants), the parent's script is this
/// backup's too: not dumped or stored again.
async fn dump_large_objects(
    client: &Client,
    request: &CaptureRequest<'_>,
    parent: Option<&SchemaDump>,
    relay: &Relay,
) -> Result<LargeObjects, SchemaError> {
    let (fingerprint, state) = large_object_fingerprints(client)
        .await
        .map_err(|e| DbError::query("fingerprinting large objects", request.settings, e))?;
    let unchanged = parent
        .filter(|d| d.large_objects_state == Some(state))
        .and_then(|d| d.large_objects_script.clone());
    let script = match unchanged {
        Some(kept) => LargeObjectsScript::Unchanged(kept),
        None => {
            let args = [
                "--data-only".to_owned(),
                "-b".to_owned(),
                "--exclude-table-data=*.*".to_owned(),
                format!("--snapshot={}", request.snapshot_id),
            ];
            let text = request
                .tool
                .run(Program::PgDump, relay, request.settings, &args)
                .await?;
            LargeObjectsScript::Dumped(text)
        }
    };
    Ok(LargeObjects {
        fingerprint,
        state,
        script,
    })
}

/// Count and fingerprint of the large objects of the database `client` is on, in its
/// transaction's snapshot: one line per object, its oid, the MD5 of its contents and its
/// comment (what a restore brings back whatever its privilege options, and verify
/// compares).
///
/// # Errors
/// The query's error (e.g. no `SELECT` privilege on an object, as pg_dump would get).
pub async fn large_object_fingerprint(
    client: &Client,
) -> Result<crate::format::Fingerprint, tokio_postgres::Error> {
    Ok(large_object_fingerprints(client).await?.0)
}

/// [`large_object_fingerprint`], and the same with each object's owner and grants (what
/// tells whether anything pg_dump writes of them changed).
async fn large_object_fingerprints(
    client: &Client,
) -> Result<(crate::format::Fingerprint, crate::format::Fingerprint), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT format(E'%s\\t%s\\t%s\\n', m.oid, d.md5, c.comment), \
                    format(E'%s\\t%s\\t%s\\t%s\\t%s\\n', m.oid, d.md5, c.comment, \
                           pg_get_userbyid(m.lomowner), coalesce(m.lomacl::text, '')) \
             FROM pg_largeobject_metadata m \
             CROSS JOIN LATERAL (SELECT md5(lo_get(m.oid))) d(md5) \
             CROSS JOIN LATERAL (SELECT coalesce(obj_description(m.oid, 'pg_largeobject'), '')) c(comment)",
            &[],
        )
        .await?;
    let mut truth = crate::format::Fingerprint::default();
    let mut state = crate::format::Fingerprint::default();
    for row in rows {
        truth.add_line(row.get::<_, String>(0).as_bytes());
        state.add_line(row.get::<_, String>(1).as_bytes());
    }
    Ok((truth, state))
}

/// Checks that `text` splits (when `toc`: as a pg_dump script), leaves out the session
/// settings `keep` refuses (those the source server does not know: a newer pg_dump's), so
/// the script runs as stored on a server of the source's version, then compresses and
/// stores it — unless `kept`, the parent backup's same script, says the same (apart from
/// pg_dump's per-run `\restrict` key): then that object is this backup's too.
async fn store_script(
    store: &dyn WriteStore,
    key: &str,
    text: Vec<u8>,
    toc: bool,
    keep: &(dyn Fn(&str) -> bool + Sync),
    kept: Option<&StoredObject>,
) -> Result<StoredObject, SchemaError> {
    let script = std::str::from_utf8(&text).map_err(|_| SchemaError::Corrupt {
        key: key.to_owned(),
        detail: "pg_dump output is not UTF-8".into(),
    })?;
    let (fitted, parsed, dropped) =
        without_settings(script, keep).map_err(|source| SchemaError::Script {
            key: key.to_owned(),
            source,
        })?;
    if !dropped.is_empty() {
        tracing::debug!(key, settings = ?dropped, "left out settings the server does not know");
    }
    if toc && parsed.entries().any(|e| e.kind == "PREAMBLE") {
        return Err(SchemaError::Corrupt {
            key: key.to_owned(),
            detail: "pg_dump output holds statements outside any object header".into(),
        });
    }
    let text_sha256 = parsed.digest_without_restrict_key(&fitted);
    if let Some(kept) = kept.filter(|k| k.text_sha256.as_deref() == Some(text_sha256.as_str())) {
        tracing::debug!(
            key = kept.key,
            "script unchanged since the parent backup: kept"
        );
        return Ok(kept.clone());
    }
    let text = fitted.into_bytes();
    let raw_bytes = text.len() as u64;
    // One shot, so zstd sizes its tables to the script rather than to the level's window.
    let compressed =
        zstd::bulk::compress(&text, SCRIPT_ZSTD_LEVEL).map_err(|e| SchemaError::Corrupt {
            key: key.to_owned(),
            detail: format!("cannot compress: {e}"),
        })?;
    let receipt = store
        .put(key, Bytes::from(compressed), WriteCondition::Always)
        .await?;
    Ok(StoredObject {
        key: key.to_owned(),
        bytes: receipt.size,
        raw_bytes,
        sha256: receipt.sha256,
        text_sha256: Some(text_sha256),
    })
}
