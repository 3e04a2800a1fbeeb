//! Restore and verification restore against the real cluster and both store adapters.
//! The oracle is ordered COPY output of the source, which Tidemark does not write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidemark_core::catalog::TableSelection;
use tidemark_core::db::DbSettings;
use tidemark_core::export::{export_slice, ExportOptions};
use tidemark_core::format::manifest::Manifest;
use tidemark_core::format::TableMode;
use tidemark_core::repo::manifest_key;
use tidemark_core::restore::{self, BackupSelector, RestoreError, RestoreOptions};
use tidemark_core::store::{S3StoreOptions, WriteCondition};
use tidemark_core::verify::{self, VerifyOptions};
use tidemark_tests::fixtures::*;
use tidemark_tests::{
    assert_same, exec, local_store, restore_fresh, s3_store, TestCluster, TestDatabase,
};

fn options(chunk_rows: u64, schemas: &[&str]) -> ExportOptions {
    ExportOptions {
        settings: tidemark_core::export::ExportSettings {
            chunk_rows,
            chunk_bytes: 1 << 30,
            workers: 2,
            selection: TableSelection {
                schemas: schemas.iter().map(|s| (*s).to_owned()).collect(),
                ..TableSelection::default()
            },
            ..tidemark_core::export::ExportSettings::default()
        },
        progress_interval: Duration::ZERO,
        ..ExportOptions::default()
    }
}

fn chain_options() -> ExportOptions {
    let mut opts = options(100, &["public"]);
    opts.settings.selection.modes = vec![("events".into(), TableMode::Append)];
    opts
}

/// Primary keys, indexes, checks and sequence positions as the catalog shows them.
async fn schema_facts(settings: &DbSettings) -> Vec<String> {
    let client = tidemark_core::db::connect(settings).await.expect("connect");
    let rows = client
        .query(
            "SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
               WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace) \
             UNION ALL SELECT indexdef FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'information_schema') \
             UNION ALL SELECT schemaname || '.' || sequencename || ' ' || coalesce(last_value, -1) FROM pg_sequences \
             ORDER BY 1",
            &[],
        )
        .await
        .expect("catalog");
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

async fn matrix_restores_equal_to_source(store: Store) {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        &format!(
            "{MATRIX_DDL}{MATRIX_DATA}
             DELETE FROM nokey WHERE x = 'same';
             CREATE INDEX matrix_ts ON matrix (ts DESC) WHERE flag;
             CREATE UNIQUE INDEX nokey_y ON nokey (y, x);
             ALTER TABLE matrix ADD CONSTRAINT matrix_n_sane CHECK (n IS NULL OR n > -1e30);
             CREATE TABLE serials (id serial PRIMARY KEY, v text DEFAULT 'd', m int REFERENCES matrix (id));
             INSERT INTO serials (v, m) SELECT 'v' || g, CASE WHEN g < 5 THEN g END FROM generate_series(1, 42) g;"
        ),
    )
    .await;
    let (sealed, _) = backup(&store, &db, &options(500, &["public", "Sales"])).await;
    let target = restore_fresh(&store, &cluster, &sealed.backup_id).await;
    let mut tables = MATRIX_TABLES.to_vec();
    tables.push(("serials", "1"));
    assert_same(&db.settings(), &target.settings(), &tables).await;
    assert_eq!(
        schema_facts(&db.settings()).await,
        schema_facts(&target.settings()).await
    );
    // The restored sequence continues where the source's would.
    exec(
        &target.settings(),
        "INSERT INTO serials (v) VALUES ('next')",
    )
    .await;
    let client = tidemark_core::db::connect(&target.settings())
        .await
        .expect("connect");
    let next: i32 = client
        .query_one("SELECT max(id) FROM serials", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(next, 43);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_type_matrix_restores_equal_to_the_source_local() {
    let (_dir, store) = local_store();
    matrix_restores_equal_to_source(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_type_matrix_restores_equal_to_the_source_s3() {
    matrix_restores_equal_to_source(Arc::new(s3_store(S3StoreOptions::default()).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_with_updates_deletes_and_late_commits_restore_and_verify() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let store: Store = Arc::new(s3_store(S3StoreOptions::default()).await);
    let opts = chain_options();
    backup(&store, &db, &opts).await;

    let late = tidemark_core::db::connect(&db.settings())
        .await
        .expect("connect");
    late.batch_execute(
        "BEGIN; INSERT INTO events (payload) VALUES ('late'); UPDATE accounts SET note = 'late' WHERE id = 3",
    )
    .await
    .expect("open transaction");
    exec(
        &db.settings(),
        "UPDATE accounts SET balance = balance * 2 WHERE id % 5 = 0;
         DELETE FROM accounts WHERE id % 13 = 0;
         INSERT INTO accounts SELECT g, g, 'new' FROM generate_series(2000, 2100) g;
         INSERT INTO events (payload) SELECT 'more ' || g FROM generate_series(1, 250) g;
         UPDATE settings SET v = 'x' WHERE k = 'k1';",
    )
    .await;
    let (mid, _) = backup(&store, &db, &opts).await;
    late.batch_execute("COMMIT").await.expect("commit late");
    exec(&db.settings(), "DELETE FROM accounts WHERE id BETWEEN 100 AND 180; UPDATE accounts SET note = NULL WHERE id = 1").await;
    let (last, _) = backup(&store, &db, &opts).await;

    let target = restore_fresh(&store, &cluster, &last.backup_id).await;
    assert_same(&db.settings(), &target.settings(), CHAIN_TABLES).await;

    for id in [&mid.backup_id, &last.backup_id] {
        let record = verify::verify(
            store.clone(),
            &cluster.settings("postgres"),
            &VerifyOptions {
                backup: Some(BackupSelector::Id(id.clone())),
                ..VerifyOptions::default()
            },
        )
        .await
        .expect("verify");
        assert!(record.ok, "{record:?}");
        assert!(record.restore_seconds > 0.0 && record.tables.len() == 3);
    }
    let listed = tidemark_core::manifest::list_backups(store.as_ref())
        .await
        .expect("list");
    assert_eq!(
        listed.iter().map(|b| b.verified).collect::<Vec<_>>(),
        vec![None, Some(true), Some(true)]
    );
    assert_no_scratch_left(&cluster).await;
}

async fn assert_no_scratch_left(cluster: &TestCluster) {
    let admin = tidemark_core::db::connect(&cluster.settings("postgres"))
        .await
        .expect("connect");
    let mine: Vec<String> = admin
        .query(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'tidemark_verify_%'",
            &[],
        )
        .await
        .expect("query")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Other tests verify in parallel; a scratch database must not outlive its verify call,
    // so none may be older than a few seconds.
    let now = chrono::Utc::now().timestamp();
    for name in mine {
        let created: i64 = name
            .rsplit('_')
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        assert!(
            now - created < 120,
            "scratch database {name} was left behind"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_and_resumed_export_still_restores_equal() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let opts = chain_options();
    for kill_ms in [40, 150, 400] {
        let (_dir, local) = local_store();
        let store: Store = Arc::new(local);
        let killed = tokio::time::timeout(
            Duration::from_millis(kill_ms),
            export_slice(store.clone(), &db.settings(), &opts),
        )
        .await;
        if let Ok(result) = killed {
            result.expect("slice");
        }
        // Writes the killed slice had already started (the lease, a chunk) still land,
        // as requests a dead Lambda sent still reach S3; the next invocation comes later.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut resume = opts.clone();
        resume.run_id = tidemark_core::lease::current(store.as_ref())
            .await
            .expect("lease")
            .map(|(l, _)| l.run_id);
        let (sealed, _) = backup(&store, &db, &resume).await;
        let target = restore_fresh(&store, &cluster, &sealed.backup_id).await;
        assert_same(&db.settings(), &target.settings(), CHAIN_TABLES).await;
    }
}

/// A backup in a local store, and the path of its store directory.
async fn one_backup(db: &TestDatabase) -> (tempfile::TempDir, Store, std::path::PathBuf, Manifest) {
    chain_fixture(db).await;
    let (dir, local) = local_store();
    let root = local.root().to_path_buf();
    let store: Store = Arc::new(local);
    let (sealed, _) = backup(&store, db, &chain_options()).await;
    let m = manifest(&store, &sealed.backup_id).await;
    (dir, store, root, m)
}

async fn verify_fails_naming(store: &Store, cluster: &TestCluster, id: &str, needle: &str) {
    let record = verify::verify(
        store.clone(),
        &cluster.settings("postgres"),
        &VerifyOptions {
            backup: Some(BackupSelector::Id(id.to_owned())),
            ..VerifyOptions::default()
        },
    )
    .await
    .expect("a verification result");
    assert!(!record.ok, "must fail: {record:?}");
    let error = record
        .error
        .clone()
        .unwrap_or_else(|| format!("{record:?}"));
    assert!(error.contains(needle), "{needle} not named in {error:?}");
    assert!(verify::read_verification(store.as_ref(), id)
        .await
        .expect("read")
        .is_some_and(|v| !v.ok));
    assert_no_scratch_left(cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_chunks_and_manifests_are_detected_and_named() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let (_dir, store, root, m) = one_backup(&db).await;
    let chunk = m
        .tables
        .iter()
        .find(|t| t.name.name == "accounts")
        .expect("accounts")
        .chunks[1]
        .key
        .clone();
    let path = root.join(&chunk);
    let original = std::fs::read(&path).expect("read chunk");

    // One flipped byte.
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    std::fs::write(&path, &flipped).expect("write");
    verify_fails_naming(&store, &cluster, &m.id, &chunk).await;
    // The failed verification still records what its restore did before it failed (one
    // connection: the table's first chunk loads before the damaged second).
    let record = verify::verify(
        store.clone(),
        &cluster.settings("postgres"),
        &VerifyOptions {
            backup: Some(BackupSelector::Id(m.id.clone())),
            workers: 1,
            ..VerifyOptions::default()
        },
    )
    .await
    .expect("a verification result");
    assert!(
        !record.ok && record.restore_seconds > 0.0 && record.rows > 0 && record.bytes > 0,
        "{record:?}"
    );
    let target = cluster.create_database().await;
    let err = restore::restore(
        store.clone(),
        &m,
        &target.settings(),
        &RestoreOptions::default(),
    )
    .await
    .expect_err("corrupt chunk");
    assert!(
        matches!(err.root(), RestoreError::ChunkCorrupt { key, .. } if *key == chunk),
        "{err}"
    );

    // Truncated.
    std::fs::write(&path, &original[..original.len() / 2]).expect("write");
    verify_fails_naming(&store, &cluster, &m.id, &chunk).await;

    // Missing.
    std::fs::remove_file(&path).expect("remove");
    verify_fails_naming(&store, &cluster, &m.id, &chunk).await;
    let target = cluster.create_database().await;
    let err = restore::restore(
        store.clone(),
        &m,
        &target.settings(),
        &RestoreOptions::default(),
    )
    .await
    .expect_err("missing chunk");
    assert!(
        err.to_string()
            .contains(&format!("chunk {chunk} is missing")),
        "{err}"
    );
    assert!(
        schema_facts(&target.settings()).await.is_empty(),
        "a missing chunk is found before anything is written"
    );
    std::fs::write(&path, &original).expect("restore the chunk");

    // An edited manifest.
    let key = manifest_key(&m.id);
    let text = String::from_utf8(
        store
            .read(&key)
            .await
            .expect("read")
            .expect("exists")
            .bytes
            .to_vec(),
    )
    .expect("utf8");
    let edited = text.replacen("\"rows\": 1000", "\"rows\": 999", 1);
    assert_ne!(edited, text, "the fixture has a 1000-row table");
    store
        .put(&key, Bytes::from(edited), WriteCondition::Always)
        .await
        .expect("edit manifest");
    verify_fails_naming(&store, &cluster, &m.id, &key).await;
    let err = restore::load_manifest(store.as_ref(), &BackupSelector::Id(m.id.clone()))
        .await
        .expect_err("edited");
    assert!(
        err.to_string()
            .contains(&format!("manifest {key} was modified")),
        "{err}"
    );
}

#[tokio::test]
async fn bad_restore_input_is_refused_and_the_target_left_untouched() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let (_dir, store, _root, m) = one_backup(&db).await;

    let err = restore::load_manifest(
        store.as_ref(),
        &BackupSelector::Id("20990101T000000Z-ffffff".into()),
    )
    .await
    .expect_err("unknown backup");
    assert!(
        err.to_string()
            .contains("unknown backup 20990101T000000Z-ffffff"),
        "{err}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let nowhere = DbSettings::from_url(
        &format!("postgres://u:Secret-Pw-1@127.0.0.1:{port}/x?sslmode=disable&connect_timeout=2")
            .into(),
    )
    .expect("url");
    let err = restore::restore(store.clone(), &m, &nowhere, &RestoreOptions::default())
        .await
        .expect_err("unreachable");
    assert!(
        err.to_string().contains("cannot connect") && !err.to_string().contains("Secret-Pw-1"),
        "{err}"
    );

    // Data-only into a target that already holds rows: refused without --clean.
    let target = cluster.create_database().await;
    exec(
        &target.settings(),
        &format!("{CHAIN_DDL} INSERT INTO settings VALUES ('keep', 'me');"),
    )
    .await;
    let data_only = RestoreOptions {
        settings: tidemark_core::restore::RestoreSettings {
            data_only: true,
            ..tidemark_core::restore::RestoreSettings::default()
        },
        ..RestoreOptions::default()
    };
    let err = restore::restore(store.clone(), &m, &target.settings(), &data_only)
        .await
        .expect_err("not empty");
    assert!(
        err.to_string()
            .contains("target table public.settings already holds rows; pass --clean"),
        "{err}"
    );
    let client = tidemark_core::db::connect(&target.settings())
        .await
        .expect("connect");
    let counts: i64 = client
        .query_one("SELECT (SELECT count(*) FROM accounts) + (SELECT count(*) FROM events) + (SELECT count(*) FROM settings)", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(counts, 1, "target untouched");

    // Restoring into existing tables without --data-only is refused too.
    let err = restore::restore(
        store.clone(),
        &m,
        &target.settings(),
        &RestoreOptions::default(),
    )
    .await
    .expect_err("tables exist");
    assert!(
        err.to_string().contains("target already has table"),
        "{err}"
    );

    // With --clean the data lands, schema from "migrations".
    let clean = RestoreOptions {
        settings: tidemark_core::restore::RestoreSettings {
            data_only: true,
            clean: true,
            ..tidemark_core::restore::RestoreSettings::default()
        },
        ..RestoreOptions::default()
    };
    restore::restore(store.clone(), &m, &target.settings(), &clean)
        .await
        .expect("clean restore");
    assert_same(&db.settings(), &target.settings(), CHAIN_TABLES).await;

    // A subset, and an unknown table in it.
    let subset_target = cluster.create_database().await;
    let subset = RestoreOptions {
        settings: tidemark_core::restore::RestoreSettings {
            tables: vec!["accounts".into()],
            ..tidemark_core::restore::RestoreSettings::default()
        },
        ..RestoreOptions::default()
    };
    let report = restore::restore(store.clone(), &m, &subset_target.settings(), &subset)
        .await
        .expect("subset");
    assert_eq!((report.tables, report.rows), (1, 1000));
    let unknown = RestoreOptions {
        settings: tidemark_core::restore::RestoreSettings {
            tables: vec!["accounts".into(), "nope".into()],
            ..tidemark_core::restore::RestoreSettings::default()
        },
        ..RestoreOptions::default()
    };
    let err = restore::restore(store.clone(), &m, &subset_target.settings(), &unknown)
        .await
        .expect_err("unknown table");
    assert!(err.to_string().contains("has no table nope"), "{err}");
}

#[tokio::test]
async fn verify_sweeps_stale_scratch_databases() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let (_dir, store, _root, _m) = one_backup(&db).await;
    let stale = format!(
        "tidemark_verify_crashed_{}",
        chrono::Utc::now().timestamp() - 10 * 3600
    );
    exec(
        &cluster.settings("postgres"),
        &format!("CREATE DATABASE \"{stale}\""),
    )
    .await;
    let started = Instant::now();
    let record = verify::verify(
        store.clone(),
        &cluster.settings("postgres"),
        &VerifyOptions::default(),
    )
    .await
    .expect("verify");
    assert!(record.ok && started.elapsed() < Duration::from_secs(60));
    let admin = tidemark_core::db::connect(&cluster.settings("postgres"))
        .await
        .expect("connect");
    let left = admin
        .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&stale])
        .await
        .expect("query");
    assert!(left.is_empty(), "the stale scratch database was swept");
}

/// A restore writes every table it creates with `COPY ... FREEZE` (pg_restore does not):
/// its pages are all-frozen and all-visible at once, so the first VACUUM has nothing to
/// rewrite. The oracle is the visibility map as PostgreSQL keeps it (pg_visibility),
/// and the rows are still the source's, for a plain table, an inheritance parent and
/// child, and a partitioned table (which PostgreSQL does not let COPY FREEZE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_writes_its_new_tables_frozen() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        "CREATE TABLE plain (id int PRIMARY KEY, note text);
         INSERT INTO plain SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
         CREATE TABLE parent (id int PRIMARY KEY, note text);
         CREATE TABLE child (extra int) INHERITS (parent);
         INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 3000) g;
         INSERT INTO child SELECT g, 'c' || g, g FROM generate_series(3001, 6000) g;
         CREATE TABLE parts (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE parts_a PARTITION OF parts FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
         CREATE TABLE parts_b PARTITION OF parts FOR VALUES FROM ('2021-01-01') TO ('2022-01-01');
         INSERT INTO parts SELECT g, date '2020-01-01' + (g % 700) FROM generate_series(1, 5000) g;",
    )
    .await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let (sealed, _) = backup(&store, &db, &options(5000, &["public"])).await;
    let restored = restore_fresh(&store, &cluster, &sealed.backup_id).await;
    assert_same(
        &db.settings(),
        &restored.settings(),
        &[
            ("ONLY plain", "id"),
            ("ONLY parent", "id"),
            ("ONLY child", "id"),
            ("parts", "id, at"),
        ],
    )
    .await;
    let client = tidemark_core::db::connect(&restored.settings())
        .await
        .expect("connect");
    client
        .batch_execute("CREATE EXTENSION pg_visibility")
        .await
        .expect("pg_visibility");
    for table in ["plain", "parent", "child"] {
        let row = client
            .query_one(
                "SELECT s.all_visible, s.all_frozen, pg_relation_size($1::text::regclass) / 8192 \
                 FROM pg_visibility_map_summary($1::text::regclass) s",
                &[&table],
            )
            .await
            .expect("visibility map");
        let (visible, frozen, pages): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert!(pages > 0, "{table} has pages");
        assert_eq!(
            (visible, frozen),
            (pages, pages),
            "every page of {table} is all-visible and all-frozen"
        );
    }
}

/// Each table's indexes and key constraints are built as soon as its data is in, in a
/// transaction of their own (pg_restore builds them all after the data), and still come
/// out exactly as the source has them: pg_dump --schema-only of the restored database
/// equals the source's, with a primary key, a UNIQUE ... INCLUDE key, an exclusion
/// constraint, an expression index on a function of the schema, CLUSTER ON, a comment on
/// an index, an index in its own tablespace followed by one in the default tablespace, a
/// partitioned table's keys, and a foreign key to a key built early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_are_built_as_each_table_lands_and_restore_exactly() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let admin = tidemark_core::db::connect(&db.settings())
        .await
        .expect("connect");
    // Cluster-wide, outside a transaction block; in place, so the test needs no directory.
    let exists: bool = admin
        .query_one(
            "SELECT count(*) > 0 FROM pg_tablespace WHERE spcname = 'tidemark_fast'",
            &[],
        )
        .await
        .expect("pg_tablespace")
        .get(0);
    if !exists {
        admin
            .batch_execute("SET allow_in_place_tablespaces = on")
            .await
            .expect("in-place tablespaces");
        admin
            .batch_execute("CREATE TABLESPACE tidemark_fast LOCATION ''")
            .await
            .expect("tablespace");
    }
    exec(
        &db.settings(),
        "CREATE SCHEMA app;
         CREATE FUNCTION app.norm(text) RETURNS text IMMUTABLE LANGUAGE sql AS 'SELECT lower(trim($1))';
         CREATE TABLE app.people (id int PRIMARY KEY, email text NOT NULL, name text,
           UNIQUE (email) INCLUDE (name));
         CREATE INDEX a_people_norm ON app.people (app.norm(name)) TABLESPACE tidemark_fast;
         CREATE INDEX b_people_name ON app.people (name);
         ALTER TABLE app.people CLUSTER ON b_people_name;
         COMMENT ON INDEX app.b_people_name IS 'by name';
         CREATE TABLE app.bookings (id int PRIMARY KEY, person int REFERENCES app.people,
           during tsrange, EXCLUDE USING gist (during WITH &&));
         CREATE TABLE app.parts (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE app.parts_a PARTITION OF app.parts FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
         CREATE INDEX parts_at ON app.parts (at);
         INSERT INTO app.people SELECT g, 'p' || g || '@x', ' Name ' || g FROM generate_series(1, 3000) g;
         INSERT INTO app.bookings SELECT g, g, tsrange('2020-01-01'::timestamp + g * interval '1 hour',
           '2020-01-01'::timestamp + (g + 1) * interval '1 hour') FROM generate_series(1, 2000) g;
         INSERT INTO app.parts SELECT g, date '2020-01-01' + (g % 300) FROM generate_series(1, 2000) g;",
    )
    .await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let (sealed, _) = backup(&store, &db, &options(1000, &["app"])).await;
    let restored = restore_fresh(&store, &cluster, &sealed.backup_id).await;
    tidemark_tests::assert_same_schema(&db, &restored);
    assert_same(
        &db.settings(),
        &restored.settings(),
        &[
            ("app.people", "id"),
            ("app.bookings", "id"),
            ("app.parts", "id, at"),
        ],
    )
    .await;
    // Built early: in another transaction than the post-data step's foreign key.
    let client = tidemark_core::db::connect(&restored.settings())
        .await
        .expect("connect");
    let row = client
        .query_one(
            "SELECT (SELECT xmin::text FROM pg_class WHERE oid = 'app.people_pkey'::regclass), \
                    (SELECT xmin::text FROM pg_class WHERE oid = 'app.a_people_norm'::regclass), \
                    (SELECT xmin::text FROM pg_constraint WHERE conname = 'bookings_person_fkey')",
            &[],
        )
        .await
        .expect("catalog");
    let (key, index, foreign): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(key, index, "a table's indexes are built in one transaction");
    assert_ne!(
        key, foreign,
        "the indexes were built before the post-data step"
    );
}

/// Verify reads a big table back in block ranges over several connections; the parts
/// must add up to exactly the source's fingerprint (no row read twice or missed at a
/// range's edge), for a plain table, an inheritance parent (its own rows only) and a
/// partitioned table (read whole), and one changed row in a middle range must show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprints_read_in_block_ranges_add_up_to_the_sources() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        "CREATE TABLE wide (id int PRIMARY KEY, note text);
         INSERT INTO wide SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 20000) g;
         CREATE TABLE parent (id int PRIMARY KEY, note text);
         CREATE TABLE child () INHERITS (parent);
         INSERT INTO parent SELECT g, md5(g::text) FROM generate_series(1, 3000) g;
         INSERT INTO child SELECT g, md5(g::text) FROM generate_series(3001, 9000) g;
         CREATE TABLE parts (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE parts_a PARTITION OF parts FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
         INSERT INTO parts SELECT g, date '2020-01-01' + (g % 300) FROM generate_series(1, 5000) g;",
    )
    .await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let (sealed, _) = backup(&store, &db, &options(100_000, &["public"])).await;
    let manifest = manifest(&store, &sealed.backup_id).await;
    let restored = restore_fresh(&store, &cluster, &sealed.backup_id).await;
    let expected: Vec<_> = manifest.tables.iter().map(|t| t.fingerprint).collect();
    for part_blocks in [1, 7, 64, verify::PART_BLOCKS] {
        let got =
            verify::table_fingerprints(&restored.settings(), &manifest.tables, 3, part_blocks)
                .await
                .expect("fingerprints");
        assert_eq!(got, expected, "parts of {part_blocks} blocks");
    }
    exec(
        &restored.settings(),
        "UPDATE wide SET note = 'changed' WHERE id = 10000",
    )
    .await;
    let got = verify::table_fingerprints(&restored.settings(), &manifest.tables, 2, 7)
        .await
        .expect("fingerprints");
    let wide = manifest
        .tables
        .iter()
        .position(|t| t.name.name == "wide")
        .expect("wide");
    assert_ne!(got[wide], expected[wide], "a changed row shows");
    assert_eq!(got[wide].rows, expected[wide].rows);
}
