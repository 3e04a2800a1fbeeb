//! Comparing a restored database's schema with the one a backup recorded.
//!
//! Both sides are pg_dump output with the same object selection, split into entries and
//! normalised: comment lines, session settings and meta-commands are dropped (they are
//! not objects), so are ownership and privilege statements (a restore leaves them out by
//! default), whitespace runs count as one space, and the order of entries does not
//! matter. What remains must match object for object; every difference is named.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::script::Script;
use super::{PgDump, Program, SchemaError};
use crate::db::relay::Relay;
use crate::db::DbSettings;

/// The outcome of a schema comparison, as the verification record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SchemaCheck {
    pub ok: bool,
    /// Objects compared (entries of the recorded schema).
    pub objects: usize,
    /// `missing: TRIGGER ...`, `different: TABLE ...`, `unexpected: INDEX ...`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<String>,
}

type Normalised = BTreeMap<String, Vec<Vec<String>>>;

/// Entry label → the statements of each entry with that label, normalised.
fn normalise(scripts: &[&Script]) -> Normalised {
    let mut out: Normalised = BTreeMap::new();
    for script in scripts {
        for entry in script.entries() {
            if entry.is_privileges() {
                continue;
            }
            let statements: Vec<String> = entry
                .statements
                .iter()
                .filter(|s| !s.is_owner_change())
                .map(|s| {
                    let text = if entry.kind == "TABLE" {
                        inherited_columns_unordered(&s.text)
                    } else {
                        s.text.clone()
                    };
                    text.split_whitespace().collect::<Vec<_>>().join(" ")
                })
                .collect();
            // An entry that only sets an owner (pg_dump's `SCHEMA public` when another
            // role than pg_database_owner owns it) is ownership, which a restore leaves
            // out by default, like the owner statements of every other entry.
            if statements.is_empty() {
                continue;
            }
            out.entry(entry.label()).or_default().push(statements);
        }
    }
    for versions in out.values_mut() {
        versions.sort();
    }
    out
}

/// The `CREATE TABLE ... INHERITS (...)` of an inheritance child with its column lines
/// sorted. A child's own columns can stand in an order no `CREATE TABLE` reproduces
/// (columns merged with a parent's by `ALTER TABLE ... INHERIT`, or added to a parent
/// later): restoring pg_dump's script puts the inherited columns first, exactly as
/// `pg_dump | pg_restore` does, so the order of these lines is not a difference; their
/// definitions are. Other statements are returned unchanged.
fn inherited_columns_unordered(statement: &str) -> String {
    let lines: Vec<&str> = statement.lines().collect();
    let close = lines.iter().rposition(|l| l.starts_with(')'));
    let is_child = close.is_some_and(|c| lines[c..].iter().any(|l| l.contains("INHERITS (")));
    match close {
        Some(close) if is_child && close > 1 && lines[0].starts_with("CREATE ") => {
            let mut columns: Vec<&str> = lines[1..close]
                .iter()
                .map(|l| l.trim().trim_end_matches(','))
                .collect();
            columns.sort_unstable();
            let mut out = vec![lines[0].to_owned()];
            out.push(columns.join(",\n"));
            out.extend(lines[close..].iter().map(|l| (*l).to_owned()));
            out.join("\n")
        }
        _ => statement.to_owned(),
    }
}

/// Compares the recorded scripts with the restored database's.
pub fn compare(recorded: &[&Script], restored: &[&Script]) -> SchemaCheck {
    let expected = normalise(recorded);
    let actual = normalise(restored);
    let mut differences = Vec::new();
    for (label, want) in &expected {
        match actual.get(label) {
            None => differences.push(format!("missing: {label}")),
            Some(got) if got != want => differences.push(format!("different: {label}")),
            Some(_) => {}
        }
    }
    for label in actual.keys() {
        if !expected.contains_key(label) {
            differences.push(format!("unexpected: {label}"));
        }
    }
    SchemaCheck {
        ok: differences.is_empty(),
        objects: expected.values().map(Vec::len).sum(),
        differences,
    }
}

/// Dumps the pre-data and post-data sections of the database `settings` names with the
/// given object selection.
///
/// # Errors
/// pg_dump failures, scripts that do not split.
pub async fn dump_sections(
    tool: &PgDump,
    settings: &DbSettings,
    selection: &[String],
) -> Result<(Script, Script), SchemaError> {
    let relay = Relay::start(settings).await?;
    let args = |section: &str| {
        let mut args = vec![format!("--section={section}")];
        args.extend(selection.iter().cloned());
        args
    };
    let (pre_args, post_args) = (args("pre-data"), args("post-data"));
    let (pre, post) = tokio::join!(
        tool.run(Program::PgDump, &relay, settings, &pre_args),
        tool.run(Program::PgDump, &relay, settings, &post_args),
    );
    let parse = |what: &str, bytes: Vec<u8>| {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Script::parse(&text).map_err(|source| SchemaError::Script {
            key: format!("pg_dump {what} of {settings}"),
            source,
        })
    };
    Ok((parse("pre-data", pre?)?, parse("post-data", post?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(text: &str) -> Script {
        Script::parse(text).expect("parses")
    }

    const SOURCE: &str = "\\restrict a
SET x = 1;
--
-- Name: t; Type: TABLE; Schema: app; Owner: alice
--

CREATE TABLE app.t (
    id integer
);

ALTER TABLE app.t OWNER TO alice;

--
-- Name: TABLE t; Type: ACL; Schema: app; Owner: alice
--

GRANT SELECT ON TABLE app.t TO bob;

--
-- Name: t trg; Type: TRIGGER; Schema: app; Owner: alice
--

CREATE TRIGGER trg AFTER INSERT ON app.t FOR EACH ROW EXECUTE FUNCTION f();
";

    #[test]
    fn owners_privileges_settings_and_layout_do_not_count() {
        let restored = "\\restrict b
--
-- Name: t trg; Type: TRIGGER; Schema: app; Owner: postgres
--

CREATE TRIGGER trg AFTER INSERT ON app.t   FOR EACH ROW EXECUTE FUNCTION f();
--
-- Name: t; Type: TABLE; Schema: app; Owner: postgres
--

CREATE TABLE app.t (
  id integer
);
ALTER TABLE app.t OWNER TO postgres;
";
        let check = compare(&[&script(SOURCE)], &[&script(restored)]);
        assert_eq!(
            check,
            SchemaCheck {
                ok: true,
                objects: 2,
                differences: vec![]
            }
        );
    }

    #[test]
    fn an_owner_only_entry_and_a_childs_column_order_do_not_count() {
        let recorded = "--
-- Name: public; Type: SCHEMA; Schema: -; Owner: postgres
--

-- *not* creating schema, since initdb creates it

ALTER SCHEMA public OWNER TO postgres;

--
-- Name: c; Type: TABLE; Schema: public; Owner: postgres
--

CREATE TABLE public.c (
    b text,
    a integer
)
INHERITS (public.p);
";
        let restored = "--
-- Name: c; Type: TABLE; Schema: public; Owner: postgres
--

CREATE TABLE public.c (
    a integer,
    b text
)
INHERITS (public.p);
";
        let check = compare(&[&script(recorded)], &[&script(restored)]);
        assert!(check.ok, "{:?}", check.differences);
        // A different column definition still counts.
        let changed = restored.replace("b text", "b varchar");
        let check = compare(&[&script(recorded)], &[&script(&changed)]);
        assert_eq!(check.differences, vec!["different: TABLE public.c"]);
    }

    #[test]
    fn every_difference_is_named() {
        let restored = "--
-- Name: t; Type: TABLE; Schema: app; Owner: postgres
--

CREATE TABLE app.t (id bigint);

--
-- Name: t_idx; Type: INDEX; Schema: app; Owner: postgres
--

CREATE INDEX t_idx ON app.t USING btree (id);
";
        let check = compare(&[&script(SOURCE)], &[&script(restored)]);
        assert!(!check.ok);
        assert_eq!(
            check.differences,
            vec![
                "different: TABLE app.t",
                "missing: TRIGGER t trg (schema app)",
                "unexpected: INDEX app.t_idx"
            ]
        );
    }
}
