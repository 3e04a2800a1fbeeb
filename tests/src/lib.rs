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
    /// The server's programs (initdb, pg_ctl, pg_resetwal, pgbench where present).
    pub bin_dir: PathBuf,
    /// The client tools the oracles run (pg_dump, pg_restore, psql):
    /// `TIDEMARK_TEST_PG_CLIENT_BIN`, else the server's own. The version matrix points it
    /// at pg_dump 18, which serves every older server but is built without TLS.
    pub client_bin_dir: PathBuf,
}

impl TestCluster {
    pub fn from_env() -> Self {
        Self::from_env_prefixed("TIDEMARK_TEST_PG_")
    }

    /// A cluster described by `{prefix}HOST`, `{prefix}PORT`, ... (the version matrix
    /// starts a second one, `TIDEMARK_COMPAT_TARGET_PG_*`, to restore into).
    pub fn from_env_prefixed(prefix: &str) -> Self {
        let var = |name: &str| env(&format!("{prefix}{name}"));
        Self {
            host: var("HOST"),
            alt_host: var("ALT_HOST"),
            port: var("PORT")
                .parse()
                .unwrap_or_else(|_| panic!("{prefix}PORT is a port number")),
            user: var("USER"),
            password: var("PASSWORD"),
            ca_file: var("CA").into(),
            bin_dir: var("BIN").into(),
            client_bin_dir: std::env::var(format!("{prefix}CLIENT_BIN"))
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| var("BIN"))
                .into(),
        }
    }

    /// The server's `server_version_num`.
    pub async fn server_version_num(&self) -> u32 {
        let client = tidemark_core::db::connect(&self.settings("postgres"))
            .await
            .expect("connect to the test cluster");
        let num: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await
            .expect("server_version_num")
            .get(0);
        num as u32
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

/// Restores `backup` into a fresh empty database and returns it.
pub async fn restore_fresh(
    store: &Arc<dyn WriteStore>,
    cluster: &TestCluster,
    backup: &str,
) -> TestDatabase {
    let target = cluster.create_database().await;
    let manifest = tidemark_core::restore::load_manifest(
        store.as_ref(),
        &tidemark_core::restore::BackupSelector::Id(backup.to_owned()),
    )
    .await
    .expect("manifest");
    tidemark_core::restore::restore(
        store.clone(),
        &manifest,
        &target.settings(),
        &tidemark_core::restore::RestoreOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("restore {backup}: {e}"));
    target
}

pub async fn assert_same(source: &DbSettings, restored: &DbSettings, tables: &[(&str, &str)]) {
    let src = tidemark_core::db::connect(source).await.expect("source");
    let dst = tidemark_core::db::connect(restored).await.expect("target");
    for (table, order) in tables {
        let select = format!("SELECT * FROM {table} ORDER BY {order}");
        let expected = ordered_copy(&src, &select).await;
        let actual = ordered_copy(&dst, &select).await;
        assert!(
            expected == actual,
            "{table} differs after restore: {} vs {} bytes\nsource:\n{}\nrestored:\n{}",
            expected.len(),
            actual.len(),
            String::from_utf8_lossy(&expected[..expected.len().min(300)]),
            String::from_utf8_lossy(&actual[..actual.len().min(300)])
        );
    }
}

/// A Secrets Manager secret (on the test server) holding `json`; returns its ARN.
pub async fn create_secret(json: String) -> String {
    let client = aws_sdk_secretsmanager::Client::new(&aws_config().await);
    let name = format!("tidemark/test/{}", uuid::Uuid::new_v4().simple());
    let out = client
        .create_secret()
        .name(&name)
        .secret_string(json)
        .send()
        .await
        .expect("create secret");
    out.arn().expect("secret ARN").to_owned()
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
    if entry.has_key_set() {
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

/// How the oracles' client tools connect: TLS when they have it (the cluster's own
/// tools), in the clear when they do not (pg_dump 18 of the version matrix).
pub const CLIENT_SSLMODE: &str = "prefer";

/// Runs the cluster's own pg_dump on `dbname` with `args`; returns its output.
pub fn cluster_pg_dump(cluster: &TestCluster, dbname: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cluster.client_bin_dir.join("pg_dump"))
        .args(args)
        .args(["-d", dbname])
        .env("PGHOST", &cluster.host)
        .env("PGPORT", cluster.port.to_string())
        .env("PGUSER", &cluster.user)
        .env("PGPASSWORD", &cluster.password)
        .env("PGSSLMODE", CLIENT_SSLMODE)
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `pg_dump --schema-only` of a whole database by the cluster's own pg_dump (the oracle:
/// Tidemark does not write it), without the random `\restrict` keys.
pub fn schema_dump(cluster: &TestCluster, dbname: &str) -> String {
    cluster_pg_dump(cluster, dbname, &["--schema-only"])
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A new database whose schema is `source`'s, made as an application's migrations would:
/// `pg_dump --schema-only --no-owner --no-privileges | psql`, run as `user` (objects
/// belong to it; it owns the database).
pub async fn migrated_copy(
    cluster: &TestCluster,
    source: &str,
    user: Option<(&str, &str)>,
) -> TestDatabase {
    let target = cluster.create_database().await;
    let (user, password) = user.unwrap_or((&cluster.user, &cluster.password));
    if user != cluster.user {
        exec(
            &cluster.settings("postgres"),
            &format!("ALTER DATABASE \"{}\" OWNER TO {user}", target.name),
        )
        .await;
    }
    let script = cluster_pg_dump(
        cluster,
        source,
        &["--schema-only", "--no-owner", "--no-privileges"],
    );
    let script = fit_client_script(cluster, &script).await;
    psql_script(cluster, &target.name, user, password, &script);
    target
}

/// `script`, written by the client tools' pg_dump or pg_restore, for `cluster`: before
/// PostgreSQL 17 without the one line pg_dump 18 writes for every server
/// (`SET transaction_timeout`), which those servers refuse. For the oracles' own scripts
/// only: what Tidemark stores must run as it is.
pub async fn fit_client_script(cluster: &TestCluster, script: &str) -> String {
    if cluster.server_version_num().await >= 170_000 {
        return script.to_owned();
    }
    script
        .lines()
        .filter(|l| !l.starts_with("SET transaction_timeout"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Verifies backup `id` on the cluster; returns the record.
pub async fn verify_backup(
    store: &std::sync::Arc<dyn WriteStore>,
    cluster: &TestCluster,
    id: &str,
) -> tidemark_core::verify::Verification {
    verify_on(store, &cluster.settings("postgres"), id).await
}

/// Verifies backup `id` with scratch databases made through `admin`; returns the record.
pub async fn verify_on(
    store: &std::sync::Arc<dyn WriteStore>,
    admin: &DbSettings,
    id: &str,
) -> tidemark_core::verify::Verification {
    tidemark_core::verify::verify(
        store.clone(),
        admin,
        &tidemark_core::verify::VerifyOptions {
            backup: Some(tidemark_core::restore::BackupSelector::Id(id.to_owned())),
            ..tidemark_core::verify::VerifyOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("verify {id}: {e}"))
}

/// Runs an SQL script with the cluster's psql as `user`/`password`, stopping at the
/// first error.
pub fn psql_script(cluster: &TestCluster, dbname: &str, user: &str, password: &str, script: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(cluster.client_bin_dir.join("psql"))
        .args(["-q", "-X", "-v", "ON_ERROR_STOP=1", "-d", dbname, "-f", "-"])
        .env("PGHOST", &cluster.host)
        .env("PGPORT", cluster.port.to_string())
        .env("PGUSER", user)
        .env("PGPASSWORD", password)
        .env("PGSSLMODE", CLIENT_SSLMODE)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run psql");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write script");
    let out = child.wait_with_output().expect("psql");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every table and materialized view of the user schemas (partitions through their
/// root), each with its COPY output sorted: the data oracle.
pub async fn all_data(settings: &DbSettings) -> std::collections::BTreeMap<String, Vec<String>> {
    let client = tidemark_core::db::connect(settings).await.expect("connect");
    // An ordinary table's own rows (ONLY: an inheritance parent's children are tables of
    // their own); a partitioned table's rows are its partitions'. Columns by name: an
    // inheritance child's column order is not always one CREATE TABLE can reproduce.
    let tables: Vec<(String, bool, String)> = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), c.relkind = 'r', \
                    coalesce((SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attname) FROM pg_attribute a \
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '') \
             FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p', 'm') AND NOT c.relispartition \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' AND (c.relkind <> 'm' OR c.relispopulated) \
             ORDER BY 1",
            &[],
        )
        .await
        .expect("list tables")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut out = std::collections::BTreeMap::new();
    for (table, ordinary, columns) in tables {
        let only = if ordinary { "ONLY " } else { "" };
        let text = ordered_copy(&client, &format!("SELECT {columns} FROM {only}{table}")).await;
        let mut lines: Vec<String> = String::from_utf8_lossy(&text)
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        out.insert(table, lines);
    }
    out
}

/// Every table and populated materialized view of `a` and `b` holds the same rows (sorted
/// COPY, compared table by table, naming the first that differs).
pub async fn assert_same_data(a: &TestDatabase, b: &TestDatabase) {
    let (want, got) = (all_data(&a.settings()).await, all_data(&b.settings()).await);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "tables and populated materialized views"
    );
    for (table, rows) in &want {
        assert!(
            rows == &got[table],
            "{table} differs: {} vs {} rows",
            rows.len(),
            got[table].len()
        );
    }
}

/// `a` and `b` (on the same cluster or not) agree on schema (`pg_dump --schema-only` by
/// the clusters' client tools), data (see [`assert_same_data`]), sequences, materialized
/// views' populated state and trigger states. A schema difference is shown as the lines
/// only one side has.
pub async fn assert_identical(a: &TestDatabase, b: &TestDatabase) {
    assert_same_schema(a, b);
    assert_same_data(a, b).await;
    assert_eq!(
        state_facts(&a.settings()).await,
        state_facts(&b.settings()).await
    );
}

/// `a` and `b` have the same `pg_dump --schema-only` (by the clusters' client tools); a
/// difference is shown as the lines only one side has.
pub fn assert_same_schema(a: &TestDatabase, b: &TestDatabase) {
    let (want, got) = (
        schema_dump(&a.cluster, &a.name),
        schema_dump(&b.cluster, &b.name),
    );
    if want != got {
        let want_lines: std::collections::BTreeSet<&str> = want.lines().collect();
        let got_lines: std::collections::BTreeSet<&str> = got.lines().collect();
        let mut diff: Vec<String> = want_lines
            .difference(&got_lines)
            .map(|l| format!("- {l}"))
            .collect();
        diff.extend(got_lines.difference(&want_lines).map(|l| format!("+ {l}")));
        diff.truncate(20);
        panic!(
            "schema dumps of {} and {} differ ({} vs {} lines):\n{}",
            a.name,
            b.name,
            want.lines().count(),
            got.lines().count(),
            diff.join("\n")
        );
    }
}

/// Sequences, materialized views' populated state, trigger states and invalid indexes:
/// what a schema dump does not show.
///
/// A sequence is shown by its options and its exact state (`last_value`, NULL before
/// its first `nextval`): a restore keeps every sequence as the source had it, also one
/// the source held behind its column's keys.
pub async fn state_facts(settings: &DbSettings) -> Vec<String> {
    let client = tidemark_core::db::connect(settings).await.expect("connect");
    let mut facts: Vec<String> = client
        .query(
            "SELECT 'matview ' || schemaname || '.' || matviewname || ' ' || ispopulated FROM pg_matviews \
             UNION ALL SELECT 'trigger ' || tgrelid::regclass || ' ' || tgname || ' ' || tgenabled::text FROM pg_trigger WHERE NOT tgisinternal \
             UNION ALL SELECT 'invalid index ' || indexrelid::regclass FROM pg_index WHERE NOT indisvalid",
            &[],
        )
        .await
        .expect("facts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let sequences = client
        .query(
            "SELECT s.schemaname || '.' || s.sequencename, s.increment_by, s.min_value, s.max_value, \
                    s.cycle, s.start_value, s.last_value FROM pg_sequences s",
            &[],
        )
        .await
        .expect("sequences");
    for row in sequences {
        let (name, inc, min, max, cycle, start, last): (
            String,
            i64,
            i64,
            i64,
            bool,
            i64,
            Option<i64>,
        ) = (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
            row.get(6),
        );
        facts.push(format!(
            "sequence {name} increment {inc} min {min} max {max} cycle {cycle} start {start} last {last:?}"
        ));
    }
    facts.sort();
    facts
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

/// Fixtures and helpers shared by the backup, restore and verify tests.
pub mod asl;
pub mod faults;
pub mod lambdas;
pub mod private;
pub mod runtime;

pub mod fixtures {
    use std::sync::Arc;
    use std::time::Duration;

    use tidemark_core::error::Classified;
    use tidemark_core::export::{
        export_slice, export_worker, ExportOptions, SliceReport, WorkerReport,
    };
    use tidemark_core::format::manifest::Manifest;
    use tidemark_core::format::read_doc;
    use tidemark_core::manifest::{seal_run, SealReport};
    use tidemark_core::repo::manifest_key;
    use tidemark_core::store::WriteStore;

    use super::{exec, TestDatabase};

    pub type Store = Arc<dyn WriteStore>;

    pub const MATRIX_DDL: &str = r#"
    CREATE SCHEMA "Sales";
    CREATE TABLE "Sales"."Order Lines" ("Order" int, "Line" int, "Note" text, PRIMARY KEY ("Order", "Line"));
    CREATE TABLE matrix (
      id int PRIMARY KEY, t text, b bytea, n numeric, j jsonb, a int[], ta text[],
      ts timestamptz, iv interval, u uuid, f float8, d date, flag boolean,
      g int GENERATED ALWAYS AS (id * 10) STORED);
    CREATE TABLE nokey (x text, y int);
    CREATE TABLE parted (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
    CREATE TABLE parted_eu PARTITION OF parted FOR VALUES IN ('eu');
    CREATE TABLE parted_us PARTITION OF parted FOR VALUES IN ('us');
    "#;

    pub const MATRIX_DATA: &str = r#"
    INSERT INTO matrix (id, t, b, n, j, a, ta, ts, iv, u, f, d, flag) VALUES
     (1, E'tab\there', '\x00ff10'::bytea, 123456789.123456789, '{"a": [1, "x\ty"], "b": null}',
      '{1,2,NULL}', '{"a b","c,d","\"q\"",NULL}', '2024-02-29 23:59:59.123456+05:30',
      '1 year 2 mons 3 days 04:05:06.7', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 1.0000000000000002, '0001-01-01', true),
     (2, E'new\nline and back\\slash', '', -0.000001, '"just a string"', '{}', '{}', 'infinity',
      '-1 day', NULL, 'NaN', 'infinity', false),
     (3, '\N', NULL, 'NaN', 'null', NULL, '{"\\N"}', NULL, NULL, NULL, '-Infinity', NULL, NULL),
     (4, 'ünïcödé 🚀 日本語', '\x5c4e'::bytea, 0, '[]', '{-2147483648}', '{""}', '1970-01-01 00:00:00+00',
      '00:00:00', '00000000-0000-0000-0000-000000000000', -0.0, '2000-01-01', NULL),
     (5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
     (6, E'\\N', NULL, 1e-20, '{"nested": {"deep": [true, false]}}', '{{1,2},{3,4}}', NULL,
      '2038-01-19 03:14:08+00', '1000 years', NULL, 1e308, NULL, NULL),
     (7, E'\r\n\t\\\b\f\v', E'\\x'::bytea, 99999999999999999999.5, '{"k": "\u00e9\"\\"}', NULL, '{"{}"}',
      '-infinity', '-178000000 years', NULL, 5e-324, '-infinity', true);
    INSERT INTO matrix (id, t, n, ts) SELECT g, md5(g::text), g / 7.0, '2020-01-01'::timestamptz + g * interval '1 minute'
      FROM generate_series(100, 2600) g;
    INSERT INTO "Sales"."Order Lines" SELECT o, l, 'note ' || o || '/' || l FROM generate_series(1, 40) o, generate_series(1, 25) l;
    INSERT INTO nokey VALUES ('same', 1), ('same', 1), (NULL, NULL), (E'a\tb', 2);
    INSERT INTO nokey SELECT 'row ' || g, g FROM generate_series(1, 700) g;
    INSERT INTO parted SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'v' || g FROM generate_series(1, 900) g;
    "#;

    /// Every table of the fixtures, with a total order for the comparison.
    pub const MATRIX_TABLES: &[(&str, &str)] = &[
        ("\"Sales\".\"Order Lines\"", "1, 2"),
        ("matrix", "1"),
        ("nokey", "1, 2"),
        ("parted", "1, 2"),
    ];

    pub const CHAIN_DDL: &str = r#"
    CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL, note text);
    CREATE TABLE events (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, payload text);
    CREATE TABLE settings (k text, v text);
    "#;

    /// A schema with every common object kind that PostgreSQL 13 has (what later
    /// versions added is in [`VERSION_FEATURES`]): extensions, enum, domains (one with a
    /// check), composite and range types, SQL and plpgsql functions, a procedure, an aggregate, identity and generated columns, row and
    /// statement triggers (one disabled), a rule, row-level security with a policy,
    /// comments, views on views, a populated materialized view with an index and an
    /// unpopulated one, a self-referencing foreign key, a deferrable foreign-key cycle,
    /// a range-partitioned table with list sub-partitions, a unique root index,
    /// partition-level index and foreign key, extended statistics, a sequence owned by
    /// a column, several schemas and mixed-case names. Statement triggers fill
    /// `"Audit Log"."Entries"`, so changes fire triggers.
    pub const WHOLE_SCHEMA: &str = r#"CREATE EXTENSION citext;
CREATE EXTENSION pgcrypto;
CREATE SCHEMA app;
CREATE SCHEMA "Audit Log";
CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN app.year AS integer CHECK (VALUE BETWEEN 1900 AND 2100);
CREATE DOMAIN app.email AS citext CHECK (VALUE ~ '@');
CREATE TYPE app.money_pair AS (amount numeric(12,2), currency char(3));
CREATE TYPE app.floatrange AS RANGE (subtype = float8, subtype_diff = float8mi);
CREATE FUNCTION app.add_tax(numeric) RETURNS numeric LANGUAGE sql IMMUTABLE AS $$ SELECT $1 * 1.2 $$;
CREATE FUNCTION app.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
CREATE FUNCTION "Audit Log".record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO "Audit Log"."Entries" (tbl, op) VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$;
CREATE FUNCTION app.sum_sq_step(numeric, numeric) RETURNS numeric LANGUAGE sql IMMUTABLE AS $$ SELECT coalesce($1, 0) + $2 * $2 $$;
CREATE AGGREGATE app.sum_sq(numeric) (SFUNC = app.sum_sq_step, STYPE = numeric, INITCOND = '0');
CREATE TABLE "Audit Log"."Entries" (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tbl text NOT NULL, op text NOT NULL, at timestamptz DEFAULT now());
CREATE TABLE app.people (
  id int GENERATED BY DEFAULT AS IDENTITY (START WITH 100 INCREMENT BY 5) PRIMARY KEY,
  name text NOT NULL, email app.email UNIQUE, born app.year, mood app.mood DEFAULT 'ok',
  wallet app.money_pair, span app.floatrange, secret bytea DEFAULT gen_random_bytes(4),
  boss int REFERENCES app.people (id),
  name_len int GENERATED ALWAYS AS (length(name)) STORED,
  search tsvector GENERATED ALWAYS AS (to_tsvector('english', name)) STORED,
  updated_at timestamptz);
CREATE PROCEDURE app.reset_moods() LANGUAGE sql AS $$ UPDATE app.people SET mood = 'ok' $$;
CREATE INDEX people_search ON app.people USING gin (search);
COMMENT ON INDEX app.people_search IS 'full text';
CREATE STATISTICS app.people_born_mood (dependencies) ON born, mood FROM app.people;
CREATE TRIGGER people_touch BEFORE UPDATE ON app.people FOR EACH ROW EXECUTE FUNCTION app.touch();
CREATE TRIGGER people_audit AFTER INSERT OR UPDATE OR DELETE ON app.people FOR EACH STATEMENT EXECUTE FUNCTION "Audit Log".record();
CREATE TRIGGER people_never BEFORE DELETE ON app.people FOR EACH ROW EXECUTE FUNCTION app.touch();
ALTER TABLE app.people DISABLE TRIGGER people_never;
CREATE TABLE app."Teams" ("Id" serial PRIMARY KEY, name text, captain int);
CREATE TABLE app.members (team int NOT NULL, person int NOT NULL, PRIMARY KEY (team, person));
ALTER TABLE app."Teams" ADD CONSTRAINT teams_captain FOREIGN KEY (captain) REFERENCES app.people (id) DEFERRABLE INITIALLY DEFERRED;
CREATE TABLE app.a (id int PRIMARY KEY, b_id int);
CREATE TABLE app.b (id int PRIMARY KEY, a_id int REFERENCES app.a (id) DEFERRABLE INITIALLY DEFERRED);
ALTER TABLE app.a ADD CONSTRAINT a_b FOREIGN KEY (b_id) REFERENCES app.b (id) DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE app.members ADD FOREIGN KEY (team) REFERENCES app."Teams" ("Id"), ADD FOREIGN KEY (person) REFERENCES app.people (id) ON DELETE CASCADE;
CREATE TABLE app.measurements (id int NOT NULL, at date NOT NULL, region text NOT NULL, value numeric CHECK (value >= 0), person int) PARTITION BY RANGE (at);
CREATE UNIQUE INDEX measurements_key ON app.measurements (id, at, region);
CREATE TABLE app.measurements_2024 PARTITION OF app.measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') PARTITION BY LIST (region);
CREATE TABLE app.measurements_2024_eu PARTITION OF app.measurements_2024 FOR VALUES IN ('eu');
CREATE TABLE app.measurements_2024_other PARTITION OF app.measurements_2024 DEFAULT;
CREATE TABLE app.measurements_2025 PARTITION OF app.measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE INDEX measurements_2025_value ON app.measurements_2025 (value);
ALTER TABLE app.measurements_2025 ADD CONSTRAINT m2025_person FOREIGN KEY (person) REFERENCES app.people (id);
CREATE TABLE app.tags (tag text PRIMARY KEY, note text);
CREATE RULE tags_no_delete AS ON DELETE TO app.tags WHERE old.tag = 'keep' DO INSTEAD NOTHING;
ALTER TABLE app.tags ENABLE ROW LEVEL SECURITY;
CREATE POLICY tags_visible ON app.tags USING (tag <> 'hidden');
CREATE VIEW app.adults AS SELECT id, name, born FROM app.people WHERE born < 2006;
CREATE VIEW app.adult_names AS SELECT name FROM app.adults;
CREATE MATERIALIZED VIEW app.mood_counts AS SELECT mood, count(*) AS n FROM app.people GROUP BY mood;
CREATE UNIQUE INDEX mood_counts_mood ON app.mood_counts (mood);
CREATE MATERIALIZED VIEW app.never_filled AS SELECT 1 AS one WITH NO DATA;
COMMENT ON TABLE app.people IS 'Everyone we know';
COMMENT ON COLUMN app.people.born IS 'Year of birth';
COMMENT ON FUNCTION app.add_tax(numeric) IS 'VAT';
COMMENT ON TYPE app.mood IS 'How it goes';
CREATE TABLE public.plain (k text, v int);
CREATE SEQUENCE app.invoice_no START 1000;
CREATE TABLE app.invoices (no int DEFAULT nextval('app.invoice_no') PRIMARY KEY, person int REFERENCES app.people);
ALTER SEQUENCE app.invoice_no OWNED BY app.invoices.no;
INSERT INTO app.people (name, email, born, mood, wallet, span) VALUES
 ('Ann', 'ann@x.org', 1980, 'happy', '(10.50,EUR)', '[1.5,2.5)'),
 ('Bob', 'BOB@x.org', 2010, 'sad', NULL, NULL);
UPDATE app.people SET boss = 100 WHERE name = 'Bob';
INSERT INTO app."Teams" (name, captain) VALUES ('red', 100), ('blue', NULL);
INSERT INTO app.members VALUES (1, 100), (1, 105), (2, 105);
BEGIN; INSERT INTO app.a VALUES (1, 1); INSERT INTO app.b VALUES (1, 1); COMMIT;
INSERT INTO app.measurements SELECT g, date '2024-01-01' + g, CASE WHEN g % 3 = 0 THEN 'eu' ELSE 'us' END, g, CASE WHEN g % 2 = 0 THEN 100 END FROM generate_series(1, 600) g;
INSERT INTO app.tags VALUES ('keep', 'k'), ('hidden', 'h'), ('x', NULL);
INSERT INTO app.invoices (person) VALUES (100), (105);
INSERT INTO public.plain VALUES ('a', 1), ('a', 1);
REFRESH MATERIALIZED VIEW app.mood_counts;
"#;

    /// What each major version added that a schema may use, for servers that have it
    /// (see [`whole_schema_for`]): objects, their rows, and changes for an incremental.
    #[derive(Debug)]
    pub struct VersionFeatures {
        pub since: u32,
        pub ddl: &'static str,
        pub changes: &'static str,
    }

    pub const VERSION_FEATURES: &[VersionFeatures] = &[
        // 14: SQL-standard function bodies, multiranges (a range type's own included).
        VersionFeatures {
            since: 14,
            ddl: r#"CREATE FUNCTION app.people_count() RETURNS bigint LANGUAGE sql STABLE
  BEGIN ATOMIC SELECT count(*) FROM app.people WHERE CASE WHEN born IS NULL THEN true ELSE born > 0 END; END;
CREATE TABLE app.rooms (id int PRIMARY KEY, free int4multirange NOT NULL DEFAULT '{}', busy app.floatmultirange);
CREATE PROCEDURE app.book(room int, slot int4range) LANGUAGE sql
  BEGIN ATOMIC UPDATE app.rooms SET free = free - int4multirange(slot) WHERE id = room; END;
INSERT INTO app.rooms VALUES (1, '{[1,3), [5,8)}', '{[1.5,2.5), [3,4]}'), (2, '{}', NULL), (3, '{[10,20)}', '{}');
"#,
            changes: "CALL app.book(1, '[5,6)'); DELETE FROM app.rooms WHERE id = 2;                       INSERT INTO app.rooms VALUES (4, '{[0,1)}', '{(,0)}');",
        },
        // 15: UNIQUE NULLS NOT DISTINCT, security_invoker views.
        VersionFeatures {
            since: 15,
            ddl: r#"CREATE TABLE app.codes (code text, region text, UNIQUE NULLS NOT DISTINCT (code, region));
CREATE VIEW app.people_invoker WITH (security_invoker = true) AS SELECT id, name FROM app.people;
INSERT INTO app.codes VALUES ('a', NULL), ('b', 'eu'), ('c', NULL);
"#,
            changes: "MERGE INTO app.codes c USING (VALUES ('a', 'us'), ('d', NULL)) v(code, region)                       ON c.code = v.code WHEN MATCHED THEN UPDATE SET region = v.region                       WHEN NOT MATCHED THEN INSERT VALUES (v.code, v.region);                       DELETE FROM app.codes WHERE code = 'c';",
        },
        // 16: SYSTEM_USER, any_value(), underscores in numeric literals.
        VersionFeatures {
            since: 16,
            ddl: r#"CREATE TABLE app.logins (id int PRIMARY KEY, who text DEFAULT SYSTEM_USER, quota bigint DEFAULT 1_000_000);
CREATE VIEW app.any_mood AS SELECT boss, any_value(mood) AS mood FROM app.people GROUP BY boss;
INSERT INTO app.logins (id) SELECT g FROM generate_series(1, 30) g;
"#,
            changes: "DELETE FROM app.logins WHERE id % 4 = 0; UPDATE app.logins SET quota = 0x10 WHERE id = 1;                       INSERT INTO app.logins (id) VALUES (31);",
        },
        // 17: identity columns on partitioned tables, JSON_TABLE.
        VersionFeatures {
            since: 17,
            ddl: r#"CREATE TABLE app.readings (id bigint GENERATED ALWAYS AS IDENTITY, at date NOT NULL, value numeric, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE app.readings_2024 PARTITION OF app.readings FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE app.readings_2025 PARTITION OF app.readings FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE VIEW app.json_rows AS SELECT jt.* FROM JSON_TABLE('[{"a": 1, "b": "x"}, {"a": 2}]', '$[*]' COLUMNS (a int PATH '$.a', b text PATH '$.b' DEFAULT 'none' ON EMPTY)) jt;
INSERT INTO app.readings (at, value) SELECT date '2024-06-01' + g * 2, g FROM generate_series(1, 200) g;
"#,
            changes: "UPDATE app.readings SET value = -value WHERE id % 9 = 0; DELETE FROM app.readings WHERE id % 10 = 0;                       INSERT INTO app.readings (at, value) VALUES ('2025-12-31', 0.5);",
        },
        // 18: virtual generated columns, uuidv7(), NOT ENFORCED constraints, temporal keys.
        VersionFeatures {
            since: 18,
            ddl: r#"CREATE EXTENSION btree_gist;
CREATE TABLE app.orders (id uuid DEFAULT uuidv7() PRIMARY KEY, qty int NOT NULL, price numeric NOT NULL,
  total numeric GENERATED ALWAYS AS (qty * price) VIRTUAL,
  CONSTRAINT qty_small CHECK (qty < 1000) NOT ENFORCED);
CREATE TABLE app.rates (room int, valid daterange, rate numeric, PRIMARY KEY (room, valid WITHOUT OVERLAPS));
INSERT INTO app.orders (qty, price) SELECT g, g * 1.5 FROM generate_series(1, 50) g;
INSERT INTO app.orders (qty, price) VALUES (5000, 1);
INSERT INTO app.rates VALUES (1, '[2024-01-01,2024-07-01)', 10), (1, '[2024-07-01,2025-01-01)', 12), (2, '[2024-01-01,)', 9);
"#,
            changes: "UPDATE app.orders SET qty = qty + 1 WHERE qty % 3 = 0; DELETE FROM app.orders WHERE qty % 7 = 0;                       INSERT INTO app.orders (qty, price) VALUES (77, 7);                       UPDATE app.rates SET rate = 13 WHERE room = 1 AND valid = '[2024-07-01,2025-01-01)';",
        },
    ];

    /// [`WHOLE_SCHEMA`] (which runs on every supported version) and the features of
    /// every version up to `major`.
    pub fn whole_schema_for(major: u32) -> String {
        let mut sql = WHOLE_SCHEMA.to_owned();
        for f in VERSION_FEATURES.iter().filter(|f| f.since <= major) {
            sql.push_str(f.ddl);
        }
        sql
    }

    /// Backs up every schema of [`WHOLE_SCHEMA`] (so the schema is captured whole, `pg_dump`
    /// without `-n`), in chunks of 200 rows.
    pub fn whole_schema_options() -> ExportOptions {
        let mut opts = ExportOptions {
            progress_interval: Duration::ZERO,
            ..ExportOptions::default()
        };
        opts.settings.chunk_rows = 200;
        opts.settings.workers = 2;
        opts.settings.selection.schemas = WHOLE_SCHEMA_SCHEMAS
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        opts
    }

    /// A new database on `cluster` with [`whole_schema_for`] its major, analyzed.
    pub async fn whole_schema_db(cluster: &super::TestCluster) -> TestDatabase {
        let major = cluster.server_version_num().await / 10_000;
        let db = cluster.create_database().await;
        exec(&db.settings(), &whole_schema_for(major)).await;
        exec(&db.settings(), "ANALYZE").await;
        db
    }

    /// The changes [`whole_schema_for`]`(major)` gets between two backups.
    pub fn whole_schema_changes_for(major: u32) -> String {
        let mut sql = String::from(
            r#"UPDATE app.people SET mood = 'happy' WHERE name = 'Bob';
INSERT INTO app.people (name, email, born, boss) VALUES ('Cid', 'cid@x.org', 1990, 105);
DELETE FROM app.members WHERE team = 2;
DELETE FROM app.measurements WHERE id % 7 = 0;
UPDATE app.measurements SET value = value + 1 WHERE id % 5 = 0;
INSERT INTO app.measurements VALUES (9001, '2025-06-01', 'eu', 5, 100);
UPDATE app.tags SET note = 'changed' WHERE tag = 'x';
INSERT INTO app.invoices (person) VALUES (110);
INSERT INTO public.plain VALUES ('b', 2);
REFRESH MATERIALIZED VIEW app.mood_counts;
"#,
        );
        for f in VERSION_FEATURES.iter().filter(|f| f.since <= major) {
            sql.push_str(f.changes);
            sql.push('\n');
        }
        sql
    }

    /// The schemas of [`WHOLE_SCHEMA`].
    pub const WHOLE_SCHEMA_SCHEMAS: &[&str] = &["Audit Log", "app", "public"];

    pub const CHAIN_TABLES: &[(&str, &str)] =
        &[("accounts", "1"), ("events", "1"), ("settings", "1, 2")];

    /// Slices until done, then seals.
    pub async fn backup(
        store: &Store,
        db: &TestDatabase,
        opts: &ExportOptions,
    ) -> (SealReport, Vec<SliceReport>) {
        backup_of(store, &db.settings(), opts).await
    }

    /// [`backup`] of any database.
    pub async fn backup_of(
        store: &Store,
        settings: &tidemark_core::db::DbSettings,
        opts: &ExportOptions,
    ) -> (SealReport, Vec<SliceReport>) {
        let mut slices = Vec::new();
        let mut opts = opts.clone();
        let mut retries = 0;
        loop {
            // Like the state machine: retry what is retryable, a few times.
            let report = match export_slice(store.clone(), settings, &opts).await {
                Ok(report) => report,
                Err(e) if e.is_retryable() && retries < 3 => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => panic!("export slice: {e}"),
            };
            opts.run_id = Some(report.run_id.clone());
            let done = report.done;
            let fan_out = report.fan_out;
            slices.push(report);
            if done {
                break;
            }
            if fan_out {
                run_workers(store, settings, &opts).await;
            }
        }
        let run_id = opts.run_id.clone().expect("a run");
        let sealed = seal_run(store.clone(), &run_id, "test")
            .await
            .expect("seal");
        (sealed, slices)
    }

    /// The `concurrency` workers of a fanned-out run at once, as the state machine's Map
    /// runs them; returns their reports.
    pub async fn run_workers(
        store: &Store,
        settings: &tidemark_core::db::DbSettings,
        opts: &ExportOptions,
    ) -> Vec<WorkerReport> {
        let mut workers = tokio::task::JoinSet::new();
        for slot in 0..opts.settings.concurrency.max(1) {
            let mut worker = opts.clone();
            worker.worker_slot = slot;
            let (store, settings) = (store.clone(), settings.clone());
            workers.spawn(async move { export_worker(store, &settings, &worker).await });
        }
        let mut reports = Vec::new();
        while let Some(joined) = workers.join_next().await {
            match joined.expect("worker task") {
                Ok(report) => reports.push(report),
                // Like the Map's retry of a failed iteration: the next workers go on.
                Err(e) if e.is_retryable() => eprintln!("worker failed: {e}"),
                Err(e) => panic!("export worker: {e}"),
            }
        }
        reports
    }

    pub async fn manifest(store: &Store, id: &str) -> Manifest {
        read_doc::<Manifest>(store.as_ref(), &manifest_key(id))
            .await
            .expect("read manifest")
            .expect("manifest exists")
            .0
    }

    pub async fn chain_fixture(db: &TestDatabase) {
        exec(
            &db.settings(),
            &format!(
                "{CHAIN_DDL}
                INSERT INTO accounts SELECT g, g * 10, 'acct ' || g FROM generate_series(1, 1000) g;
                INSERT INTO events (payload) SELECT 'event ' || g FROM generate_series(1, 2000) g;
                INSERT INTO settings SELECT 'k' || g, 'v' || g FROM generate_series(1, 10) g;
                ANALYZE;"
            ),
        )
        .await;
    }
}

/// Runs a CLI binary with `args`, a clean Tidemark environment plus `envs`.
pub fn run_cli(binary: &str, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(binary);
    cmd.args(args);
    for var in [
        "DATABASE_URL",
        "TIDEMARK_STORE",
        "TIDEMARK_SECRET_ID",
        "TIDEMARK_CA_FILE",
        "TIDEMARK_SCRATCH_URL",
        "TIDEMARK_TARGET_URL",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run the binary")
}
