//! The manifest handler fed the real `events/manifest.*.json` samples.

use std::sync::Arc;

use lambda_runtime::LambdaEvent;
use serde_json::json;
use tidemark_core::store::{S3StoreOptions, WriteStore};
use tidemark_manifest::{handle, Deps};
use tidemark_tests::{lambda_context, s3_store, sample_events};

#[tokio::test]
async fn with_no_run_in_flight_every_sample_fails_clearly() {
    let store: Arc<dyn WriteStore> = Arc::new(s3_store(S3StoreOptions::default()).await);
    let deps = Deps {
        store: store.clone(),
    };
    let (failures, seals): (Vec<_>, Vec<_>) = sample_events("manifest.")
        .into_iter()
        .partition(|(name, _)| name.contains("failure"));
    for (name, event) in seals {
        let err = handle(LambdaEvent::new(event, lambda_context(900)), &deps)
            .await
            .expect_err("nothing to seal");
        assert_eq!(err.error_type, tidemark_lambda::FATAL, "{name}");
        assert!(
            err.message.contains("no run") || err.message.contains("no backup run holds the lease"),
            "{name}: {}",
            err.message
        );
    }
    let err = handle(
        LambdaEvent::new(json!({"run_id": ""}), lambda_context(900)),
        &deps,
    )
    .await
    .expect_err("empty run id");
    assert!(err.message.starts_with("invalid event"), "{}", err.message);
    assert!(
        store.list("").await.expect("list").is_empty(),
        "nothing written"
    );

    // The failure step's sample records the failure even with no run in flight.
    assert_eq!(failures.len(), 1);
    for (name, event) in failures {
        let out = handle(LambdaEvent::new(event, lambda_context(60)), &deps)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (out["recorded"].as_bool(), out["lease_released"].as_bool()),
            (Some(true), Some(false))
        );
    }
    let keys: Vec<String> = store
        .list("")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["state/last-failure.json"]);
}
