//! Database access against the real test cluster: TLS modes, Secrets Manager, failures.

use std::time::{Duration, Instant};

use secrecy::SecretString;
use tidemark_core::db::{self, DatabaseSource, DbError, DbSettings, SslMode};
use tidemark_core::error::Classified;
use tidemark_tests::{create_secret, TestCluster};

fn settings_from_url(url: String) -> DbSettings {
    DbSettings::from_url(&SecretString::from(url)).expect("test URL parses")
}

async fn tls_of(settings: &DbSettings) -> Result<bool, DbError> {
    let client = db::connect(settings).await?;
    Ok(db::probe(&client, settings).await?.tls)
}

#[tokio::test]
async fn verify_full_with_the_generated_ca_succeeds() {
    let cluster = TestCluster::from_env();
    let settings = cluster.settings("postgres");
    assert_eq!(settings.sslmode, SslMode::VerifyFull);
    let client = db::connect(&settings).await.expect("verify-full connects");
    let info = db::probe(&client, &settings).await.expect("probe");
    assert!(info.tls, "session must be encrypted");
    assert!(
        info.server_version.starts_with(char::is_numeric),
        "{info:?}"
    );
}

#[tokio::test]
async fn verify_full_without_the_ca_fails_clearly() {
    let cluster = TestCluster::from_env();
    let settings = settings_from_url(cluster.url("postgres", SslMode::VerifyFull));
    assert!(settings.ca_file.is_none());
    let err = tls_of(&settings)
        .await
        .expect_err("the system roots do not trust the test CA");
    let msg = err.to_string();
    assert!(msg.contains("certificate verify failed"), "{msg}");
    assert!(
        msg.contains("--ca-file"),
        "the error should say what to do: {msg}"
    );
    assert!(
        msg.contains(&format!("{}:{}", cluster.host, cluster.port)),
        "{msg}"
    );
    assert!(!msg.contains(&cluster.password), "password leaked: {msg}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let cluster = TestCluster::from_env();
    let mut other_name = cluster.settings("postgres");
    other_name.host = cluster.alt_host.clone();
    let err = tls_of(&other_name)
        .await
        .expect_err("127.0.0.2 is not in the certificate");
    assert!(err.to_string().contains("mismatch"), "{err}");

    other_name.sslmode = SslMode::VerifyCa;
    assert!(tls_of(&other_name)
        .await
        .expect("verify-ca ignores the name"));
}

#[tokio::test]
async fn a_wrong_ca_is_refused() {
    let cluster = TestCluster::from_env();
    let dir = tempfile::tempdir().expect("tempdir");
    let not_a_ca = dir.path().join("empty.pem");
    std::fs::write(&not_a_ca, "no certificates here\n").expect("write");
    let mut settings = cluster.settings("postgres");
    settings.ca_file = Some(not_a_ca.clone());
    let err = tls_of(&settings).await.expect_err("no CA in the file");
    assert!(err.to_string().contains("empty.pem"), "{err}");
    settings.ca_file = Some(dir.path().join("missing.pem"));
    let err = tls_of(&settings).await.expect_err("no such file");
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[tokio::test]
async fn sslmodes_disable_prefer_and_require() {
    let cluster = TestCluster::from_env();
    let disabled = settings_from_url(cluster.url("postgres", SslMode::Disable));
    assert!(!tls_of(&disabled).await.expect("disable connects"));
    let preferred = settings_from_url(cluster.url("postgres", SslMode::Prefer));
    assert!(tls_of(&preferred).await.expect("prefer connects"));
    let required = settings_from_url(cluster.url("postgres", SslMode::Require));
    assert!(tls_of(&required)
        .await
        .expect("require connects without a CA"));
}

#[tokio::test]
async fn sessions_pin_text_output_settings() {
    let cluster = TestCluster::from_env();
    let settings = cluster.settings("postgres");
    let client = db::connect(&settings).await.expect("connect");
    let row = client
        .query_one(
            "SELECT current_setting('DateStyle'), current_setting('IntervalStyle'), \
             current_setting('TimeZone'), current_setting('extra_float_digits'), \
             current_setting('bytea_output'), current_setting('client_encoding')",
            &[],
        )
        .await
        .expect("query");
    let got: Vec<String> = (0..6).map(|i| row.get(i)).collect();
    assert_eq!(got, ["ISO, MDY", "postgres", "UTC", "3", "hex", "UTF8"]);
}

#[tokio::test]
async fn a_wrong_password_is_named_but_never_shown() {
    let cluster = TestCluster::from_env();
    let wrong = "Wr0ng-Pa55w0rd-that-must-not-leak";
    let url = format!(
        "postgres://{}:{wrong}@{}:{}/postgres?sslmode=disable",
        cluster.user, cluster.host, cluster.port
    );
    let settings = settings_from_url(url);
    let err = db::connect(&settings).await.expect_err("wrong password");
    let shown = format!("{err} {err:?} {settings:?}");
    assert!(shown.contains("password authentication failed"), "{shown}");
    assert!(!shown.contains(wrong), "password leaked: {shown}");
    assert!(
        !shown.contains(&cluster.password),
        "password leaked: {shown}"
    );
    assert!(!err.is_retryable(), "bad credentials are not retryable");
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_and_retryable() {
    let cluster = TestCluster::from_env();
    // A port nothing listens on: bind one, learn its number, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!(
        "postgres://{}:{}@127.0.0.1:{port}/postgres?sslmode=disable&connect_timeout=2",
        cluster.user, cluster.password
    );
    let started = Instant::now();
    let err = db::connect(&settings_from_url(url))
        .await
        .expect_err("nothing listens");
    assert!(started.elapsed() < Duration::from_secs(5));
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("refused"), "{msg}");
    assert!(!msg.contains(&cluster.password), "password leaked: {msg}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_missing_database_is_named() {
    let cluster = TestCluster::from_env();
    let err = db::connect(&cluster.settings("no_such_db"))
        .await
        .expect_err("no such database");
    assert!(err.to_string().contains("no_such_db"), "{err}");
}

#[tokio::test]
async fn a_secrets_manager_secret_gives_a_working_connection() {
    let cluster = TestCluster::from_env();
    let database = cluster.create_database().await;
    let arn = create_secret(
        serde_json::json!({
            "engine": "postgres",
            "username": cluster.user,
            "password": cluster.password,
            "host": cluster.host,
            "port": cluster.port,
            "dbname": database.name,
            "sslmode": "verify-full",
        })
        .to_string(),
    )
    .await;
    let source = DatabaseSource {
        secret_id: Some(arn),
        ca_file: Some(cluster.ca_file.clone()),
        ..DatabaseSource::default()
    };
    let settings = source.resolve().await.expect("secret resolves");
    assert_eq!(settings.dbname, database.name);
    assert!(!format!("{settings:?}").contains(&cluster.password));
    let client = db::connect(&settings).await.expect("connect with secret");
    let row = client
        .query_one("SELECT current_database()", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), database.name);
    assert!(db::probe(&client, &settings).await.expect("probe").tls);
}

#[tokio::test]
async fn secret_failures_are_clear() {
    let missing = DatabaseSource {
        secret_id: Some("tidemark/no-such-secret".into()),
        ..DatabaseSource::default()
    };
    let err = missing.resolve().await.expect_err("no such secret");
    assert!(
        err.to_string().contains("tidemark/no-such-secret")
            && err.to_string().contains("no such secret"),
        "{err}"
    );

    let arn =
        create_secret(r#"{"username":"app","password":"Sup3rS3cret","port":5432}"#.into()).await;
    let malformed = DatabaseSource {
        secret_id: Some(arn),
        ..DatabaseSource::default()
    };
    let err = malformed.resolve().await.expect_err("no host");
    let msg = err.to_string();
    assert!(msg.contains("\"host\" is missing"), "{msg}");
    assert!(!msg.contains("Sup3rS3cret"), "{msg}");
}

#[tokio::test]
async fn zero_or_two_sources_are_refused() {
    assert!(matches!(
        DatabaseSource::default().resolve().await,
        Err(DbError::NotConfigured)
    ));
    let both = DatabaseSource {
        url: Some(SecretString::from("postgres://a@b/c".to_owned())),
        secret_id: Some("s".into()),
        ..DatabaseSource::default()
    };
    assert!(matches!(both.resolve().await, Err(DbError::Ambiguous)));
}
