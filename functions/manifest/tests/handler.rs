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
    for (name, event) in sample_events("manifest.") {
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
}
