//! Prune against real stores: policies applied to real chains, dry runs, the lease, dead
//! runs, and a property test over random histories.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use tidemark_core::catalog::TableSelection;
use tidemark_core::export::{export_slice, ExportOptions};
use tidemark_core::format::manifest::Manifest;
use tidemark_core::format::TableMode;
use tidemark_core::prune::{prune, PruneOptions};
use tidemark_core::repo::manifest_key;
use tidemark_core::restore::{self, BackupSelector, RestoreOptions};
use tidemark_core::retention::RetentionPolicy;
use tidemark_core::run::RunError;
use tidemark_core::store::{S3StoreOptions, WriteCondition};
use tidemark_tests::fixtures::*;
use tidemark_tests::{exec, local_store, ordered_copy, s3_store, TestCluster};

fn chain_options() -> ExportOptions {
    ExportOptions {
        settings: tidemark_core::export::ExportSettings {
            chunk_rows: 100,
            selection: TableSelection {
                schemas: vec!["public".into()],
                modes: vec![("events".into(), TableMode::Append)],
                ..TableSelection::default()
            },
            ..tidemark_core::export::ExportSettings::default()
        },
        progress_interval: Duration::ZERO,
        ..ExportOptions::default()
    }
}

fn keep_last(n: u32) -> RetentionPolicy {
    RetentionPolicy {
        keep_last: Some(n),
        ..RetentionPolicy::empty()
    }
}

async fn all_keys(store: &Store) -> Vec<String> {
    store
        .list("")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect()
}

async fn snapshot(settings: &tidemark_core::db::DbSettings) -> Vec<Vec<u8>> {
    let client = tidemark_core::db::connect(settings).await.expect("connect");
    let mut out = Vec::new();
    for (table, order) in CHAIN_TABLES {
        out.push(ordered_copy(&client, &format!("SELECT * FROM {table} ORDER BY {order}")).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_last_two_leaves_two_backups_that_restore_as_they_were() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let store: Store = Arc::new(s3_store(S3StoreOptions::default()).await);
    let mut states = Vec::new();
    for round in 0..4 {
        if round > 0 {
            exec(
                &db.settings(),
                &format!(
                    "UPDATE accounts SET balance = balance + {round} WHERE id % {} = 0;
                     DELETE FROM accounts WHERE id % 17 = {round};
                     INSERT INTO events (payload) SELECT 'r{round} ' || g FROM generate_series(1, 50) g;"
                , round + 2),
            )
            .await;
        }
        let (sealed, _) = backup(&store, &db, &chain_options()).await;
        states.push((sealed.backup_id, snapshot(&db.settings()).await));
    }
    // Dry run first: the same plan, nothing deleted.
    let before = all_keys(&store).await;
    let dry = prune(
        store.clone(),
        &PruneOptions {
            policy: keep_last(2),
            dry_run: true,
            ..PruneOptions::default()
        },
    )
    .await
    .expect("dry run");
    assert_eq!(all_keys(&store).await, before, "a dry run deletes nothing");
    assert_eq!(dry.plan.backups.iter().filter(|b| b.keep).count(), 2);
    assert!(dry.plan.delete.contains(&manifest_key(&states[0].0)));

    let done = prune(
        store.clone(),
        &PruneOptions {
            policy: keep_last(2),
            ..PruneOptions::default()
        },
    )
    .await
    .expect("prune");
    assert_eq!(
        done.plan.delete, dry.plan.delete,
        "the dry run showed exactly what was deleted"
    );
    let listed = tidemark_core::manifest::list_backups(store.as_ref())
        .await
        .expect("list");
    let ids: Vec<&str> = listed.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, vec![states[2].0.as_str(), states[3].0.as_str()]);
    // The full is gone, but the chunks its kept descendants need are not.
    for (id, expected) in &states[2..] {
        let target = cluster.create_database().await;
        let manifest = restore::load_manifest(store.as_ref(), &BackupSelector::Id(id.clone()))
            .await
            .expect("manifest");
        restore::restore(
            store.clone(),
            &manifest,
            &target.settings(),
            &RestoreOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("restore {id}: {e}"));
        assert!(
            snapshot(&target.settings()).await == *expected,
            "{id} restores as it was"
        );
    }
    // Nothing unreferenced is left: a second prune has nothing to do.
    let again = prune(
        store.clone(),
        &PruneOptions {
            policy: keep_last(2),
            dry_run: true,
            ..PruneOptions::default()
        },
    )
    .await
    .expect("plan");
    assert!(again.plan.delete.is_empty(), "{:?}", again.plan.delete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_waits_for_a_running_backup_and_sweeps_dead_runs() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    backup(&store, &db, &chain_options()).await;
    // A run in progress: its lease is live.
    let mut running = chain_options();
    running.deadline = Some(Instant::now() + Duration::from_millis(300));
    running.lease_ttl = Duration::from_secs(2);
    let slice = export_slice(store.clone(), &db.settings(), &running)
        .await
        .expect("slice");
    assert!(!slice.done || slice.tables_done > 0);
    let before = all_keys(&store).await;
    let err = prune(
        store.clone(),
        &PruneOptions {
            policy: keep_last(1),
            grace: Duration::ZERO,
            ..PruneOptions::default()
        },
    )
    .await
    .expect_err("a backup holds the lease");
    assert!(
        matches!(err, tidemark_core::prune::PruneError::Run(RunError::Locked { ref run_id, .. }) if *run_id == slice.run_id),
        "{err}"
    );
    assert_eq!(all_keys(&store).await, before, "nothing deleted");

    // The run dies (its lease expires); past the grace its leftovers go, the sealed
    // backup stays.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let report = prune(
        store.clone(),
        &PruneOptions {
            policy: keep_last(1),
            grace: Duration::ZERO,
            ..PruneOptions::default()
        },
    )
    .await
    .expect("prune");
    assert_eq!(report.plan.dead_runs, vec![slice.run_id.clone()]);
    let left = all_keys(&store).await;
    assert!(!left.iter().any(|k| k.contains(&slice.run_id)), "{left:?}");
    assert_eq!(
        left.iter().filter(|k| k.starts_with("manifests/")).count(),
        1
    );
}

#[tokio::test]
async fn an_empty_policy_is_refused() {
    let (_dir, local) = local_store();
    let err = prune(
        Arc::new(local),
        &PruneOptions {
            policy: RetentionPolicy::empty(),
            ..PruneOptions::default()
        },
    )
    .await
    .expect_err("empty policy");
    assert!(err.to_string().contains("empty retention policy"), "{err}");
}

/// A synthetic manifest: `own` chunks plus those of its chain.
fn synthetic_manifest(id: &str, hours_ago: i64, chain: &[String], chunks: &[String]) -> Manifest {
    let now = chrono::Utc::now() - chrono::TimeDelta::hours(hours_ago);
    let chunk_refs: Vec<serde_json::Value> = chunks
        .iter()
        .map(|k| serde_json::json!({"key": k, "kind": "rows", "run_id": id, "rows": 1, "bytes": 1, "raw_bytes": 1, "sha256": "00"}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "version": 1, "id": id, "kind": if chain.len() > 1 { "incremental" } else { "full" },
        "chain": chain, "started_at": now, "created_at": now,
        "snapshot": {"xmin": 1, "xmax": 1, "xip": []}, "server_version": "15", "database": "x",
        "tables": [{"name": {"schema": "public", "name": "t"}, "mode": "changes",
                    "schema": {"kind": "table", "columns": []}, "columns": ["id"],
                    "fingerprint": {"rows": 0, "sum": "0000000000000000"}, "chunks": chunk_refs}],
        "totals": {"chunks": 1, "rows": 1, "bytes": 1, "raw_bytes": 1, "slices": 1}
    }))
    .expect("synthetic manifest")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Random histories of fulls and incrementals, random policies: after a prune every
    /// kept backup has all its chunks, and no chunk is left that no kept backup needs.
    #[test]
    fn every_kept_backup_stays_whole_and_nothing_unreferenced_remains(
        kinds in proptest::collection::vec(any::<bool>(), 1..14),
        last in 0u32..4,
        daily in proptest::option::of(1u32..4),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let (_dir, local) = local_store();
            let store: Store = Arc::new(local);
            let mut chain: Vec<String> = Vec::new();
            let mut chain_chunks: Vec<String> = Vec::new();
            let n = kinds.len();
            for (i, full) in kinds.iter().enumerate() {
                let id = format!("2026010{}T00000{}Z-{i:06}", i / 10, i % 10);
                if *full || chain.is_empty() {
                    chain.clear();
                    chain_chunks.clear();
                }
                chain.push(id.clone());
                let own = vec![format!("chunks/{id}/public.t/000001-001.copy.zst")];
                chain_chunks.extend(own.iter().cloned());
                for key in &own {
                    store.put(key, Bytes::from_static(b"x"), WriteCondition::Always).await.expect("chunk");
                }
                let m = synthetic_manifest(&id, ((n - i) * 20) as i64, &chain, &chain_chunks);
                tidemark_core::format::manifest::write_manifest(store.as_ref(), &m, WriteCondition::IfAbsent).await.expect("manifest");
            }
            let policy = RetentionPolicy { keep_last: Some(last), keep_daily: daily, ..RetentionPolicy::empty() };
            if policy.is_empty() {
                return;
            }
            prune(store.clone(), &PruneOptions { policy, ..PruneOptions::default() }).await.expect("prune");
            let keys: std::collections::BTreeSet<String> = store.list("").await.expect("list").into_iter().map(|o| o.key).collect();
            let mut referenced = std::collections::BTreeSet::new();
            for key in keys.iter().filter(|k| k.starts_with("manifests/")) {
                let m = tidemark_core::format::read_doc::<Manifest>(store.as_ref(), key).await.expect("read").expect("exists").0;
                for c in m.all_chunks() {
                    assert!(keys.contains(&c.key), "kept backup {} lost {}", m.id, c.key);
                    referenced.insert(c.key.clone());
                }
            }
            for key in keys.iter().filter(|k| k.starts_with("chunks/")) {
                assert!(referenced.contains(key), "{key} is referenced by no kept backup");
            }
            assert!(keys.iter().any(|k| k.starts_with("manifests/")), "the newest backup is always kept");
        });
    }
}
