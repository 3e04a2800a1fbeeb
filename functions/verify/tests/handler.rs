//! The verify handler fed the real `events/verify.*.json` samples.

use std::sync::Arc;

use lambda_runtime::LambdaEvent;
use serde_json::json;
use tidemark_core::store::{S3StoreOptions, WriteStore};
use tidemark_tests::fixtures::{backup, chain_fixture};
use tidemark_tests::{lambda_context, s3_store, sample_events, TestCluster};
use tidemark_verify::{handle, Deps};

#[test]
fn every_sample_event_parses() {
    for (name, event) in sample_events("verify.") {
        tidemark_core::events::verify_event(event).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_verify_the_newest_or_the_named_backup() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let store: Arc<dyn WriteStore> = Arc::new(s3_store(S3StoreOptions::default()).await);
    let (sealed, _) = backup(
        &store,
        &db,
        &tidemark_core::export::ExportOptions::default(),
    )
    .await;
    let deps = Deps {
        store: store.clone(),
        server: cluster.settings("postgres"),
        options: Default::default(),
    };
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
