//! Every relation kind and table feature the catalog can hold (`tests/fixtures/
//! table_kinds.sql`): inheritance, typed and column-less tables, dropped and generated
//! columns, keys with generated or INCLUDE columns, unlogged, foreign and RLS tables,
//! exotic names and types, sequences. The oracles are PostgreSQL's: `pg_dump
//! --schema-only` of what `pg_dump | psql` makes of the source, sorted `COPY` of every
//! table read with `ONLY`, and `pg_sequences`.

use std::sync::Arc;
use std::time::Duration;

use tidemark_core::export::ExportOptions;
use tidemark_core::restore::{self, RestoreError, RestoreOptions};
use tidemark_core::store::S3StoreOptions;
use tidemark_tests::fixtures::*;
use tidemark_tests::{
    all_data, assert_same_schema, cluster_pg_dump, exec, fit_client_script, migrated_copy,
    psql_script, restore_fresh, s3_store, state_facts, verify_backup, TestCluster, TestDatabase,
};

const FIXTURE: &str = include_str!("../fixtures/table_kinds.sql");
const FIXTURE_15: &str = include_str!("../fixtures/table_kinds_15.sql");
const FIXTURE_18: &str = include_str!("../fixtures/table_kinds_18.sql");

/// Changes between the full and the incremental backup, in every kind of table.
const CHANGES: &str = r#"
UPDATE kinds.vehicle SET name = name || ' (updated)' WHERE id % 4 = 0;
DELETE FROM kinds.vehicle WHERE id IN (3, 5);
DELETE FROM kinds.car WHERE id = 102;
UPDATE kinds.sports_car SET top_speed = 999 WHERE id = 201;
INSERT INTO kinds.owned_car VALUES (303, 'new owned', 4, 'Cid', 'CD-2');
INSERT INTO kinds.nothing DEFAULT VALUES;
INSERT INTO kinds.emptied DEFAULT VALUES;
UPDATE kinds.holes SET v = 'changed' WHERE id = 7;
DELETE FROM kinds.holes WHERE id = 8;
UPDATE kinds.gen_key SET b = 'changed' WHERE a % 10 = 0;
DELETE FROM kinds.gen_key WHERE a = 11;
INSERT INTO kinds.gen_key (a, b) VALUES (1000, 'new');
UPDATE kinds.gen_only_key SET v = -v WHERE a < 5;
DELETE FROM kinds.gen_only_key WHERE a = 6;
UPDATE kinds.incl SET area = box(point(0, 0), point(9, 9)) WHERE id = 3;
DELETE FROM kinds.incl WHERE id = 4;
INSERT INTO kinds.migrated (v) VALUES ('d');
INSERT INTO kinds.shapes (p) VALUES (point '(5,5)');
DO $$ BEGIN
  IF current_setting('server_version_num')::int >= 180000 THEN
    UPDATE kinds.virtual_cols SET b = 'changed' WHERE a % 7 = 0;
    DELETE FROM kinds.virtual_cols WHERE a = 3;
  END IF;
END $$;
UPDATE kinds."we""ird.table name" SET "Col ""Two""" = 'new "two"' WHERE "col.one" = 1;
SELECT lo_put(424242, 1, '\x11');
SELECT lo_unlink(424243);
SELECT lo_from_bytea(424244, 'new');
"#;

/// Every large object's oid, contents (MD5) and comment.
async fn large_objects(db: &TestDatabase) -> Vec<String> {
    let client = tidemark_core::db::connect(&db.settings())
        .await
        .expect("connect");
    client
        .query(
            "SELECT format('%s %s %s', oid, md5(lo_get(oid)), obj_description(oid, 'pg_largeobject')) \
             FROM pg_largeobject_metadata ORDER BY oid",
            &[],
        )
        .await
        .expect("large objects")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn options() -> ExportOptions {
    ExportOptions {
        settings: tidemark_core::export::ExportSettings {
            chunk_rows: 50,
            workers: 2,
            selection: tidemark_core::catalog::TableSelection {
                schemas: vec!["kinds".into(), "public".into()],
                ..Default::default()
            },
            ..tidemark_core::export::ExportSettings::default()
        },
        progress_interval: Duration::ZERO,
        ..ExportOptions::default()
    }
}

async fn fixture_db(cluster: &TestCluster) -> TestDatabase {
    let db = cluster.create_database().await;
    let mut sql = FIXTURE.to_owned();
    let version = cluster.server_version_num().await;
    if version >= 150_000 {
        sql.push_str(FIXTURE_15);
    }
    if version >= 180_000 {
        sql.push_str(FIXTURE_18);
    }
    exec(&db.settings(), &sql).await;
    exec(&db.settings(), "ANALYZE").await;
    db
}

/// What `pg_dump | psql` makes of `source`: the reference for what a restore can be.
async fn pg_dump_copy(cluster: &TestCluster, source: &TestDatabase) -> TestDatabase {
    let target = cluster.create_database().await;
    let script = cluster_pg_dump(cluster, &source.name, &["--no-owner", "--no-privileges"]);
    let script = fit_client_script(cluster, &script).await;
    psql_script(
        cluster,
        &target.name,
        &cluster.user,
        &cluster.password,
        &script,
    );
    target
}

/// `restored` has the schema `pg_dump | psql` gives the source, and the source's rows and
/// sequences exactly.
async fn assert_restores_like_pg_dump(
    cluster: &TestCluster,
    source: &TestDatabase,
    restored: &TestDatabase,
) {
    let reference = pg_dump_copy(cluster, source).await;
    assert_same_schema(&reference, restored);
    let (want, got) = (
        all_data(&source.settings()).await,
        all_data(&restored.settings()).await,
    );
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (table, rows) in &want {
        assert_eq!(rows, &got[table], "{table}");
    }
    assert_eq!(
        state_facts(&source.settings()).await,
        state_facts(&restored.settings()).await
    );
    assert_eq!(large_objects(source).await, large_objects(restored).await);
}

async fn count(db: &TestDatabase, sql: &str) -> i64 {
    let client = tidemark_core::db::connect(&db.settings())
        .await
        .expect("connect");
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_kind_round_trips_full_and_incremental() {
    let cluster = TestCluster::from_env();
    let db = fixture_db(&cluster).await;
    let store: Store = Arc::new(s3_store(S3StoreOptions::default()).await);
    let opts = options();

    let (full, _) = backup(&store, &db, &opts).await;
    let m = manifest(&store, &full.backup_id).await;
    let mode = |name: &str| {
        m.tables
            .iter()
            .find(|t| t.name.name == name)
            .map(|t| (t.mode.to_string(), t.key.clone()))
            .unwrap_or_else(|| panic!("{name} backed up"))
    };
    // Generated and INCLUDE keys back up by default, keyed on the key alone.
    assert_eq!(
        mode("gen_key"),
        ("changes".into(), vec!["a".into(), "g".into()])
    );
    assert_eq!(mode("gen_only_key"), ("changes".into(), vec!["k".into()]));
    assert_eq!(mode("incl"), ("changes".into(), vec!["id".into()]));
    assert_eq!(mode("nothing").0, "snapshot");
    // The parent's own rows only.
    let vehicle = m.tables.iter().find(|t| t.name.name == "vehicle").unwrap();
    assert_eq!(vehicle.fingerprint.rows, 32);

    let restored = restore_fresh(&store, &cluster, &full.backup_id).await;
    assert_restores_like_pg_dump(&cluster, &db, &restored).await;
    assert_eq!(
        count(&restored, "SELECT count(*) FROM ONLY kinds.vehicle").await,
        32
    );
    assert_eq!(
        count(&restored, "SELECT count(*) FROM kinds.nothing").await,
        3
    );
    // The identity sequence, not the old serial one it shares the column with, is where
    // the source left it; so is the one behind its keys.
    assert_eq!(
        count(&restored, "SELECT last_value FROM kinds.migrated_id_seq1").await,
        count(&db, "SELECT last_value FROM kinds.migrated_id_seq1").await
    );
    assert_eq!(
        count(&restored, "SELECT last_value FROM kinds.behind_id_seq").await,
        1
    );
    let record = verify_backup(&store, &cluster, &full.backup_id).await;
    assert!(record.ok, "{record:?}");

    exec(&db.settings(), CHANGES).await;
    let (incr, _) = backup(&store, &db, &opts).await;
    assert_eq!(incr.kind.to_string(), "incremental");
    let restored = restore_fresh(&store, &cluster, &incr.backup_id).await;
    assert_restores_like_pg_dump(&cluster, &db, &restored).await;
    let record = verify_backup(&store, &cluster, &incr.backup_id).await;
    assert!(record.ok, "{record:?}");
    assert!(record.schema.as_ref().is_some_and(|s| s.ok), "{record:?}");

    // A changed byte of a large object in a restore is named by the comparison.
    exec(&restored.settings(), "SELECT lo_put(424242, 0, '\\x99')").await;
    let m = manifest(&store, &incr.backup_id).await;
    let tool = tidemark_core::schema::PgDump::locate(None)
        .await
        .expect("pg_dump");
    let (_, schema) =
        tidemark_core::verify::compare_restored(store.as_ref(), &m, &restored.settings(), &tool, 2)
            .await
            .expect("compare");
    assert!(
        !schema.ok && schema.differences[0].starts_with("different: LARGE OBJECTS"),
        "{schema:?}"
    );

    // Large objects changed between the full and the incremental: dumped again. Nothing
    // of them changed since: the next backup keeps the incremental's script, and restores
    // them all the same.
    let lo_script = |m: &tidemark_core::format::manifest::Manifest| {
        m.schema_dump
            .as_ref()
            .and_then(|d| d.large_objects_script.as_ref())
            .map(|o| o.key.clone())
    };
    let incr_script = lo_script(&manifest(&store, &incr.backup_id).await);
    assert!(incr_script.is_some());
    assert_ne!(
        lo_script(&manifest(&store, &full.backup_id).await),
        incr_script
    );
    exec(
        &db.settings(),
        "UPDATE kinds.holes SET v = 'again' WHERE id = 9",
    )
    .await;
    let (third, _) = backup(&store, &db, &opts).await;
    assert_eq!(
        lo_script(&manifest(&store, &third.backup_id).await),
        incr_script
    );
    let restored = restore_fresh(&store, &cluster, &third.backup_id).await;
    assert_restores_like_pg_dump(&cluster, &db, &restored).await;

    // No schema change since the full: every backup keeps the full's scripts (pg_dump's
    // random \restrict key aside, they say the same), and restores and verifies from them.
    let scripts = |m: &tidemark_core::format::manifest::Manifest| {
        let dump = m.schema_dump.as_ref().expect("schema");
        (dump.pre_data.key.clone(), dump.post_data.key.clone())
    };
    let full_scripts = scripts(&manifest(&store, &full.backup_id).await);
    assert!(full_scripts.0.contains(&full.backup_id), "{full_scripts:?}");
    assert_eq!(
        scripts(&manifest(&store, &incr.backup_id).await),
        full_scripts
    );
    assert_eq!(
        scripts(&manifest(&store, &third.backup_id).await),
        full_scripts
    );
    // A new index is post-data: only that script is stored anew.
    exec(&db.settings(), "CREATE INDEX holes_v ON kinds.holes (v)").await;
    let (fourth, _) = backup(&store, &db, &opts).await;
    let (pre, post) = scripts(&manifest(&store, &fourth.backup_id).await);
    assert_eq!(pre, full_scripts.0);
    assert!(post.contains(&fourth.backup_id), "{post}");
    let restored = restore_fresh(&store, &cluster, &fourth.backup_id).await;
    assert_restores_like_pg_dump(&cluster, &db, &restored).await;
    let record = verify_backup(&store, &cluster, &fourth.backup_id).await;
    assert!(record.ok, "{record:?}");

    // --advance-sequences moves the sequence the source held behind its keys, and only it.
    let target = cluster.create_database().await;
    let manifest = manifest(&store, &incr.backup_id).await;
    let report = restore::restore(
        store.clone(),
        &manifest,
        &target.settings(),
        &RestoreOptions {
            settings: tidemark_core::restore::RestoreSettings {
                advance_sequences: true,
                ..tidemark_core::restore::RestoreSettings::default()
            },
            ..RestoreOptions::default()
        },
    )
    .await
    .expect("restore");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("kinds.behind_id_seq") && w.contains("moved past them")),
        "{:?}",
        report.warnings
    );
    assert_eq!(
        count(&target, "SELECT last_value FROM kinds.behind_id_seq").await,
        11
    );
}

/// Verify reads each table back as soon as the restore reports its load committed, while
/// the rest loads; that is sound only if nothing the restore does afterwards changes a
/// table's rows. A chain (rows merged on load) of every table kind, read at each report,
/// must give the source's fingerprints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_table_read_back_as_it_lands_has_the_sources_fingerprint() {
    let cluster = TestCluster::from_env();
    let db = fixture_db(&cluster).await;
    let store: Store = Arc::new(s3_store(S3StoreOptions::default()).await);
    backup(&store, &db, &options()).await;
    exec(&db.settings(), CHANGES).await;
    let (incr, _) = backup(&store, &db, &options()).await;
    let m = manifest(&store, &incr.backup_id).await;
    let scratch = cluster.create_database().await;
    let target = scratch.settings();
    let (landed, reports) = tokio::sync::mpsc::unbounded_channel();
    let reading = tidemark_core::verify::fingerprints_as_landed(&target, &m.tables, reports, 2);
    let opts = RestoreOptions {
        landed: Some(landed),
        ..RestoreOptions::default()
    };
    // The options hold the sender: the reading ends once the restore has dropped them.
    let restoring = async {
        let opts = opts;
        restore::restore(store.clone(), &m, &target, &opts).await
    };
    let (report, early) = tokio::join!(restoring, reading);
    report.expect("restore");
    assert_eq!(
        early.len(),
        m.tables.len(),
        "every table is reported once it is in"
    );
    for (i, entry) in m.tables.iter().enumerate() {
        assert_eq!(early.get(&i), Some(&entry.fingerprint), "{}", entry.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_only_loads_every_table_it_can_and_lists_the_failed_ones() {
    let cluster = TestCluster::from_env();
    let db = fixture_db(&cluster).await;
    // A NOT VALID check that a row breaks: a schema-only script creates it before the
    // data, so loading that table fails.
    exec(
        &db.settings(),
        "CREATE TABLE kinds.checked (id int PRIMARY KEY, v int);
         INSERT INTO kinds.checked VALUES (1, -1), (2, 2);
         ALTER TABLE kinds.checked ADD CONSTRAINT v_positive CHECK (v > 0) NOT VALID;",
    )
    .await;
    let store: Store = Arc::new(s3_store(S3StoreOptions::default()).await);
    let (full, _) = backup(&store, &db, &options()).await;
    let first = manifest(&store, &full.backup_id).await;
    let data_only = |exit_on_error| RestoreOptions {
        settings: tidemark_core::restore::RestoreSettings {
            data_only: true,
            exit_on_error,
            ..tidemark_core::restore::RestoreSettings::default()
        },
        ..RestoreOptions::default()
    };

    let target = migrated_copy(&cluster, &db.name, None).await;
    let err = restore::restore(store.clone(), &first, &target.settings(), &data_only(false))
        .await
        .expect_err("kinds.checked cannot load");
    match &err {
        RestoreError::TablesFailed { failed, .. } => {
            assert_eq!(failed.len(), 1, "{err}");
            assert_eq!(failed[0].tables[0].to_string(), "kinds.checked");
            assert!(failed[0].error.contains("v_positive"), "{err}");
        }
        other => panic!("expected the failed tables listed, got {other}"),
    }
    // Every other table holds the source's rows.
    let (want, got) = (
        all_data(&db.settings()).await,
        all_data(&target.settings()).await,
    );
    for (table, rows) in &want {
        if table == "kinds.checked" {
            continue;
        }
        assert_eq!(rows, &got[table], "{table}");
    }
    assert_eq!(
        count(&target, "SELECT count(*) FROM kinds.checked").await,
        0
    );

    // --exit-on-error stops at the first failure instead.
    let target = migrated_copy(&cluster, &db.name, None).await;
    let err = restore::restore(store.clone(), &first, &target.settings(), &data_only(true))
        .await
        .expect_err("stops");
    assert!(
        !matches!(err, RestoreError::TablesFailed { .. }) && err.to_string().contains("v_positive"),
        "{err}"
    );

    // Without the broken row, --data-only gives the source's data exactly.
    exec(&db.settings(), "DELETE FROM kinds.checked WHERE v < 0").await;
    let (second, _) = backup(&store, &db, &options()).await;
    let manifest = manifest(&store, &second.backup_id).await;
    let target = migrated_copy(&cluster, &db.name, None).await;
    restore::restore(
        store.clone(),
        &manifest,
        &target.settings(),
        &data_only(false),
    )
    .await
    .expect("data-only restore");
    assert_eq!(
        all_data(&db.settings()).await,
        all_data(&target.settings()).await
    );
    assert_eq!(large_objects(&db).await, large_objects(&target).await);
    // Again with --clean: the tables are emptied and the large objects replaced.
    let clean = RestoreOptions {
        settings: tidemark_core::restore::RestoreSettings {
            clean: true,
            ..data_only(false).settings
        },
        ..data_only(false)
    };
    restore::restore(store.clone(), &manifest, &target.settings(), &clean)
        .await
        .expect("data-only --clean restore");
    assert_eq!(large_objects(&db).await, large_objects(&target).await);

    // A target that already holds one of the backup's large objects is refused before
    // anything is written.
    let taken = migrated_copy(&cluster, &db.name, None).await;
    exec(&taken.settings(), "SELECT lo_create(424242)").await;
    let err = restore::restore(
        store.clone(),
        &manifest,
        &taken.settings(),
        &data_only(false),
    )
    .await
    .expect_err("refused");
    assert!(
        matches!(
            err,
            RestoreError::TargetLargeObjectsExist { first: 424242, .. }
        ),
        "{err}"
    );
    assert_eq!(count(&taken, "SELECT count(*) FROM kinds.vehicle").await, 0);
    assert_eq!(
        state_facts(&db.settings()).await,
        state_facts(&target.settings()).await
    );
}
