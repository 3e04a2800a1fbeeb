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
                .map(|s| s.text.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect();
            out.entry(entry.label()).or_default().push(statements);
        }
    }
    for versions in out.values_mut() {
        versions.sort();
    }
    out
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
