//! The faults of real networks and databases, through a fault-injecting proxy in front of
//! the S3 server and by hitting the database: store errors and resets, outages, lost
//! acknowledgements, a store that keeps less than was sent, killed backends, a restarted
//! server, leftovers of killed writers, and restores that never leave half a table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_core::catalog::TableSelection;
use tidemark_core::db::DbSettings;
use tidemark_core::error::Classified;
use tidemark_core::export::{export_slice, ExportOptions};
use tidemark_core::format::BackupKind;
use tidemark_core::lease;
use tidemark_core::manifest::seal_run;
use tidemark_core::prune::{prune, PruneOptions};
use tidemark_core::restore::{self, BackupSelector, RestoreError, RestoreOptions};
use tidemark_core::retention::RetentionPolicy;
use tidemark_core::store::{RetryPolicy, S3Store, S3StoreOptions, WriteCondition};
use tidemark_tests::faults::{Fault, FaultProxy, Kind, Rule, When};
use tidemark_tests::fixtures::*;
use tidemark_tests::private::PrivateCluster;
use tidemark_tests::{all_data, aws_config, create_bucket, exec, TestCluster, TestDatabase};

const TABLES: &str = "
CREATE TABLE big (id bigint PRIMARY KEY, a text, b text);
CREATE TABLE keyless (n int, note text);
INSERT INTO big SELECT g, md5(g::text), md5((g * 7)::text) FROM generate_series(1, 200000) g;
INSERT INTO keyless SELECT g, 'note ' || g FROM generate_series(1, 20000) g;
ANALYZE;";

const CHANGES: &str = "
UPDATE big SET a = 'changed' WHERE id % 97 = 0;
DELETE FROM big WHERE id % 89 = 0;
INSERT INTO big SELECT g, md5(g::text), 'new' FROM generate_series(1000001, 1003000) g;
DELETE FROM keyless WHERE n % 3 = 0;";

fn options() -> ExportOptions {
    ExportOptions {
        settings: tidemark_core::export::ExportSettings {
            workers: 2,
            chunk_rows: 1_000_000,
            selection: TableSelection {
                schemas: vec!["public".into()],
                ..TableSelection::default()
            },
            ..tidemark_core::export::ExportSettings::default()
        },
        ..ExportOptions::default()
    }
}

fn retry(secs: u64) -> RetryPolicy {
    RetryPolicy {
        budget: Duration::from_secs(secs),
        first_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(2),
    }
}

/// A store in a fresh bucket, reached through `proxy`.
async fn store_through(proxy: &FaultProxy, bucket: &str, retry: RetryPolicy) -> Store {
    let config = aws_config().await;
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config)
            .endpoint_url(&proxy.endpoint)
            .force_path_style(true)
            .build(),
    );
    Arc::new(S3Store::from_client(
        client,
        bucket,
        "db/prod",
        S3StoreOptions {
            retry,
            ..S3StoreOptions::default()
        },
    ))
}

async fn proxy() -> (FaultProxy, String) {
    let upstream = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL (scripts/test)");
    (FaultProxy::start(&upstream, 7).await, create_bucket().await)
}

async fn restore_into(store: &Store, target: &DbSettings, id: &str) -> Result<(), RestoreError> {
    let manifest =
        restore::load_manifest(store.as_ref(), &BackupSelector::Id(id.to_owned())).await?;
    restore::restore(store.clone(), &manifest, target, &RestoreOptions::default())
        .await
        .map(|_| ())
}

/// Restores backup `id` into a new database of `cluster` and compares it with `source`.
async fn assert_restores_equal(
    store: &Store,
    cluster: &TestCluster,
    source: &TestDatabase,
    id: &str,
) {
    let target = cluster.create_database().await;
    restore_into(store, &target.settings(), id)
        .await
        .unwrap_or_else(|e| panic!("restore {id}: {e}"));
    assert_eq!(
        all_data(&source.settings()).await,
        all_data(&target.settings()).await
    );
}

/// A database of the shared cluster holding [`TABLES`].
async fn source() -> (TestCluster, TestDatabase) {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), TABLES).await;
    (cluster, db)
}

async fn rows(settings: &DbSettings, table: &str) -> i64 {
    let client = tidemark_core::db::connect(settings).await.expect("connect");
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_errors_and_resets_are_ridden_out_by_backup_and_restore() {
    let (cluster, db) = source().await;
    let (proxy, bucket) = proxy().await;
    let store = store_through(&proxy, &bucket, retry(60)).await;
    // Reads of table chunks break off mid-body; and one request in ten fails: throttled,
    // a server error, or its body cut mid-stream.
    proxy.add(Rule {
        kinds: vec![Kind::GetObject],
        path_contains: Some("/public.".into()),
        when: When::Nth(vec![1, 2, 3]),
        faults: vec![Fault::ResetMidBody],
    });
    proxy.add(Rule::rate(
        &[],
        0.10,
        &[
            Fault::Status(503, "SlowDown"),
            Fault::ResetMidBody,
            Fault::Status(500, "InternalError"),
        ],
    ));
    let (full, _) = backup(&store, &db, &options()).await;
    exec(&db.settings(), CHANGES).await;
    let (incremental, _) = backup(&store, &db, &options()).await;
    assert_eq!(incremental.kind, BackupKind::Incremental);
    assert_eq!(incremental.parent.as_deref(), Some(full.backup_id.as_str()));
    // Restore through the same faults.
    assert_restores_equal(&store, &cluster, &db, &incremental.backup_id).await;
    let injected = proxy.injected();
    let resets = injected
        .iter()
        .filter(|(k, _, f)| *k == Kind::GetObject && *f == Fault::ResetMidBody)
        .count();
    // Three chunk reads reset, and one request in ten of ~80 failing at random (seeded,
    // but which request draws which number depends on the order concurrent requests reach
    // the proxy; about 8 expected, fewer than 2 about once in 500 runs).
    let requests = proxy.requests();
    assert!(
        requests >= 60 && injected.len() >= 3 + 2,
        "{requests} requests, faults injected: {injected:?}"
    );
    assert!(resets >= 3, "chunk reads reset mid-body: {injected:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_shorter_than_the_retry_budget_is_ridden_out() {
    let (cluster, db) = source().await;
    let (proxy, bucket) = proxy().await;
    let store = store_through(&proxy, &bucket, retry(60)).await;
    let started = Instant::now();
    proxy.outage(Duration::from_secs(8));
    let (sealed, _) = backup(&store, &db, &options()).await;
    assert!(started.elapsed() >= Duration::from_secs(8));
    assert_restores_equal(&store, &cluster, &db, &sealed.backup_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_acknowledgement_of_a_conditional_write_is_not_a_conflict() {
    let (_, db) = source().await;
    let (proxy, bucket) = proxy().await;
    let store = store_through(&proxy, &bucket, retry(30)).await;
    // The store applies the write, the answer never arrives; the retry meets 412.
    for (path, nth) in [
        ("/progress.json", vec![1, 3]),
        ("/db/prod/lock", vec![1, 2]),
        ("/manifests/", vec![1]),
        ("/checkpoint.json", vec![1]),
    ] {
        proxy.add(
            Rule {
                kinds: vec![Kind::PutObject],
                path_contains: None,
                when: When::Nth(nth),
                faults: vec![Fault::DropResponse],
            }
            .on_path(path),
        );
    }
    let (full, _) = backup(&store, &db, &options()).await;
    exec(&db.settings(), CHANGES).await;
    let (incremental, _) = backup(&store, &db, &options()).await;
    assert_eq!(incremental.parent.as_deref(), Some(full.backup_id.as_str()));
    let dropped = proxy
        .injected()
        .iter()
        .filter(|(_, _, f)| *f == Fault::DropResponse)
        .count();
    assert!(
        dropped >= 5,
        "acknowledgements lost: {:?}",
        proxy.injected()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_run_releases_its_lease_and_a_plain_rerun_resumes_it() {
    let (cluster, db) = source().await;
    let (proxy, bucket) = proxy().await;
    let store = store_through(&proxy, &bucket, retry(5)).await;
    // Every chunk write is refused (a permission gone wrong): the slice fails for good.
    proxy.add(Rule {
        kinds: vec![Kind::PutObject, Kind::CreateMultipartUpload],
        path_contains: Some("/public.".into()),
        when: When::From(1),
        faults: vec![Fault::Status(403, "AccessDenied")],
    });
    let err = export_slice(store.clone(), &db.settings(), &options())
        .await
        .expect_err("chunk writes are refused");
    let message = err.to_string();
    assert!(message.contains("access denied"), "{message}");
    assert!(!err.is_retryable(), "{message}");
    let (held, _) = lease::current(store.as_ref())
        .await
        .expect("read lease")
        .expect("the run's lease record stays, released");
    assert!(
        !lease::is_live(&held, chrono::Utc::now()),
        "the failed slice released its lease"
    );
    // The plain re-run (no run id) resumes the failed run at once.
    proxy.clear();
    let report = export_slice(store.clone(), &db.settings(), &options())
        .await
        .unwrap_or_else(|e| panic!("re-run: {e}"));
    assert_eq!(
        report.run_id, held.run_id,
        "the re-run resumed the failed run"
    );
    assert!(report.done);
    let sealed = seal_run(store.clone(), &report.run_id, "test")
        .await
        .expect("seal");
    assert_restores_equal(&store, &cluster, &db, &sealed.backup_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_keeps_less_than_was_sent_fails_the_chunk_before_it_is_recorded() {
    let (_, db) = source().await;
    let (proxy, bucket) = proxy().await;
    let store = store_through(&proxy, &bucket, retry(5)).await;
    // The multipart chunk of `big`: its last part is cut in half on the way, and the
    // store answers 200.
    proxy.add(Rule::nth(Kind::UploadPart, &[2], Fault::TruncateRequest));
    let err = export_slice(store.clone(), &db.settings(), &options())
        .await
        .expect_err("a short object is not recorded");
    let message = err.to_string();
    assert!(
        message.contains("bytes of chunks/") || message.contains("checksum"),
        "{message}"
    );
    assert!(
        store.list("manifests/").await.expect("list").is_empty(),
        "nothing sealed"
    );
    assert!(
        proxy
            .injected()
            .iter()
            .any(|(_, _, f)| *f == Fault::TruncateRequest),
        "the fault was injected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_errors_are_one_line_with_code_status_operation_and_key() {
    let (proxy, bucket) = proxy().await;
    let store = store_through(&proxy, &bucket, retry(1)).await;
    proxy.add(Rule {
        kinds: vec![Kind::HeadObject, Kind::PutObject],
        path_contains: None,
        when: When::From(1),
        faults: vec![Fault::Status(503, "SlowDown")],
    });
    let head = store.head("state/checkpoint.json").await.expect_err("503");
    let put = store
        .put(
            "state/progress.json",
            bytes::Bytes::from_static(b"{}"),
            WriteCondition::Always,
        )
        .await
        .expect_err("503");
    for (err, operation) in [(head, "HeadObject"), (put, "PutObject")] {
        let message = err.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(!message.contains("Error {"), "no SDK debug dump: {message}");
        assert!(message.contains(operation), "{message}");
        assert!(message.contains("HTTP 503"), "{message}");
        assert!(message.contains("db/prod/state/"), "{message}");
        assert!(message.contains("gave up after"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_of_killed_writers_are_aborted_by_the_next_slice_and_by_prune() {
    let (_, db) = source().await;
    let bucket = create_bucket().await;
    let config = aws_config().await;
    let s3 = S3Store::new(&config, &bucket, "db/prod", S3StoreOptions::default());
    let store: Store = Arc::new(s3.clone());
    let start_upload = |key: String| {
        let client = s3.client().clone();
        let bucket = bucket.clone();
        async move {
            client
                .create_multipart_upload()
                .bucket(bucket)
                .key(format!("db/prod/{key}"))
                .send()
                .await
                .expect("start an upload")
        }
    };
    // A first slice that stops after one range, then a killed writer's upload of the run.
    let first = export_slice(
        store.clone(),
        &db.settings(),
        &ExportOptions {
            settings: tidemark_core::export::ExportSettings {
                chunk_rows: 50_000,
                ..options().settings
            },
            deadline: Some(Instant::now()),
            ..options()
        },
    )
    .await
    .expect("first slice");
    assert!(!first.done);
    start_upload(format!(
        "chunks/{}/public.big/000099-s1.copy.zst",
        first.run_id
    ))
    .await;
    // Another writer's, long gone (prune's business: past the grace period).
    start_upload("chunks/20200101T000000Z-dead00/public.big/000001-s1.copy.zst".into()).await;
    let pending = |prefix: &'static str| {
        let store = store.clone();
        async move {
            store
                .incomplete_uploads(prefix)
                .await
                .expect("list uploads")
        }
    };
    assert_eq!(pending("").await.len(), 2);
    let (sealed, _) = backup(
        &store,
        &db,
        &ExportOptions {
            run_id: Some(first.run_id.clone()),
            ..options()
        },
    )
    .await;
    assert_eq!(sealed.backup_id, first.run_id);
    let left = pending("").await;
    assert_eq!(left.len(), 1, "the run's own leftover is aborted: {left:?}");
    assert!(left[0].key.contains("dead00"));
    // Prune aborts the rest once past the grace period, and says so in its plan.
    let plan = prune(
        store.clone(),
        &PruneOptions {
            policy: RetentionPolicy {
                keep_last: Some(5),
                ..RetentionPolicy::default()
            },
            grace: Duration::ZERO,
            ..PruneOptions::default()
        },
    )
    .await
    .expect("prune");
    assert_eq!(plan.plan.incomplete_uploads, 1);
    assert!(pending("").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_chunk_fails_the_restore_without_leaving_half_a_table() {
    let (cluster, db) = source().await;
    let bucket = create_bucket().await;
    let store: Store = Arc::new(S3Store::new(
        &aws_config().await,
        &bucket,
        "db/prod",
        S3StoreOptions::default(),
    ));
    let (sealed, _) = backup(
        &store,
        &db,
        &ExportOptions {
            settings: tidemark_core::export::ExportSettings {
                chunk_rows: 50_000,
                ..options().settings
            },
            ..options()
        },
    )
    .await;
    // Flip one byte in the middle of big's last chunk: three chunks load before it.
    let m = manifest(&store, &sealed.backup_id).await;
    let big = m.tables.iter().find(|t| t.name.name == "big").expect("big");
    let victim = &big.chunks[big.chunks.len() - 1];
    let object = store.read(&victim.key).await.expect("read").expect("chunk");
    let mut bytes = object.bytes.to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    store
        .put(&victim.key, bytes.into(), WriteCondition::Always)
        .await
        .expect("corrupt the chunk");
    let target = cluster.create_database().await;
    let err = restore_into(&store, &target.settings(), &sealed.backup_id)
        .await
        .expect_err("a corrupt chunk fails the restore");
    assert!(err.is_backup_damage(), "{err}");
    assert!(
        matches!(err.root(), RestoreError::ChunkCorrupt { key, .. } if *key == victim.key),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains(&victim.key), "{message}");
    assert!(message.contains("none is half-loaded"), "{message}");
    assert_eq!(
        rows(&target.settings(), "big").await,
        0,
        "big rolled back whole"
    );
}

/// Exports slices until the run is done, starting another slice after a failure that
/// can pass (as `tidemark backup` and the state machine do); returns the sealed id.
async fn backup_through_failures(
    store: &Store,
    settings: &DbSettings,
    full: bool,
) -> (String, usize) {
    let mut run_id = None;
    let mut failures = 0;
    loop {
        let opts = ExportOptions {
            settings: tidemark_core::export::ExportSettings {
                chunk_rows: 20_000,
                ..options().settings
            },
            run_id: run_id.clone(),
            full,
            ..options()
        };
        match export_slice(store.clone(), settings, &opts).await {
            Ok(report) => {
                run_id = Some(report.run_id.clone());
                if report.done {
                    break;
                }
            }
            Err(e) if e.is_retryable() && failures < 10 => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("export slice: {e}"),
        }
    }
    let run_id = run_id.expect("a run");
    let sealed = seal_run(store.clone(), &run_id, "test")
        .await
        .expect("seal");
    (sealed.backup_id, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_backends_and_a_restarted_server_do_not_fail_the_backup() {
    let server = PrivateCluster::start();
    let source = server.create_database("source").await;
    exec(&source, &TABLES.replace("200000", "400000")).await;
    let bucket = create_bucket().await;
    let store: Store = Arc::new(S3Store::new(
        &aws_config().await,
        &bucket,
        "db/prod",
        S3StoreOptions::default(),
    ));

    // COPY backends terminated while they stream.
    let admin = server.settings("postgres");
    let killer = tokio::spawn({
        let admin = admin.clone();
        async move {
            let client = tidemark_core::db::connect(&admin).await.expect("admin");
            let mut killed = 0i64;
            let until = Instant::now() + Duration::from_secs(20);
            while killed < 3 && Instant::now() < until {
                let n: i64 = client
                    .query_one(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE datname = 'source' AND query LIKE 'COPY%' AND state = 'active'",
                        &[],
                    )
                    .await
                    .expect("terminate")
                    .get(0);
                killed += n;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            killed
        }
    });
    let (first, failures) = backup_through_failures(&store, &source, false).await;
    let killed = killer.await.expect("killer");
    assert!(killed >= 1, "no COPY backend was terminated");
    assert_eq!(failures, 0, "a worker redoes its range on a new connection");
    let target = server.create_database("first").await;
    restore_into(&store, &target, &first)
        .await
        .expect("restore");
    assert_eq!(all_data(&source).await, all_data(&target).await);

    // The server restarted in the middle of a run.
    exec(&source, CHANGES).await;
    let backup = {
        let store = store.clone();
        let source = source.clone();
        tokio::spawn(async move { backup_through_failures(&store, &source, true).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!backup.is_finished(), "the full backup outlasts the wait");
    server.stop();
    server.restart();
    let (second, _) = backup.await.expect("backup task");
    let target = server.create_database("second").await;
    restore_into(&store, &target, &second)
        .await
        .expect("restore");
    assert_eq!(all_data(&source).await, all_data(&target).await);
}
