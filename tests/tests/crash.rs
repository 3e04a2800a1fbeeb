//! The safety net under every restructuring: a small full backup, an incremental one and a
//! restore, each killed — or failed once — at every store operation in turn
//! ([`FaultyStore`]), then resumed the way the state machine resumes (the next slice
//! continues the run the lease names) and compared with the source. Deterministic: the
//! operation index, not a clock, says where the run dies.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tidemark_core::export::{export_slice, ExportOptions};
use tidemark_core::format::TableMode;
use tidemark_core::manifest::seal_run;
use tidemark_core::restore::{self, RestoreOptions};
use tidemark_core::run::RunError;
use tidemark_core::store::{Fault, FaultyStore, LocalStore, WriteStore};
use tidemark_tests::fixtures::*;
use tidemark_tests::{all_data, exec, TestCluster, TestDatabase};

const FIXTURE: &str = "CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL, note text);
    INSERT INTO acct SELECT g, g, 'n' || g FROM generate_series(1, 300) g;
    CREATE TABLE log (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, what text);
    INSERT INTO log (what) SELECT 'w' || g FROM generate_series(1, 200) g;
    CREATE TABLE bag (v text);
    INSERT INTO bag SELECT 'b' || g FROM generate_series(1, 50) g;
    ANALYZE;";

const CHANGE: &str = "UPDATE acct SET balance = -balance WHERE id % 10 = 0;
    DELETE FROM acct WHERE id % 13 = 0;
    INSERT INTO acct SELECT g, g, 'new' FROM generate_series(1001, 1150) g;
    INSERT INTO log (what) VALUES ('later');
    INSERT INTO bag VALUES ('new');";

/// One worker, so that the store sees the same operations in the same order every time.
fn opts() -> ExportOptions {
    ExportOptions {
        settings: tidemark_core::export::ExportSettings {
            chunk_rows: 100,
            workers: 1,
            selection: tidemark_core::catalog::TableSelection {
                modes: vec![("log".into(), TableMode::Append)],
                ..Default::default()
            },
            ..tidemark_core::export::ExportSettings::default()
        },
        progress_interval: Duration::ZERO,
        ..ExportOptions::default()
    }
}

fn local(dir: &Path) -> Store {
    Arc::new(LocalStore::open(dir).expect("local store"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A backup run through `store`, slice after slice, then sealed; the first error ends it.
async fn run_through(store: Store, db: &TestDatabase) -> Result<String, RunError> {
    let mut opts = opts();
    loop {
        let report = export_slice(store.clone(), &db.settings(), &opts).await?;
        opts.run_id = Some(report.run_id.clone());
        if report.done {
            break;
        }
    }
    let run_id = opts.run_id.clone().unwrap_or_default();
    Ok(seal_run(store, &run_id, "crash test").await?.backup_id)
}

/// What the state machine does after a dead invocation: the next one continues the run
/// that holds the lease (or starts one, if the dead one took none or had released it);
/// returns the backup id.
async fn resume(store: &Store, db: &TestDatabase) -> String {
    let held = tidemark_core::lease::current(store.as_ref())
        .await
        .expect("read the lease")
        .filter(|(lease, _)| tidemark_core::lease::is_live(lease, chrono::Utc::now()))
        .map(|(lease, _)| lease.run_id);
    let opts = ExportOptions {
        run_id: held,
        ..opts()
    };
    backup_of(store, &db.settings(), &opts).await.0.backup_id
}

/// Store operations of an undisturbed run of `work`.
async fn operations<F, Fut>(store: Store, work: F) -> u64
where
    F: FnOnce(Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let counting = Arc::new(FaultyStore::new(store, u64::MAX, Fault::FailOnce));
    work(counting.clone()).await;
    counting.operations()
}

/// Restores backup `id` into a fresh database and compares it with `source`.
async fn assert_restores_source(store: &Store, id: &str, source: &TestDatabase, what: &str) {
    let manifest = manifest(store, id).await;
    let mut keys: Vec<&str> = manifest.all_chunks().map(|c| c.key.as_str()).collect();
    let total = keys.len();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), total, "{what}: a chunk is listed twice");
    let target = source.cluster.create_database().await;
    restore::restore(
        store.clone(),
        &manifest,
        &target.settings(),
        &RestoreOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: restore: {e}"));
    let (want, got) = (
        all_data(&source.settings()).await,
        all_data(&target.settings()).await,
    );
    for (table, rows) in &want {
        assert!(
            got.get(table) == Some(rows),
            "{what}: {table} differs from the source: {} rows, {} restored",
            rows.len(),
            got.get(table).map_or(0, Vec::len)
        );
    }
}

/// Runs a backup killed, then failed once, at each operation `n` of `count`, each time
/// from a copy of `base` (a store directory), resumes it and compares its restore.
async fn every_operation(base: &Path, count: u64, db: &TestDatabase, what: &str) {
    for n in 1..=count {
        for fault in [Fault::Kill, Fault::FailOnce] {
            let dir = tempfile::tempdir().expect("tempdir");
            copy_dir(base, dir.path());
            let store = local(dir.path());
            let faulty: Store = Arc::new(FaultyStore::new(store.clone(), n, fault));
            let label = format!("{what}, {fault:?} at store operation {n} of {count}");
            let id = match run_through(faulty, db).await {
                Ok(id) => id,
                Err(e) => {
                    assert!(
                        tidemark_core::error_chain(&e).contains("injected fault"),
                        "{label}: {e}"
                    );
                    resume(&store, db).await
                }
            };
            assert_restores_source(&store, &id, db, &label).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_or_failed_at_any_store_operation_resumes_to_the_source() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), FIXTURE).await;

    // Full: from an empty store.
    let empty = tempfile::tempdir().expect("tempdir");
    let count = {
        let dir = tempfile::tempdir().expect("tempdir");
        operations(local(dir.path()), |s| async {
            run_through(s, &db).await.expect("undisturbed full");
        })
        .await
    };
    assert!(count > 10, "{count} operations");
    every_operation(empty.path(), count, &db, "full").await;

    // Incremental: from a store holding the full backup.
    let base = tempfile::tempdir().expect("tempdir");
    run_through(local(base.path()), &db)
        .await
        .expect("the full backup");
    exec(&db.settings(), CHANGE).await;
    let count = {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(base.path(), dir.path());
        operations(local(dir.path()), |s| async {
            run_through(s, &db).await.expect("undisturbed incremental");
        })
        .await
    };
    every_operation(base.path(), count, &db, "incremental").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_killed_at_any_store_operation_fails_cleanly_and_runs_again() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), FIXTURE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local(dir.path());
    run_through(store.clone(), &db).await.expect("full");
    exec(&db.settings(), CHANGE).await;
    let id = run_through(store.clone(), &db).await.expect("incremental");
    let manifest = manifest(&store, &id).await;
    let restore_through = |s: Store, target: TestDatabase| {
        let manifest = manifest.clone();
        async move {
            let result =
                restore::restore(s, &manifest, &target.settings(), &RestoreOptions::default())
                    .await;
            (result, target)
        }
    };
    let count = {
        let target = cluster.create_database().await;
        operations(store.clone(), |s| async {
            restore_through(s, target)
                .await
                .0
                .expect("undisturbed restore");
        })
        .await
    };
    assert!(count > 3, "{count} operations");
    for n in 1..=count {
        let faulty: Arc<dyn WriteStore> = Arc::new(FaultyStore::new(store.clone(), n, Fault::Kill));
        let (result, _target) = restore_through(faulty, cluster.create_database().await).await;
        let err = result.expect_err("a restore that lost its store fails");
        assert!(
            tidemark_core::error_chain(&err).contains("injected fault"),
            "operation {n}: {err}"
        );
    }
    // Run again, as the error says (into a fresh database), it restores the source.
    assert_restores_source(&store, &id, &db, "restore after kills").await;
}
