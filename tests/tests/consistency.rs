//! One point in time for every backup, however many slices exported it. The oracle is
//! pgbench's own invariant — in every consistent state of its database
//! `sum(abalance) = sum(bbalance) = sum(tbalance) = sum(delta)` — with pgbench writing
//! while the backups run in many slices, and foreign keys that only hold in a state the
//! source was in.

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_core::catalog::TableSelection;
use tidemark_core::export::{export_slice, ExportOptions};
use tidemark_core::format::progress::RunProgress;
use tidemark_core::format::read_doc;
use tidemark_core::manifest::{seal_run, SealReport};
use tidemark_core::repo::progress_key;
use tidemark_core::store::WriteCondition;
use tidemark_tests::fixtures::*;
use tidemark_tests::{
    assert_same, exec, local_store, restore_fresh, verify_backup, TestCluster, TestDatabase,
};

/// Options that cut a backup into many short slices.
fn sliced(chunk_rows: u64) -> ExportOptions {
    ExportOptions {
        settings: tidemark_core::export::ExportSettings {
            chunk_rows,
            chunk_bytes: 1 << 30,
            workers: 2,
            selection: TableSelection::default(),
            ..tidemark_core::export::ExportSettings::default()
        },
        progress_interval: Duration::ZERO,
        ..ExportOptions::default()
    }
}

/// Runs slices of `budget` each until the run is ready, then seals it; returns the seal
/// and the number of slices.
async fn sliced_backup(
    store: &Store,
    db: &TestDatabase,
    opts: &ExportOptions,
    budget: Duration,
) -> (SealReport, u32) {
    let mut opts = opts.clone();
    let mut slices = 0;
    loop {
        opts.deadline = Some(Instant::now() + budget);
        let report = export_slice(store.clone(), &db.settings(), &opts)
            .await
            .unwrap_or_else(|e| panic!("slice: {e}"));
        slices += 1;
        opts.run_id = Some(report.run_id.clone());
        if report.done {
            break;
        }
        assert!(slices < 500, "the run does not end");
    }
    let run_id = opts.run_id.clone().expect("a run");
    let sealed = seal_run(store.clone(), &run_id, "test")
        .await
        .expect("seal");
    (sealed, slices)
}

fn pgbench(cluster: &TestCluster, db: &TestDatabase, args: &[&str]) -> Command {
    let mut cmd = Command::new(cluster.bin_dir.join("pgbench"));
    cmd.args(args)
        .arg(&db.name)
        .env("PGHOST", &cluster.host)
        .env("PGPORT", cluster.port.to_string())
        .env("PGUSER", &cluster.user)
        .env("PGPASSWORD", &cluster.password)
        .env("PGSSLMODE", "require")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// Stops pgbench when dropped.
struct Load(Child);

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// pgbench's four sums in `db`.
async fn balances(db: &TestDatabase) -> [i64; 4] {
    let client = tidemark_core::db::connect(&db.settings())
        .await
        .expect("connect");
    let row = client
        .query_one(
            "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts)::int8, \
                    (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches)::int8, \
                    (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers)::int8, \
                    (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::int8",
            &[],
        )
        .await
        .expect("sums");
    [row.get(0), row.get(1), row.get(2), row.get(3)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_over_many_slices_under_pgbench_load_restore_to_one_moment() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let init = pgbench(&cluster, &db, &["-i", "-s", "2", "--foreign-keys", "-q"])
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    // Writing the whole time: 4 clients, rate-limited so the machine stays usable.
    let load = Load(
        pgbench(
            &cluster,
            &db,
            &["-c", "4", "-j", "2", "-T", "600", "-R", "400", "-n"],
        )
        .spawn()
        .expect("pgbench"),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_dir, store) = local_store();
    let store: Store = Arc::new(store);
    let opts = sliced(10_000);
    let mut ids = Vec::new();
    for round in 0..3 {
        let (sealed, slices) = sliced_backup(&store, &db, &opts, Duration::from_millis(200)).await;
        assert!(slices >= 3, "backup {round} took {slices} slices");
        let m = manifest(&store, &sealed.backup_id).await;
        let consistency = m.consistency.clone().expect("consistency recorded");
        assert!(
            consistency.consistent && consistency.pass_rounds >= 1 && consistency.lsn.is_some(),
            "{consistency:?}"
        );
        ids.push(sealed.backup_id);
    }
    drop(load);
    for id in &ids {
        let restored = restore_fresh(&store, &cluster, id).await;
        let sums = balances(&restored).await;
        assert!(
            sums.iter().all(|s| *s == sums[0]) && sums[0] != 0,
            "backup {id} restores to a state pgbench never left: {sums:?}"
        );
        let record = verify_backup(&store, &cluster, id).await;
        assert!(record.ok, "{record:?}");
    }

    // The same backup with one table left as the slices read it (without what the
    // consistency pass added) is of mixed moments: verify names the table.
    let id = ids.last().expect("a backup");
    let mut m = manifest(&store, id).await;
    let pass_slice = m.consistency.as_ref().expect("consistency").slice;
    let accounts = m
        .tables
        .iter_mut()
        .find(|t| t.name.name == "pgbench_accounts")
        .expect("accounts");
    let suffix = |key: &str| {
        key.rsplit('/')
            .next()
            .and_then(|f| f.split('.').next())
            .and_then(|f| f.split('-').nth(1))
            .and_then(|s| s.parse::<u32>().ok())
    };
    let before = accounts.chunks.len();
    accounts
        .chunks
        .retain(|c| !c.key.contains(id) || suffix(&c.key).is_some_and(|s| s < pass_slice));
    assert!(
        accounts.chunks.len() < before,
        "the pass wrote accounts chunks"
    );
    accounts.key_chunks.clear();
    accounts.key_set = false;
    tidemark_core::format::manifest::write_manifest(store.as_ref(), &m, WriteCondition::Always)
        .await
        .expect("rewrite manifest");
    let record = verify_backup(&store, &cluster, id).await;
    assert!(!record.ok);
    let failed: Vec<String> = record
        .tables
        .iter()
        .filter(|t| !t.ok)
        .map(|t| t.name.to_string())
        .collect();
    assert_eq!(failed, vec!["public.pgbench_accounts"], "{record:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_hold_when_parents_and_children_change_between_slices() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        "CREATE TABLE parent (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text);
         CREATE TABLE child (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                             parent_id bigint NOT NULL REFERENCES parent ON DELETE CASCADE, v text);
         INSERT INTO parent (v) SELECT 'p' || g FROM generate_series(1, 20000) g;
         INSERT INTO child (parent_id, v) SELECT 1 + g % 20000, 'c' || g FROM generate_series(1, 40000) g;
         ANALYZE;",
    )
    .await;
    // Parents and children are created and deleted the whole time: a child exported in
    // one slice whose parent is deleted before another slice reads parent breaks a
    // restore that mixes moments.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (settings, stop) = (db.settings(), stop.clone());
        tokio::spawn(async move {
            let client = tidemark_core::db::connect(&settings)
                .await
                .expect("connect");
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let _ = client
                    .batch_execute(&format!(
                        "BEGIN;
                         WITH p AS (INSERT INTO parent (v) VALUES ('new {i}') RETURNING id)
                           INSERT INTO child (parent_id, v) SELECT id, 'new child' FROM p, generate_series(1, 2);
                         DELETE FROM parent WHERE id = (SELECT min(id) FROM parent);
                         UPDATE child SET parent_id = (SELECT max(id) FROM parent) WHERE id = (SELECT min(id) FROM child);
                         COMMIT;"
                    ))
                    .await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let (_dir, store) = local_store();
    let store: Store = Arc::new(store);
    let opts = sliced(2_000);
    let (full, full_slices) = sliced_backup(&store, &db, &opts, Duration::from_millis(100)).await;
    let (incr, _) = sliced_backup(&store, &db, &opts, Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.await.expect("churn");
    assert!(full_slices >= 3, "{full_slices} slices");
    for id in [&full.backup_id, &incr.backup_id] {
        // restore_fresh builds the foreign key after the data: it fails on an orphan.
        let _restored = restore_fresh(&store, &cluster, id).await;
        let record = verify_backup(&store, &cluster, id).await;
        assert!(record.ok, "{id}: {record:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_during_the_consistency_pass_resumes_to_one_moment() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    exec(
        &db.settings(),
        "INSERT INTO accounts SELECT g, g, 'bulk' FROM generate_series(2000, 40000) g; ANALYZE;",
    )
    .await;
    let mut opts = sliced(4_000);
    opts.settings.selection.modes =
        vec![("events".into(), tidemark_core::format::TableMode::Append)];
    for kill_ms in [30u64, 120, 400] {
        let (_dir, local) = local_store();
        let store: Store = Arc::new(local);
        // Slices with no time to spare until every table's ranges are exported...
        let mut run = opts.clone();
        loop {
            run.deadline = Some(Instant::now());
            let report = export_slice(store.clone(), &db.settings(), &run)
                .await
                .expect("slice");
            run.run_id = Some(report.run_id.clone());
            assert!(!report.done, "a one-snapshot run needs no pass");
            if report.tables_done == report.tables {
                break;
            }
        }
        // ...then the slice that runs the pass, killed part way.
        exec(
            &db.settings(),
            "UPDATE accounts SET balance = balance + 1 WHERE id % 3 = 0",
        )
        .await;
        let killed = tokio::time::timeout(
            Duration::from_millis(kill_ms),
            export_slice(store.clone(), &db.settings(), &run),
        )
        .await;
        if let Ok(result) = killed {
            result.expect("an unkilled slice succeeds");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let run_id = run.run_id.clone().expect("run");
        let progress = read_doc::<RunProgress>(store.as_ref(), &progress_key(&run_id))
            .await
            .expect("read")
            .map(|(p, _)| p);
        run.deadline = None;
        let (sealed, _) = backup(&store, &db, &run).await;
        let m = manifest(&store, &sealed.backup_id).await;
        assert!(
            m.is_consistent(),
            "kill at {kill_ms} ms (pass {:?}): {:?}",
            progress.and_then(|p| p.pass),
            m.consistency
        );
        let mut keys: Vec<_> = m.all_chunks().map(|c| c.key.clone()).collect();
        let total = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(
            keys.len(),
            total,
            "kill at {kill_ms} ms: a chunk is listed twice"
        );
        let target = restore_fresh(&store, &cluster, &sealed.backup_id).await;
        assert_same(&db.settings(), &target.settings(), CHAIN_TABLES).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_cannot_converge_is_sealed_loudly_as_mixed_and_fails_verification() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let mut opts = sliced(200);
    opts.settings.max_pass_rounds = 2;
    let mut run = opts.clone();
    let mut rounds_seen = Vec::new();
    loop {
        // No time for anything but the minimum, the pass included.
        run.deadline = Some(Instant::now());
        run.pass_deadline = Some(Instant::now());
        let report = export_slice(store.clone(), &db.settings(), &run)
            .await
            .expect("slice");
        run.run_id = Some(report.run_id.clone());
        rounds_seen.push(report.pass_round);
        if report.done {
            assert_eq!(report.consistent, Some(false));
            break;
        }
        assert!(rounds_seen.len() < 200, "the run does not end");
    }
    assert!(rounds_seen.contains(&Some(2)), "{rounds_seen:?}");
    let sealed = seal_run(store.clone(), &run.run_id.clone().expect("run"), "test")
        .await
        .expect("sealed all the same");
    assert!(!sealed.consistent);
    let m = manifest(&store, &sealed.backup_id).await;
    assert!(
        m.warnings
            .iter()
            .any(|w| w.contains("NOT one point in time")),
        "{:?}",
        m.warnings
    );
    let listed = tidemark_core::manifest::list_backups(store.as_ref())
        .await
        .expect("list");
    assert!(!listed[0].consistent);
    let record = verify_backup(&store, &cluster, &sealed.backup_id).await;
    assert!(
        !record.ok
            && record
                .error
                .as_deref()
                .is_some_and(|e| e.contains("not one point in time")),
        "{record:?}"
    );
    // The next backup counts changes from the oldest snapshot of that run's data, so it
    // misses nothing: one that can converge restores to the source.
    let (next, _) = backup(&store, &db, &sliced(200)).await;
    let target = restore_fresh(&store, &cluster, &next.backup_id).await;
    assert_same(&db.settings(), &target.settings(), CHAIN_TABLES).await;
}
