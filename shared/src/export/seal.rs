//! Sealing a run: the manifest written from the progress document.

use super::options::ExportOptions;
use super::state::Shared;
use crate::catalog::{self, TableSelection};
use crate::db::{DbSettings, Session};
use crate::format::progress::RunProgress;
use crate::run::RunError;
use crate::schema::capture::CaptureRequest;
use crate::schema::{self, PgDump};

/// Every table is of this slice's snapshot: the schema and sequences are taken again in
/// it (unless the run's schema already is), and the run is ready to seal.
pub(super) async fn finalize_run(
    shared: &Shared,
    client: &Session<'_>,
    db: &DbSettings,
    opts: &ExportOptions,
    snapshot_id: &str,
) -> Result<(), RunError> {
    let slice = shared.slice;
    let (schema_slice, schemas, parent) = {
        let state = shared.state.lock().await;
        (
            state.doc.schema_slice,
            dump_schemas(&opts.settings.selection, &state.doc),
            state.doc.parent.clone(),
        )
    };
    let mut recaptured = None;
    if schema_slice != slice {
        let tool = PgDump::locate(opts.pg_dump.as_deref()).await?;
        recaptured = Some(
            schema::capture::capture(
                shared.store.as_ref(),
                client,
                &CaptureRequest {
                    tool: &tool,
                    settings: db,
                    snapshot_id,
                    run_id: &shared.run_id,
                    schemas: &schemas,
                    parent: parent.as_deref(),
                    parent_schema: None,
                },
            )
            .await?,
        );
    }
    let sequences = catalog::sequences(client, &opts.settings.selection.schemas).await?;
    let mut state = shared.state.lock().await;
    let doc = &mut state.doc;
    if let Some((dump, warnings)) = recaptured {
        doc.schema_dump = Some(dump);
        doc.schema_slice = slice;
        for warning in warnings {
            if !doc.warnings.contains(&warning) {
                doc.warnings.push(warning);
            }
        }
    }
    doc.sequences = sequences;
    for table in &mut doc.tables {
        table.consistent_in_slice = Some(slice);
        table.pass_base = None;
    }
    doc.consistent_in_slice = Some(slice);
    tracing::info!(
        run_id = doc.run_id,
        slice,
        rounds = doc.pass.as_ref().map_or(0, |p| p.round),
        "every table is of one snapshot"
    );
    shared.flush(&mut state).await
}

/// The schemas whose objects a backup's schema dump covers: the selected schemas (or the
/// listed tables'), and every schema a partition of a covered table lives in.
pub(super) fn dump_schemas(selection: &TableSelection, progress: &RunProgress) -> Vec<String> {
    let mut schemas: Vec<String> = if selection.tables.is_empty() {
        if selection.schemas.is_empty() {
            vec!["public".to_owned()]
        } else {
            selection.schemas.clone()
        }
    } else {
        Vec::new()
    };
    for table in &progress.tables {
        schemas.push(table.name.schema.clone());
        schemas.extend(
            table
                .schema
                .partitions
                .iter()
                .map(|p| p.name.schema.clone()),
        );
    }
    schemas.sort();
    schemas.dedup();
    schemas
}
