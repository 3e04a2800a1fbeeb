//! Running a schema script against a target database, entry by entry, as `pg_restore`
//! would: session settings the target does not know are left out, psql meta-commands
//! (`\restrict`) are not SQL and are skipped, ownership and privilege statements are
//! left out unless asked for, and each section runs in one transaction, so a failure
//! leaves nothing of it behind and names the object.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use super::script::{Entry, Item, Script};
use crate::error::{Classified, ErrorKind};
use crate::format::TableName;

/// How to apply a script.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Keep `ALTER ... OWNER TO` (pg_restore's default; Tidemark's is `--no-owner`).
    pub with_owners: bool,
    /// Keep `GRANT`/`REVOKE` and default privileges.
    pub with_privileges: bool,
    /// Queries run after the script, in the same transaction; the first column of each
    /// row they return is a warning (see [`warning_queries`]).
    pub finish_queries: Vec<String>,
    /// A statement run last, in the same transaction (a marker that the section is in).
    pub finish_with: Option<String>,
}

/// Runs `queries` one after the other; the first column of each row they return is a
/// warning.
///
/// # Errors
/// The first query the server refused.
pub async fn warning_queries(
    client: &Client,
    queries: &[String],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut warnings = Vec::new();
    for query in queries {
        for message in client.simple_query(query).await? {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                if let Some(text) = row.get(0) {
                    warnings.push(text.to_owned());
                }
            }
        }
    }
    Ok(warnings)
}

/// What to do with one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Apply,
    /// Apply; if it fails, skip it with a warning (objects a table subset may need).
    Optional,
    Skip(String),
}

/// A statement the target refused.
#[derive(Debug, thiserror::Error)]
#[error("restoring the schema ({section}): {object}: {}", crate::db::server_message(.cause))]
pub struct ApplyError {
    pub section: &'static str,
    pub object: String,
    /// The server's error, kept for its SQLSTATE and kind; its text is the message.
    pub cause: tokio_postgres::Error,
}

impl Classified for ApplyError {
    fn kind(&self) -> ErrorKind {
        crate::db::kind_of(&self.cause)
    }
}

/// What applying did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub entries: usize,
    /// Entries left out or skipped after failing, with why.
    pub warnings: Vec<String>,
}

/// Names of the settings the target knows (for leaving out newer ones, such as
/// `transaction_timeout` on a server older than 17).
///
/// # Errors
/// The query's error.
pub async fn known_settings(client: &Client) -> Result<HashSet<String>, tokio_postgres::Error> {
    Ok(client
        .query("SELECT name FROM pg_settings", &[])
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect())
}

/// Applies `script` in one transaction on `client`, deciding per entry with `decide`.
///
/// # Errors
/// [`ApplyError`] naming the entry and the server's message; the transaction is rolled
/// back.
pub async fn apply(
    client: &Client,
    script: &Script,
    section: &'static str,
    opts: &ApplyOptions,
    known: &HashSet<String>,
    decide: &dyn Fn(&Entry) -> Decision,
) -> Result<Applied, ApplyError> {
    let fail = |object: String, cause: tokio_postgres::Error| ApplyError {
        section,
        object,
        cause,
    };
    in_transaction(client, section, async {
        let mut applied = Applied::default();
        for item in &script.items {
            match item {
                Item::Meta(_) => {}
                Item::Setting(statement) => {
                    let setting = statement.setting_name();
                    if let Some(name) = setting.filter(|n| !known.contains(n)) {
                        tracing::debug!(
                            setting = name,
                            "target does not know a setting of the script; left out"
                        );
                        continue;
                    }
                    client
                        .batch_execute(&statement.text)
                        .await
                        .map_err(|e| fail(statement.text.clone(), e))?;
                }
                Item::Entry(entry) => {
                    let decision = if entry.is_privileges() && !opts.with_privileges {
                        Decision::Skip(String::new())
                    } else {
                        decide(entry)
                    };
                    apply_entry(client, entry, decision, opts, &mut applied)
                        .await
                        .map_err(|e| fail(entry.label(), e))?;
                }
            }
        }
        let warnings = warning_queries(client, &opts.finish_queries)
            .await
            .map_err(|e| fail("finishing".into(), e))?;
        applied.warnings.extend(warnings);
        if let Some(statement) = &opts.finish_with {
            client
                .batch_execute(statement)
                .await
                .map_err(|e| fail("finishing".into(), e))?;
        }
        Ok(applied)
    })
    .await
}

/// Runs `body` between `BEGIN` and `COMMIT` on `client`; on its error, rolls back.
async fn in_transaction<T>(
    client: &Client,
    section: &'static str,
    body: impl std::future::Future<Output = Result<T, ApplyError>>,
) -> Result<T, ApplyError> {
    let fail = |object: &str, cause| ApplyError {
        section,
        object: object.into(),
        cause,
    };
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| fail("starting the transaction", e))?;
    match body.await {
        Ok(done) => {
            client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| fail("committing", e))?;
            Ok(done)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// An entry taken out of its script to run on its own (a table's indexes, built as soon
/// as the table is loaded), with the session settings in effect before it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detached {
    /// The script's settings up to this entry that the target knows, in order.
    pub settings: String,
    pub entry: Entry,
}

/// The entries of `script` that `pick` takes, each with the settings before it (those the
/// target does not know left out, as [`apply`] does).
pub fn detach(
    script: &Script,
    known: &HashSet<String>,
    pick: &mut dyn FnMut(&Entry) -> bool,
) -> Vec<Detached> {
    let mut settings = String::new();
    let mut out = Vec::new();
    for item in &script.items {
        match item {
            Item::Setting(statement) => {
                if statement.setting_name().is_none_or(|n| known.contains(&n)) {
                    settings.push_str(&statement.text);
                    settings.push('\n');
                }
            }
            Item::Entry(entry) if pick(entry) => out.push(Detached {
                settings: settings.clone(),
                entry: entry.clone(),
            }),
            Item::Entry(_) | Item::Meta(_) => {}
        }
    }
    out
}

/// Runs detached entries in one transaction on `client`, each after its settings; then
/// `RESET ALL`, so the connection goes on with its own session defaults.
///
/// # Errors
/// [`ApplyError`] naming the entry; the transaction is rolled back.
pub async fn apply_detached(
    client: &Client,
    entries: &[&Detached],
    section: &'static str,
    opts: &ApplyOptions,
) -> Result<Applied, ApplyError> {
    let fail = |object: String, cause: tokio_postgres::Error| ApplyError {
        section,
        object,
        cause,
    };
    let applied = in_transaction(client, section, async {
        let mut applied = Applied::default();
        for detached in entries {
            let entry = &detached.entry;
            client
                .batch_execute(&detached.settings)
                .await
                .map_err(|e| fail(format!("the settings before {}", entry.label()), e))?;
            apply_entry(client, entry, Decision::Apply, opts, &mut applied)
                .await
                .map_err(|e| fail(entry.label(), e))?;
        }
        Ok(applied)
    })
    .await?;
    client
        .batch_execute("RESET ALL")
        .await
        .map_err(|e| fail("resetting the session settings".into(), e))?;
    Ok(applied)
}

/// Runs one entry's statements as `decision` says, counting it in `applied` (or noting
/// why it was skipped). An optional entry runs under a savepoint: if it fails, it is
/// rolled back alone and reported as a warning.
async fn apply_entry(
    client: &Client,
    entry: &Entry,
    decision: Decision,
    opts: &ApplyOptions,
    applied: &mut Applied,
) -> Result<(), tokio_postgres::Error> {
    let statements = entry
        .statements
        .iter()
        .filter(|s| opts.with_owners || !s.is_owner_change())
        // pg_dump wraps each large objects' data entry in its own transaction; here it
        // runs inside the restore's.
        .filter(|s| !matches!(s.text.trim(), "BEGIN;" | "COMMIT;"));
    match decision {
        Decision::Skip(reason) => {
            if !reason.is_empty() {
                applied
                    .warnings
                    .push(format!("{}: {reason}", entry.label()));
            }
        }
        Decision::Apply => {
            for statement in statements {
                client.batch_execute(&statement.text).await?;
            }
            applied.entries += 1;
        }
        Decision::Optional => {
            client.batch_execute("SAVEPOINT tidemark_entry").await?;
            let mut failed = None;
            for statement in statements {
                if let Err(e) = client.batch_execute(&statement.text).await {
                    failed = Some(crate::db::server_message(&e));
                    break;
                }
            }
            let end = if failed.is_some() {
                "ROLLBACK TO SAVEPOINT tidemark_entry"
            } else {
                "RELEASE SAVEPOINT tidemark_entry"
            };
            client.batch_execute(end).await?;
            match failed {
                Some(message) => applied
                    .warnings
                    .push(format!("{}: skipped ({message})", entry.label())),
                None => applied.entries += 1,
            }
        }
    }
    Ok(())
}

/// The extensions a script creates.
/// The large objects a large-objects script creates (`lo_create('OID')` in its
/// `BLOB`/`BLOB METADATA` entries).
pub fn large_objects(script: &Script) -> Vec<u32> {
    let mut oids = Vec::new();
    for entry in script
        .entries()
        .filter(|e| matches!(e.kind.as_str(), "BLOB" | "BLOB METADATA"))
    {
        for statement in &entry.statements {
            let mut rest = statement.text.as_str();
            while let Some(at) = rest.find("lo_create('") {
                rest = &rest[at + "lo_create('".len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(oid) = digits.parse() {
                    oids.push(oid);
                }
            }
        }
    }
    oids
}

/// Whether `entry` of a large-objects script belongs to the large objects (its other
/// entries, pg_dump's `SEQUENCE SET`s of a data-only dump, do not).
pub fn is_large_object_entry(entry: &Entry) -> bool {
    match entry.kind.as_str() {
        "BLOB" | "BLOB METADATA" | "BLOBS" => true,
        "COMMENT" | "ACL" | "SECURITY LABEL" => entry.name.starts_with("LARGE OBJECT "),
        _ => false,
    }
}

pub fn extensions(script: &Script) -> Vec<String> {
    script
        .entries()
        .filter(|e| e.kind == "EXTENSION")
        .map(|e| e.name.clone())
        .collect()
}

/// The schemas a script creates with `CREATE SCHEMA`.
pub fn created_schemas(script: &Script) -> Vec<String> {
    script
        .entries()
        .filter(|e| e.kind == "SCHEMA")
        .map(|e| e.name.clone())
        .collect()
}

/// The tables (ordinary, partitioned, foreign) a script creates.
pub fn created_tables(script: &Script) -> Vec<TableName> {
    script
        .entries()
        .filter(|e| e.kind == "TABLE" || e.kind == "FOREIGN TABLE")
        .filter_map(|e| Some(TableName::new(e.schema.clone()?, e.name.clone())))
        .collect()
}

/// The materialized views whose data the script refreshes.
pub fn refreshed_views(script: &Script) -> Vec<TableName> {
    script
        .entries()
        .filter(|e| e.kind == "MATERIALIZED VIEW DATA")
        .filter_map(|e| Some(TableName::new(e.schema.clone()?, e.name.clone())))
        .collect()
}

/// Which entries a restore of a table subset needs: the tables themselves (with their
/// partitions, owned sequences, defaults, indexes, constraints, triggers, rules,
/// policies, comments), and every object that does not belong to a relation (types,
/// domains, functions, schemas, extensions...) as optional. Other relations are left
/// out, and so are foreign keys to tables outside the subset (with a warning).
#[derive(Debug, Clone)]
pub struct SubsetPlan {
    selected: HashSet<TableName>,
    /// Relations of each schema, longest name first (tags are `relation object`).
    relations: HashMap<String, Vec<String>>,
    /// Index → the relation it is on.
    index_owner: HashMap<TableName, TableName>,
    /// Sequence → the table that owns it.
    sequence_owner: HashMap<TableName, TableName>,
}

impl SubsetPlan {
    /// `selected`: the restored tables and their partitions; `sequence_owner`: from the
    /// manifest.
    pub fn new(
        selected: HashSet<TableName>,
        sequence_owner: HashMap<TableName, TableName>,
        scripts: &[&Script],
    ) -> Self {
        let mut relations: HashMap<String, Vec<String>> = HashMap::new();
        let mut index_owner = HashMap::new();
        for script in scripts {
            for entry in script.entries() {
                let Some(schema) = entry.schema.clone() else {
                    continue;
                };
                if matches!(
                    entry.kind.as_str(),
                    "TABLE" | "FOREIGN TABLE" | "VIEW" | "MATERIALIZED VIEW" | "SEQUENCE"
                ) {
                    relations
                        .entry(schema.clone())
                        .or_default()
                        .push(entry.name.clone());
                }
                if entry.kind == "INDEX" {
                    if let Some((s, t)) = entry
                        .statements
                        .first()
                        .and_then(|st| st.relation_after("on"))
                    {
                        index_owner.insert(
                            TableName::new(schema.clone(), entry.name.clone()),
                            TableName::new(s.unwrap_or_else(|| schema.clone()), t),
                        );
                    }
                }
            }
        }
        for names in relations.values_mut() {
            names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        }
        Self {
            selected,
            relations,
            index_owner,
            sequence_owner,
        }
    }

    /// The relation of `schema` that `tag` starts with (followed by `sep`).
    fn prefix_relation(&self, schema: &str, tag: &str, sep: char) -> Option<TableName> {
        self.relations.get(schema)?.iter().find_map(|name| {
            let rest = tag.strip_prefix(name.as_str())?;
            rest.starts_with(sep)
                .then(|| TableName::new(schema, name.clone()))
        })
    }

    /// The relation of `schema` that `tag` ends with (after ` ON `).
    fn suffix_relation(&self, schema: &str, tag: &str) -> Option<TableName> {
        self.relations.get(schema)?.iter().find_map(|name| {
            let rest = tag.strip_suffix(name.as_str())?;
            rest.ends_with(" ON ")
                .then(|| TableName::new(schema, name.clone()))
        })
    }

    fn relation_decision(&self, relation: &TableName) -> Decision {
        if self.selected.contains(relation) {
            return Decision::Apply;
        }
        match self.sequence_owner.get(relation) {
            Some(owner) if self.selected.contains(owner) => Decision::Apply,
            Some(_) => Decision::Skip(String::new()),
            None if self
                .relations
                .get(&relation.schema)
                .is_some_and(|r| r.contains(&relation.name)) =>
            {
                Decision::Skip(String::new())
            }
            None => Decision::Optional,
        }
    }

    /// What a subset restore does with `entry`.
    pub fn decide(&self, entry: &Entry) -> Decision {
        let Some(schema) = entry.schema.as_deref() else {
            return Decision::Optional;
        };
        let own = |name: &str| TableName::new(schema, name);
        match entry.kind.as_str() {
            "TABLE"
            | "FOREIGN TABLE"
            | "VIEW"
            | "MATERIALIZED VIEW"
            | "MATERIALIZED VIEW DATA"
            | "TABLE ATTACH"
            | "ROW SECURITY" => {
                if self.selected.contains(&own(&entry.name)) {
                    Decision::Apply
                } else {
                    Decision::Skip(String::new())
                }
            }
            "SEQUENCE" | "SEQUENCE OWNED BY" => {
                let sequence = own(&entry.name);
                match self.sequence_owner.get(&sequence) {
                    Some(owner) if self.selected.contains(owner) => Decision::Apply,
                    Some(_) => Decision::Skip(String::new()),
                    None => Decision::Optional,
                }
            }
            "INDEX" => match self.index_owner.get(&own(&entry.name)) {
                Some(owner) => self.relation_decision(owner),
                None => Decision::Optional,
            },
            "INDEX ATTACH" => match self.index_owner.get(&own(&entry.name)) {
                Some(owner) => self.relation_decision(owner),
                None => Decision::Optional,
            },
            "STATISTICS" => match entry
                .statements
                .first()
                .and_then(|s| s.relation_after("from"))
            {
                Some((s, t)) => {
                    self.relation_decision(&TableName::new(s.unwrap_or_else(|| schema.into()), t))
                }
                None => Decision::Optional,
            },
            "FK CONSTRAINT" => {
                let Some(owner) = self.prefix_relation(schema, &entry.name, ' ') else {
                    return Decision::Optional;
                };
                if !self.selected.contains(&owner) {
                    return Decision::Skip(String::new());
                }
                let referenced = entry
                    .statements
                    .first()
                    .and_then(|s| s.relation_after("references"))
                    .map(|(s, t)| TableName::new(s.unwrap_or_else(|| schema.into()), t));
                match referenced {
                    Some(r) if !self.selected.contains(&r) => Decision::Skip(format!(
                        "foreign key skipped: it references {r}, which this restore does not include"
                    )),
                    _ => Decision::Apply,
                }
            }
            "DEFAULT" | "CONSTRAINT" | "CHECK CONSTRAINT" | "TRIGGER" | "RULE" | "POLICY" => {
                match self.prefix_relation(schema, &entry.name, ' ') {
                    Some(owner) => self.relation_decision(&owner),
                    None => Decision::Optional,
                }
            }
            "COMMENT" | "SECURITY LABEL" | "ACL" => self.described_object(schema, &entry.name),
            _ => Decision::Optional,
        }
    }

    /// For comments, labels and privileges: the tag names the object (`TABLE t`,
    /// `COLUMN t.c`, `INDEX i`, `TRIGGER x ON t`, ...).
    fn described_object(&self, schema: &str, tag: &str) -> Decision {
        for prefix in [
            "TABLE ",
            "VIEW ",
            "MATERIALIZED VIEW ",
            "SEQUENCE ",
            "FOREIGN TABLE ",
        ] {
            if let Some(name) = tag.strip_prefix(prefix) {
                return self.relation_decision(&TableName::new(schema, name));
            }
        }
        if let Some(rest) = tag.strip_prefix("COLUMN ") {
            return match self.prefix_relation(schema, rest, '.') {
                Some(owner) => self.relation_decision(&owner),
                None => Decision::Optional,
            };
        }
        if let Some(name) = tag.strip_prefix("INDEX ") {
            return match self.index_owner.get(&TableName::new(schema, name)) {
                Some(owner) => self.relation_decision(owner),
                None => Decision::Optional,
            };
        }
        if ["CONSTRAINT ", "TRIGGER ", "POLICY ", "RULE "]
            .iter()
            .any(|p| tag.starts_with(p))
        {
            return match self.suffix_relation(schema, tag) {
                Some(owner) => self.relation_decision(&owner),
                None => Decision::Optional,
            };
        }
        Decision::Optional
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRE: &str = "--
-- Name: mood; Type: TYPE; Schema: app; Owner: o
--

CREATE TYPE app.mood AS ENUM ('a');

--
-- Name: people; Type: TABLE; Schema: app; Owner: o
--

CREATE TABLE app.people (id integer);

--
-- Name: people_id_seq; Type: SEQUENCE; Schema: app; Owner: o
--

ALTER TABLE app.people ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (SEQUENCE NAME app.people_id_seq);

--
-- Name: people x; Type: TABLE; Schema: app; Owner: o
--

CREATE TABLE app.\"people x\" (id integer);

--
-- Name: adults; Type: VIEW; Schema: app; Owner: o
--

CREATE VIEW app.adults AS SELECT 1;

--
-- Name: COLUMN people x.id; Type: COMMENT; Schema: app; Owner: o
--

COMMENT ON COLUMN app.\"people x\".id IS 'c';
";

    const POST: &str = "--
-- Name: people_pkey_idx; Type: INDEX; Schema: app; Owner: o
--

CREATE UNIQUE INDEX people_pkey_idx ON app.people USING btree (id);

--
-- Name: people x people x_fk; Type: FK CONSTRAINT; Schema: app; Owner: o
--

ALTER TABLE ONLY app.\"people x\"
    ADD CONSTRAINT \"people x_fk\" FOREIGN KEY (id) REFERENCES app.people(id);

--
-- Name: people people_fk; Type: FK CONSTRAINT; Schema: app; Owner: o
--

ALTER TABLE ONLY app.people
    ADD CONSTRAINT people_fk FOREIGN KEY (id) REFERENCES app.\"people x\"(id);

--
-- Name: people audit; Type: TRIGGER; Schema: app; Owner: o
--

CREATE TRIGGER audit AFTER INSERT ON app.people FOR EACH STATEMENT EXECUTE FUNCTION f();

--
-- Name: TRIGGER audit ON people; Type: COMMENT; Schema: app; Owner: o
--

COMMENT ON TRIGGER audit ON app.people IS 't';
";

    #[test]
    fn a_subset_keeps_its_tables_objects_and_drops_the_rest() {
        let pre = Script::parse(PRE).expect("pre");
        let post = Script::parse(POST).expect("post");
        let people = TableName::new("app", "people");
        let plan = SubsetPlan::new(
            [people.clone()].into_iter().collect(),
            [(TableName::new("app", "people_id_seq"), people.clone())]
                .into_iter()
                .collect(),
            &[&pre, &post],
        );
        let decisions: Vec<(String, Decision)> = pre
            .entries()
            .chain(post.entries())
            .map(|e| (e.label(), plan.decide(e)))
            .collect();
        let skip = || Decision::Skip(String::new());
        assert_eq!(
            decisions,
            vec![
                ("TYPE app.mood".into(), Decision::Optional),
                ("TABLE app.people".into(), Decision::Apply),
                ("SEQUENCE app.people_id_seq".into(), Decision::Apply),
                ("TABLE people x (schema app)".into(), skip()),
                ("VIEW app.adults".into(), skip()),
                ("COMMENT COLUMN people x.id (schema app)".into(), skip()),
                ("INDEX app.people_pkey_idx".into(), Decision::Apply),
                ("FK CONSTRAINT people x people x_fk (schema app)".into(), skip()),
                (
                    "FK CONSTRAINT people people_fk (schema app)".into(),
                    Decision::Skip(
                        "foreign key skipped: it references app.\"people x\", which this restore does not include".into()
                    )
                ),
                ("TRIGGER people audit (schema app)".into(), Decision::Apply),
                ("COMMENT TRIGGER audit ON people (schema app)".into(), Decision::Apply),
            ]
        );
    }

    #[test]
    fn script_facts() {
        let pre = Script::parse(PRE).expect("pre");
        assert_eq!(
            created_tables(&pre),
            vec![
                TableName::new("app", "people"),
                TableName::new("app", "people x")
            ]
        );
        assert!(extensions(&pre).is_empty());
    }

    #[test]
    fn a_large_objects_script_names_its_objects() {
        let script = Script::parse(
            "--
-- Name: 16390..424243; Type: BLOB METADATA; Schema: -; Owner: postgres
--

SELECT pg_catalog.lo_create('16390');
SELECT pg_catalog.lo_create('424243');

--
-- Name: LARGE OBJECT 16390; Type: COMMENT; Schema: -; Owner: postgres
--

COMMENT ON LARGE OBJECT 16390 IS 'lo_create(''1'')';

--
-- Name: s; Type: SEQUENCE SET; Schema: public; Owner: postgres
--

SELECT pg_catalog.setval('public.s', 3, true);
",
        )
        .expect("parses");
        assert_eq!(large_objects(&script), vec![16390, 424243]);
        let kinds: Vec<bool> = script.entries().map(is_large_object_entry).collect();
        assert_eq!(kinds, vec![true, true, false]);
    }
}
