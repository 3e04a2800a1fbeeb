//! The export and manifest handlers fed the real `events/*.json` samples, against the
//! test cluster and the S3-protocol server.

use std::sync::Arc;
use std::time::Duration;

use lambda_runtime::LambdaEvent;
use serde_json::{json, Value};
use tidemark_core::store::{S3StoreOptions, WriteStore};
use tidemark_export::{handle, Deps};
use tidemark_tests::{exec, lambda_context, s3_store, sample_events, TestCluster, TestDatabase};

async fn deps(db: &TestDatabase) -> Deps {
    exec(
        &db.settings(),
        "CREATE TABLE articles (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, title text);
         INSERT INTO articles (title) SELECT 't' || g FROM generate_series(1, 500) g;",
    )
    .await;
    let env = |name: &str| (name == "TIDEMARK_TABLE_MODES").then(|| "articles=append".to_owned());
    Deps {
        store: Arc::new(s3_store(S3StoreOptions::default()).await) as Arc<dyn WriteStore>,
        db: db.settings(),
        options: tidemark_core::config::export_options_from_env(&env).expect("options"),
        margin: Duration::from_secs(60),
    }
}

async fn seal(store: &Arc<dyn WriteStore>, run_id: &str) -> Value {
    let deps = tidemark_manifest::Deps {
        store: store.clone(),
    };
    let (_, mut event) = sample_events("manifest.step-functions").remove(0);
    event["run_id"] = json!(run_id);
    tidemark_manifest::handle(LambdaEvent::new(event, lambda_context(900)), &deps)
        .await
        .expect("seal")
}

/// The state machine's failure payload for a run it knows only by `execution`; the cause
/// is the Lambda error document when `message` is given.
fn failure_event(error: &str, message: &str, execution: &str) -> Value {
    let cause = if message.is_empty() {
        String::new()
    } else {
        json!({"errorType": error, "errorMessage": message}).to_string()
    };
    json!({"failure": {"run_id": null, "execution": execution, "error": {"Error": error, "Cause": cause}}})
}

/// Runs the failure step (the manifest function) on `event`.
async fn record_failure(store: &Arc<dyn WriteStore>, event: Value) -> Value {
    let deps = tidemark_manifest::Deps {
        store: store.clone(),
    };
    tidemark_manifest::handle(LambdaEvent::new(event, lambda_context(60)), &deps)
        .await
        .expect("recorded")
}

/// Deps with 100-row chunks, and the report of a first slice of `event` given 30 s with a
/// 60 s margin: it exports a range per connection and stops, leaving the run in flight
/// with its lease held (as a slice that was killed would).
async fn run_in_flight(db: &TestDatabase, event: Value) -> (Deps, Value) {
    let mut deps = deps(db).await;
    deps.options.settings.chunk_rows = 100;
    let first = handle(LambdaEvent::new(event, lambda_context(30)), &deps)
        .await
        .expect("slice");
    (deps, first)
}

#[test]
fn every_sample_event_parses() {
    for (name, event) in sample_events("export.") {
        tidemark_core::events::export_event(event).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, event) in sample_events("manifest.") {
        tidemark_core::events::manifest_event(event).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_event_runs_a_slice_and_the_manifest_seals_it() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let deps = deps(&db).await;
    let (_, console) = sample_events("export.console").remove(0);
    let out = handle(LambdaEvent::new(console, lambda_context(900)), &deps)
        .await
        .expect("slice");
    assert_eq!(
        (out["done"].as_bool(), out["kind"].as_str()),
        (Some(true), Some("full"))
    );
    let run_id = out["run_id"].as_str().expect("run_id").to_owned();
    let sealed = seal(&deps.store, &run_id).await;
    assert_eq!(sealed["backup_id"].as_str(), Some(run_id.as_str()));
    assert_eq!(sealed["rows"], 500);

    // The Step Functions payload (the previous output) continues a run: here the next
    // incremental, started from the console sample, then fed back as its own payload.
    exec(
        &db.settings(),
        "INSERT INTO articles (title) VALUES ('one more')",
    )
    .await;
    let (_, console) = sample_events("export.console").remove(0);
    let first = handle(LambdaEvent::new(console, lambda_context(900)), &deps)
        .await
        .expect("slice");
    let (_, mut step) = sample_events("export.step-functions").remove(0);
    step["run_id"] = first["run_id"].clone();
    let again = handle(LambdaEvent::new(step, lambda_context(900)), &deps)
        .await
        .expect("slice");
    assert_eq!(again["run_id"], first["run_id"]);
    assert_eq!(again["done"], true);
    let sealed = seal(&deps.store, first["run_id"].as_str().expect("id")).await;
    assert_eq!(
        (sealed["kind"].as_str(), sealed["rows"].as_u64()),
        (Some("incremental"), Some(501))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_event_starts_a_full_run_and_a_short_deadline_stops_early() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let mut deps = deps(&db).await;
    deps.options.settings.chunk_rows = 100;
    let (_, scheduled) = sample_events("export.scheduled-event").remove(0);
    // 30 s left with a 60 s margin: past the deadline at once, the slice still exports
    // a range per connection (so the state machine's loop always ends), then stops.
    let out = handle(LambdaEvent::new(scheduled, lambda_context(30)), &deps)
        .await
        .expect("slice");
    assert_eq!(
        (out["done"].as_bool(), out["kind"].as_str()),
        (Some(false), Some("full"))
    );
    let rows = out["rows"].as_u64().expect("rows");
    assert!((100..500).contains(&rows), "{out}");
    let run_id = out["run_id"].clone();

    // A second run while this one holds the lease: typed Locked, not retryable.
    let err = handle(LambdaEvent::new(json!({}), lambda_context(900)), &deps)
        .await
        .expect_err("locked");
    assert_eq!(err.error_type, tidemark_lambda::LOCKED);
    assert!(
        err.message.contains(run_id.as_str().unwrap_or_default()),
        "{}",
        err.message
    );

    let out = handle(
        LambdaEvent::new(json!({"run_id": run_id}), lambda_context(900)),
        &deps,
    )
    .await
    .expect("resume");
    assert_eq!(out["done"], true);
}

#[tokio::test]
async fn malformed_events_are_bad_input_and_unknown_runs_fatal_with_nothing_written() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let deps = deps(&db).await;
    for event in [
        json!({"mode": "weekly"}),
        json!("full"),
        json!({"run_id": 42}),
        json!({"backup_id": "../../x"}),
        json!({"pad": "x".repeat(100_000)}),
        json!({"run_id": "r".repeat(1 << 20)}),
    ] {
        let err = handle(LambdaEvent::new(event.clone(), lambda_context(900)), &deps)
            .await
            .expect_err("malformed");
        assert_eq!(err.error_type, tidemark_lambda::BAD_INPUT, "{event}");
        assert!(err.message.starts_with("invalid event"), "{}", err.message);
        assert!(err.message.len() < 300, "{} bytes", err.message.len());
    }
    let err = handle(
        LambdaEvent::new(
            json!({"run_id": "20990101T000000Z-ffffff"}),
            lambda_context(900),
        ),
        &deps,
    )
    .await
    .expect_err("no such run");
    assert_eq!(err.error_type, tidemark_lambda::FATAL);
    assert!(
        err.message.contains("no run 20990101T000000Z-ffffff"),
        "{}",
        err.message
    );
    assert!(
        deps.store.list("").await.expect("list").is_empty(),
        "nothing written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_step_records_the_failure_and_frees_the_run_for_the_next_execution() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    // A run in flight: one slice done, the lease held.
    let (deps, first) = run_in_flight(&db, json!({"mode": "full"})).await;
    assert_eq!(first["done"], false);
    let run_id = first["run_id"].as_str().expect("id").to_owned();
    let locked = handle(LambdaEvent::new(json!({}), lambda_context(900)), &deps)
        .await
        .expect_err("locked");
    assert_eq!(locked.error_type, tidemark_lambda::LOCKED);

    // The state machine's failure step for another run leaves this run's lease alone.
    let manifest = tidemark_manifest::Deps {
        store: deps.store.clone(),
    };
    let (_, sample) = sample_events("manifest.failure").remove(0);
    let other = tidemark_manifest::handle(
        LambdaEvent::new(sample.clone(), lambda_context(60)),
        &manifest,
    )
    .await
    .expect("recorded");
    assert_eq!(
        (
            other["recorded"].as_bool(),
            other["lease_released"].as_bool()
        ),
        (Some(true), Some(false))
    );
    assert_eq!(other["error"], "Tidemark.Fatal");
    assert_eq!(
        other["cause"],
        "exporting public.orders: permission denied for table orders"
    );

    // For this run it releases the lease and records the failure.
    let mut event = sample;
    event["failure"]["run_id"] = json!(run_id);
    let recorded =
        tidemark_manifest::handle(LambdaEvent::new(event, lambda_context(60)), &manifest)
            .await
            .expect("recorded");
    assert_eq!(recorded["lease_released"], true, "{recorded}");
    let stored = deps
        .store
        .read("state/last-failure.json")
        .await
        .expect("read")
        .expect("the failure is recorded");
    let stored: Value = serde_json::from_slice(&stored.bytes).expect("JSON");
    assert_eq!(stored["run_id"], run_id.as_str());
    assert!(stored["execution"]
        .as_str()
        .is_some_and(|e| e.starts_with("arn:aws:states:")));

    // The next execution starts at once and finishes the failed run's work.
    let next = handle(LambdaEvent::new(json!({}), lambda_context(900)), &deps)
        .await
        .expect("next execution");
    assert_eq!(
        (next["run_id"].as_str(), next["done"].as_bool()),
        (Some(run_id.as_str()), Some(true))
    );
    let sealed = seal(&deps.store, &run_id).await;
    assert_eq!(sealed["rows"], 500);
}

/// A table the role may not read fails the run at once; the failed slice hands the run
/// back, so the run after the grant is fixed starts at once instead of waiting out the
/// lease. The failure step finds a run that never reported its id by its execution, and
/// a later `Tidemark.Locked` does not overwrite the real cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_table_fails_the_run_and_the_run_after_the_grant_starts_at_once() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let mut deps = deps(&db).await;
    let role = format!("reader_{}", uuid::Uuid::new_v4().simple());
    exec(
        &db.settings(),
        &format!(
            "CREATE TABLE secrets (id int PRIMARY KEY, s text); INSERT INTO secrets VALUES (1, 'x');
             CREATE ROLE {role} LOGIN PASSWORD 'reader-pw';
             GRANT SELECT ON articles, articles_id_seq TO {role};"
        ),
    )
    .await;
    deps.db.user = role.clone();
    deps.db.password = Some("reader-pw".to_owned().into());
    let execution = "arn:aws:states:us-east-1:1:execution:tidemark:first";
    let step = json!({"mode": "incremental", "run_id": null, "execution": execution});
    let err = handle(LambdaEvent::new(step, lambda_context(900)), &deps)
        .await
        .expect_err("permission denied");
    assert_eq!(err.error_type, tidemark_lambda::FATAL, "{}", err.message);
    assert!(err.message.contains("secrets"), "{}", err.message);

    // The failure step (run id unknown to the state machine) records the cause.
    let recorded = record_failure(
        &deps.store,
        failure_event("Tidemark.Fatal", &err.message, execution),
    )
    .await;
    assert!(recorded["cause"]
        .as_str()
        .is_some_and(|c| c.contains("secrets")));

    // Fixed: the next run starts at once (the lease was handed back).
    exec(
        &db.settings(),
        &format!("GRANT SELECT ON secrets TO {role}"),
    )
    .await;
    let step = json!({"mode": "incremental", "run_id": null, "execution": "arn:aws:states:us-east-1:1:execution:tidemark:second"});
    let out = handle(LambdaEvent::new(step, lambda_context(900)), &deps)
        .await
        .unwrap_or_else(|e| panic!("the run after the grant: {e}"));
    assert_eq!(out["done"], true);
}

/// A first slice killed before it reported its run id (a Lambda timeout) leaves its lease:
/// the failure step finds the run by the execution the lease names and releases it; a run
/// refused by that lease (`Tidemark.Locked`) keeps the real cause on record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_step_releases_a_run_known_only_by_its_execution() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let execution = "arn:aws:states:us-east-1:1:execution:tidemark:killed";
    // One slice that stops early stands for the killed one: the run holds the lease.
    let (deps, first) = run_in_flight(
        &db,
        json!({"mode": "full", "run_id": null, "execution": execution}),
    )
    .await;
    assert_eq!(first["done"], false);
    // Another execution refused by the lease first: recorded (nothing else is), lease kept.
    let locked = record_failure(
        &deps.store,
        failure_event(
            "Tidemark.Locked",
            "",
            "arn:aws:states:us-east-1:1:execution:tidemark:other",
        ),
    )
    .await;
    assert_eq!(locked["lease_released"], false);
    let timed_out =
        record_failure(&deps.store, failure_event("States.Timeout", "", execution)).await;
    assert_eq!(timed_out["lease_released"], true, "{timed_out}");
    assert_eq!(timed_out["run_id"], first["run_id"]);
    let record = tidemark_core::failure::last_failure(deps.store.as_ref())
        .await
        .expect("read")
        .expect("a record");
    assert_eq!(record.error, "States.Timeout");
}

/// While a failed run still holds the lease, the runs it refuses do not overwrite its
/// failure record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_run_does_not_overwrite_the_failure_that_locked_it() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let (deps, first) = run_in_flight(&db, json!({"mode": "full"})).await;
    let run_id = first["run_id"].as_str().expect("id").to_owned();
    // The failure of that run, recorded without releasing (as if the release failed).
    tidemark_core::format::write_doc(
        deps.store.as_ref(),
        tidemark_core::repo::LAST_FAILURE_KEY,
        &tidemark_core::format::failure::FailureRecord {
            version: tidemark_core::format::FORMAT_VERSION,
            run_id: Some(run_id.clone()),
            execution: None,
            error: "Tidemark.Fatal".into(),
            cause: "the real cause".into(),
            failed_at: chrono::Utc::now(),
            lease_released: false,
        },
        tidemark_core::store::WriteCondition::Always,
    )
    .await
    .expect("write");
    record_failure(
        &deps.store,
        failure_event("Tidemark.Locked", "", "arn:x:other"),
    )
    .await;
    let record = tidemark_core::failure::last_failure(deps.store.as_ref())
        .await
        .expect("read")
        .expect("a record");
    assert_eq!(
        (record.error.as_str(), record.cause.as_str()),
        ("Tidemark.Fatal", "the real cause")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_fans_the_run_out_and_worker_events_export_it() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let mut deps = deps(&db).await;
    deps.options.settings.chunk_rows = 100;
    let (_, mut step) = sample_events("export.step-functions").remove(0);
    step["run_id"] = Value::Null;
    step["mode"] = json!("full");
    step["concurrency"] = json!(2);
    // 30 s left with a 60 s margin: the first slice stops after its minimum of work, so
    // the run needs a second slice, which fans it out.
    let first = handle(LambdaEvent::new(step.clone(), lambda_context(30)), &deps)
        .await
        .expect("slice");
    assert_eq!(
        (first["fan_out"].as_bool(), first["done"].as_bool()),
        (Some(false), Some(false)),
        "{first}"
    );
    let run_id = first["run_id"].clone();
    step["run_id"] = run_id.clone();
    let second = handle(LambdaEvent::new(step.clone(), lambda_context(900)), &deps)
        .await
        .expect("slice");
    assert_eq!(second["fan_out"], true, "{second}");
    let mut rows = first["rows"].as_u64().expect("rows");
    for slot in 0..2 {
        let (_, mut worker) = sample_events("export.worker").remove(0);
        worker["run_id"] = run_id.clone();
        worker["worker"] = json!(slot);
        let report = handle(LambdaEvent::new(worker, lambda_context(900)), &deps)
            .await
            .expect("worker");
        assert_eq!(report["worker"], slot, "{report}");
        rows += report["rows"].as_u64().expect("rows");
    }
    // Every row exported once: by the first slice or by exactly one of the workers.
    assert_eq!(rows, 500);
    step["run_id"] = run_id.clone();
    let last = handle(LambdaEvent::new(step, lambda_context(900)), &deps)
        .await
        .expect("slice");
    assert_eq!(last["done"], true, "{last}");
    let sealed = seal(&deps.store, run_id.as_str().expect("id")).await;
    assert_eq!(
        (sealed["rows"].as_u64(), sealed["kind"].as_str()),
        (Some(500), Some("full"))
    );
    // A worker without a run is refused by name.
    let err = handle(
        LambdaEvent::new(json!({"worker": 1}), lambda_context(900)),
        &deps,
    )
    .await
    .expect_err("refused");
    assert!(format!("{err:?}").contains("run_id"), "{err:?}");
}
