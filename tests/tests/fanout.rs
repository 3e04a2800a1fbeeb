//! Fan-out: a run's export spread over many workers that share it only through the store
//! (work items claimed with conditional writes), each in a snapshot of its own. The
//! oracles are pgbench's balance invariant under load, the source's own rows, and the
//! manifest listing every chunk once.

use std::collections::BTreeSet;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_core::catalog::TableSelection;
use tidemark_core::export::{export_slice, export_worker, ExportOptions, WorkerReport};
use tidemark_core::format::item::WorkItem;
use tidemark_core::format::manifest::Manifest;
use tidemark_core::manifest::{seal_run, SealReport};
use tidemark_tests::fixtures::*;
use tidemark_tests::{
    assert_same, exec, local_store, restore_fresh, verify_backup, TestCluster, TestDatabase,
};

/// Options of a run fanned out over `concurrency` workers, cut into many small ranges.
fn fanned(concurrency: usize, chunk_rows: u64) -> ExportOptions {
    ExportOptions {
        settings: tidemark_core::export::ExportSettings {
            chunk_rows,
            chunk_bytes: 1 << 30,
            workers: 2,
            concurrency,
            selection: TableSelection::default(),
            ..tidemark_core::export::ExportSettings::default()
        },
        progress_interval: Duration::ZERO,
        ..ExportOptions::default()
    }
}

/// What a fanned-out backup did.
struct Fanned {
    sealed: SealReport,
    workers: Vec<WorkerReport>,
}

/// A first slice with no time to spare (a run fans out once it needs a second slice),
/// then slices (unbounded) and, whenever one fans the run out, its workers at once, each
/// bounded to `worker_budget` as a short Lambda timeout would; then the seal.
async fn fanned_backup(
    store: &Store,
    db: &TestDatabase,
    opts: &ExportOptions,
    worker_budget: Duration,
) -> Fanned {
    let mut opts = opts.clone();
    let mut workers = Vec::new();
    for _ in 0..500 {
        opts.deadline = opts.run_id.is_none().then(Instant::now);
        let report = export_slice(store.clone(), &db.settings(), &opts)
            .await
            .unwrap_or_else(|e| panic!("slice: {e}"));
        opts.run_id = Some(report.run_id.clone());
        if report.done {
            let sealed = seal_run(store.clone(), &report.run_id, "test")
                .await
                .expect("seal");
            return Fanned { sealed, workers };
        }
        if !report.fan_out {
            assert_eq!(
                report.slice, 1,
                "a later slice either ends the run or fans out"
            );
            continue;
        }
        opts.deadline = Some(Instant::now() + worker_budget);
        workers.extend(run_workers(store, &db.settings(), &opts).await);
    }
    panic!("the run does not end");
}

/// Every chunk a manifest lists, checked to be listed once and to exist.
async fn assert_chunks_once(store: &Store, m: &Manifest) {
    let keys: Vec<String> = m.all_chunks().map(|c| c.key.clone()).collect();
    let unique: BTreeSet<&String> = keys.iter().collect();
    assert_eq!(
        unique.len(),
        keys.len(),
        "a chunk is listed twice in {}",
        m.id
    );
    for key in unique {
        assert!(
            store.head(key).await.expect("head").is_some(),
            "{} lists {key}, which is not in the store",
            m.id
        );
    }
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
async fn fanned_out_backups_under_pgbench_load_restore_to_one_moment() {
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
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let opts = fanned(4, 10_000);
    let mut ids = Vec::new();
    let mut released = 0;
    for _ in 0..3 {
        let run = fanned_backup(&store, &db, &opts, Duration::from_millis(150)).await;
        let m = manifest(&store, &run.sealed.backup_id).await;
        assert!(m.is_consistent(), "{:?}", m.consistency);
        assert_chunks_once(&store, &m).await;
        // Workers read in snapshots of their own: each took a slice number of its own.
        let slices: Vec<u32> = run.workers.iter().filter_map(|w| w.slice).collect();
        let distinct: BTreeSet<&u32> = slices.iter().collect();
        assert_eq!(distinct.len(), slices.len(), "{slices:?}");
        assert!(run.workers.iter().any(|w| w.items_done > 0));
        released += run.workers.iter().map(|w| w.items_released).sum::<u64>();
        // The workers' items and slices went into the manifest, and away with the run.
        let leftovers = store
            .list(&format!("runs/{}/", run.sealed.backup_id))
            .await
            .expect("list");
        assert!(leftovers.is_empty(), "{leftovers:?}");
        ids.push(run.sealed.backup_id);
    }
    assert!(
        released > 0,
        "no worker handed an item back at its deadline"
    );
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
}

/// Returns once some work item of `run_id` is held and not done (by the only worker
/// running).
async fn until_claimed(store: &Store, run_id: &str) {
    loop {
        let listed = store
            .list(&tidemark_core::repo::items_prefix(run_id))
            .await
            .expect("list the items");
        for object in listed {
            let item = tidemark_core::format::read_doc::<WorkItem>(store.as_ref(), &object.key)
                .await
                .expect("read an item");
            if item.is_some_and(|(item, _)| item.holder.is_some() && !item.done) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_item_is_taken_over_and_nothing_is_lost_or_listed_twice() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    exec(
        &db.settings(),
        "INSERT INTO accounts SELECT g, g, 'bulk' FROM generate_series(2000, 60000) g;
         INSERT INTO settings SELECT 'bulk' || g, 'v' FROM generate_series(1, 20000) g; ANALYZE;",
    )
    .await;
    let mut opts = fanned(3, 2_000);
    opts.settings.selection.modes =
        vec![("events".into(), tidemark_core::format::TableMode::Append)];
    // Claims lapse quickly, so that the killed worker's items are taken over soon.
    opts.lease_ttl = Duration::from_secs(2);
    let mut taken_over = 0;
    for kill_ms in [0u64, 50, 200] {
        let (_dir, local) = local_store();
        let store: Store = Arc::new(local);
        for round in 0..2 {
            let mut run = opts.clone();
            run.deadline = Some(Instant::now());
            let first = export_slice(store.clone(), &db.settings(), &run)
                .await
                .expect("slice");
            assert!(!first.fan_out && !first.done, "{first:?}");
            run.run_id = Some(first.run_id.clone());
            run.deadline = None;
            let second = export_slice(store.clone(), &db.settings(), &run)
                .await
                .expect("slice");
            assert!(
                second.fan_out,
                "a run that needs a second slice fans out: {second:?}"
            );
            // One worker killed part way, `kill_ms` after it claimed its first item: its
            // future is dropped, as a process dies.
            let settings = db.settings();
            tokio::select! {
                result = export_worker(store.clone(), &settings, &run) => {
                    result.expect("an unkilled worker succeeds");
                }
                () = async {
                    until_claimed(&store, &first.run_id).await;
                    tokio::time::sleep(Duration::from_millis(kill_ms)).await;
                } => {}
            }
            if round == 1 {
                exec(&db.settings(), "UPDATE accounts SET balance = balance + 1 WHERE id % 7 = 0; DELETE FROM settings WHERE k LIKE 'bulk1%';").await;
            }
            // The rest of the run: the items it held are taken over once its claim lapses.
            let done = fanned_backup(&store, &db, &run, Duration::from_secs(30)).await;
            taken_over += done.workers.iter().map(|w| w.items_taken_over).sum::<u64>();
            let m = manifest(&store, &done.sealed.backup_id).await;
            assert!(
                m.is_consistent(),
                "kill at {kill_ms} ms: {:?}",
                m.consistency
            );
            assert_chunks_once(&store, &m).await;
            let target = restore_fresh(&store, &cluster, &done.sealed.backup_id).await;
            assert_same(&db.settings(), &target.settings(), CHAIN_TABLES).await;
        }
    }
    assert!(taken_over > 0, "no killed worker's item was taken over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_changes_how_a_backup_is_taken_not_what_it_holds() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    exec(
        &db.settings(),
        "INSERT INTO accounts SELECT g, g, 'bulk' FROM generate_series(2000, 30000) g; ANALYZE;",
    )
    .await;
    let mut shapes = Vec::new();
    for concurrency in [1, 4] {
        let (_dir, local) = local_store();
        let store: Store = Arc::new(local);
        let mut opts = fanned(concurrency, 3_000);
        opts.settings.selection.modes =
            vec![("events".into(), tidemark_core::format::TableMode::Append)];
        let full = if concurrency == 1 {
            backup(&store, &db, &opts).await.0
        } else {
            fanned_backup(&store, &db, &opts, Duration::from_secs(30))
                .await
                .sealed
        };
        let m = manifest(&store, &full.backup_id).await;
        assert!(m.is_consistent());
        assert_chunks_once(&store, &m).await;
        let shape: Vec<_> = m
            .tables
            .iter()
            // An `append` table brought to one moment by a consistency pass records the
            // fingerprint of its keys (its rows may have been updated between the
            // snapshots, which append mode does not export), as for a run over slices.
            .map(|t| {
                let of_rows = t.mode != tidemark_core::format::TableMode::Append;
                (
                    t.name.to_string(),
                    t.mode,
                    t.fingerprint.rows,
                    of_rows.then_some(t.fingerprint),
                )
            })
            .collect();
        shapes.push((shape, m.kind, m.schema_dump.is_some(), m.sequences.len()));
        let target = restore_fresh(&store, &cluster, &full.backup_id).await;
        assert_same(&db.settings(), &target.settings(), CHAIN_TABLES).await;
    }
    assert_eq!(shapes[0], shapes[1]);
}
