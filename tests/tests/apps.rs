//! Real application schemas, not only fixtures: Zabbix server (with its initial data),
//! the Icinga 2 IDO, PowerDNS and Matrix Synapse, as their own packages ship them
//! (`scripts/test` fetches them into `.tools/app-schemas`). Each is backed up, changed,
//! backed up again, restored, and compared with the source by the cluster's own
//! `pg_dump --schema-only` and sorted COPY of every table; then verified, and loaded
//! `--data-only` into a schema made by `pg_dump --schema-only | psql`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tidemark_core::export::ExportOptions;
use tidemark_core::restore::{self, RestoreOptions};
use tidemark_tests::fixtures::*;
use tidemark_tests::{
    assert_identical, exec, local_store, migrated_copy, psql_script, restore_fresh, verify_backup,
    TestCluster, TestDatabase,
};

fn app_dir(app: &str) -> PathBuf {
    PathBuf::from(
        std::env::var("TIDEMARK_TEST_APP_SCHEMAS")
            .expect("TIDEMARK_TEST_APP_SCHEMAS: run the tests with scripts/test"),
    )
    .join(app)
}

/// A database loaded with the application's scripts, in name order.
async fn load(cluster: &TestCluster, app: &str) -> TestDatabase {
    let db = cluster.create_database().await;
    let mut files: Vec<PathBuf> = std::fs::read_dir(app_dir(app))
        .expect("app schema directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scripts for {app}");
    for file in files {
        let script = std::fs::read_to_string(&file).expect("read script");
        psql_script(cluster, &db.name, &cluster.user, &cluster.password, &script);
    }
    exec(&db.settings(), "ANALYZE").await;
    db
}

/// Full, `changes`, incremental, restore, compare, verify, data-only.
async fn round_trip(app: &str, changes: &str) {
    let cluster = TestCluster::from_env();
    let db = load(&cluster, app).await;
    let (_dir, store) = local_store();
    let store: Store = Arc::new(store);
    let opts = ExportOptions {
        settings: tidemark_core::export::ExportSettings {
            workers: 2,
            ..tidemark_core::export::ExportSettings::default()
        },
        progress_interval: Duration::from_secs(1),
        ..ExportOptions::default()
    };
    backup(&store, &db, &opts).await;
    exec(&db.settings(), changes).await;
    let (incr, _) = backup(&store, &db, &opts).await;
    let restored = restore_fresh(&store, &cluster, &incr.backup_id).await;
    assert_identical(&db, &restored).await;

    let record = verify_backup(&store, &cluster, &incr.backup_id).await;
    assert!(
        record.ok
            && record
                .schema
                .as_ref()
                .is_some_and(|s| s.ok && s.objects > 20),
        "{app}: {:?} {:?}",
        record.error,
        record.schema
    );

    // Into a schema the application's own migrations would have made.
    let target = migrated_copy(&cluster, &db.name, None).await;
    let m = manifest(&store, &incr.backup_id).await;
    restore::restore(
        store.clone(),
        &m,
        &target.settings(),
        &RestoreOptions {
            settings: tidemark_core::restore::RestoreSettings {
                data_only: true,
                ..tidemark_core::restore::RestoreSettings::default()
            },
            ..RestoreOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{app}: data-only restore: {e}"));
    assert_identical(&db, &target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zabbix_server_with_its_data_restores_identical() {
    round_trip(
        "zabbix",
        "UPDATE hosts SET description = 'edited by the test' WHERE hostid % 3 = 0;
         DELETE FROM globalmacro WHERE globalmacroid = (SELECT min(globalmacroid) FROM globalmacro);
         INSERT INTO globalmacro (globalmacroid, macro, value, description, type)
           VALUES (990001, '{$TIDEMARK_TEST}', 'x', 'added between backups', 0);",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icinga2_ido_restores_identical() {
    round_trip(
        "icinga",
        "INSERT INTO icinga_instances (instance_id, instance_name, instance_description)
           VALUES (2, 'second', 'added between backups');",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerdns_restores_identical() {
    round_trip(
        "pdns",
        "INSERT INTO domains (name, type) VALUES ('example.org', 'NATIVE');
         INSERT INTO records (domain_id, name, type, content, ttl)
           SELECT id, 'www.example.org', 'A', '192.0.2.1', 3600 FROM domains WHERE name = 'example.org';",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_synapse_restores_identical() {
    round_trip(
        "synapse",
        "INSERT INTO users (name, password_hash, creation_ts) VALUES ('@alice:example.org', 'x', 1700000000);",
    )
    .await;
}
