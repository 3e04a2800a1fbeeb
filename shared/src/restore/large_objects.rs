//! Large objects: checked against the target before anything is written, restored after
//! the data.

use super::error::RestoreError;
use super::RestoreOptions;
use crate::db::{DbError, DbSettings};
use crate::schema::apply::{self, ApplyOptions, Decision};
use crate::schema::{self};
use std::collections::HashSet;
use tokio_postgres::Client;

/// Which of the large objects `script` creates the target already holds.
pub(super) async fn present_large_objects(
    client: &Client,
    target: &DbSettings,
    script: &schema::Script,
) -> Result<Vec<u32>, RestoreError> {
    let oids: Vec<u32> = apply::large_objects(script);
    Ok(client
        .query(
            "SELECT oid FROM pg_largeobject_metadata WHERE oid = ANY($1) ORDER BY oid",
            &[&oids],
        )
        .await
        .map_err(|e| DbError::query("checking the target's large objects", target, e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Restores the backup's large objects (contents, comments; owners and privileges with
/// `with_privileges`) from its large-objects script, in one transaction. Objects of the
/// backup that the target already holds (the preflight allowed that only for
/// `--data-only --clean`, or an earlier slice of this restore) are replaced. A `--tables`
/// subset restores none (as `pg_restore -t`).
pub(super) async fn restore_large_objects(
    client: &Client,
    target: &DbSettings,
    script: &schema::Script,
    known: &HashSet<String>,
    opts: &RestoreOptions,
) -> Result<Vec<String>, RestoreError> {
    let present = present_large_objects(client, target, script).await?;
    if !present.is_empty() {
        client
            .execute(
                "SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid = ANY($1)",
                &[&present],
            )
            .await
            .map_err(|e| DbError::query("replacing the target's large objects", target, e))?;
    }
    let decide = |entry: &schema::Entry| {
        if apply::is_large_object_entry(entry) {
            Decision::Apply
        } else {
            Decision::Skip(String::new())
        }
    };
    let applied = apply::apply(
        client,
        script,
        "large objects",
        &ApplyOptions {
            with_owners: opts.settings.with_privileges,
            with_privileges: opts.settings.with_privileges,
            ..ApplyOptions::default()
        },
        known,
        &decide,
    )
    .await?;
    Ok(applied.warnings)
}
