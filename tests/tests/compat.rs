//! The version matrix (`scripts/compat`): the core round trip on the server the harness
//! points at, whatever its major (13 to 18), and restores from one major into another.
//!
//! The oracles are the newest pg_dump's `--schema-only` output and sorted COPY of every
//! table (plus sequences, materialized views' state and trigger states); for a restore
//! into another major, what pg_dump 18 + pg_restore of the same source produce there.
//! `scripts/compat` starts each server and runs these tests against it; the main suite
//! runs the round trip on its own server too. The cross-version tests need a second
//! server (`TIDEMARK_COMPAT_TARGET_PG_*`) and are run by `scripts/compat` only.

use std::sync::Arc;

use tidemark_core::db::Support;
use tidemark_core::restore::{self, BackupSelector, RestoreError, RestoreOptions};
use tidemark_core::store::S3StoreOptions;
use tidemark_tests::fixtures::*;
use tidemark_tests::{assert_identical, exec, s3_store, verify_backup, TestCluster, TestDatabase};

/// Full backup, changes (updates, deletes, inserts, a transaction that commits only after
/// the next backup has passed it), two incrementals; the last verifies and restores equal
/// to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_round_trip_holds_on_this_server_version() {
    let cluster = TestCluster::from_env();
    let major = cluster.server_version_num().await / 10_000;
    let check = tidemark_core::check::check_database(&cluster.settings("postgres"))
        .await
        .expect("tidemark check on this server");
    assert_eq!(check.server.version().major(), major);
    assert_eq!(check.server.support, Support::Supported, "{check:?}");

    let db = whole_schema_db(&cluster).await;
    let store: Store = Arc::new(s3_store(S3StoreOptions::default()).await);
    let opts = whole_schema_options();
    let (full, _) = backup(&store, &db, &opts).await;
    let m = manifest(&store, &full.backup_id).await;
    let dump = m.schema_dump.as_ref().expect("schema captured");
    assert_eq!(dump.server_version_num / 10_000, major);
    // The stored pre-data script runs as stored, by psql with ON_ERROR_STOP, on the
    // source's own version (as the README's restore by hand does).
    let pre_data = tidemark_tests::chunk_text(store.as_ref(), &dump.pre_data.key).await;
    let by_hand = cluster.create_database().await;
    tidemark_tests::psql_script(
        &cluster,
        &by_hand.name,
        &cluster.user,
        &cluster.password,
        &String::from_utf8(pre_data).expect("UTF-8 script"),
    );
    assert!(
        m.consistency.as_ref().is_some_and(|c| c.consistent),
        "{:?}",
        m.consistency
    );

    exec(&db.settings(), &whole_schema_changes_for(major)).await;
    // A transaction that writes now and commits after the next backup has passed it.
    let late = tidemark_core::db::connect(&db.settings())
        .await
        .expect("connect");
    late.batch_execute(
        "BEGIN; INSERT INTO app.tags VALUES ('late', 'committed after a backup'); \
         UPDATE app.people SET born = 1970 WHERE name = 'Ann'; DELETE FROM app.measurements WHERE id = 3",
    )
    .await
    .expect("the late transaction");
    let (passed, _) = backup(&store, &db, &opts).await;
    late.batch_execute("COMMIT").await.expect("commit late");
    exec(
        &db.settings(),
        "INSERT INTO app.tags VALUES ('after', NULL)",
    )
    .await;
    let (last, _) = backup(&store, &db, &opts).await;
    assert_eq!(passed.kind.to_string(), "incremental");
    assert_eq!(last.kind.to_string(), "incremental");

    let record = verify_backup(&store, &cluster, &last.backup_id).await;
    let schema = record
        .schema
        .clone()
        .unwrap_or_else(|| panic!("the verification compared no schema: {record:?}"));
    assert!(record.ok && schema.ok, "{record:?}");

    let restored = tidemark_tests::restore_fresh(&store, &cluster, &last.backup_id).await;
    assert_identical(&db, &restored).await;
}

/// The second server of a cross-version run.
fn target_cluster() -> TestCluster {
    TestCluster::from_env_prefixed("TIDEMARK_COMPAT_TARGET_PG_")
}

/// What pg_dump 18 (custom format) + pg_restore 18 of `source` make in a new database on
/// `target`, without owners and grants as Tidemark restores by default. pg_restore writes
/// a script that psql runs, stopping at the first error (fitted to an older target by
/// [`tidemark_tests::fit_client_script`]).
async fn pg_restore_copy(
    source_cluster: &TestCluster,
    source: &TestDatabase,
    target: &TestCluster,
) -> TestDatabase {
    let archive = tempfile::NamedTempFile::new().expect("temp file");
    let path = archive.path().to_str().expect("utf8").to_owned();
    tidemark_tests::cluster_pg_dump(source_cluster, &source.name, &["-Fc", "-f", &path]);
    let out = std::process::Command::new(target.client_bin_dir.join("pg_restore"))
        .args(["--no-owner", "--no-privileges", "-f", "-", &path])
        .output()
        .expect("run pg_restore");
    assert!(
        out.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script =
        tidemark_tests::fit_client_script(target, &String::from_utf8_lossy(&out.stdout)).await;
    let copy = target.create_database().await;
    tidemark_tests::psql_script(target, &copy.name, &target.user, &target.password, &script);
    copy
}

async fn restore_into(
    store: &Store,
    target: &TestCluster,
    backup: &str,
    opts: &RestoreOptions,
) -> (TestDatabase, Result<restore::RestoreReport, RestoreError>) {
    let db = target.create_database().await;
    let manifest = restore::load_manifest(store.as_ref(), &BackupSelector::Id(backup.to_owned()))
        .await
        .expect("manifest");
    let result = restore::restore(store.clone(), &manifest, &db.settings(), opts).await;
    (db, result)
}

/// Files anywhere under `dir`, counted on disk (not through the store's own listing).
fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => files_under(&e.path()),
                    _ => 1,
                })
                .sum()
        })
        .unwrap_or(0)
}

async fn user_relations(db: &TestDatabase) -> i64 {
    let client = tidemark_core::db::connect(&db.settings())
        .await
        .expect("connect");
    client
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
            &[],
        )
        .await
        .expect("count relations")
        .get(0)
}

/// A backup taken on the main server restores into the second server, of a newer major,
/// equal to what pg_dump 18 + pg_restore of the source make there (the upgrade path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a second server: run by scripts/compat"]
async fn a_backup_restores_into_a_newer_major_like_pg_restore() {
    let (source_cluster, target) = (TestCluster::from_env(), target_cluster());
    let source_major = source_cluster.server_version_num().await / 10_000;
    let target_major = target.server_version_num().await / 10_000;
    assert!(
        target_major > source_major,
        "{source_major} -> {target_major}"
    );
    let db = whole_schema_db(&source_cluster).await;
    let store: Store = Arc::new(s3_store(S3StoreOptions::default()).await);
    backup(&store, &db, &whole_schema_options()).await;
    exec(&db.settings(), &whole_schema_changes_for(source_major)).await;
    let (last, _) = backup(&store, &db, &whole_schema_options()).await;

    let (restored, result) =
        restore_into(&store, &target, &last.backup_id, &RestoreOptions::default()).await;
    let report = result.unwrap_or_else(|e| panic!("restore {source_major} -> {target_major}: {e}"));
    assert!(report.done && report.warnings.is_empty(), "{report:?}");
    let oracle = pg_restore_copy(&source_cluster, &db, &target).await;
    assert_identical(&oracle, &restored).await;
}

/// A restore into an older major than the backup's source is refused before anything is
/// written; with `allow_older_target` it runs: what the older server lacks fails by
/// name, and a schema it has restores like pg_restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a second server: run by scripts/compat"]
async fn a_restore_into_an_older_major_is_refused_unless_allowed() {
    let (source_cluster, target) = (TestCluster::from_env(), target_cluster());
    let source_num = source_cluster.server_version_num().await;
    let target_num = target.server_version_num().await;
    let (source_major, target_major) = (source_num / 10_000, target_num / 10_000);
    assert!(
        target_major < source_major,
        "{source_major} -> {target_major}"
    );
    let (dir, local) = tidemark_tests::local_store();
    let store_path = dir.path().join("store");
    let store: Store = Arc::new(local);
    let tidemark = tidemark_tests::lambdas::binary_dir().join("tidemark");
    assert!(
        tidemark.is_file(),
        "{} is missing: cargo build -p tidemark-cli (scripts/compat does)",
        tidemark.display()
    );
    // `tidemark restore` into the target, as an operator runs it.
    let cli_restore = |backup: &str, target_db: &TestDatabase, extra: &[&str]| {
        let url = target_db.url(tidemark_core::db::SslMode::VerifyFull);
        let mut args = vec![
            "restore",
            "--store",
            store_path.to_str().expect("utf8"),
            "--backup",
            backup,
            "--target-url",
            &url,
            "--ca-file",
            target.ca_file.to_str().expect("utf8"),
        ];
        args.extend_from_slice(extra);
        tidemark_tests::run_cli(tidemark.to_str().expect("utf8"), &args, &[])
    };

    // Everything the source's major has, some of which the target lacks.
    let newest = whole_schema_db(&source_cluster).await;
    let (full, _) = backup(&store, &newest, &whole_schema_options()).await;
    let (refused, result) =
        restore_into(&store, &target, &full.backup_id, &RestoreOptions::default()).await;
    let error = result.expect_err("an older target is refused");
    assert!(matches!(error, RestoreError::OlderTarget { .. }), "{error}");
    let error = error.to_string();
    let source_version = tidemark_core::db::ServerVersion(source_num).to_string();
    let target_version = tidemark_core::db::ServerVersion(target_num).to_string();
    assert!(
        error.contains(&format!("taken on PostgreSQL {source_version}"))
            && error.contains(&format!("runs PostgreSQL {target_version}"))
            && error.contains("--allow-older-target"),
        "{error}"
    );
    assert_eq!(user_relations(&refused).await, 0, "nothing written");
    // The same from the CLI: one clear error, a non-zero exit, nothing written.
    let out = cli_restore(&full.backup_id, &refused, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains(&format!("runs PostgreSQL {target_version}"))
            && stderr.contains("--allow-older-target")
            && !stderr.contains(&target.password),
        "{stderr}"
    );
    assert_eq!(user_relations(&refused).await, 0, "nothing written");

    // Allowed: the first schema object the older server cannot create fails, by name, and
    // the pre-data transaction leaves nothing behind.
    let allowed = RestoreOptions {
        settings: tidemark_core::restore::RestoreSettings {
            allow_older_target: true,
            ..tidemark_core::restore::RestoreSettings::default()
        },
        ..RestoreOptions::default()
    };
    let (failed, result) = restore_into(&store, &target, &full.backup_id, &allowed).await;
    let error = result
        .expect_err("objects the older server lacks fail")
        .to_string();
    eprintln!("{source_version} into {target_version} with allow_older_target: {error}");
    assert!(
        error.starts_with("restoring the schema (pre-data): ") && error.contains("ERROR"),
        "the failing schema object is named: {error}"
    );
    assert_eq!(user_relations(&failed).await, 0, "nothing written");

    // A schema the older server has: restores like pg_dump 18 + pg_restore into it.
    let plain = source_cluster.create_database().await;
    chain_fixture(&plain).await;
    exec(
        &plain.settings(),
        "CREATE INDEX accounts_balance ON accounts (balance); \
         CREATE VIEW rich AS SELECT id, balance FROM accounts WHERE balance > 5000; \
         CREATE SEQUENCE tickets START 7; SELECT nextval('tickets'); \
         UPDATE accounts SET note = NULL WHERE id % 3 = 0; DELETE FROM events WHERE id % 11 = 0;",
    )
    .await;
    let (plain_backup, _) = backup(&store, &plain, &whole_schema_options()).await;
    let restored = target.create_database().await;
    let out = cli_restore(
        &plain_backup.backup_id,
        &restored,
        &["--allow-older-target"],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("an older major (--allow-older-target)"),
        "the restore says what it did: {stdout}{stderr}"
    );
    let oracle = pg_restore_copy(&source_cluster, &plain, &target).await;
    assert_identical(&oracle, &restored).await;
}

/// A server older than the oldest supported major (the second server; the main one is a
/// supported source): `tidemark check`, a backup and a restore into it refuse it by
/// name, before writing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a PostgreSQL 12 server: run by scripts/compat"]
async fn an_unsupported_server_is_refused_by_name() {
    let (source_cluster, old) = (TestCluster::from_env(), target_cluster());
    let old_major = old.server_version_num().await / 10_000;
    assert!(old_major < 13, "the second server is {old_major}");
    let refusal =
        format!("PostgreSQL {old_major} is not supported (Tidemark supports PostgreSQL 13 to 18)");

    // tidemark check: the database line fails, naming the version.
    let tidemark = tidemark_tests::lambdas::binary_dir().join("tidemark");
    let (dir, local) = tidemark_tests::local_store();
    let store_path = dir.path().join("store");
    let out = tidemark_tests::run_cli(
        tidemark.to_str().expect("utf8"),
        &[
            "check",
            "--store",
            store_path.to_str().expect("utf8"),
            "--ca-file",
            old.ca_file.to_str().expect("utf8"),
        ],
        &[(
            "DATABASE_URL",
            &old.url("postgres", tidemark_core::db::SslMode::VerifyFull),
        )],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success()
            && stdout
                .lines()
                .any(|l| l.starts_with("database  FAIL") && l.contains(&refusal)),
        "{stdout}"
    );

    // A backup of it stops before writing anything to the store.
    let db = old.create_database().await;
    chain_fixture(&db).await;
    let store: Store = Arc::new(local);
    // (`tidemark check` above round-tripped its probe there: compare with what it left.)
    let before = files_under(&store_path);
    let error =
        tidemark_core::export::export_slice(store.clone(), &db.settings(), &whole_schema_options())
            .await
            .expect_err("a backup of an unsupported server")
            .to_string();
    assert!(error.contains(&refusal), "{error}");
    assert_eq!(files_under(&store_path), before, "nothing written");

    // A restore into it, even allowed into an older major, is refused in the preflight.
    let source = source_cluster.create_database().await;
    chain_fixture(&source).await;
    let (full, _) = backup(&store, &source, &whole_schema_options()).await;
    let allowed = RestoreOptions {
        settings: tidemark_core::restore::RestoreSettings {
            allow_older_target: true,
            ..tidemark_core::restore::RestoreSettings::default()
        },
        ..RestoreOptions::default()
    };
    let (target_db, result) = restore_into(&store, &old, &full.backup_id, &allowed).await;
    let error = result.expect_err("refused").to_string();
    assert!(
        error.contains("the target runs PostgreSQL") && error.contains(&refusal),
        "{error}"
    );
    assert_eq!(user_relations(&target_db).await, 0, "nothing written");
}
