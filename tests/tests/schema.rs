//! Whole-database fidelity: every schema object restores, not only tables. The oracles
//! are the cluster's own `pg_dump --schema-only` of the source and of the restore, and
//! sorted COPY output of every table; Tidemark writes neither.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tidemark_core::db::relay::Relay;
use tidemark_core::db::DbSettings;
use tidemark_core::export::ExportOptions;
use tidemark_core::restore::{self, RestoreError, RestoreOptions};
use tidemark_core::schema::{PgDump, Program};
use tidemark_core::store::S3StoreOptions;
use tidemark_core::verify;
use tidemark_tests::fixtures::*;
use tidemark_tests::{
    all_data, assert_identical, assert_same_data, exec, local_store, migrated_copy, restore_fresh,
    s3_store, state_facts, verify_backup, TestCluster, TestDatabase,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_object_kind_restores_identical_to_the_source_and_verify_checks_the_schema() {
    let cluster = TestCluster::from_env();
    let db = whole_schema_db(&cluster).await;
    let store: Store = Arc::new(s3_store(S3StoreOptions::default()).await);
    let opts = whole_schema_options();
    let (full, _) = backup(&store, &db, &opts).await;
    let m = manifest(&store, &full.backup_id).await;
    let dump = m.schema_dump.as_ref().expect("schema captured");
    assert!(dump.pre_data.raw_bytes > 1000 && dump.globals.is_some());

    // Changes, some of them made by triggers: the statement trigger writes audit rows,
    // the row trigger sets updated_at.
    exec(
        &db.settings(),
        r#"UPDATE app.people SET mood = 'happy' WHERE name = 'Bob';
           INSERT INTO app.people (name, email, born, boss) VALUES ('Cid', 'cid@x.org', 1990, 105);
           DELETE FROM app.members WHERE team = 2;
           INSERT INTO app.measurements VALUES (9001, '2025-06-01', 'eu', 5, 100);
           UPDATE app.tags SET note = 'changed' WHERE tag = 'x';
           INSERT INTO app.invoices (person) VALUES (110);
           REFRESH MATERIALIZED VIEW app.mood_counts;"#,
    )
    .await;
    let (incr, _) = backup(&store, &db, &opts).await;
    assert_eq!(incr.kind.to_string(), "incremental");

    let restored = restore_fresh(&store, &cluster, &incr.backup_id).await;
    assert_identical(&db, &restored).await;

    let record = verify_backup(&store, &cluster, &incr.backup_id).await;
    let schema = record.schema.clone().expect("schema compared");
    assert!(record.ok && schema.ok, "{record:?}");
    assert!(schema.objects > 60, "{schema:?}");

    // Drop an object from a restore by hand, change another: the comparison names both.
    exec(
        &restored.settings(),
        "DROP TRIGGER people_audit ON app.people;
         CREATE OR REPLACE FUNCTION app.add_tax(numeric) RETURNS numeric LANGUAGE sql IMMUTABLE AS $$ SELECT $1 * 1.25 $$;",
    )
    .await;
    let m = manifest(&store, &incr.backup_id).await;
    let tool = PgDump::locate(None).await.expect("pg_dump");
    let (tables, schema) =
        verify::compare_restored(store.as_ref(), &m, &restored.settings(), &tool, 2)
            .await
            .expect("compare");
    assert!(tables.iter().all(|t| t.ok));
    assert!(!schema.ok);
    assert_eq!(
        schema.differences,
        vec![
            "different: FUNCTION app.add_tax(numeric)",
            "missing: TRIGGER people people_audit (schema app)"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_fails_naming_an_object_the_restore_did_not_bring_back() {
    // An extension the verification server cannot create: the restore fails in its
    // preflight, naming it, and the failed verification still records what it measured.
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 50);",
    )
    .await;
    let (_dir, store) = local_store();
    let store: Store = Arc::new(store);
    let (sealed, _) = backup(&store, &db, &whole_schema_options()).await;
    // Rewrite the recorded pre-data with an extension that does not exist, as a backup
    // from a server with more extensions would be; re-seal so only the extension differs.
    let mut m = manifest(&store, &sealed.backup_id).await;
    let dump = m.schema_dump.as_mut().expect("dump");
    let text = tidemark_core::schema::load_text(store.as_ref(), &dump.pre_data)
        .await
        .expect("pre-data");
    let with_extension = format!(
        "--\n-- Name: no_such_ext; Type: EXTENSION; Schema: -; Owner: -\n--\n\nCREATE EXTENSION IF NOT EXISTS no_such_ext WITH SCHEMA public;\n\n{text}"
    );
    let compressed = zstd::encode_all(with_extension.as_bytes(), 3).expect("zstd");
    let receipt = store
        .put(
            &dump.pre_data.key,
            bytes::Bytes::from(compressed),
            tidemark_core::store::WriteCondition::Always,
        )
        .await
        .expect("put");
    dump.pre_data.bytes = receipt.size;
    dump.pre_data.raw_bytes = with_extension.len() as u64;
    dump.pre_data.sha256 = receipt.sha256;
    tidemark_core::format::manifest::write_manifest(
        store.as_ref(),
        &m,
        tidemark_core::store::WriteCondition::Always,
    )
    .await
    .expect("write manifest");

    let target = cluster.create_database().await;
    let err = restore::restore(
        store.clone(),
        &m,
        &target.settings(),
        &RestoreOptions::default(),
    )
    .await
    .expect_err("refused");
    assert!(
        matches!(&err, RestoreError::MissingExtensions(names) if names == &vec!["no_such_ext".to_owned()]),
        "{err}"
    );
    let left: i64 = tidemark_core::db::connect(&target.settings())
        .await
        .expect("connect")
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "nothing was written");
    let record = verify_backup(&store, &cluster, &m.id).await;
    assert!(!record.ok);
    assert!(
        record
            .error
            .as_deref()
            .is_some_and(|e| e.contains("no_such_ext")),
        "{record:?}"
    );
}

fn as_user(target: &TestDatabase, user: &str, password: &str) -> DbSettings {
    let mut settings = target.settings();
    settings.user = user.to_owned();
    settings.password = Some(password.to_owned().into());
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_only_into_a_migrated_schema_keeps_foreign_keys_and_triggers_quiet() {
    let cluster = TestCluster::from_env();
    let db = whole_schema_db(&cluster).await;
    let (_dir, store) = local_store();
    let store: Store = Arc::new(store);
    let (sealed, _) = backup(&store, &db, &whole_schema_options()).await;
    let m = manifest(&store, &sealed.backup_id).await;
    let data_only = RestoreOptions {
        settings: tidemark_core::restore::RestoreSettings {
            data_only: true,
            ..tidemark_core::restore::RestoreSettings::default()
        },
        ..RestoreOptions::default()
    };

    // As a superuser: every trigger off during the load, then back as it was (the
    // disabled one stays disabled); no audit row is added by the load.
    let target = migrated_copy(&cluster, &db.name, None).await;
    let report = restore::restore(store.clone(), &m, &target.settings(), &data_only)
        .await
        .expect("data-only restore");
    assert!(
        report
            .data_only
            .as_deref()
            .is_some_and(|d| d.contains("superuser")),
        "{report:?}"
    );
    assert_same_data(&db, &target).await;
    assert_eq!(
        state_facts(&db.settings()).await,
        state_facts(&target.settings()).await
    );
    // --clean empties every table at once (they reference each other) and loads again.
    let clean = RestoreOptions {
        settings: tidemark_core::restore::RestoreSettings {
            data_only: true,
            clean: true,
            ..tidemark_core::restore::RestoreSettings::default()
        },
        ..RestoreOptions::default()
    };
    restore::restore(store.clone(), &m, &target.settings(), &clean)
        .await
        .expect("data-only --clean");
    assert_same_data(&db, &target).await;

    // As the owner of the tables, not a superuser: foreign-key order, the a <-> b cycle
    // deferred, the self-referencing people table landed in one statement.
    let role = format!("restorer_{}", &target.name[2..10]);
    exec(
        &cluster.settings("postgres"),
        &format!("CREATE ROLE {role} LOGIN PASSWORD 'restorer-pw'"),
    )
    .await;
    let owned = migrated_copy(&cluster, &db.name, Some((&role, "restorer-pw"))).await;
    let report = restore::restore(
        store.clone(),
        &m,
        &as_user(&owned, &role, "restorer-pw"),
        &data_only,
    )
    .await
    .expect("data-only restore as the owner");
    assert!(
        report
            .data_only
            .as_deref()
            .is_some_and(|d| d.contains("foreign-key order")),
        "{report:?}"
    );
    assert_same_data(&db, &owned).await;

    // A database error while loading names the table and the server's message; the
    // chunk is not called corrupt. The other tables are loaded all the same.
    let strict = migrated_copy(&cluster, &db.name, None).await;
    exec(
        &strict.settings(),
        "ALTER TABLE app.tags ADD CONSTRAINT tags_no_x CHECK (tag <> 'x')",
    )
    .await;
    let err = restore::restore(store.clone(), &m, &strict.settings(), &data_only)
        .await
        .expect_err("the check refuses a row");
    let text = err.to_string();
    assert!(
        matches!(&err, RestoreError::TablesFailed { failed, .. }
            if failed.len() == 1 && failed[0].tables.iter().map(ToString::to_string).eq(["app.tags"])),
        "{text}"
    );
    assert!(
        text.contains("tags_no_x") && !text.contains("corrupt"),
        "{text}"
    );
    let (want, got) = (
        all_data(&db.settings()).await,
        all_data(&strict.settings()).await,
    );
    for (table, rows) in want.iter().filter(|(t, _)| t.as_str() != "app.tags") {
        assert_eq!(rows, &got[table], "{table}");
    }
    drop(owned);
    exec(&cluster.settings("postgres"), &format!("DROP ROLE {role}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_subset_brings_its_own_objects_and_skips_foreign_keys_out_of_it() {
    let cluster = TestCluster::from_env();
    let db = whole_schema_db(&cluster).await;
    let (_dir, store) = local_store();
    let store: Store = Arc::new(store);
    let (sealed, _) = backup(&store, &db, &whole_schema_options()).await;
    let m = manifest(&store, &sealed.backup_id).await;
    let target = cluster.create_database().await;
    let report = restore::restore(
        store.clone(),
        &m,
        &target.settings(),
        &RestoreOptions {
            settings: tidemark_core::restore::RestoreSettings {
                tables: vec!["app.members".into(), "app.\"Teams\"".into()],
                ..tidemark_core::restore::RestoreSettings::default()
            },
            ..RestoreOptions::default()
        },
    )
    .await
    .expect("subset restore");
    let warnings = report.warnings.join("\n");
    assert!(
        warnings.contains("members_person_fkey") && warnings.contains("teams_captain"),
        "{warnings}"
    );
    let client = tidemark_core::db::connect(&target.settings())
        .await
        .expect("connect");
    let facts: Vec<String> = client
        .query(
            "SELECT conrelid::regclass || ' ' || conname FROM pg_constraint \
               WHERE connamespace = 'app'::regnamespace AND conrelid <> 0 AND contype <> 'n' \
             UNION ALL SELECT 'table ' || c.oid::regclass FROM pg_class c \
               WHERE relnamespace = 'app'::regnamespace AND relkind IN ('r', 'p', 'v', 'm') \
             UNION ALL SELECT 'type ' || typname FROM pg_type \
               WHERE typnamespace = 'app'::regnamespace AND typtype IN ('e', 'd') ORDER BY 1",
            &[],
        )
        .await
        .expect("facts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        facts,
        vec![
            "app.\"Teams\" Teams_pkey",
            "app.members members_pkey",
            "app.members members_team_fkey",
            "table app.\"Teams\"",
            "table app.members",
            "type email",
            "type mood",
            "type year",
        ]
    );
    let data = |d: BTreeMap<String, Vec<String>>| -> Vec<Vec<String>> {
        ["app.\"Teams\"", "app.members"]
            .iter()
            .map(|t| d[*t].clone())
            .collect()
    };
    assert_eq!(
        data(all_data(&db.settings()).await),
        data(all_data(&target.settings()).await)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_dump_without_tls_reaches_a_tls_only_server_through_the_relay() {
    let cluster = TestCluster::from_env();
    let pg_dump_18 = std::path::PathBuf::from(
        std::env::var("TIDEMARK_TEST_PG_DUMP_18")
            .expect("TIDEMARK_TEST_PG_DUMP_18: run scripts/test"),
    );
    let role = std::env::var("TIDEMARK_TEST_PG_TLS_ONLY_ROLE").expect("tls-only role");
    let password = "tls-only-Pa55:word\\x";
    exec(
        &cluster.settings("postgres"),
        &format!(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN SUPERUSER; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
             ALTER ROLE {role} PASSWORD '{}'",
            password.replace('\'', "''")
        ),
    )
    .await;
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');",
    )
    .await;
    let mut settings = as_user(&db, &role, password);
    // The role cannot connect without TLS (pg_hba hostnossl ... reject).
    let mut plain = settings.clone();
    plain.sslmode = tidemark_core::db::SslMode::Disable;
    let refused = tidemark_core::db::connect(&plain)
        .await
        .expect_err("refused");
    // ("no encryption" from 14 on, "SSL off" before.)
    let refused = refused.to_string();
    assert!(
        refused.contains("no encryption") || refused.contains("SSL off"),
        "{refused}"
    );

    // A wrapper that records how pg_dump and pg_dumpall are started, then runs them.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("calls.log");
    for name in ["pg_dump", "pg_dumpall"] {
        let wrapper = dir.path().join(name);
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\necho \"args: $* | passfile mode: $(stat -c %a \"$PGPASSFILE\" 2>/dev/null) | PGPASSWORD set: ${{PGPASSWORD+yes}}\" >> '{log}'\nexec '{real}' \"$@\"\n",
                log = log.display(),
                real = pg_dump_18.with_file_name(name).display()
            ),
        )
        .expect("wrapper");
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
    }
    let (_store_dir, store) = local_store();
    let store: Store = Arc::new(store);
    let opts = ExportOptions {
        pg_dump: Some(dir.path().join("pg_dump")),
        progress_interval: Duration::ZERO,
        ..ExportOptions::default()
    };
    assert_eq!(settings.sslmode, tidemark_core::db::SslMode::VerifyFull);
    let report = tidemark_core::export::export_slice(store.clone(), &settings, &opts)
        .await
        .expect("export through the relay");
    assert!(report.done);
    let sealed = tidemark_core::manifest::seal_run(store.clone(), &report.run_id, "test")
        .await
        .expect("seal");
    let m = manifest(&store, &sealed.backup_id).await;
    let dump = m.schema_dump.expect("schema");
    assert!(dump.pg_dump_version.starts_with("18."));
    assert!(
        dump.globals.is_some(),
        "pg_dumpall ran too: {:?}",
        m.warnings
    );
    let calls = std::fs::read_to_string(&log).expect("log");
    // pre-data, post-data and globals (besides --version), each with a 0600 password
    // file, no PGPASSWORD, and no password in the arguments.
    let dumps: Vec<&str> = calls.lines().filter(|l| !l.contains("--version")).collect();
    assert_eq!(dumps.len(), 3, "{calls}");
    for call in dumps {
        assert!(
            call.contains("passfile mode: 600 |") && call.ends_with("PGPASSWORD set: "),
            "{call}"
        );
    }
    assert!(
        !calls.contains(password) && !calls.contains("tls-only-Pa55"),
        "{calls}"
    );

    // A wrong CA: the relay refuses the server, and says so.
    settings.ca_file = Some("/etc/ssl/certs/ca-certificates.crt".into());
    let tool = PgDump::locate(Some(&pg_dump_18)).await.expect("pg_dump 18");
    let relay = Relay::start(&settings).await.expect("relay");
    let err = tool
        .run(
            Program::PgDump,
            &relay,
            &settings,
            &["--schema-only".to_owned()],
        )
        .await
        .expect_err("certificate refused");
    let text = err.to_string();
    assert!(
        text.contains("tidemark relay") && text.contains("certificate verify failed"),
        "{text}"
    );
    assert!(!text.contains(password));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_come_back_through_tidemark_and_by_hand_with_psql() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        "CREATE TABLE docs (id int PRIMARY KEY, body oid); \
         INSERT INTO docs VALUES (1, lo_from_bytea(0, 'hello')), (2, lo_from_bytea(0, ''));",
    )
    .await;
    let (_dir, store) = local_store();
    let store: Store = Arc::new(store);
    let (sealed, _) = backup(&store, &db, &ExportOptions::default()).await;
    let m = manifest(&store, &sealed.backup_id).await;
    let dump = m.schema_dump.as_ref().expect("schema");
    assert_eq!(dump.large_objects, 2);
    assert_eq!(dump.large_objects_fingerprint.map(|f| f.rows), Some(2));
    let contents = "SELECT string_agg(encode(lo_get(body), 'escape'), ',' ORDER BY id) FROM docs";
    let read = |settings: DbSettings| async move {
        let client = tidemark_core::db::connect(&settings)
            .await
            .expect("connect");
        let text: String = client.query_one(contents, &[]).await.expect("read").get(0);
        text
    };
    assert_eq!(read(db.settings()).await, "hello,");

    let restored = restore_fresh(&store, &cluster, &sealed.backup_id).await;
    assert_eq!(read(restored.settings()).await, "hello,");

    // By hand, as the README shows: the schema, the rows, then the large-objects script.
    let by_hand = migrated_copy(&cluster, &db.name, None).await;
    let script = String::from_utf8(
        tidemark_tests::chunk_text(
            store.as_ref(),
            &dump.large_objects_script.as_ref().expect("script").key,
        )
        .await,
    )
    .expect("UTF-8");
    let script: String = script
        .lines()
        .filter(|l| !l.starts_with("SELECT pg_catalog.setval"))
        .map(|l| format!("{l}\n"))
        .collect();
    tidemark_tests::psql_script(
        &cluster,
        &by_hand.name,
        &cluster.user,
        &cluster.password,
        &script,
    );
    let client = tidemark_core::db::connect(&db.settings())
        .await
        .expect("connect");
    let oids: Vec<u32> = client
        .query("SELECT oid FROM pg_largeobject_metadata ORDER BY oid", &[])
        .await
        .expect("oids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let copy = tidemark_core::db::connect(&by_hand.settings())
        .await
        .expect("connect");
    for oid in oids {
        let want: Vec<u8> = client
            .query_one("SELECT lo_get($1)", &[&oid])
            .await
            .expect("lo")
            .get(0);
        let got: Vec<u8> = copy
            .query_one("SELECT lo_get($1)", &[&oid])
            .await
            .expect("lo")
            .get(0);
        assert_eq!(want, got, "large object {oid}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backup_restores_by_hand_with_zstd_and_psql() {
    // What the README shows: pre-data, every chunk with \copy, post-data, sequences.
    let cluster = TestCluster::from_env();
    let db = whole_schema_db(&cluster).await;
    let (_dir, local) = local_store();
    let root = local.root().to_path_buf();
    let store: Store = Arc::new(local);
    let (sealed, _) = backup(&store, &db, &whole_schema_options()).await;
    let m = manifest(&store, &sealed.backup_id).await;
    let dump = m.schema_dump.clone().expect("schema");
    let target = cluster.create_database().await;
    let url = target.url(tidemark_core::db::SslMode::Prefer);
    let sh = |script: String| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    cluster.client_bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let psql = format!("psql '{url}' -X -q -v ON_ERROR_STOP=1");
    sh(format!(
        "zstd -dc '{}' | {psql}",
        root.join(&dump.pre_data.key).display()
    ));
    for entry in &m.tables {
        let columns: Vec<String> = entry
            .columns
            .iter()
            .map(|c| tidemark_core::format::quote_ident(c))
            .collect();
        for chunk in &entry.chunks {
            sh(format!(
                "zstd -dc '{}' | {psql} -c '\\copy {} ({}) FROM STDIN'",
                root.join(&chunk.key).display(),
                entry.name.quoted().replace('\'', "'\\''"),
                columns.join(", ").replace('\'', "'\\''"),
            ));
        }
    }
    sh(format!(
        "zstd -dc '{}' | {psql}",
        root.join(&dump.post_data.key).display()
    ));
    let setvals: Vec<String> = m
        .sequences
        .iter()
        .map(|s| {
            format!(
                "SELECT setval({}, {}, {});",
                tidemark_core::format::quote_literal(&s.name.quoted()),
                s.last_value,
                s.is_called
            )
        })
        .collect();
    exec(&target.settings(), &setvals.join("\n")).await;
    assert_identical(&db, &target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_some_schemas_captures_those_schemas_and_the_extensions() {
    // The database has a schema the backup does not cover: pg_dump is limited to the
    // covered schemas (-n) plus every extension (-e), and the restore still works into a
    // fresh database, whose public schema already exists.
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        "CREATE EXTENSION citext;
         CREATE TABLE users (id int PRIMARY KEY, email citext UNIQUE);
         CREATE VIEW emails AS SELECT email FROM users;
         INSERT INTO users VALUES (1, 'A@x.org'), (2, 'b@x.org');
         CREATE SCHEMA archive;
         CREATE TABLE archive.old (id int);",
    )
    .await;
    let (_dir, store) = local_store();
    let store: Store = Arc::new(store);
    let (sealed, _) = backup(&store, &db, &ExportOptions::default()).await;
    let m = manifest(&store, &sealed.backup_id).await;
    let selection = m.schema_dump.as_ref().expect("schema").selection.join(" ");
    assert!(
        selection.contains("-n \"public\"") && selection.contains("-e *"),
        "{selection}"
    );
    let restored = restore_fresh(&store, &cluster, &sealed.backup_id).await;
    let client = tidemark_core::db::connect(&restored.settings())
        .await
        .expect("connect");
    let found: Vec<String> = client
        .query(
            "SELECT c.oid::regclass::text FROM pg_class c WHERE relkind IN ('r', 'v') \
               AND relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace) ORDER BY 1",
            &[],
        )
        .await
        .expect("query")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(found, vec!["emails", "users"]);
    let record = verify_backup(&store, &cluster, &sealed.backup_id).await;
    assert!(record.ok, "{record:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_grants_and_missing_roles_restore_when_asked() {
    let cluster = TestCluster::from_env();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let (owner, reader) = (
        format!("own_{}", &suffix[..8]),
        format!("read_{}", &suffix[..8]),
    );
    let admin = cluster.settings("postgres");
    exec(
        &admin,
        &format!("CREATE ROLE {owner} NOLOGIN; CREATE ROLE {reader} NOLOGIN IN ROLE {owner}"),
    )
    .await;
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        &format!(
            "CREATE TABLE ledger (id int PRIMARY KEY, amount numeric);
             INSERT INTO ledger VALUES (1, 10), (2, 20);
             ALTER TABLE ledger OWNER TO {owner};
             GRANT SELECT ON ledger TO {reader};"
        ),
    )
    .await;
    let (_dir, store) = local_store();
    let store: Store = Arc::new(store);
    let (sealed, _) = backup(&store, &db, &ExportOptions::default()).await;
    let m = manifest(&store, &sealed.backup_id).await;
    // The roles go away with the source, as on a new server.
    drop(db);
    exec(&admin, &format!("DROP ROLE {reader}; DROP ROLE {owner}")).await;

    let facts = |settings: DbSettings| {
        let (owner, reader) = (owner.clone(), reader.clone());
        async move {
            let client = tidemark_core::db::connect(&settings)
                .await
                .expect("connect");
            let row = client
                .query_one(
                    "SELECT pg_get_userbyid(relowner)::text, \
                            EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $2) \
                              AND has_table_privilege($2, 'public.ledger', 'SELECT'), \
                            EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) \
                              AND pg_has_role($2, $1, 'MEMBER') \
                     FROM pg_class WHERE oid = 'public.ledger'::regclass",
                    &[&owner, &reader],
                )
                .await
                .expect("facts");
            (
                row.get::<_, String>(0),
                row.get::<_, bool>(1),
                row.get::<_, bool>(2),
            )
        }
    };
    // By default: no owners, no grants, no roles created.
    let plain = cluster.create_database().await;
    restore::restore(
        store.clone(),
        &m,
        &plain.settings(),
        &RestoreOptions::default(),
    )
    .await
    .expect("restore");
    assert_eq!(
        facts(plain.settings()).await,
        (cluster.user.clone(), false, false)
    );
    // --roles --with-privileges: the roles come back with their membership, then the
    // owner and the grant.
    let full = cluster.create_database().await;
    let report = restore::restore(
        store.clone(),
        &m,
        &full.settings(),
        &RestoreOptions {
            settings: tidemark_core::restore::RestoreSettings {
                with_privileges: true,
                create_roles: true,
                ..tidemark_core::restore::RestoreSettings::default()
            },
            ..RestoreOptions::default()
        },
    )
    .await
    .expect("restore with privileges");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.starts_with("created roles:") && w.contains(&owner) && w.contains(&reader)),
        "{:?}",
        report.warnings
    );
    assert_eq!(facts(full.settings()).await, (owner.clone(), true, true));
    drop(full);
    drop(plain);
    exec(
        &admin,
        &format!("DROP ROLE IF EXISTS {reader}; DROP ROLE IF EXISTS {owner}"),
    )
    .await;
}
