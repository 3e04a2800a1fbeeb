//! Test harness: the throwaway PostgreSQL cluster and S3-protocol server that
//! `scripts/test` starts, handed to each test in isolation (its own database, its own
//! bucket and prefix), so tests run in parallel.
//!
//! Run the tests with `scripts/test`; plain `cargo test` without it fails with a message
//! that says so.

use std::path::PathBuf;
use std::sync::Arc;

use tidemark_core::db::{DbSettings, SslMode};
use tidemark_core::store::{LocalStore, S3Store, S3StoreOptions, WriteStore};

fn env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: integration tests need the PostgreSQL cluster and S3 server \
             that scripts/test starts; run `scripts/test`"
        ),
    }
}

/// The test cluster, as `scripts/test` exported it.
#[derive(Debug, Clone)]
pub struct TestCluster {
    pub host: String,
    /// Another loopback address of the same server, not named by its certificate.
    pub alt_host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub ca_file: PathBuf,
    pub bin_dir: PathBuf,
}

impl TestCluster {
    pub fn from_env() -> Self {
        Self {
            host: env("TIDEMARK_TEST_PG_HOST"),
            alt_host: env("TIDEMARK_TEST_PG_ALT_HOST"),
            port: env("TIDEMARK_TEST_PG_PORT")
                .parse()
                .expect("TIDEMARK_TEST_PG_PORT is a port number"),
            user: env("TIDEMARK_TEST_PG_USER"),
            password: env("TIDEMARK_TEST_PG_PASSWORD"),
            ca_file: env("TIDEMARK_TEST_PG_CA").into(),
            bin_dir: env("TIDEMARK_TEST_PG_BIN").into(),
        }
    }

    /// `postgres://user:password@host:port/dbname?sslmode=...`.
    pub fn url(&self, dbname: &str, sslmode: SslMode) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{dbname}?sslmode={sslmode}",
            self.user, self.password, self.host, self.port
        )
    }

    /// Settings for `dbname`, verified TLS with the cluster's CA.
    pub fn settings(&self, dbname: &str) -> DbSettings {
        let mut s = DbSettings::from_url(&self.url(dbname, SslMode::VerifyFull).into())
            .expect("test URL parses");
        s.ca_file = Some(self.ca_file.clone());
        s
    }

    /// A fresh database only this test uses; dropped when the guard is dropped.
    pub async fn create_database(&self) -> TestDatabase {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let admin = tidemark_core::db::connect(&self.settings("postgres"))
            .await
            .expect("connect to the test cluster");
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create test database");
        TestDatabase {
            cluster: self.clone(),
            name,
        }
    }
}

/// A database that is dropped (with `FORCE`) when this guard goes out of scope.
#[derive(Debug)]
pub struct TestDatabase {
    pub cluster: TestCluster,
    pub name: String,
}

impl TestDatabase {
    pub fn settings(&self) -> DbSettings {
        self.cluster.settings(&self.name)
    }

    pub fn url(&self, sslmode: SslMode) -> String {
        self.cluster.url(&self.name, sslmode)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let settings = self.cluster.settings("postgres");
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        // Drop runs outside any async context we could borrow: use a private runtime on a
        // plain thread, and wait for it so the database is gone when the test ends.
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let client = tidemark_core::db::connect(&settings).await.ok()?;
                client.batch_execute(&sql).await.ok()
            })
        });
        let _ = handle.join();
    }
}

/// The AWS SDK configuration that points at the test S3 server.
pub async fn aws_config() -> aws_config::SdkConfig {
    env("AWS_ENDPOINT_URL");
    tidemark_core::aws::sdk_config().await
}

/// A bucket created for this test.
pub async fn create_bucket() -> String {
    let config = aws_config().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(true)
            .build(),
    );
    let bucket = format!("tidemark-test-{}", uuid::Uuid::new_v4().simple());
    s3.create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create test bucket");
    bucket
}

/// An S3 store in a fresh bucket, under a prefix.
pub async fn s3_store(options: S3StoreOptions) -> S3Store {
    let bucket = create_bucket().await;
    S3Store::new(&aws_config().await, &bucket, "db/prod", options)
}

/// A local store in a fresh temporary directory (kept alive by the returned guard).
pub fn local_store() -> (tempfile::TempDir, LocalStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LocalStore::open(&dir.path().join("store")).expect("open local store");
    (dir, store)
}

/// Both adapters, boxed, for tests that do not care which.
pub async fn each_store() -> Vec<(Option<tempfile::TempDir>, Arc<dyn WriteStore>)> {
    let (dir, local) = local_store();
    vec![
        (Some(dir), Arc::new(local)),
        (None, Arc::new(s3_store(S3StoreOptions::default()).await)),
    ]
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough for upload tests.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs SQL (several statements allowed) on a fresh connection to `settings`.
pub async fn exec(settings: &DbSettings, sql: &str) {
    let client = tidemark_core::db::connect(settings).await.expect("connect");
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// `COPY (SELECT cols FROM table ORDER BY order_by) TO STDOUT`: the oracle every
/// comparison uses; Tidemark writes none of it.
pub async fn ordered_copy(client: &tokio_postgres::Client, select: &str) -> Vec<u8> {
    use futures_util::TryStreamExt;
    let stream = client
        .copy_out(&format!("COPY ({select}) TO STDOUT"))
        .await
        .unwrap_or_else(|e| panic!("{select}: {e:?}"));
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(block) = stream.try_next().await.expect("copy data") {
        out.extend_from_slice(&block);
    }
    out
}

/// Reads and decompresses one chunk.
pub async fn chunk_text(store: &dyn tidemark_core::store::ReadStore, key: &str) -> Vec<u8> {
    let object = store
        .read(key)
        .await
        .expect("read chunk")
        .expect("chunk exists");
    zstd::decode_all(object.bytes.as_ref()).expect("chunk is zstd")
}

/// Loads COPY text into `table (columns)` with plain `COPY ... FROM STDIN`.
pub async fn copy_in(
    client: &tokio_postgres::Client,
    table: &str,
    columns: &[String],
    text: Vec<u8>,
) {
    use futures_util::SinkExt;
    let cols = columns
        .iter()
        .map(|c| tidemark_core::format::quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let sink = client
        .copy_in(&format!("COPY {table} ({cols}) FROM STDIN"))
        .await
        .expect("start COPY FROM");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(text))
        .await
        .expect("send COPY data");
    sink.close().await.expect("finish COPY FROM");
}

/// A test-only replay of one manifest table into an existing, empty target table,
/// independent of Tidemark's restore engine: rows chunks in order, a later version of a
/// key replacing an earlier one, then keys outside the live key set deleted.
pub async fn replay_table(
    store: &dyn tidemark_core::store::ReadStore,
    entry: &tidemark_core::format::manifest::TableEntry,
    client: &tokio_postgres::Client,
    target: &str,
) {
    use tidemark_core::format::quote_ident;
    let keyed = !entry.key.is_empty() && entry.mode == tidemark_core::format::TableMode::Changes;
    if !keyed {
        for chunk in &entry.chunks {
            copy_in(
                client,
                target,
                &entry.columns,
                chunk_text(store, &chunk.key).await,
            )
            .await;
        }
        return;
    }
    let keys = entry
        .key
        .iter()
        .map(|k| quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS pg_temp.stage; CREATE TEMP TABLE stage AS SELECT * FROM {target} WITH NO DATA"
        ))
        .await
        .expect("stage table");
    for chunk in &entry.chunks {
        copy_in(
            client,
            "pg_temp.stage",
            &entry.columns,
            chunk_text(store, &chunk.key).await,
        )
        .await;
        client
            .batch_execute(&format!(
                "DELETE FROM {target} t USING pg_temp.stage s WHERE ({}) = ({}); \
                 INSERT INTO {target} ({cols}) SELECT {cols} FROM pg_temp.stage; TRUNCATE pg_temp.stage",
                entry.key.iter().map(|k| format!("t.{}", quote_ident(k))).collect::<Vec<_>>().join(", "),
                entry.key.iter().map(|k| format!("s.{}", quote_ident(k))).collect::<Vec<_>>().join(", "),
                cols = entry.columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", "),
            ))
            .await
            .expect("merge chunk");
    }
    if !entry.key_chunks.is_empty() {
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS pg_temp.live; CREATE TEMP TABLE live AS SELECT {keys} FROM {target} WITH NO DATA"
            ))
            .await
            .expect("live key table");
        for chunk in &entry.key_chunks {
            copy_in(
                client,
                "pg_temp.live",
                &entry.key,
                chunk_text(store, &chunk.key).await,
            )
            .await;
        }
        client
            .batch_execute(&format!(
                "DELETE FROM {target} WHERE ({keys}) NOT IN (SELECT {keys} FROM pg_temp.live)"
            ))
            .await
            .expect("apply live key set");
    }
}

/// The sample payloads in `events/` whose file names start with `prefix`.
pub fn sample_events(prefix: &str) -> Vec<(String, serde_json::Value)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../events");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("events/ exists") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.starts_with(prefix) && name.ends_with(".json") {
            let text = std::fs::read_to_string(&path).expect("read event");
            let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            out.push((name, value));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "no events/{prefix}*.json");
    out
}

/// A Lambda context whose deadline is `seconds` from now.
pub fn lambda_context(seconds: u64) -> lambda_runtime::Context {
    let mut context = lambda_runtime::Context::default();
    context.request_id = uuid::Uuid::new_v4().to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    context.deadline = (now.as_millis() as u64) + seconds * 1000;
    context
}
