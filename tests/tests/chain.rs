//! Chain integrity, tried as an adversarial user would: a full backup, a change, an
//! incremental, then the restore of the latest backup against the source (sorted COPY of
//! every table, the oracle) and verify's verdict. An incremental must never restore a
//! state the source was not in, and verify must say so when it cannot see.

use std::sync::Arc;
use std::time::Duration;

use tidemark_core::catalog::TableSelection;
use tidemark_core::export::ExportOptions;
use tidemark_core::format::manifest::Manifest;
use tidemark_core::format::{BackupKind, FingerprintOf, TableMode};
use tidemark_tests::fixtures::*;
use tidemark_tests::{all_data, exec, local_store, restore_fresh, verify_backup, TestCluster};

fn opts() -> ExportOptions {
    ExportOptions {
        settings: tidemark_core::export::ExportSettings {
            chunk_rows: 500,
            chunk_bytes: 1 << 30,
            workers: 2,
            selection: TableSelection::default(),
            ..tidemark_core::export::ExportSettings::default()
        },
        progress_interval: Duration::ZERO,
        ..ExportOptions::default()
    }
}

fn append(mut o: ExportOptions, table: &str) -> ExportOptions {
    o.settings
        .selection
        .modes
        .push((table.into(), TableMode::Append));
    o
}

/// A full backup of `setup`, then `change`, then an incremental; the latest backup must
/// restore to exactly the source and verify must pass. Returns the incremental's
/// manifest.
async fn case(setup: &str, change: &str, o: ExportOptions) -> Manifest {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(&db.settings(), setup).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let (full, _) = backup(&store, &db, &o).await;
    assert_eq!(full.kind, BackupKind::Full);
    exec(&db.settings(), change).await;
    let (inc, _) = backup(&store, &db, &o).await;
    assert_eq!(inc.kind, BackupKind::Incremental);
    let restored = restore_fresh(&store, &cluster, &inc.backup_id).await;
    assert_eq!(
        all_data(&restored.settings()).await,
        all_data(&db.settings()).await,
        "the incremental restores to the source"
    );
    let record = verify_backup(&store, &cluster, &inc.backup_id).await;
    assert!(record.ok, "verify: {record:#?}");
    manifest(&store, &inc.backup_id).await
}

fn entry<'a>(m: &'a Manifest, table: &str) -> &'a tidemark_core::format::manifest::TableEntry {
    m.tables
        .iter()
        .find(|t| t.name.name == table)
        .unwrap_or_else(|| panic!("{table} in the manifest"))
}

const KEYED: &str = "CREATE TABLE t (id int PRIMARY KEY, v text);
    INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 2000) g;
    CREATE TABLE other (id int PRIMARY KEY); INSERT INTO other VALUES (1), (2);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_table_restores_empty() {
    let m = case(KEYED, "TRUNCATE t", opts()).await;
    let t = entry(&m, "t");
    assert_eq!(t.fingerprint.rows, 0);
    assert!(t.has_key_set(), "an emptied table has an empty key set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_emptied_by_delete_restores_empty() {
    let m = case(KEYED, "DELETE FROM t", opts()).await;
    assert_eq!(entry(&m, "t").fingerprint.rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_and_re_added_column_is_a_new_chain() {
    let m = case(
        "CREATE TABLE s (id int PRIMARY KEY, a text, b int);
         INSERT INTO s SELECT g, 'a' || g, g FROM generate_series(1, 1000) g;",
        "ALTER TABLE s DROP COLUMN b; ALTER TABLE s ADD COLUMN b int;",
        opts(),
    )
    .await;
    let s = entry(&m, "s");
    assert!(
        s.new_chain.as_deref().is_some_and(|r| r.contains("column")),
        "{:?}",
        s.new_chain
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_swapped_by_renames_are_new_chains() {
    let m = case(
        "CREATE TABLE s (id int PRIMARY KEY, v text);
         INSERT INTO s SELECT g, 'old ' || g FROM generate_series(1, 1000) g;
         CREATE TABLE s_new (id int PRIMARY KEY, v text);
         INSERT INTO s_new SELECT g, 'new ' || g FROM generate_series(1, 700) g;",
        "ALTER TABLE s RENAME TO s_old; ALTER TABLE s_new RENAME TO s;",
        opts(),
    )
    .await;
    let s = entry(&m, "s");
    assert!(s.new_chain.is_some(), "s is another table now");
    assert_eq!(s.fingerprint.rows, 700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_primary_key_is_a_new_chain() {
    let m = case(
        "CREATE TABLE k (a int PRIMARY KEY, b int NOT NULL UNIQUE, v text);
         INSERT INTO k SELECT g, 10000 - g, 'v' || g FROM generate_series(1, 1000) g;",
        "ALTER TABLE k DROP CONSTRAINT k_pkey; ALTER TABLE k ADD PRIMARY KEY (b);
         UPDATE k SET a = a + 5000, v = 'moved' WHERE b % 3 = 0;
         DELETE FROM k WHERE b % 7 = 0;",
        opts(),
    )
    .await;
    assert!(entry(&m, "k")
        .new_chain
        .as_deref()
        .is_some_and(|r| r.contains("key")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_partition_keeps_its_rows() {
    let m = case(
        "CREATE TABLE pm (id int, part int, v text, PRIMARY KEY (id, part)) PARTITION BY LIST (part);
         CREATE TABLE pm_1 PARTITION OF pm FOR VALUES IN (1);
         CREATE TABLE pm_2 PARTITION OF pm FOR VALUES IN (2);
         INSERT INTO pm SELECT g, 1 + g % 2, 'v' || g FROM generate_series(1, 1000) g;
         CREATE TABLE pm_3 (id int, part int, v text, PRIMARY KEY (id, part));
         INSERT INTO pm_3 SELECT g, 3, 'three ' || g FROM generate_series(1, 100) g;",
        "ALTER TABLE pm ATTACH PARTITION pm_3 FOR VALUES IN (3);",
        opts(),
    )
    .await;
    assert_eq!(entry(&m, "pm").fingerprint.rows, 1100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_delete_and_a_late_row_past_a_dropped_gap_are_caught() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let mut o = append(opts(), "events");
    // Gaps are forgotten at once, as when more than MAX_GAPS are open.
    o.settings.gap_ttl = Duration::ZERO;
    backup(&store, &db, &o).await;
    let late = tidemark_core::db::connect(&db.settings())
        .await
        .expect("connect");
    late.batch_execute("BEGIN; INSERT INTO events (payload) VALUES ('late')")
        .await
        .expect("open the late transaction");
    exec(
        &db.settings(),
        "INSERT INTO events (payload) VALUES ('early')",
    )
    .await;
    backup(&store, &db, &o).await;
    late.batch_execute("COMMIT").await.expect("commit");
    // Row count as before: one deleted, one late. A count cannot see it.
    exec(&db.settings(), "DELETE FROM events WHERE id = 10").await;
    let (inc, _) = backup(&store, &db, &o).await;
    let m = manifest(&store, &inc.backup_id).await;
    assert!(
        m.warnings.iter().any(|w| w.contains("exporting it whole")),
        "{:?}",
        m.warnings
    );
    let restored = restore_fresh(&store, &cluster, &inc.backup_id).await;
    assert_eq!(
        all_data(&restored.settings()).await,
        all_data(&db.settings()).await
    );
    assert!(verify_backup(&store, &cluster, &inc.backup_id).await.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_update_is_named_unseen_and_a_deep_check_fails_verify() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    chain_fixture(&db).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let o = append(opts(), "events");
    backup(&store, &db, &o).await;
    exec(
        &db.settings(),
        "UPDATE events SET payload = 'changed' WHERE id = 5",
    )
    .await;
    // Between deep checks verify compares keys, and says so: it cannot see the update.
    let (inc, _) = backup(&store, &db, &o).await;
    let record = verify_backup(&store, &cluster, &inc.backup_id).await;
    assert!(record.ok);
    let events = record
        .tables
        .iter()
        .find(|t| t.name.name == "events")
        .expect("events");
    assert_eq!(events.of, FingerprintOf::Keys);
    let accounts = record
        .tables
        .iter()
        .find(|t| t.name.name == "accounts")
        .expect("accounts");
    assert_eq!(accounts.of, FingerprintOf::Rows);

    // A deep check fingerprints the source's rows: the chain's stale row fails verify.
    let mut deep = o.clone();
    deep.settings.deep = true;
    let (checked, _) = backup(&store, &db, &deep).await;
    let record = verify_backup(&store, &cluster, &checked.backup_id).await;
    assert!(!record.ok, "the deep check sees the update");
    let failed: Vec<_> = record
        .tables
        .iter()
        .filter(|t| !t.ok)
        .map(|t| (t.name.name.clone(), t.of))
        .collect();
    assert_eq!(failed, vec![("events".to_owned(), FingerprintOf::Rows)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_table_keyed_at_i64_min_is_not_empty() {
    let m = case(
        "CREATE TABLE ev (id bigint PRIMARY KEY, v text);
         INSERT INTO ev VALUES (-9223372036854775808, 'the smallest key');",
        "INSERT INTO ev VALUES (-9223372036854775807, 'next'), (9223372036854775807, 'largest');",
        append(opts(), "ev"),
    )
    .await;
    assert_eq!(entry(&m, "ev").fingerprint.rows, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1600_column_table_merges() {
    let columns: Vec<String> = (1..1600).map(|i| format!("c{i} int")).collect();
    let setup = format!(
        "CREATE TABLE wide (id int PRIMARY KEY, {});
         INSERT INTO wide (id, c1, c1599) SELECT g, g, -g FROM generate_series(1, 300) g;",
        columns.join(", ")
    );
    let m = case(
        &setup,
        "UPDATE wide SET c2 = 2, c1599 = 0 WHERE id % 3 = 0; DELETE FROM wide WHERE id % 5 = 0;
         INSERT INTO wide (id, c800) VALUES (1000, 800);",
        opts(),
    )
    .await;
    assert_eq!(entry(&m, "wide").fingerprint.rows, 241);
}

/// `last_value`, increment and bounds of every sequence, and what `nextval` gives.
async fn sequences(settings: &tidemark_core::db::DbSettings) -> Vec<String> {
    let client = tidemark_core::db::connect(settings).await.expect("connect");
    client
        .query(
            "SELECT format('%s.%s start %s inc %s min %s max %s cycle %s last %s', schemaname, \
               sequencename, start_value, increment_by, min_value, max_value, cycle, last_value) \
             FROM pg_sequences ORDER BY 1",
            &[],
        )
        .await
        .expect("sequences")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descending_and_stepped_identities_restore_exactly() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        "CREATE TABLE down (id int GENERATED ALWAYS AS IDENTITY (START -1 INCREMENT -1) PRIMARY KEY, v text);
         CREATE TABLE step (id int GENERATED BY DEFAULT AS IDENTITY (START 100 INCREMENT 5) PRIMARY KEY, v text);
         CREATE SEQUENCE odd START 7 INCREMENT 2 MINVALUE 1 MAXVALUE 1000 CYCLE;
         CREATE SEQUENCE unused START -50 INCREMENT -10 MAXVALUE -50;
         INSERT INTO down (v) SELECT 'v' || g FROM generate_series(1, 20) g;
         INSERT INTO step (v) SELECT 'v' || g FROM generate_series(1, 20) g;
         SELECT nextval('odd'), nextval('odd');",
    )
    .await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let (full, _) = backup(&store, &db, &opts()).await;
    exec(
        &db.settings(),
        "INSERT INTO down (v) VALUES ('later'); INSERT INTO step (v) VALUES ('later');",
    )
    .await;
    let (inc, _) = backup(&store, &db, &opts()).await;
    for id in [&full.backup_id, &inc.backup_id] {
        let restored = restore_fresh(&store, &cluster, id).await;
        if id == &inc.backup_id {
            assert_eq!(
                sequences(&restored.settings()).await,
                sequences(&db.settings()).await
            );
            // The next values continue where the source's would.
            let next =
                "INSERT INTO down (v) VALUES ('next'); INSERT INTO step (v) VALUES ('next');";
            exec(&restored.settings(), next).await;
            exec(&db.settings(), next).await;
            assert_eq!(
                all_data(&restored.settings()).await,
                all_data(&db.settings()).await
            );
        }
        assert!(verify_backup(&store, &cluster, id).await.ok);
    }
}

/// Restores the backup of a source whose sequences stand behind their columns' keys
/// (rows written with explicit keys the sequences never handed out), with or without
/// `--advance-sequences`; returns the warnings and the state of both sequences.
async fn restore_sequences_behind(advance: bool) -> (Vec<String>, Vec<(i64, bool)>) {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    exec(
        &db.settings(),
        "CREATE TABLE up (id serial PRIMARY KEY, v text);
         INSERT INTO up (v) VALUES ('a'), ('b');
         INSERT INTO up VALUES (500, 'explicit');
         CREATE TABLE down (id int GENERATED BY DEFAULT AS IDENTITY (START -1 INCREMENT -1) PRIMARY KEY);
         INSERT INTO down VALUES (DEFAULT), (-300);",
    )
    .await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let (full, _) = backup(&store, &db, &opts()).await;
    let restored = cluster.create_database().await;
    let m = manifest(&store, &full.backup_id).await;
    let report = tidemark_core::restore::restore(
        store.clone(),
        &m,
        &restored.settings(),
        &tidemark_core::restore::RestoreOptions {
            settings: tidemark_core::restore::RestoreSettings {
                advance_sequences: advance,
                ..tidemark_core::restore::RestoreSettings::default()
            },
            ..Default::default()
        },
    )
    .await
    .expect("restore");
    let client = tidemark_core::db::connect(&restored.settings())
        .await
        .expect("connect");
    let mut states = Vec::new();
    for sequence in ["up_id_seq", "down_id_seq"] {
        let row = client
            .query_one(
                &format!("SELECT last_value, is_called FROM {sequence}"),
                &[],
            )
            .await
            .expect("sequence");
        states.push((row.get(0), row.get(1)));
    }
    (report.warnings, states)
}

fn warns_of_both(warnings: &[String], outcome: &str) {
    for sequence in ["public.up_id_seq", "public.down_id_seq"] {
        assert!(
            warnings.iter().any(
                |w| w.starts_with(&format!("sequence {sequence} was behind"))
                    && w.contains(outcome)
            ),
            "{warnings:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_behind_its_column_is_restored_as_the_source_had_it() {
    let (warnings, states) = restore_sequences_behind(false).await;
    warns_of_both(&warnings, "left as the source had it");
    // Exactly the source's: up handed out 1 and 2, down handed out -1.
    assert_eq!(states, vec![(2, true), (-1, true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advance_sequences_moves_a_sequence_past_its_columns_keys() {
    let (warnings, states) = restore_sequences_behind(true).await;
    warns_of_both(&warnings, "moved past them");
    // nextval then never hands out a key the data already holds.
    assert_eq!(states, vec![(500, true), (-300, true)]);
}

// --- The transaction counter: a private cluster each, moved with pg_resetwal. ---

const XID_FIXTURE: &str = "CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL, note text);
    INSERT INTO acct SELECT g, g, 'n' || g FROM generate_series(1, 3000) g;
    CREATE TABLE log (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, what text);
    INSERT INTO log (what) SELECT 'w' || g FROM generate_series(1, 1000) g;";

const XID_CHANGE: &str = "UPDATE acct SET balance = -balance, note = 'changed' WHERE id % 10 = 0;
    DELETE FROM acct WHERE id % 13 = 0;
    INSERT INTO acct SELECT g, g, 'new' FROM generate_series(5001, 5100) g;
    INSERT INTO log (what) VALUES ('later');";

fn xid_opts() -> ExportOptions {
    append(opts(), "log")
}

/// Restores `id` into a new database of `cluster`, compares it with `source` and
/// verifies it there.
async fn restores_and_verifies(
    store: &Store,
    cluster: &tidemark_tests::private::PrivateCluster,
    source: &tidemark_core::db::DbSettings,
    id: &str,
) {
    let name = format!("restored_{}", uuid::Uuid::new_v4().simple());
    let target = cluster.create_database(&name).await;
    let m = manifest(store, id).await;
    tidemark_core::restore::restore(
        store.clone(),
        &m,
        &target,
        &tidemark_core::restore::RestoreOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("restore {id}: {e}"));
    assert_eq!(all_data(&target).await, all_data(source).await);
    let record = tidemark_tests::verify_on(store, &cluster.settings("postgres"), id).await;
    assert!(record.ok, "{record:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_2_31_transactions_since_the_parent_start_a_new_chain() {
    let cluster = tidemark_tests::private::PrivateCluster::start();
    let db = cluster.create_database("app").await;
    exec(&db, XID_FIXTURE).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let (full, _) = backup_of(&store, &db, &xid_opts()).await;
    let parent_xid = cluster.next_xid().await;
    cluster.advance_xid_to(parent_xid + (1 << 31) + 1000).await;
    exec(&db, XID_CHANGE).await;
    let (inc, _) = backup_of(&store, &db, &xid_opts()).await;
    assert_eq!(
        inc.kind,
        BackupKind::Full,
        "32-bit xids no longer order the rows"
    );
    let m = manifest(&store, &inc.backup_id).await;
    assert!(
        m.warnings.iter().any(|w| w.contains("more than 2^31")),
        "{:?}",
        m.warnings
    );
    assert_ne!(m.id, full.backup_id);
    restores_and_verifies(&store, &cluster, &db, &inc.backup_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_continues_across_the_32_bit_wrap() {
    let cluster = tidemark_tests::private::PrivateCluster::start();
    let db = cluster.create_database("app").await;
    exec(&db, XID_FIXTURE).await;
    // Just below 2^32: the parent's xids are in epoch 0, the incremental's in epoch 1.
    cluster.advance_xid_to((1 << 32) - 400).await;
    exec(
        &db,
        "UPDATE acct SET note = 'before the wrap' WHERE id <= 50",
    )
    .await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let (full, _) = backup_of(&store, &db, &xid_opts()).await;
    let client = tidemark_core::db::connect(&db).await.expect("connect");
    for _ in 0..600 {
        client
            .batch_execute("SELECT txid_current()")
            .await
            .expect("use an xid");
    }
    assert!(cluster.next_xid().await > 1 << 32, "the counter wrapped");
    exec(&db, XID_CHANGE).await;
    let (inc, _) = backup_of(&store, &db, &xid_opts()).await;
    assert_eq!(
        (inc.kind, inc.parent.as_deref()),
        (BackupKind::Incremental, Some(full.backup_id.as_str()))
    );
    let m = manifest(&store, &inc.backup_id).await;
    let acct = entry(&m, "acct");
    assert!(
        acct.new_chain.is_none() && acct.exported_rows < 1000,
        "only the changes: {} rows, {:?}",
        acct.exported_rows,
        acct.new_chain
    );
    restores_and_verifies(&store, &cluster, &db, &inc.backup_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_copy_on_another_server_starts_a_new_chain() {
    let origin = tidemark_tests::private::PrivateCluster::start();
    let db = origin.create_database("app").await;
    exec(&db, XID_FIXTURE).await;
    // The original server is far ahead of the copy's.
    origin.jump_xid(origin.next_xid().await + 5_000_000);
    exec(
        &db,
        "UPDATE acct SET note = 'late on the origin' WHERE id <= 100",
    )
    .await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let (full, _) = backup_of(&store, &db, &xid_opts()).await;

    // The database restored on a new server; the store now points at the copy.
    let copy = tidemark_tests::private::PrivateCluster::start();
    let copy_db = copy.create_database("app").await;
    tidemark_core::restore::restore(
        store.clone(),
        &manifest(&store, &full.backup_id).await,
        &copy_db,
        &tidemark_core::restore::RestoreOptions::default(),
    )
    .await
    .expect("restore onto the new server");
    exec(&copy_db, XID_CHANGE).await;
    let (inc, _) = backup_of(&store, &copy_db, &xid_opts()).await;
    assert_eq!(inc.kind, BackupKind::Full);
    let m = manifest(&store, &inc.backup_id).await;
    assert!(
        m.warnings.iter().any(|w| w.contains("another server")),
        "{:?}",
        m.warnings
    );
    restores_and_verifies(&store, &copy, &copy_db, &inc.backup_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_server_rolled_back_to_a_snapshot_starts_a_new_chain() {
    let cluster = tidemark_tests::private::PrivateCluster::start();
    let db = cluster.create_database("app").await;
    exec(&db, XID_FIXTURE).await;
    // A file-level snapshot of the server, taken now.
    cluster.stop();
    let snapshot = cluster.scratch().join("snapshot");
    cluster.snapshot_data(&snapshot);
    cluster.restart();
    for _ in 0..300 {
        exec(&db, "UPDATE acct SET balance = balance + 1 WHERE id = 1").await;
    }
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    backup_of(&store, &db, &xid_opts()).await;
    // The server is rolled back to the snapshot: same system identifier, lower xids.
    cluster.stop();
    cluster.replace_data(&snapshot);
    cluster.restart();
    exec(&db, XID_CHANGE).await;
    let (inc, _) = backup_of(&store, &db, &xid_opts()).await;
    assert_eq!(inc.kind, BackupKind::Full);
    let m = manifest(&store, &inc.backup_id).await;
    assert!(
        m.warnings.iter().any(|w| w.contains("went backwards")),
        "{:?}",
        m.warnings
    );
    restores_and_verifies(&store, &cluster, &db, &inc.backup_id).await;
}

/// Waits until every transaction that began before now has ended (other tests' runs
/// hold the cluster's xmin back), so that the next backup's snapshot sees the rows
/// written so far as older than itself: an incremental re-exports any row whose xmin
/// it cannot place before its parent's snapshot, which is correct but not the point.
async fn settle(db: &tidemark_tests::TestDatabase) {
    let client = tidemark_core::db::connect(&db.settings())
        .await
        .expect("connect");
    let xid: i64 = client
        .query_one("SELECT txid_current()", &[])
        .await
        .expect("txid")
        .get(0);
    for _ in 0..600 {
        let xmin: i64 = client
            .query_one("SELECT txid_snapshot_xmin(txid_current_snapshot())", &[])
            .await
            .expect("xmin")
            .get(0);
        if xmin > xid {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("other transactions held the cluster's xmin back for 60 s");
}

/// An incremental of tables that did not change writes nothing for them: right after a
/// full (the live keys are the chain's rows) and after an incremental that recorded a
/// key set (the same key text is the parent's chunk, referred to again). A row deleted
/// before such a run stays deleted in its restore, and a delete after it is seen. The
/// oracle is the source's sorted COPY of every table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incrementals_of_unchanged_tables_write_nothing_and_keep_deletes() {
    let cluster = TestCluster::from_env();
    let db = cluster.create_database().await;
    let mut setup = String::new();
    for t in 0..30 {
        setup.push_str(&format!(
            "CREATE TABLE t{t} (id int PRIMARY KEY, v text);
             INSERT INTO t{t} SELECT g, md5(g::text) FROM generate_series(1, 50) g;"
        ));
    }
    exec(&db.settings(), &setup).await;
    settle(&db).await;
    let (_dir, local) = local_store();
    let store: Store = Arc::new(local);
    let o = opts();
    let restores_to_source = |id: String| {
        let (store, cluster, db) = (store.clone(), &cluster, &db);
        async move {
            let restored = restore_fresh(&store, cluster, &id).await;
            assert_eq!(
                all_data(&restored.settings()).await,
                all_data(&db.settings()).await,
                "backup {id} restores to the source"
            );
        }
    };
    backup(&store, &db, &o).await;

    let (quiet, _) = backup(&store, &db, &o).await;
    let m = manifest(&store, &quiet.backup_id).await;
    assert_eq!(m.totals.chunks, 0, "nothing changed, nothing written");
    assert!(
        quiet.store_requests <= 25,
        "a no-change incremental of 30 tables: {} store requests",
        quiet.store_requests
    );
    assert!(m.tables.iter().all(|t| !t.has_key_set()));
    restores_to_source(quiet.backup_id.clone()).await;

    exec(
        &db.settings(),
        "DELETE FROM t1 WHERE id = 7; UPDATE t2 SET v = 'changed' WHERE id = 8;
         DELETE FROM t4 WHERE id = 1; INSERT INTO t4 VALUES (1000, 'as many rows');",
    )
    .await;
    settle(&db).await;
    let (changed, _) = backup(&store, &db, &o).await;
    let m = manifest(&store, &changed.backup_id).await;
    let keys_of = |m: &Manifest, t: &str| entry(m, t).key_chunks.clone();
    assert_eq!(keys_of(&m, "t1").len(), 1, "a delete writes the key set");
    assert!(entry(&m, "t3").key_chunks.is_empty() && !entry(&m, "t3").has_key_set());
    restores_to_source(changed.backup_id.clone()).await;

    let (again, _) = backup(&store, &db, &o).await;
    let next = manifest(&store, &again.backup_id).await;
    assert_eq!(next.totals.chunks, 0, "nothing changed, nothing written");
    assert_eq!(
        keys_of(&next, "t1"),
        keys_of(&m, "t1"),
        "the parent's key set is referred to again"
    );
    assert_eq!(keys_of(&next, "t2"), keys_of(&m, "t2"));
    restores_to_source(again.backup_id.clone()).await;
    let record = verify_backup(&store, &cluster, &again.backup_id).await;
    assert!(record.ok, "verify: {record:#?}");

    exec(&db.settings(), "DELETE FROM t1 WHERE id = 9").await;
    let (last, _) = backup(&store, &db, &o).await;
    let m = manifest(&store, &last.backup_id).await;
    assert_eq!(entry(&m, "t1").key_chunks[0].run_id, last.backup_id);
    restores_to_source(last.backup_id.clone()).await;
}
