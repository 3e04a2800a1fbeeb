//! One restore, start to end: scripts, preflight, pre-data, data, post-data, sequences.

use super::data_only;
use super::error::FailedTables;
use super::error::RestoreError;
use super::indexes::{self, IndexBuilds};
use super::large_objects::{present_large_objects, restore_large_objects};
use super::preflight::{check_target_version, preflight, select_tables};
use super::roles::create_roles;
use super::sequences::{sequence_catch_up, set_sequences};
use super::tables::{by_chunk_any, lands_by_chunk, load_data_only, load_tables, PROGRESS_SCHEMA};
use super::{RestoreMeter, RestoreOptions, RestoreReport, ResumePoint, FINISHED_MARK};
use crate::db::{self, DbError, DbSettings};
use crate::format::manifest::{Manifest, SchemaDump, TableEntry};
use crate::format::{quote_ident, quote_literal, TableName};
use crate::schema::apply::{self, ApplyOptions, Decision, SubsetPlan};
use crate::schema::{self, Script};
use crate::store::ReadStore;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio_postgres::Client;

/// The schema scripts a restore runs.
pub(super) struct Scripts {
    pub(super) pre: Script,
    pub(super) post: Script,
    pub(super) globals: Option<Script>,
}

/// Restores `manifest` into the database `target` names.
///
/// # Errors
/// Preflight errors (nothing written), chunk errors naming the object, database errors
/// naming the table or schema object and the server's message.
pub async fn restore(
    store: Arc<dyn ReadStore>,
    manifest: &Manifest,
    target: &DbSettings,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let tables = select_tables(manifest, &opts.settings.tables)?;
    let resume = opts.resume.clone().unwrap_or_default();
    let scripts = load_scripts(store.as_ref(), manifest, opts).await?;
    let admin = db::connect(target).await?;
    let mut warnings = Vec::new();
    warnings.extend(check_target_version(&admin, target, manifest, opts).await?);
    let existing_schemas = preflight(
        store.as_ref(),
        &admin,
        target,
        &tables,
        scripts.as_ref(),
        opts,
        &resume,
    )
    .await?;
    let large_objects =
        checked_large_objects(store.as_ref(), &admin, target, manifest, opts).await?;
    // Settings the target knows: pg_dump's that it does not are left out.
    let known = apply::known_settings(&admin)
        .await
        .map_err(|e| DbError::query("reading the target's settings", target, e))?;
    let meter = opts.meter.clone().unwrap_or_default();
    meter.tables_total.store(tables.len(), Ordering::Relaxed);
    let mut schema = SchemaSteps::new(&admin, &known, existing_schemas, opts);
    schema.large_objects = large_objects;
    if let Some(s) = scripts
        .as_ref()
        .filter(|_| !opts.settings.tables.is_empty())
    {
        // Which pg_dump entries a restore of some tables applies.
        let relations = restored_relations(&tables);
        let plan = SubsetPlan::new(relations, sequence_owners(manifest), &[&s.pre, &s.post]);
        schema.subset = Some(plan);
    }
    let indexes = scripts.as_ref().map(|s| {
        let plain = indexes::plain_tables(&tables);
        let decide = |entry: &schema::Entry| schema.decide(entry);
        let resumed = opts.resume.is_some();
        let plan = IndexBuilds::plan(&s.post, &plain, &known, &schema.options, resumed, &decide);
        Arc::new(plan)
    });
    let schema_applied = match &scripts {
        Some(scripts) if !resume.schema_applied => {
            schema.pre_data(target, scripts, &tables, opts).await?;
            warnings.append(&mut schema.warnings);
            true
        }
        _ => resume.schema_applied,
    };
    let data = load_data(
        store.clone(),
        &admin,
        target,
        &tables,
        &resume,
        opts,
        &meter,
        indexes.clone(),
    )
    .await?;
    warnings.extend(data.warnings);
    let failed_count: usize = data.failed.iter().map(|f| f.tables.len()).sum();
    let loaded = resume.loaded.len() + data.completed.len();
    let done = loaded + failed_count == tables.len();
    if done {
        let store = store.as_ref();
        if let Some(indexes) = &indexes {
            schema.prebuilt = indexes::existing(&admin, indexes.indexes())
                .await
                .map_err(|e| DbError::query("reading the indexes built", target, e))?;
        }
        schema
            .finish(store, target, manifest, scripts.as_ref(), &tables, opts)
            .await?;
    }
    schema.objects += indexes.as_ref().map_or(0, |i| i.built());
    warnings.append(&mut schema.warnings);
    for warning in &warnings {
        tracing::warn!(backup_id = manifest.id, "{warning}");
    }
    if !data.failed.is_empty() {
        return Err(RestoreError::TablesFailed {
            failed: data.failed,
            total: tables.len(),
        });
    }
    let report = RestoreReport {
        backup_id: manifest.id.clone(),
        target: target.to_string(),
        tables: tables.len(),
        rows: meter.rows.load(Ordering::Relaxed),
        bytes: tables.iter().map(TableEntry::stored_bytes).sum(),
        chunks: tables.iter().map(TableEntry::chunk_count).sum(),
        seconds: started.elapsed().as_secs_f64(),
        done,
        completed: data.completed,
        schema_applied,
        schema_objects: schema.objects,
        data_only: data.note,
        warnings,
    };
    tracing::info!(
        backup_id = report.backup_id,
        target = report.target,
        rows = report.rows,
        seconds = report.seconds,
        "restore finished"
    );
    Ok(report)
}

/// The schema scripts a restore applies: none for a data-only restore.
async fn load_scripts(
    store: &dyn ReadStore,
    manifest: &Manifest,
    opts: &RestoreOptions,
) -> Result<Option<Scripts>, RestoreError> {
    if opts.settings.data_only {
        return Ok(None);
    }
    let dump = manifest
        .schema_dump
        .as_ref()
        .ok_or_else(|| RestoreError::NoSchemaDump {
            backup: manifest.id.clone(),
        })?;
    let globals = match (&dump.globals, opts.settings.create_roles) {
        (Some(g), true) => Some(schema::load_script(store, g).await?),
        (None, true) => {
            return Err(RestoreError::NoGlobals {
                backup: manifest.id.clone(),
            })
        }
        (_, false) => None,
    };
    Ok(Some(Scripts {
        pre: schema::load_script(store, &dump.pre_data).await?,
        post: schema::load_script(store, &dump.post_data).await?,
        globals,
    }))
}

/// The backup's large-object script, once the target is known to hold none of them
/// (`None` when the backup has none or only some tables are restored).
async fn checked_large_objects(
    store: &dyn ReadStore,
    admin: &Client,
    target: &DbSettings,
    manifest: &Manifest,
    opts: &RestoreOptions,
) -> Result<Option<Script>, RestoreError> {
    let object = manifest
        .schema_dump
        .as_ref()
        .and_then(|d| d.large_objects_script.as_ref());
    let Some(object) = object.filter(|_| opts.settings.tables.is_empty()) else {
        return Ok(None);
    };
    let script = schema::load_script(store, object).await?;
    let present = present_large_objects(admin, target, &script).await?;
    let replace = opts.resume.is_some() || (opts.settings.data_only && opts.settings.clean);
    if let (Some(first), false) = (present.first(), replace) {
        return Err(RestoreError::TargetLargeObjectsExist {
            count: present.len(),
            first: *first,
        });
    }
    Ok(Some(script))
}

/// The schema's side of a restore: which entries apply, and what was applied.
struct SchemaSteps<'a> {
    admin: &'a Client,
    known: &'a HashSet<String>,
    /// Schemas the target has already (and empty): not created again.
    existing_schemas: HashSet<String>,
    subset: Option<SubsetPlan>,
    /// The large-objects script, checked against the backup's fingerprint.
    large_objects: Option<Script>,
    /// Indexes built as their tables were loaded: left out of the post-data step.
    prebuilt: HashSet<TableName>,
    options: ApplyOptions,
    objects: usize,
    warnings: Vec<String>,
}

impl<'a> SchemaSteps<'a> {
    fn new(
        admin: &'a Client,
        known: &'a HashSet<String>,
        existing_schemas: HashSet<String>,
        opts: &RestoreOptions,
    ) -> Self {
        Self {
            admin,
            known,
            existing_schemas,
            subset: None,
            large_objects: None,
            prebuilt: HashSet::new(),
            options: ApplyOptions {
                with_owners: opts.settings.with_privileges,
                with_privileges: opts.settings.with_privileges,
                finish_queries: Vec::new(),
                finish_with: None,
            },
            objects: 0,
            warnings: Vec::new(),
        }
    }

    fn decide(&self, entry: &schema::Entry) -> Decision {
        if entry.kind == "SCHEMA" && self.existing_schemas.contains(&entry.name) {
            return Decision::Skip(String::new());
        }
        if !self.prebuilt.is_empty()
            && indexes::index_of(entry).is_some_and(|(_, index)| self.prebuilt.contains(&index))
        {
            return Decision::Skip(String::new());
        }
        match &self.subset {
            Some(plan) => plan.decide(entry),
            None => Decision::Apply,
        }
    }

    async fn apply(&mut self, script: &Script, section: &'static str) -> Result<(), RestoreError> {
        let decide = |entry: &schema::Entry| self.decide(entry);
        let applied = apply::apply(
            self.admin,
            script,
            section,
            &self.options,
            self.known,
            &decide,
        )
        .await?;
        self.objects += applied.entries;
        self.warnings.extend(applied.warnings);
        Ok(())
    }

    /// Roles (with `create_roles`), then the pre-data script.
    async fn pre_data(
        &mut self,
        target: &DbSettings,
        scripts: &Scripts,
        tables: &[TableEntry],
        opts: &RestoreOptions,
    ) -> Result<(), RestoreError> {
        if let Some(globals) = &scripts.globals {
            let created = create_roles(self.admin, target, globals).await?;
            if !created.is_empty() {
                self.warnings
                    .push(format!("created roles: {}", created.join(", ")));
            }
        }
        self.apply(&scripts.pre, "pre-data").await?;
        if opts.settings.tables.is_empty() {
            let covered = restored_relations(tables);
            for table in apply::created_tables(&scripts.pre) {
                if !covered.contains(&table) {
                    self.warnings.push(format!(
                        "table {table} is in the backup's schema but not among its tables: restored empty"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Once every table is loaded: the chunk progress table goes, then large objects,
    /// sequences, the sequence checks, the materialized views of a data-only restore, the
    /// post-data script (and the finished mark).
    async fn finish(
        &mut self,
        store: &dyn ReadStore,
        target: &DbSettings,
        manifest: &Manifest,
        scripts: Option<&Scripts>,
        tables: &[TableEntry],
        opts: &RestoreOptions,
    ) -> Result<(), RestoreError> {
        if by_chunk_any(self.admin).await {
            self.admin
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {PROGRESS_SCHEMA} CASCADE"))
                .await
                .map_err(|e| DbError::query("dropping the chunk progress table", target, e))?;
        }
        if let Some(script) = &self.large_objects {
            let known = self.known;
            let moved = restore_large_objects(self.admin, target, script, known, opts).await?;
            self.warnings.extend(moved);
        }
        set_sequences(
            self.admin,
            target,
            manifest,
            tables,
            opts.settings.data_only,
        )
        .await?;
        // Once the keys' indexes exist (post-data), or now if they already do.
        let catch_up = sequence_catch_up(manifest, tables, opts.settings.advance_sequences);
        let Some(scripts) = scripts else {
            let moved = apply::warning_queries(self.admin, &catch_up)
                .await
                .map_err(|e| DbError::query("checking sequences against the data", target, e))?;
            self.warnings.extend(moved);
            if let Some(dump) = &manifest.schema_dump {
                self.refresh_materialized_views(store, dump).await?;
            }
            return Ok(());
        };
        self.options.finish_queries = catch_up;
        if opts.mark_finished {
            self.options.finish_with = Some(format!(
                "COMMENT ON DATABASE {} IS {}",
                quote_ident(&target.dbname),
                quote_literal(FINISHED_MARK)
            ));
        }
        self.apply(&scripts.post, "post-data").await
    }

    /// As pg_restore --data-only does: refresh the materialized views that were populated
    /// in the backup, now that their tables hold the data.
    async fn refresh_materialized_views(
        &mut self,
        store: &dyn ReadStore,
        dump: &SchemaDump,
    ) -> Result<(), RestoreError> {
        let post = schema::load_script(store, &dump.post_data).await?;
        let refresh_only = |entry: &schema::Entry| {
            if entry.kind == "MATERIALIZED VIEW DATA" {
                Decision::Optional
            } else {
                Decision::Skip(String::new())
            }
        };
        let applied = apply::apply(
            self.admin,
            &post,
            "materialized views",
            &ApplyOptions::default(),
            self.known,
            &refresh_only,
        )
        .await?;
        self.warnings.extend(applied.warnings);
        Ok(())
    }
}

/// What the data step did.
struct Loaded {
    completed: Vec<TableName>,
    failed: Vec<FailedTables>,
    /// How a data-only restore kept constraints and triggers quiet.
    note: Option<String>,
    warnings: Vec<String>,
}

/// Loads the tables not loaded yet: into the fresh schema (building each table's
/// `indexes` once it is in), or into the existing one (`data_only`).
#[allow(clippy::too_many_arguments)]
async fn load_data(
    store: Arc<dyn ReadStore>,
    admin: &Client,
    target: &DbSettings,
    tables: &[TableEntry],
    resume: &ResumePoint,
    opts: &RestoreOptions,
    meter: &Arc<RestoreMeter>,
    indexes: Option<Arc<IndexBuilds>>,
) -> Result<Loaded, RestoreError> {
    if opts.settings.data_only {
        let plan = data_only::plan(admin, target, tables).await?;
        if opts.settings.clean {
            let names: Vec<String> = tables.iter().map(TableEntry::own_rows).collect();
            admin
                .batch_execute(&format!("TRUNCATE {}", names.join(", ")))
                .await
                .map_err(|e| DbError::query("emptying the target tables (--clean)", target, e))?;
        }
        let (completed, failed) = load_data_only(store, target, tables, &plan, opts, meter).await?;
        return Ok(Loaded {
            completed,
            failed,
            note: Some(plan.describe()),
            warnings: plan.warnings,
        });
    }
    let pending: Vec<usize> = (0..tables.len())
        .filter(|&t| !resume.loaded.contains(&tables[t].name))
        .collect();
    let by_chunk = prepare_tables(admin, target, tables, &pending, opts).await?;
    let completed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let loaded = load_tables(
        store, target, tables, &pending, opts, meter, &completed, indexes,
    )
    .await;
    let completed = completed.lock().map(|c| c.clone()).unwrap_or_default();
    if let Err(cause) = loaded {
        return Err(RestoreError::Incomplete {
            cause: Box::new(cause),
            loaded: resume.loaded.len() + completed.len(),
            tables: tables.len(),
            state: if by_chunk {
                "a time-boxed restore lands big tables chunk by chunk, and a table still loading holds exactly the chunks recorded in tidemark_restore_progress.chunks; the next slice resumes it"
            } else {
                "each table loads in one transaction, so the failed one was rolled back and none is half-loaded; drop the target database and restore again"
            },
        });
    }
    Ok(Loaded {
        completed,
        failed: Vec::new(),
        note: None,
        warnings: Vec::new(),
    })
}

/// Readies the target for the tables still to load; returns whether any lands chunk by
/// chunk (and so records its progress in the target).
async fn prepare_tables(
    admin: &Client,
    target: &DbSettings,
    tables: &[TableEntry],
    pending: &[usize],
    opts: &RestoreOptions,
) -> Result<bool, RestoreError> {
    let by_chunk = pending.iter().any(|&t| lands_by_chunk(&tables[t], opts));
    if by_chunk {
        admin
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {PROGRESS_SCHEMA}; \
                 CREATE TABLE IF NOT EXISTS {PROGRESS_SCHEMA}.chunks \
                 (tbl text NOT NULL, chunk text NOT NULL, PRIMARY KEY (tbl, chunk))"
            ))
            .await
            .map_err(|e| DbError::query("creating the chunk progress table", target, e))?;
    }
    let whole: Vec<String> = pending
        .iter()
        .filter(|&&t| !lands_by_chunk(&tables[t], opts))
        .map(|&t| tables[t].own_rows())
        .collect();
    if opts.resume.is_some() && !whole.is_empty() {
        // A slice that died mid-table left at most a rolled-back transaction; empty the
        // tables still to load anyway, so a load never lands twice. (Tables landed chunk
        // by chunk hold exactly the chunks their progress records: they resume.)
        admin
            .batch_execute(&format!("TRUNCATE {}", whole.join(", ")))
            .await
            .map_err(|e| DbError::query("emptying half-loaded tables", target, e))?;
    }
    Ok(by_chunk)
}

/// The backup tables a restore covers and their partitions.
pub(super) fn restored_relations(tables: &[TableEntry]) -> HashSet<TableName> {
    let mut out = HashSet::new();
    for t in tables {
        out.insert(t.name.clone());
        out.extend(t.schema.partitions.iter().map(|p| p.name.clone()));
    }
    out
}

pub(super) fn sequence_owners(manifest: &Manifest) -> HashMap<TableName, TableName> {
    manifest
        .sequences
        .iter()
        .filter_map(|s| Some((s.name.clone(), s.owned_by.as_ref()?.0.clone())))
        .collect()
}
