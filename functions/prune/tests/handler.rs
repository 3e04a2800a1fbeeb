//! The prune handler fed the real `events/prune.*.json` samples.

use std::sync::Arc;

use lambda_runtime::LambdaEvent;
use serde_json::json;
use tidemark_core::store::{S3StoreOptions, WriteStore};
use tidemark_prune::{handle, Deps};
use tidemark_tests::fixtures::{backup, chain_fixture};
use tidemark_tests::{lambda_context, s3_store, sample_events, TestCluster};

fn keep_last_one(name: &str) -> Option<String> {
    (name == "TIDEMARK_KEEP_LAST").then(|| "1".to_owned())
}

#[test]
fn every_sample_event_parses() {
    for (name, event) in sample_events("prune.") {
        tidemark_core::events::prune_event(event).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_plan_and_prune() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let store: Arc<dyn WriteStore> = Arc::new(s3_store(S3StoreOptions::default()).await);
    let opts = tidemark_core::export::ExportOptions::default();
    backup(&store, &db, &opts).await;
    tidemark_tests::exec(
        &db.settings(),
        "UPDATE accounts SET note = 'x' WHERE id = 1",
    )
    .await;
    backup(&store, &db, &opts).await;
    let deps = Deps {
        store: store.clone(),
        env: keep_last_one,
    };
    let before = store.list("").await.expect("list").len();
    // A payload prune does not take is refused before anything is read or deleted.
    for hostile in [json!({"run_id": 5}), json!({"backup_id": "x", "ok": true})] {
        let err = handle(
            LambdaEvent::new(hostile.clone(), lambda_context(900)),
            &deps,
        )
        .await
        .expect_err("refused");
        assert_eq!(err.error_type, tidemark_lambda::BAD_INPUT, "{hostile}");
        assert!(err.message.contains("unknown field"), "{}", err.message);
    }
    assert_eq!(store.list("").await.expect("list").len(), before);
    // The console sample is a dry run.
    let (_, console) = sample_events("prune.console").remove(0);
    let out = handle(LambdaEvent::new(console, lambda_context(900)), &deps)
        .await
        .expect("dry run");
    assert_eq!(
        (out["dry_run"].as_bool(), out["deleted"].as_u64()),
        (Some(true), Some(0))
    );
    assert_eq!(store.list("").await.expect("list").len(), before);
    // The state machine passes {}: the environment's policy, keep the last one.
    let (_, step) = sample_events("prune.step-functions").remove(0);
    let out = handle(LambdaEvent::new(step, lambda_context(900)), &deps)
        .await
        .expect("prune");
    assert!(out["deleted"].as_u64().is_some_and(|n| n > 0), "{out}");
    assert_eq!(
        tidemark_core::manifest::list_backups(store.as_ref())
            .await
            .expect("list")
            .len(),
        1
    );
    // The scheduled sample's policy (daily 7, ...) keeps what is left.
    let (_, scheduled) = sample_events("prune.scheduled-event").remove(0);
    let out = handle(LambdaEvent::new(scheduled, lambda_context(900)), &deps)
        .await
        .expect("prune");
    assert_eq!(out["deleted"], 0);

    let err = handle(
        LambdaEvent::new(
            json!({"keep_daily": 0, "keep_last": 0}),
            lambda_context(900),
        ),
        &deps,
    )
    .await
    .expect_err("empty policy");
    assert_eq!(err.error_type, tidemark_lambda::FATAL, "{}", err.message);
    let err = handle(
        LambdaEvent::new(json!({"keep_dayly": 1}), lambda_context(900)),
        &deps,
    )
    .await
    .expect_err("typo");
    assert!(
        err.message.starts_with("invalid event") && err.message.contains("keep_dayly"),
        "{}",
        err.message
    );
}
