//! Unit tests of the export's pure parts: no database, no store.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;

use super::append::{export_whole, find_gaps, probe_select, still_empty, MAX_GAPS};
use super::plan::{chain_break, lanes_between, scope_lane, table_shape, MAX_XID_DISTANCE};
use super::range::{bound_sql, key_fields, strip_flag, RangeQuery};
use super::sql::{column_list, key_compare, range_condition};
use super::state::{work_left, Delta, Work};
use crate::format::checkpoint::{Checkpoint, GapRange};
use crate::format::progress::{ExportScope, Lane, TableProgress};
use crate::format::{
    BackupKind, ChunkKind, ChunkRef, Fingerprint, KeyRange, PgSnapshot, TableMode,
};

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("a valid time")
}

fn gap(from: i64, to: i64, seen_at: DateTime<Utc>) -> GapRange {
    GapRange { from, to, seen_at }
}

/// A table `app.t` with these columns (`name`, type), key and scope, exporting
/// `columns` minus the `hidden` ones (generated columns are not exported).
fn table(
    columns: &[(&str, &str)],
    hidden: &[&str],
    key: &[&str],
    scope: ExportScope,
) -> TableProgress {
    let defs: Vec<_> = columns
        .iter()
        .map(|(name, ty)| json!({ "name": name, "type_name": ty, "not_null": false }))
        .collect();
    let exported: Vec<&str> = columns
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !hidden.contains(name))
        .collect();
    serde_json::from_value(json!({
        "name": { "schema": "app", "name": "t" },
        "mode": TableMode::Changes,
        "schema": { "kind": "table", "columns": defs, "primary_key": key },
        "columns": exported,
        "key": key,
        "scope": scope,
        "rows_per_chunk": 1000,
        "gaps_probed": true,
        "done": false,
        "next_seq": 1,
        "fingerprint": Fingerprint::default(),
        "exported_rows": 0,
    }))
    .expect("a valid table progress")
}

fn keyed() -> TableProgress {
    table(
        &[("id", "bigint"), ("name", "text")],
        &[],
        &["id"],
        ExportScope::Whole,
    )
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}

#[test]
fn find_gaps_reports_every_missing_key_range() {
    let mut keys = vec![7, 1, 3];
    let gaps = find_gaps(&mut keys, Some(0), Some(9), at(0));
    assert_eq!(
        gaps,
        vec![gap(2, 2, at(0)), gap(4, 6, at(0)), gap(8, 9, at(0))]
    );
}

#[test]
fn find_gaps_from_the_first_key_when_nothing_came_before() {
    let mut keys = vec![5, 6];
    assert_eq!(find_gaps(&mut keys, None, Some(6), at(0)), vec![]);
    let mut none: Vec<i64> = Vec::new();
    assert_eq!(find_gaps(&mut none, None, Some(6), at(0)), vec![]);
    assert_eq!(
        find_gaps(&mut none, Some(2), Some(6), at(0)),
        vec![gap(3, 6, at(0))]
    );
}

#[test]
fn gaps_end_at_the_largest_key_without_a_phantom_gap_past_it() {
    let mut keys = vec![i64::MAX];
    assert_eq!(
        find_gaps(&mut keys, Some(i64::MAX - 3), Some(i64::MAX), at(0)),
        vec![gap(i64::MAX - 2, i64::MAX - 1, at(0))]
    );
    let gaps = [gap(i64::MAX - 5, i64::MAX, at(0))];
    let mut found = vec![i64::MAX];
    assert_eq!(
        still_empty(&gaps, &mut found, TimeDelta::seconds(60), at(0)),
        vec![gap(i64::MAX - 5, i64::MAX - 1, at(0))]
    );
}

#[test]
fn still_empty_keeps_unfilled_parts_until_the_ttl() {
    let gaps = [gap(1, 10, at(0)), gap(20, 25, at(-100))];
    let mut found = vec![10, 4, 3];
    let left = still_empty(&gaps, &mut found, TimeDelta::seconds(60), at(30));
    // The second gap was seen 130 s ago with a TTL of 60 s: given up.
    assert_eq!(left, vec![gap(1, 2, at(0)), gap(5, 9, at(0))]);
    let mut nothing: Vec<i64> = Vec::new();
    let left = still_empty(&gaps, &mut nothing, TimeDelta::seconds(200), at(30));
    assert_eq!(left, gaps.to_vec());
}

fn checkpoint(xmin: u64, system_identifier: Option<&str>) -> Checkpoint {
    Checkpoint {
        version: 1,
        backup_id: "b1".into(),
        kind: BackupKind::Full,
        created_at: at(0),
        snapshot: PgSnapshot {
            xmin,
            xmax: xmin + 1,
            xip: Vec::new(),
        },
        system_identifier: system_identifier.map(str::to_owned),
        runs_since_deep: 0,
        tables: Vec::new(),
    }
}

fn snapshot(xmax: u64) -> PgSnapshot {
    PgSnapshot {
        xmin: xmax,
        xmax,
        xip: Vec::new(),
    }
}

#[test]
fn chain_continues_on_the_same_server_within_2_31_transactions() {
    let parent = checkpoint(1000, Some("42"));
    assert_eq!(chain_break(&parent, &snapshot(5000), Some("42")), None);
    assert_eq!(
        chain_break(&parent, &snapshot(1000 + MAX_XID_DISTANCE - 1), Some("42")),
        None
    );
    // An old checkpoint without the identifier continues.
    assert_eq!(
        chain_break(&checkpoint(1000, None), &snapshot(5000), Some("42")),
        None
    );
}

#[test]
fn chain_breaks_on_another_server_a_counter_gone_back_or_2_31_transactions() {
    let parent = checkpoint(1000, Some("42"));
    let other = chain_break(&parent, &snapshot(5000), Some("43")).expect("another server");
    assert!(other.contains("another server"), "{other}");
    let back = chain_break(&parent, &snapshot(999), Some("42")).expect("went back");
    assert!(back.contains("went backwards"), "{back}");
    let far = chain_break(&parent, &snapshot(1000 + MAX_XID_DISTANCE), Some("42"))
        .expect("too many transactions");
    assert!(far.contains("more than 2^31"), "{far}");
}

#[test]
fn table_shape_names_each_exported_column_with_its_type() {
    let t = keyed();
    let columns = strings(&["id", "name", "gone"]);
    assert_eq!(
        table_shape(&columns, &t.schema),
        strings(&["id bigint", "name text", "gone ?"])
    );
}

#[test]
fn sql_fragments_quote_names_and_cast_values_to_the_key_types() {
    let t = table(
        &[("id", "integer"), ("Kind", "text")],
        &[],
        &["Kind", "id"],
        ExportScope::Whole,
    );
    assert_eq!(column_list(&strings(&["a", "b\"c"])), r#""a", "b""c""#);
    assert_eq!(
        key_compare(&t, ">", &strings(&["it's", "7"])),
        r#"("Kind", "id") > ('it''s'::text, '7'::integer)"#
    );
    assert_eq!(range_condition(&t, None, None), "true");
    assert_eq!(
        range_condition(&t, Some(&strings(&["a", "1"])), Some(&strings(&["b", "2"]))),
        r#"("Kind", "id") > ('a'::text, '1'::integer) AND ("Kind", "id") <= ('b'::text, '2'::integer)"#
    );
}

#[test]
fn the_next_bound_is_rows_per_chunk_keys_on_in_key_order() {
    let t = keyed();
    assert_eq!(
        bound_sql(&t, Some(&strings(&["10"])), None),
        r#"SELECT "id"::text AS tidemark_bound_0 FROM ONLY "app"."t" WHERE ("id") > ('10'::bigint) ORDER BY "id" OFFSET 999 LIMIT 1"#
    );
}

#[test]
fn a_whole_range_reads_the_exported_columns() {
    let t = keyed();
    let range = KeyRange {
        after: None,
        upto: Some(strings(&["5"])),
    };
    let query = RangeQuery::new(&t, &range);
    assert_eq!(
        query.select,
        r#"SELECT "id", "name" FROM ONLY "app"."t" WHERE ("id") <= ('5'::bigint)"#
    );
    assert_eq!(query.changed_since, None);
    assert_eq!((query.read, query.exported), (2, 2));
    assert!(!query.hidden_keys);
    assert_eq!(query.key_positions, vec![0]);
}

#[test]
fn a_changes_range_reads_hidden_generated_keys_after_the_row_and_a_changed_flag() {
    let t = table(
        &[("a", "integer"), ("k", "integer"), ("v", "text")],
        &["k"],
        &["a", "k"],
        ExportScope::Changed {
            since_xmin: (1 << 32) + 100,
        },
    );
    let range = KeyRange {
        after: None,
        upto: None,
    };
    let query = RangeQuery::new(&t, &range);
    assert_eq!(
        query.select,
        "SELECT \"a\", \"v\", \"k\", (xmin::text::bigint - 100 + 4294967296) % 4294967296 \
           < (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 4294967396) \
         FROM ONLY \"app\".\"t\" WHERE true"
    );
    assert_eq!(query.changed_since, Some((1 << 32) + 100));
    assert_eq!((query.read, query.exported), (3, 2));
    assert!(query.hidden_keys);
    assert_eq!(query.key_positions, vec![0, 2]);
}

#[test]
fn the_changed_flag_is_cut_off_and_the_key_set_line_taken_from_the_row() {
    let mut out = Vec::new();
    assert!(strip_flag(b"1\tx\t3\tt\n", 3, &mut out));
    assert_eq!(out, b"1\tx\t3\n");
    assert!(!strip_flag(b"1\tx\t3\tf\n", 3, &mut out));
    assert_eq!(out, b"1\tx\t3\n");
    // A column-less table reads the flag alone.
    assert!(strip_flag(b"t\n", 0, &mut out));
    assert_eq!(out, b"\n");
    key_fields(b"1\tx\t3\n", &[0, 2], &mut out);
    assert_eq!(out, b"1\t3\n");
}

#[test]
fn lanes_cover_the_range_between_their_bounds() {
    let lane = |after: Option<&str>, until: Option<&str>| Lane {
        after: after.map(|a| strings(&[a])),
        until: until.map(|u| strings(&[u])),
        cursor: None,
        done: false,
    };
    assert_eq!(
        lanes_between(None, vec![strings(&["10"]), strings(&["20"])], None),
        vec![
            lane(None, Some("10")),
            lane(Some("10"), Some("20")),
            lane(Some("20"), None)
        ]
    );
    assert_eq!(
        lanes_between(Some(strings(&["5"])), Vec::new(), Some(strings(&["9"]))),
        vec![lane(Some("5"), Some("9"))]
    );
}

#[test]
fn an_append_scope_is_one_lane_after_its_cursor_and_none_when_empty() {
    let mut t = keyed();
    t.scope = ExportScope::Appended {
        after: Some(4),
        upto: Some(9),
    };
    let lane = scope_lane(&t).expect("a lane");
    assert_eq!(
        (lane.after, lane.until),
        (Some(strings(&["4"])), Some(strings(&["9"])))
    );
    t.scope = ExportScope::Appended {
        after: Some(9),
        upto: Some(9),
    };
    assert_eq!(scope_lane(&t), None);
    t.scope = ExportScope::Appended {
        after: None,
        upto: None,
    };
    assert_eq!(scope_lane(&t), None);
    t.scope = ExportScope::Whole;
    assert_eq!(scope_lane(&t), Some(Lane::default()));
}

#[test]
fn work_left_probes_gaps_first_then_lanes_then_finalizes() {
    let mut keyless = table(&[("v", "text")], &[], &[], ExportScope::Whole);
    keyless.lanes = vec![Lane::default()];
    let mut probing = keyed();
    probing.gaps_probed = false;
    probing.lanes = vec![
        Lane {
            done: true,
            ..Lane::default()
        },
        Lane::default(),
    ];
    let mut finished_lanes = keyed();
    finished_lanes.lanes = vec![Lane {
        done: true,
        ..Lane::default()
    }];
    let mut done = keyed();
    done.done = true;
    let queue: Vec<String> = work_left(&[keyless, probing, finished_lanes, done])
        .into_iter()
        .map(|w| format!("{w:?}"))
        .collect();
    let expected = [
        Work::Keyless(0),
        Work::Probe(1),
        Work::Lane(1, 1),
        Work::Finalize(2),
    ];
    assert_eq!(queue, expected.map(|w| format!("{w:?}")));
}

fn chunk(rows: u64) -> ChunkRef {
    ChunkRef {
        key: format!("chunks/r/{rows}"),
        kind: ChunkKind::Rows,
        run_id: "r".into(),
        rows,
        bytes: 10,
        raw_bytes: 20,
        sha256: String::new(),
        range: None,
        text_sha256: None,
        first_read: false,
    }
}

#[test]
fn a_delta_adds_rows_chunks_fingerprints_and_keeps_the_newest_gaps() {
    let mut t = keyed();
    t.gaps = (0..MAX_GAPS as i64)
        .map(|i| gap(i * 10, i * 10 + 1, at(i)))
        .collect();
    let mut fingerprint = Fingerprint::default();
    fingerprint.add_line(b"1\ta\n");
    let delta = Delta {
        chunks: vec![chunk(3), chunk(4)],
        key_chunks: vec![chunk(7)],
        keys_of_rows: false,
        fingerprint,
        key_fingerprint: Fingerprint::default(),
        gaps: vec![gap(-5, -1, at(1_000_000))],
    };
    delta.apply(&mut t);
    assert_eq!(t.exported_rows, 7);
    assert_eq!((t.chunks.len(), t.key_chunks.len()), (2, 1));
    assert_eq!(t.fingerprint, fingerprint);
    assert_eq!(t.gaps.len(), MAX_GAPS);
    // The oldest gap went; the new one stayed.
    assert_eq!(t.gaps.first(), Some(&gap(10, 11, at(1))));
    assert_eq!(t.gaps.last(), Some(&gap(-5, -1, at(1_000_000))));
}

#[test]
fn an_append_table_that_no_longer_matches_is_exported_whole_as_a_new_chain() {
    let mut t = keyed();
    t.scope = ExportScope::Appended {
        after: Some(50),
        upto: Some(90),
    };
    t.inherited = vec![chunk(50)];
    t.chunks = vec![chunk(40)];
    t.exported_rows = 40;
    t.gaps_to_probe = vec![gap(60, 61, at(0))];
    t.gaps_probed = false;
    let whole = export_whole(&t, 3, 90);
    assert_eq!(
        whole.scope,
        ExportScope::Appended {
            after: None,
            upto: Some(90)
        }
    );
    assert!(whole.inherited.is_empty() && whole.chunks.is_empty());
    assert_eq!(whole.exported_rows, 0);
    assert!(whole.gaps_to_probe.is_empty() && whole.gaps_probed);
    assert_eq!(whole.started_in_slice, 3);
    assert!(whole.new_chain.is_some());
    assert_eq!(
        whole.lanes,
        vec![Lane {
            after: None,
            until: Some(strings(&["90"])),
            cursor: None,
            done: false
        }]
    );
}

#[test]
fn gaps_are_probed_with_one_join_over_their_ranges() {
    let t = keyed();
    assert_eq!(
        probe_select(&t, &[gap(2, 3, at(0)), gap(9, 9, at(0))]),
        r#"SELECT t."id", t."name" FROM ONLY "app"."t" t JOIN (VALUES (2::int8, 3::int8), (9::int8, 9::int8)) g(lo, hi) ON t."id" BETWEEN g.lo AND g.hi"#
    );
}
