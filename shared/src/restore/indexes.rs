//! A table's indexes, built as soon as its data is in.
//!
//! pg_restore builds every index after all the data; Tidemark's loading worker builds a
//! table's indexes (its `INDEX` entries and the `PRIMARY KEY`, `UNIQUE` and `EXCLUDE`
//! constraints that bring one) right after the table's load commits, while the other
//! workers are still loading, as pgcopydb does. Each table's builds run in one
//! transaction, after the post-data script's settings in effect before each entry, so
//! they do what the post-data script would. The rest of the post-data section (foreign
//! keys, triggers, rules, policies, comments, index attachments of partitions) still runs
//! in one transaction once every table is in, and leaves out the indexes that exist.
//!
//! Only plain tables of the restore take part: partitioned tables and their partitions
//! keep their indexes in the post-data transaction (their `ATTACH` order matters). Builds
//! are idempotent: an index that exists (a slice that died after building) is left alone.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_postgres::Client;

use super::error::RestoreError;
use crate::format::manifest::TableEntry;
use crate::format::TableName;
use crate::schema::apply::{self, ApplyOptions, Decision, Detached};
use crate::schema::script::{Entry, Token};
use crate::schema::Script;

/// The post-data entries that build the indexes of each plain table of a restore.
#[derive(Debug, Default)]
pub(super) struct IndexBuilds {
    /// Table → its entries, in script order, each with the index it creates.
    by_table: HashMap<TableName, Vec<(TableName, Detached)>>,
    options: ApplyOptions,
    /// A resumed restore: an earlier slice may have built some indexes already. (A
    /// restore into a target it has just checked holds none of them.)
    resumed: bool,
    /// Entries this restore built early.
    built: AtomicUsize,
}

impl IndexBuilds {
    /// Takes from `post` the index entries of the `plain` tables ([`plain_tables`]) that
    /// `decide` applies.
    pub(super) fn plan(
        post: &Script,
        plain: &HashSet<TableName>,
        known: &HashSet<String>,
        options: &ApplyOptions,
        resumed: bool,
        decide: &dyn Fn(&Entry) -> Decision,
    ) -> Self {
        let mut found = Vec::new();
        let detached = apply::detach(post, known, &mut |entry| {
            let Some(built) = index_of(entry).filter(|(table, _)| plain.contains(table)) else {
                return false;
            };
            if decide(entry) != Decision::Apply {
                return false;
            }
            found.push(built);
            true
        });
        let mut by_table: HashMap<TableName, Vec<(TableName, Detached)>> = HashMap::new();
        for ((table, index), entry) in found.into_iter().zip(detached) {
            by_table.entry(table).or_default().push((index, entry));
        }
        Self {
            by_table,
            options: ApplyOptions {
                finish_queries: Vec::new(),
                finish_with: None,
                ..options.clone()
            },
            resumed,
            built: AtomicUsize::new(0),
        }
    }

    /// The indexes this plan builds.
    pub(super) fn indexes(&self) -> impl Iterator<Item = &TableName> {
        self.by_table.values().flatten().map(|(index, _)| index)
    }

    /// How many entries this restore built.
    pub(super) fn built(&self) -> usize {
        self.built.load(Ordering::Relaxed)
    }

    /// Builds `table`'s indexes (in a resumed restore, those that do not exist yet), in
    /// one transaction.
    ///
    /// # Errors
    /// The entry the target refused, by name (nothing of the table's builds is left).
    pub(super) async fn build(
        &self,
        client: &Client,
        table: &TableName,
    ) -> Result<(), RestoreError> {
        let Some(entries) = self.by_table.get(table) else {
            return Ok(());
        };
        let present = if self.resumed {
            existing(client, entries.iter().map(|(index, _)| index))
                .await
                .map_err(|cause| apply::ApplyError {
                    section: "post-data",
                    object: format!("checking the indexes of {table}"),
                    cause,
                })?
        } else {
            HashSet::new()
        };
        let missing: Vec<&Detached> = entries
            .iter()
            .filter(|(index, _)| !present.contains(index))
            .map(|(_, entry)| entry)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let applied = apply::apply_detached(client, &missing, "post-data", &self.options).await?;
        self.built.fetch_add(applied.entries, Ordering::Relaxed);
        tracing::debug!(
            table = %table,
            indexes = applied.entries,
            seconds = started.elapsed().as_secs_f64(),
            "indexes built"
        );
        Ok(())
    }
}

/// The tables of a restore that are neither partitioned nor partitions (these are the
/// backup's tables: a partition is listed under its parent).
pub(super) fn plain_tables(tables: &[TableEntry]) -> HashSet<TableName> {
    tables
        .iter()
        .filter(|t| !t.schema.is_partitioned() && t.schema.partitions.is_empty())
        .map(|t| t.name.clone())
        .collect()
}

/// Which of `indexes` exist in the database `client` is on.
///
/// # Errors
/// The query's error.
pub(super) async fn existing<'a>(
    client: &Client,
    indexes: impl Iterator<Item = &'a TableName>,
) -> Result<HashSet<TableName>, tokio_postgres::Error> {
    let (schemas, names): (Vec<&str>, Vec<&str>) = indexes
        .map(|i| (i.schema.as_str(), i.name.as_str()))
        .unzip();
    if names.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('i', 'I') \
             AND (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            &[&schemas, &names],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// For an entry that builds one index on one table: `(table, index)`. `INDEX` entries
/// (`CREATE [UNIQUE] INDEX i ON s.t ...`), and `CONSTRAINT` entries that add a
/// `PRIMARY KEY`, `UNIQUE` or `EXCLUDE` constraint (whose index takes the constraint's
/// name). Foreign keys, checks and indexes on `ONLY` a partitioned table are not.
pub(super) fn index_of(entry: &Entry) -> Option<(TableName, TableName)> {
    // Asked of every post-data entry: only these two kinds are read further.
    if !matches!(entry.kind.as_str(), "INDEX" | "CONSTRAINT") {
        return None;
    }
    let schema = entry.schema.as_deref()?;
    let statement = entry.statements.first()?;
    let tokens = statement.tokens();
    let word = |w: &str| Token::Word(w.into());
    match entry.kind.as_str() {
        "INDEX" => {
            let on = tokens.iter().position(|t| *t == word("on"))?;
            if tokens.get(on + 1) == Some(&word("only")) {
                return None;
            }
            let (s, t) = statement.relation_after("on")?;
            let table = TableName::new(s.unwrap_or_else(|| schema.to_owned()), t);
            Some((table, TableName::new(schema, entry.name.clone())))
        }
        "CONSTRAINT" => {
            let (s, t) = statement.relation_after("table")?;
            let add = tokens
                .windows(2)
                .position(|w| w[0] == word("add") && w[1] == word("constraint"))?;
            let name = match tokens.get(add + 2)? {
                Token::Word(w) | Token::Quoted(w) => w.clone(),
                _ => return None,
            };
            let kind = tokens.get(add + 3)?;
            if ![word("primary"), word("unique"), word("exclude")].contains(kind) {
                return None;
            }
            let table = TableName::new(s.unwrap_or_else(|| schema.to_owned()), t);
            Some((table, TableName::new(schema, name)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POST: &str = r#"--
-- PostgreSQL database dump
--

SET statement_timeout = 0;
SET transaction_timeout = 0;
SELECT pg_catalog.set_config('search_path', '', false);

--
-- Name: people people_pkey; Type: CONSTRAINT; Schema: app; Owner: o
--

ALTER TABLE ONLY app.people
    ADD CONSTRAINT people_pkey PRIMARY KEY (id);

--
-- Name: people x u x; Type: CONSTRAINT; Schema: app; Owner: o
--

ALTER TABLE ONLY app."people x"
    ADD CONSTRAINT "u x" UNIQUE (id) INCLUDE (name);

SET default_tablespace = fast;

--
-- Name: people_name; Type: INDEX; Schema: app; Owner: o
--

CREATE INDEX people_name ON app.people USING btree (lower(name));

ALTER TABLE app.people CLUSTER ON people_name;

SET default_tablespace = '';

--
-- Name: parts_id; Type: INDEX; Schema: app; Owner: o
--

CREATE INDEX parts_id ON ONLY app.parts USING btree (id);

--
-- Name: people people_fk; Type: FK CONSTRAINT; Schema: app; Owner: o
--

ALTER TABLE ONLY app.people
    ADD CONSTRAINT people_fk FOREIGN KEY (id) REFERENCES app.people(id);

--
-- Name: people people_check; Type: CONSTRAINT; Schema: app; Owner: o
--

ALTER TABLE app.people
    ADD CONSTRAINT people_check CHECK (id > 0) NOT VALID;
"#;

    #[test]
    fn the_entries_that_build_one_index_of_a_table_are_recognised() {
        let post = Script::parse(POST).expect("parses");
        let found: Vec<Option<(TableName, TableName)>> = post.entries().map(index_of).collect();
        let pair = |t: &str, i: &str| Some((TableName::new("app", t), TableName::new("app", i)));
        assert_eq!(
            found,
            vec![
                pair("people", "people_pkey"),
                pair("people x", "u x"),
                pair("people", "people_name"),
                None,
                None,
                None,
            ]
        );
    }

    #[test]
    fn each_detached_index_keeps_the_settings_before_it_and_only_applied_tables_take_part() {
        let post = Script::parse(POST).expect("parses");
        let known: HashSet<String> = ["statement_timeout", "default_tablespace"]
            .into_iter()
            .map(String::from)
            .collect();
        let tables: HashSet<TableName> = ["people", "people x", "parts"]
            .into_iter()
            .map(|t| TableName::new("app", t))
            .collect();
        let skip_u = |e: &Entry| {
            if e.name.contains("\"u x\"") || e.name.ends_with(" u x") {
                Decision::Optional
            } else {
                Decision::Apply
            }
        };
        let plan = IndexBuilds::plan(
            &post,
            &tables,
            &known,
            &ApplyOptions::default(),
            false,
            &skip_u,
        );
        let people = &plan.by_table[&TableName::new("app", "people")];
        let names: Vec<&str> = people.iter().map(|(i, _)| i.name.as_str()).collect();
        assert_eq!(names, ["people_pkey", "people_name"]);
        let header = "SET statement_timeout = 0;\n\
                      SELECT pg_catalog.set_config('search_path', '', false);\n";
        assert_eq!(people[0].1.settings, header);
        assert_eq!(
            people[1].1.settings,
            format!("{header}SET default_tablespace = fast;\n")
        );
        assert_eq!(
            people[1].1.entry.statements.len(),
            2,
            "CLUSTER ON goes along"
        );
        assert!(
            !plan
                .by_table
                .contains_key(&TableName::new("app", "people x")),
            "an entry not simply applied stays in the post-data transaction"
        );
        assert_eq!(plan.indexes().count(), 2);
    }
}
