//! The verify handler fed the real `events/verify.*.json` samples.

use std::sync::Arc;

use lambda_runtime::LambdaEvent;
use serde_json::json;
use tidemark_core::export::ExportOptions;
use tidemark_core::manifest::SealReport;
use tidemark_core::store::{S3StoreOptions, WriteStore};
use tidemark_core::verify::VerifyOptions;
use tidemark_tests::fixtures::{backup, chain_fixture};
use tidemark_tests::{lambda_context, s3_store, sample_events, TestCluster, TestDatabase};
use tidemark_verify::{handle, Deps};

/// A sealed backup of the chain fixture in a fresh S3 prefix, and the handler's
/// dependencies verifying on the test cluster (the database guard keeps the source).
async fn sealed_backup(options: VerifyOptions) -> (TestDatabase, SealReport, Deps) {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let store: Arc<dyn WriteStore> = Arc::new(s3_store(S3StoreOptions::default()).await);
    let (sealed, _) = backup(&store, &db, &ExportOptions::default()).await;
    let deps = Deps {
        store,
        server: cluster.settings("postgres"),
        options,
        margin: std::time::Duration::from_secs(60),
    };
    (db, sealed, deps)
}

#[test]
fn every_sample_event_parses() {
    for (name, event) in sample_events("verify.") {
        tidemark_core::events::verify_event(event).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_verify_the_newest_or_the_named_backup() {
    let (_db, sealed, deps) = sealed_backup(VerifyOptions::default()).await;
    // The manifest step's output, fed straight in.
    let (_, mut step) = sample_events("verify.step-functions").remove(0);
    step["backup_id"] = json!(sealed.backup_id);
    let out = handle(LambdaEvent::new(step, lambda_context(900)), &deps)
        .await
        .expect("verify");
    assert_eq!(
        (out["ok"].as_bool(), out["done"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(out["backup_id"], sealed.backup_id.as_str());
    assert!(out["restore_seconds"].as_f64().is_some_and(|s| s > 0.0));

    for name in ["verify.console", "verify.scheduled-event"] {
        let (_, event) = sample_events(name).remove(0);
        let out = handle(LambdaEvent::new(event, lambda_context(900)), &deps)
            .await
            .expect("verify");
        assert_eq!(out["backup_id"], sealed.backup_id.as_str(), "{name}");
        assert_eq!(out["ok"], true);
    }

    // A payload verify does not take neither verifies nor overwrites the record.
    let record_key = format!("verifications/{}.json", sealed.backup_id);
    let before = deps.store.head(&record_key).await.expect("head");
    let err = handle(
        LambdaEvent::new(
            json!({"backup_id": sealed.backup_id, "mode": "weird"}),
            lambda_context(900),
        ),
        &deps,
    )
    .await
    .expect_err("refused");
    assert_eq!(err.error_type, tidemark_lambda::BAD_INPUT);
    assert!(
        err.message.contains("unknown field `mode`"),
        "{}",
        err.message
    );
    assert_eq!(deps.store.head(&record_key).await.expect("head"), before);
    let err = handle(
        LambdaEvent::new(
            json!({"backup_id": "20990101T000000Z-ffffff"}),
            lambda_context(900),
        ),
        &deps,
    )
    .await
    .expect_err("unknown backup");
    assert_eq!(err.error_type, tidemark_lambda::FATAL);
    assert!(err.message.contains("unknown backup"), "{}", err.message);
    let err = handle(
        LambdaEvent::new(json!({"backup_id": 7}), lambda_context(900)),
        &deps,
    )
    .await
    .expect_err("malformed");
    assert!(err.message.starts_with("invalid event"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_deadline_verifies_in_slices() {
    let (_db, sealed, deps) = sealed_backup(VerifyOptions {
        workers: 1,
        ..VerifyOptions::default()
    })
    .await;
    let store = deps.store.clone();
    // 60 s left with a 60 s margin: one table per invocation, as a 15-minute Lambda
    // would go through a backup too big for one invocation.
    let mut slices = 0;
    let out = loop {
        slices += 1;
        assert!(slices < 20, "verification never finished");
        let event = json!({"backup_id": sealed.backup_id});
        let out = handle(LambdaEvent::new(event, lambda_context(60)), &deps)
            .await
            .expect("slice");
        assert_eq!(out["backup_id"], sealed.backup_id.as_str());
        if out["done"] == true {
            break out;
        }
        // The state machine's ResultSelector reads `ok` from every slice's output.
        assert_eq!(out.get("ok"), Some(&serde_json::Value::Null), "{out}");
    };
    assert_eq!(slices, 3, "one table per slice");
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["tables"], 3, "{out}");
    assert_eq!(out["tables_failed"], 0, "{out}");
    assert_eq!(
        out["record"],
        format!("verifications/{}.json", sealed.backup_id),
        "{out}"
    );
    assert!(
        store.list("runs/").await.expect("list").is_empty(),
        "the slice state is gone once the verification is recorded"
    );
}

/// Verifies `backup_id` one minimal slice at a time (one connection, past its deadline at
/// once), checking each unfinished slice's output with `each`, until done or `limit`
/// slices; returns the last output and the slices taken.
async fn verify_in_minimal_slices(
    store: &Arc<dyn WriteStore>,
    cluster: &TestCluster,
    backup_id: &str,
    limit: usize,
    each: impl Fn(&serde_json::Value),
) -> (serde_json::Value, usize) {
    let deps = Deps {
        store: store.clone(),
        server: cluster.settings("postgres"),
        options: VerifyOptions {
            workers: 1,
            ..VerifyOptions::default()
        },
        margin: std::time::Duration::from_secs(60),
    };
    let mut slices = 0;
    loop {
        slices += 1;
        assert!(slices < limit, "verification never finished");
        let event = json!({"backup_id": backup_id});
        let out = handle(LambdaEvent::new(event, lambda_context(60)), &deps)
            .await
            .expect("slice");
        if out["done"] == true {
            return (out, slices);
        }
        each(&out);
    }
}

/// A table bigger than one slice: verify lands it chunk by chunk across slices (each
/// chunk with its progress record, in one transaction), and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_bigger_than_a_slice_finishes_across_slices() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    tidemark_tests::exec(
        &db.settings(),
        "CREATE TABLE big (id bigint PRIMARY KEY, note text);
         INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 60000) g;",
    )
    .await;
    let store: Arc<dyn WriteStore> = Arc::new(s3_store(S3StoreOptions::default()).await);
    let (sealed, _) = backup(
        &store,
        &db,
        &ExportOptions {
            settings: tidemark_core::export::ExportSettings {
                chunk_rows: 5000,
                ..tidemark_core::export::ExportSettings::default()
            },
            ..ExportOptions::default()
        },
    )
    .await;
    // Past the deadline at once: each slice lands one chunk of the one table.
    let (out, slices) = verify_in_minimal_slices(&store, &cluster, &sealed.backup_id, 30, |out| {
        assert_eq!(out["tables_done"], 0, "{out}");
    })
    .await;
    assert!(slices >= 12, "one chunk per slice: {slices} slices");
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["rows"], 60000, "{out}");
}

/// An incremental's `changes` chain bigger than a slice: verify merges it chunk by chunk
/// across slices (the live key set, then the chunks newest first, each step with its
/// progress record) and the result matches the source's truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_chain_bigger_than_a_slice_finishes_across_slices() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    tidemark_tests::exec(
        &db.settings(),
        "CREATE TABLE accounts (id bigint PRIMARY KEY, balance int, note text);
         INSERT INTO accounts SELECT g, g, md5(g::text) FROM generate_series(1, 20000) g;",
    )
    .await;
    let store: Arc<dyn WriteStore> = Arc::new(s3_store(S3StoreOptions::default()).await);
    let opts = ExportOptions {
        settings: tidemark_core::export::ExportSettings {
            chunk_rows: 4000,
            ..tidemark_core::export::ExportSettings::default()
        },
        ..ExportOptions::default()
    };
    backup(&store, &db, &opts).await;
    tidemark_tests::exec(
        &db.settings(),
        "UPDATE accounts SET balance = -balance WHERE id % 7 = 0;
         DELETE FROM accounts WHERE id % 11 = 0;
         INSERT INTO accounts SELECT g, g, 'new' FROM generate_series(20001, 26000) g;",
    )
    .await;
    let (sealed, _) = backup(&store, &db, &opts).await;
    assert_eq!(sealed.kind.to_string(), "incremental");
    let (out, slices) =
        verify_in_minimal_slices(&store, &cluster, &sealed.backup_id, 40, |_| {}).await;
    assert!(slices >= 6, "one merge step per slice: {slices} slices");
    assert_eq!(out["ok"], true, "{out}");
}
