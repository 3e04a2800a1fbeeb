//! `tidemark check` end to end: the real binary, the test cluster, the S3-protocol server.

use std::process::Output;

use tidemark_core::db::SslMode;
use tidemark_core::store::{LocalStore, ReadStore};
use tidemark_tests::{aws_config, create_bucket, TestCluster};

fn tidemark(args: &[&str], envs: &[(&str, &str)]) -> Output {
    tidemark_tests::run_cli(env!("CARGO_BIN_EXE_tidemark"), args, envs)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn check_passes_against_s3_with_verified_tls() {
    let cluster = TestCluster::from_env();
    let bucket = create_bucket().await;
    let store = format!("s3://{bucket}/prod/main");
    let ca = cluster.ca_file.to_string_lossy().into_owned();
    let out = tidemark(
        &["check", "--store", &store, "--ca-file", &ca],
        &[(
            "DATABASE_URL",
            &cluster.url("postgres", SslMode::VerifyFull),
        )],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("database  ok") && stdout.contains("TLS on (sslmode verify-full)"),
        "{stdout}"
    );
    // The server's version and whether Tidemark supports it.
    let version = tidemark_core::db::ServerVersion(cluster.server_version_num().await);
    assert!(
        stdout.contains(&format!("PostgreSQL {version}"))
            && stdout.contains("; supported (PostgreSQL 13 to 18)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("store     ok    {store}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("pg_dump   ok    pg_dump ") && stdout.contains("through the TLS relay"),
        "{stdout}"
    );
    assert!(!stdout.contains(&cluster.password) && !stderr.contains(&cluster.password));
}

#[tokio::test]
async fn check_json_reports_both_results() {
    let cluster = TestCluster::from_env();
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let out = tidemark(
        &["check", "--json"],
        &[
            ("TIDEMARK_STORE", store_dir.to_str().expect("utf8 path")),
            ("DATABASE_URL", &cluster.url("postgres", SslMode::Require)),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("database reachable"),
        "human logs on stderr: {stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    assert_eq!(report["ok"], true);
    assert_eq!(report["database"]["tls"], true);
    assert_eq!(report["database"]["sslmode"], "require");
    assert_eq!(report["store"]["conditional_writes"], true);
    assert_eq!(report["pg_dump"]["ok"], true);
    assert_eq!(report["pg_dump"]["probed"], true);
    // The probe is gone: the check leaves nothing in the store.
    let store = LocalStore::open(&store_dir).expect("open");
    assert!(store.list("").await.expect("list").is_empty());
}

#[tokio::test]
async fn a_wrong_password_fails_with_one_line_and_no_secret() {
    let cluster = TestCluster::from_env();
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = "N0t-The-Pa55word-7731";
    let url = format!(
        "postgres://{}:{wrong}@{}:{}/postgres?sslmode=disable",
        cluster.user, cluster.host, cluster.port
    );
    let out = tidemark(
        &[
            "-vv",
            "check",
            "--store",
            dir.path().to_str().expect("utf8"),
        ],
        &[("DATABASE_URL", &url)],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let failures: Vec<_> = stdout.lines().filter(|l| l.contains("FAIL")).collect();
    assert_eq!(failures.len(), 1, "{stdout}");
    assert!(
        failures[0].contains("password authentication failed"),
        "{stdout}"
    );
    assert!(stdout.contains("store     ok"), "{stdout}");
    for shown in [&stdout, &stderr] {
        assert!(!shown.contains(wrong), "password leaked: {shown}");
    }
    // --help shows that DATABASE_URL is read, never its value.
    let help = tidemark(&["--help"], &[("DATABASE_URL", &url)]);
    assert!(!text(&help).0.contains(wrong));
}

#[tokio::test]
async fn a_secret_id_connects_and_stays_out_of_logs() {
    let cluster = TestCluster::from_env();
    let client = aws_sdk_secretsmanager::Client::new(&aws_config().await);
    let name = format!("tidemark/cli/{}", uuid::Uuid::new_v4().simple());
    client
        .create_secret()
        .name(&name)
        .secret_string(
            serde_json::json!({
                "username": cluster.user, "password": cluster.password,
                "host": cluster.host, "port": cluster.port.to_string(), "dbname": "postgres",
            })
            .to_string(),
        )
        .send()
        .await
        .expect("create secret");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = cluster.ca_file.to_string_lossy().into_owned();
    let out = tidemark(
        &[
            "-vv",
            "check",
            "--store",
            dir.path().to_str().expect("utf8"),
        ],
        &[
            ("TIDEMARK_SECRET_ID", &name),
            ("TIDEMARK_CA_FILE", &ca),
            ("TIDEMARK_SSLMODE", "verify-full"),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("TLS on (sslmode verify-full)"), "{stdout}");
    assert!(!stdout.contains(&cluster.password) && !stderr.contains(&cluster.password));
}

#[tokio::test]
async fn a_missing_bucket_is_one_clear_line() {
    let cluster = TestCluster::from_env();
    let out = tidemark(
        &["check", "--store", "s3://tidemark-missing-bucket/x"],
        &[("DATABASE_URL", &cluster.url("postgres", SslMode::Require))],
    );
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("database  ok"), "{stdout}");
    assert!(
        stdout.contains("store     FAIL  bucket \"tidemark-missing-bucket\" does not exist"),
        "{stdout}"
    );
}

#[test]
fn a_file_as_store_and_an_unreachable_server_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a store").expect("write");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!(
        "postgres://app:Hidden-Pw-99@127.0.0.1:{port}/db?sslmode=disable&connect_timeout=2"
    );
    let out = tidemark(
        &["check", "--store", file.to_str().expect("utf8")],
        &[("DATABASE_URL", &url)],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains(&format!(
            "store     FAIL  store path {} is not a directory",
            file.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "database  FAIL  cannot connect to PostgreSQL at app@127.0.0.1:{port}/db"
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("Hidden-Pw-99") && !stderr.contains("Hidden-Pw-99"));
    assert_eq!(
        std::fs::read(&file).expect("read"),
        b"not a store",
        "the file is untouched"
    );
}

#[test]
fn nothing_configured_and_bad_flags_are_refused() {
    let out = tidemark(&["check"], &[]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains("no database configured") && stdout.contains("no store configured"),
        "{stdout}"
    );

    let out = tidemark(&["check", "--sslmode", "sometimes"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains("unknown sslmode \"sometimes\""),
        "{}",
        text(&out).1
    );

    let out = tidemark(&["check", "--store", "gs://bucket/x"], &[]);
    assert!(text(&out).0.contains("unsupported scheme \"gs\""));
}

#[test]
fn lambda_log_format_json_gives_json_log_lines() {
    let cluster = TestCluster::from_env();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = tidemark(
        &["-v", "check", "--store", dir.path().to_str().expect("utf8")],
        &[
            ("DATABASE_URL", &cluster.url("postgres", SslMode::Require)),
            ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
        ],
    );
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "database reachable" && l["level"] == "INFO"),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "checking the store" && l["level"] == "DEBUG"),
        "{stderr}"
    );
    assert!(!stderr.contains(&cluster.password));
}
