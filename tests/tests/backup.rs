//! Backups end to end against the real cluster and both store adapters: every chunk is
//! loaded back with plain `COPY FROM` (or the test-only chain replay) and compared with
//! ordered COPY output of the source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_core::catalog::TableSelection;
use tidemark_core::export::{export_slice, ExportOptions};
use tidemark_core::format::{read_doc, BackupKind, TableMode};
use tidemark_core::manifest::{list_backups, seal_run};
use tidemark_core::run::RunError;
use tidemark_core::store::S3StoreOptions;
use tidemark_tests::fixtures::*;
use tidemark_tests::{
    exec, local_store, ordered_copy, replay_table, s3_store, TestCluster, TestDatabase,
};

fn options(chunk_rows: u64) -> ExportOptions {
    ExportOptions {
        settings: tidemark_core::export::ExportSettings {
            chunk_rows,
            chunk_bytes: 1 << 30,
            workers: 2,
            selection: TableSelection {
                schemas: vec!["public".into(), "Sales".into()],
                ..TableSelection::default()
            },
            ..tidemark_core::export::ExportSettings::default()
        },
        progress_interval: Duration::ZERO,
        ..ExportOptions::default()
    }
}

/// Replays backup `id` into a fresh database made with `ddl` and compares every table.
async fn assert_restores_to_source(
    store: &Store,
    id: &str,
    source: &TestDatabase,
    ddl: &str,
    tables: &[(&str, &str)],
) {
    let m = manifest(store, id).await;
    let target = source.cluster.create_database().await;
    exec(&target.settings(), ddl).await;
    let client = tidemark_core::db::connect(&target.settings())
        .await
        .expect("connect target");
    for entry in &m.tables {
        replay_table(store.as_ref(), entry, &client, &entry.name.quoted()).await;
    }
    let src = tidemark_core::db::connect(&source.settings())
        .await
        .expect("connect source");
    for (table, order) in tables {
        let select = format!("SELECT * FROM {table} ORDER BY {order}");
        let expected = ordered_copy(&src, &select).await;
        let actual = ordered_copy(&client, &select).await;
        assert!(
            expected == actual,
            "backup {id}: {table} differs after replay\nsource: {} bytes, restored: {} bytes\nfirst source lines:\n{}\nfirst restored lines:\n{}",
            expected.len(),
            actual.len(),
            String::from_utf8_lossy(&expected[..expected.len().min(400)]),
            String::from_utf8_lossy(&actual[..actual.len().min(400)]),
        );
        let rows = expected.iter().filter(|&&b| b == b'\n').count() as u64;
        let entry = m
            .tables
            .iter()
            .find(|e| e.name.quoted() == *table || e.name.name == *table)
            .unwrap_or_else(|| panic!("{table} in manifest"));
        assert_eq!(entry.fingerprint.rows, rows, "{table}: manifest row count");
    }
}

async fn type_matrix_round_trip(store: Store) {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), &format!("{MATRIX_DDL}{MATRIX_DATA}")).await;
    let (sealed, slices) = backup(&store, &db, &options(500)).await;
    assert_eq!(sealed.kind, BackupKind::Full);
    assert_eq!(slices.len(), 1);
    let m = manifest(&store, &sealed.backup_id).await;
    let matrix = m
        .tables
        .iter()
        .find(|t| t.name.name == "matrix")
        .expect("matrix");
    assert_eq!(matrix.mode, TableMode::Changes);
    assert!(
        matrix.chunks.len() >= 5,
        "2507 rows in ranges of 500: {:?}",
        matrix
            .chunks
            .iter()
            .map(|c| (c.rows, c.range.clone()))
            .collect::<Vec<_>>()
    );
    assert!(
        !matrix.columns.contains(&"g".to_owned()),
        "generated columns are not exported"
    );
    assert!(matrix
        .chunks
        .iter()
        .all(|c| c.range.is_some() && c.sha256.len() == 64));
    let nokey = m
        .tables
        .iter()
        .find(|t| t.name.name == "nokey")
        .expect("nokey");
    assert_eq!(nokey.mode, TableMode::Snapshot);
    assert!(
        m.tables.iter().all(|t| t.name.name != "parted_eu"),
        "partitions export through their root"
    );
    assert_eq!(
        m.tables
            .iter()
            .find(|t| t.name.name == "parted")
            .map(|t| t.schema.partitions.len()),
        Some(2)
    );
    assert_restores_to_source(&store, &sealed.backup_id, &db, MATRIX_DDL, MATRIX_TABLES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_matrix_round_trips_through_plain_copy_local() {
    let (_dir, store) = local_store();
    type_matrix_round_trip(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_matrix_round_trips_through_plain_copy_s3() {
    type_matrix_round_trip(Arc::new(s3_store(S3StoreOptions::default()).await)).await;
}

fn chain_options() -> ExportOptions {
    let mut opts = options(100);
    opts.settings.selection.schemas = vec!["public".into()];
    opts.settings.selection.modes = vec![("events".into(), TableMode::Append)];
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incrementals_capture_inserts_updates_and_deletes() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let store: Store = Arc::new(s3_store(S3StoreOptions::default()).await);
    let opts = chain_options();
    let (full, _) = backup(&store, &db, &opts).await;
    assert_eq!(full.kind, BackupKind::Full);
    assert_restores_to_source(&store, &full.backup_id, &db, CHAIN_DDL, CHAIN_TABLES).await;

    exec(
        &db.settings(),
        "UPDATE accounts SET balance = balance + 1, note = E'changed\\tnote' WHERE id % 7 = 0;
         DELETE FROM accounts WHERE id % 11 = 0;
         INSERT INTO accounts SELECT g, 0, NULL FROM generate_series(1001, 1050) g;
         INSERT INTO events (payload) SELECT 'later ' || g FROM generate_series(1, 300) g;
         UPDATE settings SET v = 'changed' WHERE k = 'k3'; DELETE FROM settings WHERE k = 'k4';",
    )
    .await;
    let (inc1, _) = backup(&store, &db, &opts).await;
    assert_eq!(
        (inc1.kind, inc1.parent.as_deref()),
        (BackupKind::Incremental, Some(full.backup_id.as_str()))
    );
    assert_restores_to_source(&store, &inc1.backup_id, &db, CHAIN_DDL, CHAIN_TABLES).await;
    let m1 = manifest(&store, &inc1.backup_id).await;
    let accounts = m1
        .tables
        .iter()
        .find(|t| t.name.name == "accounts")
        .expect("accounts");
    assert!(
        accounts.exported_rows < 400,
        "an incremental exports the changes, not the table: {} rows",
        accounts.exported_rows
    );
    assert!(
        !accounts.key_chunks.is_empty(),
        "the live key set is recorded"
    );
    assert_eq!(
        m1.chain,
        vec![full.backup_id.clone(), inc1.backup_id.clone()]
    );

    exec(
        &db.settings(),
        "UPDATE accounts SET balance = -1 WHERE id IN (1, 2, 1001);
         DELETE FROM accounts WHERE id BETWEEN 500 AND 520;
         INSERT INTO accounts VALUES (11, 11, 'deleted then back');
         INSERT INTO events (payload) VALUES ('one more');",
    )
    .await;
    let (inc2, _) = backup(&store, &db, &opts).await;
    assert_restores_to_source(&store, &inc2.backup_id, &db, CHAIN_DDL, CHAIN_TABLES).await;
    // Each backup still restores to what it was: the full backup is unchanged by later runs.
    let m0 = manifest(&store, &full.backup_id).await;
    assert_eq!(
        m0.tables.iter().map(|t| t.fingerprint.rows).sum::<u64>(),
        1000 + 2000 + 10
    );

    let listed = list_backups(store.as_ref()).await.expect("list");
    let ids: Vec<_> = listed.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            full.backup_id.as_str(),
            inc1.backup_id.as_str(),
            inc2.backup_id.as_str()
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_reaches_the_next_backup() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let opts = chain_options();
    let (_full, _) = backup(&store, &db, &opts).await;

    // A takes key 2001 and an update of account 5, but commits only after B's row
    // (key 2002) is committed and a backup has passed both.
    let a = tidemark_core::db::connect(&db.settings())
        .await
        .expect("connect");
    a.batch_execute(
        "BEGIN; INSERT INTO events (payload) VALUES ('late'); UPDATE accounts SET note = 'late update' WHERE id = 5",
    )
    .await
    .expect("session A");
    exec(
        &db.settings(),
        "INSERT INTO events (payload) VALUES ('early')",
    )
    .await;
    let (passed, _) = backup(&store, &db, &opts).await;
    let m = manifest(&store, &passed.backup_id).await;
    let events = m
        .tables
        .iter()
        .find(|t| t.name.name == "events")
        .expect("events");
    assert_eq!(
        events.fingerprint.rows, 2001,
        "the late row is not visible yet"
    );
    a.batch_execute("COMMIT").await.expect("commit A");

    let (next, _) = backup(&store, &db, &opts).await;
    assert_restores_to_source(&store, &next.backup_id, &db, CHAIN_DDL, CHAIN_TABLES).await;
    let m = manifest(&store, &next.backup_id).await;
    let events = m
        .tables
        .iter()
        .find(|t| t.name.name == "events")
        .expect("events");
    assert_eq!(events.fingerprint.rows, 2002);
    assert!(
        m.warnings.is_empty(),
        "found by the gap probe, not by a whole re-export: {:?}",
        m.warnings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_row_past_its_gap_ttl_forces_a_whole_export() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let mut opts = chain_options();
    opts.settings.gap_ttl = Duration::ZERO;
    backup(&store, &db, &opts).await;
    // A row below the cursor that no gap remembers (as if its gap had expired).
    exec(&db.settings(), "DELETE FROM events WHERE id = 10").await;
    let (inc, _) = backup(&store, &db, &opts).await;
    let m = manifest(&store, &inc.backup_id).await;
    assert!(
        m.warnings.iter().any(|w| w.contains("exporting it whole")),
        "{:?}",
        m.warnings
    );
    assert_restores_to_source(&store, &inc.backup_id, &db, CHAIN_DDL, CHAIN_TABLES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_at_any_point_resumes_without_loss_or_duplicates() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    exec(
        &db.settings(),
        "INSERT INTO settings SELECT 'bulk' || g, 'v' FROM generate_series(1, 500) g",
    )
    .await;
    let opts = chain_options();

    // How long an uninterrupted full backup takes here.
    let (_d, reference) = local_store();
    let reference: Store = Arc::new(reference);
    let started = Instant::now();
    backup(&reference, &db, &opts).await;
    let whole = started.elapsed();

    let points = 12;
    for i in 1..=points {
        let (_dir, local) = local_store();
        let store: Store = Arc::new(local);
        let kill_after = whole * i / (points + 1);
        let killed = tokio::time::timeout(
            kill_after,
            export_slice(store.clone(), &db.settings(), &opts),
        )
        .await;
        if let Ok(result) = killed {
            result.expect("an unkilled slice succeeds");
        }
        // Writes the killed slice had already started (the lease, a chunk) still land,
        // as requests a dead Lambda sent still reach S3; the next invocation comes later.
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Resume: the run the lease names (the killed slice's), or a new one.
        let mut resume = opts.clone();
        resume.run_id = tidemark_core::lease::current(store.as_ref())
            .await
            .expect("read lease")
            .map(|(lease, _)| lease.run_id);
        let (sealed, _) = backup(&store, &db, &resume).await;
        let m = manifest(&store, &sealed.backup_id).await;
        let mut keys: Vec<_> = m.all_chunks().map(|c| c.key.clone()).collect();
        let total = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), total, "kill point {i}: a chunk is listed twice");
        // Let any write the killed slice still had in flight land, then check that every
        // recorded chunk still has the content the manifest names.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for chunk in m.all_chunks() {
            let object = store
                .read(&chunk.key)
                .await
                .expect("read")
                .expect("chunk exists");
            assert_eq!(
                tidemark_core::store::sha256_hex(&object.bytes),
                chunk.sha256,
                "kill point {i}: {} was overwritten",
                chunk.key
            );
        }
        assert_restores_to_source(&store, &sealed.backup_id, &db, CHAIN_DDL, CHAIN_TABLES).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_run_fails_fast_naming_the_holder() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let store: Store = Arc::new(s3_store(S3StoreOptions::default()).await);
    let opts = chain_options();
    let settings = db.settings();
    let (a, b) = tokio::join!(
        export_slice(store.clone(), &settings, &opts),
        export_slice(store.clone(), &settings, &opts)
    );
    let (winner, loser) = match (a, b) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        (a, b) => panic!("exactly one run must proceed: {a:?} / {b:?}"),
    };
    match &loser {
        RunError::Locked { run_id, .. } => assert_eq!(run_id, &winner.run_id),
        other => panic!("expected Locked, got {other}"),
    }
    let message = loser.to_string();
    assert!(
        message.starts_with(&format!("locked by run {} since ", winner.run_id))
            && message.contains("(expires "),
        "{message}"
    );
    // Sealing releases the lease: the next run proceeds.
    seal_run(store.clone(), &winner.run_id, "test")
        .await
        .expect("seal");
    export_slice(store.clone(), &db.settings(), &opts)
        .await
        .expect("next run after release");
}

#[tokio::test]
async fn an_unknown_table_is_named_and_nothing_is_written() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let mut opts = chain_options();
    opts.settings.selection.tables = vec!["accounts".into(), "no_such_table".into()];
    let err = export_slice(store.clone(), &db.settings(), &opts)
        .await
        .expect_err("unknown table");
    assert!(
        err.to_string().contains("unknown table no_such_table"),
        "{err}"
    );
    assert!(
        store.list("").await.expect("list").is_empty(),
        "nothing written"
    );

    opts.settings.selection.tables = vec![];
    opts.settings.selection.modes = vec![("settings".into(), TableMode::Append)];
    let err = export_slice(store.clone(), &db.settings(), &opts)
        .await
        .expect_err("append needs an integer key");
    assert!(
        err.to_string().contains("settings") && err.to_string().contains("append mode needs"),
        "{err}"
    );
    assert!(
        store.list("").await.expect("list").is_empty(),
        "nothing written"
    );
}

#[tokio::test]
async fn an_unchanged_incremental_costs_the_same_whatever_the_history() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let opts = chain_options();
    backup(&store, &db, &opts).await;
    let mut costs = Vec::new();
    for _ in 0..4 {
        let (sealed, _) = backup(&store, &db, &opts).await;
        costs.push(manifest(&store, &sealed.backup_id).await.store_requests);
    }
    // An incremental over-exports rows written while other tests' transactions held the
    // cluster's snapshot xmin back (a chunk more or less, as the parallel tests go); what
    // must not happen is growth with the history.
    assert!(
        costs[3] <= costs[1] + 8,
        "requests per run grow with the history: {costs:?}"
    );
    assert!(
        costs.iter().all(|&c| c < 60),
        "requests per unchanged incremental: {costs:?}"
    );
}

#[tokio::test]
async fn a_chunk_restores_by_hand_with_zstd_and_psql() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), &format!("{MATRIX_DDL}{MATRIX_DATA}")).await;
    let (dir, local) = local_store();
    let root = local.root().to_path_buf();
    let store: Store = Arc::new(local);
    let (sealed, _) = backup(&store, &db, &options(400)).await;
    let m = manifest(&store, &sealed.backup_id).await;
    let target = cluster.create_database().await;
    exec(&target.settings(), MATRIX_DDL).await;
    let url = target.url(tidemark_core::db::SslMode::Prefer);
    for name in ["Order Lines", "nokey"] {
        let entry = m
            .tables
            .iter()
            .find(|t| t.name.name == name)
            .expect("table");
        for chunk in &entry.chunks {
            let file = root.join(&chunk.key);
            let script = format!(
                "zstd -dc '{}' | psql '{url}' -v ON_ERROR_STOP=1 -q -c '\\copy {} FROM STDIN'",
                file.display(),
                entry.name.quoted().replace('\'', "'\\''")
            );
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(&script)
                .output()
                .expect("sh");
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let src = tidemark_core::db::connect(&db.settings())
        .await
        .expect("source");
    let dst = tidemark_core::db::connect(&target.settings())
        .await
        .expect("target");
    for select in [
        "SELECT * FROM \"Sales\".\"Order Lines\" ORDER BY 1, 2",
        "SELECT * FROM nokey ORDER BY 1, 2",
    ] {
        assert!(
            ordered_copy(&src, select).await == ordered_copy(&dst, select).await,
            "{select}"
        );
    }
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_table_is_split_into_lanes_that_export_at_once() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let mut opts = chain_options();
    opts.settings.workers = 3;
    opts.deadline = Some(Instant::now());
    let first = export_slice(store.clone(), &db.settings(), &opts)
        .await
        .expect("slice");
    assert!(!first.done);
    let (progress, _) = read_doc::<tidemark_core::format::progress::RunProgress>(
        store.as_ref(),
        &tidemark_core::repo::progress_key(&first.run_id),
    )
    .await
    .expect("read progress")
    .expect("progress exists");
    for (name, lanes) in [("accounts", 3), ("events", 3), ("settings", 1)] {
        let table = progress
            .tables
            .iter()
            .find(|t| t.name.name == name)
            .expect("table");
        assert_eq!(table.lanes.len(), lanes, "{name}: {:?}", table.lanes);
        // Lanes tile the key space: each starts where the previous one ends.
        for pair in table.lanes.windows(2) {
            assert_eq!(pair[0].until, pair[1].after, "{name}");
        }
    }
    opts.deadline = None;
    opts.run_id = Some(first.run_id.clone());
    let (sealed, _) = backup(&store, &db, &opts).await;
    assert_restores_to_source(&store, &sealed.backup_id, &db, CHAIN_DDL, CHAIN_TABLES).await;
}
