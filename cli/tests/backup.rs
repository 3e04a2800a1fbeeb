//! `tidemark backup | export | manifest | list` through the real binary.

use std::process::Output;

use tidemark_core::db::SslMode;
use tidemark_core::store::{LocalStore, ReadStore};
use tidemark_tests::{exec, TestCluster};

fn tidemark(args: &[&str], envs: &[(&str, &str)]) -> Output {
    tidemark_tests::run_cli(env!("CARGO_BIN_EXE_tidemark"), args, envs)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const FIXTURE: &str = "CREATE TABLE articles (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, title text NOT NULL, body text);
     INSERT INTO articles (title, body) SELECT 'title ' || g, repeat('x', g % 50) FROM generate_series(1, 3000) g;
     CREATE TABLE tags (name text, n int); INSERT INTO tags SELECT 'tag' || g, g FROM generate_series(1, 20) g;";

#[tokio::test]
async fn backup_then_incremental_then_list() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), FIXTURE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let store_arg = store.to_str().expect("utf8");
    let url = db.url(SslMode::Require);
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("TIDEMARK_STORE", store_arg),
    ];

    let full = tidemark(
        &[
            "backup",
            "--table-mode",
            "articles=append",
            "--chunk-rows",
            "1000",
        ],
        &env,
    );
    assert!(full.status.success(), "{}", stderr(&full));
    let full_id = stdout(&full).trim().to_owned();
    assert!(
        full_id.len() > 20 && !full_id.contains(' '),
        "prints the backup id: {full_id:?}"
    );
    assert!(stderr(&full).contains("full backup"), "{}", stderr(&full));

    exec(
        &db.settings(),
        "INSERT INTO articles (title) VALUES ('new one')",
    )
    .await;
    let inc = tidemark(
        &["--json", "backup", "--table-mode", "articles=append"],
        &env,
    );
    assert!(inc.status.success(), "{}", stderr(&inc));
    let report: serde_json::Value = serde_json::from_str(&stdout(&inc)).expect("JSON report");
    assert_eq!(report["kind"], "incremental");
    assert_eq!(report["parent"], full_id.as_str());

    let list = tidemark(&["list", "--json"], &env);
    assert!(list.status.success(), "{}", stderr(&list));
    let listed: Vec<serde_json::Value> = serde_json::from_str(&stdout(&list)).expect("JSON array");
    assert_eq!(listed.len(), 2);
    for field in [
        "id",
        "kind",
        "parent",
        "created_at",
        "tables",
        "rows",
        "bytes",
    ] {
        assert!(listed[1].get(field).is_some(), "list --json has {field}");
    }
    assert_eq!(listed[0]["id"], full_id.as_str());
    assert_eq!(listed[1]["parent"], full_id.as_str());
    assert_eq!(listed[1]["rows"], 3021);

    let table = tidemark(&["list"], &env);
    assert!(
        stdout(&table).contains(&full_id) && stdout(&table).contains("incremental"),
        "{}",
        stdout(&table)
    );
    assert!(!stdout(&table).contains("FAILED"), "{}", stdout(&table));

    // A failed run recorded after the newest backup is shown first; JSON stays a list.
    let local = LocalStore::open(&store).expect("store");
    tidemark_core::failure::record_failure(
        &local,
        tidemark_core::failure::Failure {
            run_id: Some("20991231T000000Z-abcdef".into()),
            execution: None,
            error: "Tidemark.Fatal".into(),
            cause: "exporting public.articles: permission denied".into(),
        },
    )
    .await
    .expect("record");
    let table = tidemark(&["list"], &env);
    let first = stdout(&table).lines().next().unwrap_or_default().to_owned();
    assert!(
        first.starts_with("last run FAILED at ")
            && first.contains("Tidemark.Fatal, run 20991231T000000Z-abcdef")
            && first.ends_with("permission denied"),
        "{first}"
    );
    let list = tidemark(&["list", "--json"], &env);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&stdout(&list)).expect("JSON array");
    assert_eq!(listed.len(), 2);

    // A backup after it makes it history.
    let later = tidemark(&["backup", "--table-mode", "articles=append"], &env);
    assert!(later.status.success(), "{}", stderr(&later));
    let table = tidemark(&["list"], &env);
    assert!(!stdout(&table).contains("FAILED"), "{}", stdout(&table));
}

#[tokio::test]
async fn export_slices_and_manifest_seal_like_the_lambdas() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), FIXTURE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store_arg = dir.path().to_str().expect("utf8").to_owned();
    let url = db.url(SslMode::Require);
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("TIDEMARK_STORE", store_arg.as_str()),
    ];

    // A zero-second budget still exports one piece (every slice makes progress, so a
    // loop of slices always ends), and says the run is not done.
    let first = tidemark(
        &["export", "--max-seconds", "0", "--chunk-rows", "500"],
        &env,
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let report: serde_json::Value = serde_json::from_str(&stdout(&first)).expect("JSON");
    assert_eq!(report["done"], false);
    let first_rows = report["rows"].as_u64().expect("rows");
    assert!(first_rows > 0 && first_rows < 3020, "{report}");
    let run_id = report["run_id"].as_str().expect("run_id").to_owned();

    // While the run holds the lease, a new run is refused; sealing too early is refused.
    let second = tidemark(&["backup"], &env);
    assert_eq!(second.status.code(), Some(1));
    assert!(
        stderr(&second).contains(&format!("error: locked by run {run_id} since"))
            && stderr(&second).contains("expires"),
        "{}",
        stderr(&second)
    );
    let early = tidemark(&["manifest", "--run", &run_id], &env);
    assert_eq!(early.status.code(), Some(1));
    assert!(
        stderr(&early).contains("is not finished"),
        "{}",
        stderr(&early)
    );

    let rest = tidemark(&["export", "--run", &run_id], &env);
    assert!(rest.status.success(), "{}", stderr(&rest));
    let report: serde_json::Value = serde_json::from_str(&stdout(&rest)).expect("JSON");
    assert_eq!(
        (report["done"].as_bool(), report["run_id"].as_str()),
        (Some(true), Some(run_id.as_str()))
    );
    // The rest, plus (if the first slice's two workers took `tags` too) the keyless `tags`
    // again: the consistency pass reads it whole in this slice's snapshot.
    let rows = report["rows"].as_u64().expect("rows");
    let rest_rows = 3020 - first_rows;
    assert!(
        rows == rest_rows || (first_rows % 500 == 20 && rows == rest_rows + 20),
        "{rows} rows after {first_rows}"
    );

    let sealed = tidemark(&["manifest", "--run", &run_id], &env);
    assert!(sealed.status.success(), "{}", stderr(&sealed));
    let report: serde_json::Value = serde_json::from_str(&stdout(&sealed)).expect("JSON");
    assert_eq!(
        (report["backup_id"].as_str(), report["created"].as_bool()),
        (Some(run_id.as_str()), Some(true))
    );
    // Sealing again is harmless.
    let again = tidemark(&["manifest", "--run", &run_id], &env);
    assert!(again.status.success());
    assert!(stdout(&again).contains("\"created\": false"));
}

#[tokio::test]
async fn bad_input_fails_clearly_and_writes_nothing() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), FIXTURE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    std::fs::create_dir(&store_dir).expect("mkdir");
    let store_arg = store_dir.to_str().expect("utf8");
    let store = LocalStore::open(&store_dir).expect("open");

    let url = db.url(SslMode::Require);
    let unknown = tidemark(
        &["backup", "--tables", "articles,nope"],
        &[("DATABASE_URL", &url), ("TIDEMARK_STORE", store_arg)],
    );
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("unknown table nope"),
        "{}",
        stderr(&unknown)
    );

    let wrong = format!(
        "postgres://{}:Not-The-Password-42@{}:{}/{}?sslmode=require",
        cluster.user, cluster.host, cluster.port, db.name
    );
    let denied = tidemark(
        &["backup"],
        &[("DATABASE_URL", &wrong), ("TIDEMARK_STORE", store_arg)],
    );
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        stderr(&denied).contains("password authentication failed"),
        "{}",
        stderr(&denied)
    );
    assert!(
        !stderr(&denied).contains("Not-The-Password-42")
            && !stdout(&denied).contains("Not-The-Password-42")
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let nowhere = format!("postgres://u:p@127.0.0.1:{port}/db?sslmode=disable&connect_timeout=2");
    let unreachable = tidemark(
        &["backup"],
        &[("DATABASE_URL", &nowhere), ("TIDEMARK_STORE", store_arg)],
    );
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(
        stderr(&unreachable).contains("cannot connect to PostgreSQL"),
        "{}",
        stderr(&unreachable)
    );

    // pg_dump missing, or older than the server: one clear error before any write.
    let missing = tidemark(
        &["backup"],
        &[
            ("DATABASE_URL", &url),
            ("TIDEMARK_STORE", store_arg),
            ("TIDEMARK_PG_DUMP", "/nonexistent/bin/pg_dump"),
        ],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("pg_dump not found")
            && stderr(&missing).contains("/nonexistent/bin/pg_dump"),
        "{}",
        stderr(&missing)
    );
    let old = dir.path().join("old-pg_dump");
    std::fs::write(&old, "#!/bin/sh\necho 'pg_dump (PostgreSQL) 12.22'\n").expect("write");
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let too_old = tidemark(
        &["backup"],
        &[
            ("DATABASE_URL", &url),
            ("TIDEMARK_STORE", store_arg),
            ("TIDEMARK_PG_DUMP", old.to_str().expect("utf8")),
        ],
    );
    assert_eq!(too_old.status.code(), Some(1));
    let text = stderr(&too_old);
    assert!(
        text.contains("pg_dump 12.22") && text.contains("is older than the server (PostgreSQL "),
        "{text}"
    );

    assert!(
        store.list("").await.expect("list").is_empty(),
        "nothing was written"
    );

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let not_dir = tidemark(
        &["backup"],
        &[
            ("DATABASE_URL", &url),
            ("TIDEMARK_STORE", file.to_str().expect("utf8")),
        ],
    );
    assert_eq!(not_dir.status.code(), Some(1));
    assert!(
        stderr(&not_dir).contains("is not a directory"),
        "{}",
        stderr(&not_dir)
    );
    assert_eq!(std::fs::read(&file).expect("read"), b"x");

    let bad_mode = tidemark(
        &["backup", "--table-mode", "articles=sometimes"],
        &[("DATABASE_URL", &url), ("TIDEMARK_STORE", store_arg)],
    );
    assert_eq!(bad_mode.status.code(), Some(2));
    assert!(
        stderr(&bad_mode).contains("unknown table mode \"sometimes\""),
        "{}",
        stderr(&bad_mode)
    );
}

#[tokio::test]
async fn restore_and_verify_from_the_cli() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), FIXTURE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store_arg = dir.path().to_str().expect("utf8").to_owned();
    let url = db.url(SslMode::Require);
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("TIDEMARK_STORE", store_arg.as_str()),
    ];
    let full = tidemark(&["backup"], &env);
    assert!(full.status.success(), "{}", stderr(&full));
    let id = stdout(&full).trim().to_owned();

    let verified = tidemark(&["--json", "verify"], &env);
    assert!(verified.status.success(), "{}", stderr(&verified));
    let record: serde_json::Value = serde_json::from_str(&stdout(&verified)).expect("JSON");
    assert_eq!(
        (record["backup_id"].as_str(), record["ok"].as_bool()),
        (Some(id.as_str()), Some(true))
    );
    let listed = tidemark(&["--json", "list"], &env);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&stdout(&listed)).expect("JSON");
    assert_eq!(listed[0]["verified"], true);

    let target = cluster.create_database().await;
    let target_url = target.url(SslMode::Require);
    let restored = tidemark(
        &["restore", "--backup", "latest", "--target-url", &target_url],
        &env,
    );
    assert!(restored.status.success(), "{}", stderr(&restored));
    assert!(
        stdout(&restored).contains(&format!("restored backup {id}")),
        "{}",
        stdout(&restored)
    );
    let again = tidemark(&["restore", "--target-url", &target_url], &env);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("target already has table"),
        "{}",
        stderr(&again)
    );
    let data_only = tidemark(
        &["restore", "--target-url", &target_url, "--data-only"],
        &env,
    );
    assert_eq!(data_only.status.code(), Some(1));
    assert!(
        stderr(&data_only).contains("already holds rows; pass --clean"),
        "{}",
        stderr(&data_only)
    );
    let clean = tidemark(
        &[
            "restore",
            "--target-url",
            &target_url,
            "--data-only",
            "--clean",
        ],
        &env,
    );
    assert!(clean.status.success(), "{}", stderr(&clean));
    // A table whose rows the target refuses: every other table is loaded, the failed one
    // named, the exit non-zero; --exit-on-error stops at it instead.
    exec(
        &target.settings(),
        "ALTER TABLE tags ADD CONSTRAINT small CHECK (n < 10) NOT VALID",
    )
    .await;
    let refused = tidemark(
        &[
            "restore",
            "--target-url",
            &target_url,
            "--data-only",
            "--clean",
        ],
        &env,
    );
    assert_eq!(refused.status.code(), Some(1), "{}", stdout(&refused));
    assert!(
        stderr(&refused).contains("1 of 2 tables failed to load")
            && stderr(&refused).contains("public.tags")
            && stderr(&refused).contains("\"small\""),
        "{}",
        stderr(&refused)
    );
    let client = tidemark_core::db::connect(&target.settings())
        .await
        .expect("connect");
    let counts: (i64, i64) = {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM articles), (SELECT count(*) FROM tags)",
                &[],
            )
            .await
            .expect("counts");
        (row.get(0), row.get(1))
    };
    assert_eq!(counts, (3000, 0));
    let stopped = tidemark(
        &[
            "restore",
            "--target-url",
            &target_url,
            "--data-only",
            "--clean",
            "--exit-on-error",
        ],
        &env,
    );
    assert_eq!(stopped.status.code(), Some(1));
    assert!(
        !stderr(&stopped).contains("failed to load") && stderr(&stopped).contains("public.tags"),
        "{}",
        stderr(&stopped)
    );
    // --advance-sequences is a restore option like any other.
    let fresh = cluster.create_database().await;
    let advanced = tidemark(
        &[
            "restore",
            "--target-url",
            &fresh.url(SslMode::Require),
            "--advance-sequences",
        ],
        &env,
    );
    assert!(advanced.status.success(), "{}", stderr(&advanced));
    let unknown = tidemark(
        &[
            "restore",
            "--backup",
            "20990101T000000Z-ffffff",
            "--target-url",
            &target_url,
        ],
        &env,
    );
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("unknown backup 20990101T000000Z-ffffff"),
        "{}",
        stderr(&unknown)
    );
    assert!(
        !stderr(&unknown).contains(&cluster.password),
        "no password in errors"
    );

    // The verification server given as a Secrets Manager secret.
    let secret = tidemark_tests::create_secret(
        serde_json::json!({"username": cluster.user, "password": cluster.password,
            "host": cluster.host, "port": cluster.port, "dbname": "postgres", "sslmode": "require"})
        .to_string(),
    )
    .await;
    let via_secret = tidemark(
        &["verify", "--backup", &id, "--scratch-secret-id", &secret],
        &env,
    );
    assert!(via_secret.status.success(), "{}", stderr(&via_secret));
    assert!(
        stdout(&via_secret).contains("verification ok"),
        "{}",
        stdout(&via_secret)
    );

    // Corrupt a chunk: verify exits non-zero and names it.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join(format!("manifests/{id}.json"))).expect("manifest"),
    )
    .expect("JSON");
    let chunk = manifest["tables"][0]["chunks"][0]["key"]
        .as_str()
        .expect("chunk key")
        .to_owned();
    let path = dir.path().join(&chunk);
    let mut bytes = std::fs::read(&path).expect("chunk");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).expect("write");
    let failed = tidemark(&["verify", "--backup", &id], &env);
    assert_eq!(failed.status.code(), Some(1), "{}", stdout(&failed));
    assert!(
        stdout(&failed).contains("verification FAILED") && stdout(&failed).contains(&chunk),
        "{}",
        stdout(&failed)
    );
}

#[tokio::test]
async fn prune_from_the_cli() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), FIXTURE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store_arg = dir.path().to_str().expect("utf8").to_owned();
    let url = db.url(SslMode::Require);
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("TIDEMARK_STORE", store_arg.as_str()),
    ];
    for _ in 0..3 {
        let out = tidemark(&["backup", "--full"], &env);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let dry = tidemark(&["prune", "--keep-last", "1", "--dry-run"], &env);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert_eq!(
        stdout(&dry)
            .lines()
            .filter(|l| l.starts_with("remove"))
            .count(),
        2,
        "{}",
        stdout(&dry)
    );
    assert!(stdout(&dry).contains("would delete"), "{}", stdout(&dry));
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&stdout(&tidemark(&["--json", "list"], &env))).expect("JSON");
    assert_eq!(listed.len(), 3, "a dry run deletes nothing");

    let done = tidemark(&["--json", "prune", "--keep-last", "1"], &env);
    assert!(done.status.success(), "{}", stderr(&done));
    let report: serde_json::Value = serde_json::from_str(&stdout(&done)).expect("JSON");
    assert!(
        report["deleted"].as_u64().is_some_and(|n| n >= 2),
        "{report}"
    );
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&stdout(&tidemark(&["--json", "list"], &env))).expect("JSON");
    assert_eq!(listed.len(), 1);

    let empty = tidemark(&["prune", "--keep-daily", "0"], &env);
    assert_eq!(empty.status.code(), Some(1));
    assert!(
        stderr(&empty).contains("empty retention policy"),
        "{}",
        stderr(&empty)
    );
    let zone = tidemark(
        &["prune", "--keep-daily", "3", "--timezone", "Mars/Olympus"],
        &env,
    );
    // A bad value is a usage error, as for every flag clap parses.
    assert_eq!(zone.status.code(), Some(2));
    assert!(
        stderr(&zone).contains("--timezone")
            && stderr(&zone).contains("unknown time zone \"Mars/Olympus\""),
        "{}",
        stderr(&zone)
    );
}

#[tokio::test]
async fn a_directory_store_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), FIXTURE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let store_arg = store.to_str().expect("utf8");
    let url = db.url(SslMode::Require);
    // The most permissive umask: only the store's own modes can keep others out.
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            "umask 000 && exec \"$0\" backup",
            env!("CARGO_BIN_EXE_tidemark"),
        ])
        .env("DATABASE_URL", &url)
        .env("TIDEMARK_STORE", store_arg)
        .output()
        .expect("run tidemark");
    assert!(out.status.success(), "{}", stderr(&out));
    let mut files = 0;
    let mut dirs = vec![store.clone()];
    while let Some(d) = dirs.pop() {
        let mode = std::fs::metadata(&d).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
                files += 1;
            }
        }
    }
    assert!(
        files > 4,
        "the backup wrote its chunks, schema and manifest"
    );

    let env = [
        ("DATABASE_URL", url.as_str()),
        ("TIDEMARK_STORE", store_arg),
    ];
    let check = tidemark(&["check"], &env);
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(
        !stdout(&check).contains("store     warn"),
        "{}",
        stdout(&check)
    );
    // A store an older build (or a hand) left readable is named, with the fix.
    std::fs::set_permissions(
        store.join("manifests"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let check = tidemark(&["check"], &env);
    assert!(
        check.status.success(),
        "a warning, not a failure: {}",
        stderr(&check)
    );
    assert!(
        stdout(&check).contains("can be read by other users")
            && stdout(&check).contains("chmod -R go-rwx"),
        "{}",
        stdout(&check)
    );
    let json = tidemark(&["check", "--json"], &env);
    let report: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("JSON");
    assert_eq!(report["store_readable_by_others"], true);
}

#[tokio::test]
async fn a_backup_killed_with_sigkill_is_resumed_at_once_by_the_next() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 600000) g;
         CREATE TABLE small (k text, n int); INSERT INTO small VALUES ('a', 1);",
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let store_arg = store.to_str().expect("utf8");
    let url = db.url(SslMode::Require);
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("TIDEMARK_STORE", store_arg),
    ];

    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args(["backup", "--chunk-rows", "20000", "--workers", "1"])
        .env("DATABASE_URL", &url)
        .env("TIDEMARK_STORE", store_arg)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start tidemark backup");
    // Kill it once it holds the lease and has written progress and a chunk or two.
    let local = LocalStore::open(&store).expect("open");
    let started = std::time::Instant::now();
    let run_id = loop {
        let chunks = local.list("chunks/").await.unwrap_or_default();
        let progress = local.list("runs/").await.unwrap_or_default();
        if chunks.len() >= 2 && !progress.is_empty() {
            break progress[0]
                .key
                .split('/')
                .nth(1)
                .expect("run id")
                .to_owned();
        }
        assert!(
            first.try_wait().expect("poll").is_none(),
            "the first backup ended before it could be killed"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(120));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    first.kill().expect("kill -9");
    first.wait().expect("reap");
    assert!(local.list("manifests/").await.expect("list").is_empty());

    // The next backup takes the dead process's lease over at once and finishes its run.
    let resumed_at = std::time::Instant::now();
    let second = tidemark(&["backup"], &env);
    let took = resumed_at.elapsed();
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(stdout(&second).trim(), run_id, "the killed run was resumed");
    assert!(!stderr(&second).contains("locked"), "{}", stderr(&second));
    eprintln!("resumed after kill -9 in {:.1} s", took.as_secs_f64());

    let target = cluster.create_database().await;
    let restore = tidemark(
        &[
            "restore",
            "--backup",
            "latest",
            "--target-url",
            &target.url(SslMode::Require),
        ],
        &env,
    );
    assert!(restore.status.success(), "{}", stderr(&restore));
    let src = tidemark_core::db::connect(&db.settings())
        .await
        .expect("source");
    let dst = tidemark_core::db::connect(&target.settings())
        .await
        .expect("target");
    for select in [
        "SELECT * FROM big ORDER BY id",
        "SELECT * FROM small ORDER BY 1",
    ] {
        assert!(
            tidemark_tests::ordered_copy(&src, select).await
                == tidemark_tests::ordered_copy(&dst, select).await,
            "{select} differs after the resumed backup"
        );
    }
}

#[tokio::test]
async fn a_fanned_out_backup_from_the_cli_and_its_workers_by_hand() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), FIXTURE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = db.url(SslMode::Require);
    let store_of = |name: &str| dir.path().join(name).to_str().expect("utf8").to_owned();

    // --concurrency 4 and a slice bound, from flags and from the environment alike.
    let one = store_of("one");
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("TIDEMARK_STORE", one.as_str()),
    ];
    let whole = tidemark(
        &[
            "--json",
            "backup",
            "--concurrency",
            "4",
            "--slice-seconds",
            "30",
            "--chunk-rows",
            "400",
        ],
        &env,
    );
    assert!(whole.status.success(), "{}", stderr(&whole));
    let report: serde_json::Value = serde_json::from_str(&stdout(&whole)).expect("JSON");
    assert_eq!(
        (report["rows"].as_u64(), report["consistent"].as_bool()),
        (Some(3020), Some(true)),
        "{report}"
    );
    let two = store_of("two");
    let env2 = [
        ("DATABASE_URL", url.as_str()),
        ("TIDEMARK_STORE", two.as_str()),
        ("TIDEMARK_CONCURRENCY", "2"),
        ("TIDEMARK_SLICE_SECONDS", "30"),
    ];
    let sealed = tidemark(&["--json", "backup", "--chunk-rows", "400"], &env2);
    assert!(sealed.status.success(), "{}", stderr(&sealed));

    // The same run by hand, as the state machine drives the functions: slices until one
    // fans out, workers export, the next slice finishes, the manifest seals.
    let three = store_of("three");
    let env3 = [
        ("DATABASE_URL", url.as_str()),
        ("TIDEMARK_STORE", three.as_str()),
    ];
    // A first slice that cannot finish: the run needs a second slice, which fans out.
    let first = tidemark(
        &[
            "export",
            "--full",
            "--concurrency",
            "2",
            "--chunk-rows",
            "400",
            "--max-seconds",
            "0",
        ],
        &env3,
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let slice: serde_json::Value = serde_json::from_str(&stdout(&first)).expect("JSON");
    assert_eq!(
        (slice["fan_out"].as_bool(), slice["done"].as_bool()),
        (Some(false), Some(false)),
        "{slice}"
    );
    let first_rows = slice["rows"].as_u64().expect("rows");
    let run_id = slice["run_id"].as_str().expect("run_id").to_owned();
    let second = tidemark(&["export", "--run", &run_id, "--concurrency", "2"], &env3);
    let slice: serde_json::Value = serde_json::from_str(&stdout(&second)).expect("JSON");
    assert_eq!(
        (slice["fan_out"].as_bool(), slice["rows"].as_u64()),
        (Some(true), Some(0)),
        "{slice}"
    );
    let mut rows = first_rows;
    for slot in ["0", "1"] {
        let worker = tidemark(
            &[
                "export",
                "--run",
                &run_id,
                "--worker",
                slot,
                "--concurrency",
                "2",
            ],
            &env3,
        );
        assert!(worker.status.success(), "{}", stderr(&worker));
        let report: serde_json::Value = serde_json::from_str(&stdout(&worker)).expect("JSON");
        rows += report["rows"].as_u64().expect("rows");
    }
    assert_eq!(rows, 3020);
    let last = tidemark(&["export", "--run", &run_id, "--concurrency", "2"], &env3);
    let slice: serde_json::Value = serde_json::from_str(&stdout(&last)).expect("JSON");
    assert_eq!(slice["done"], true, "{slice}");
    let sealed = tidemark(&["manifest", "--run", &run_id], &env3);
    assert!(sealed.status.success(), "{}", stderr(&sealed));

    // Bad values are refused by name.
    for (args, named) in [
        (vec!["backup", "--concurrency", "0"], "--concurrency"),
        (vec!["backup", "--slice-seconds", "0"], "--slice-seconds"),
        (vec!["export", "--worker", "0"], "--run"),
        (vec!["backup", "--run", &run_id, "--full"], "--full"),
    ] {
        let out = tidemark(&args, &env3);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(named), "{args:?}: {}", stderr(&out));
    }
    // `backup --run` continues only a run the store holds.
    let unknown = tidemark(&["backup", "--run", "20260101T000000Z-abcdef"], &env3);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("no run 20260101T000000Z-abcdef"),
        "{}",
        stderr(&unknown)
    );
}
