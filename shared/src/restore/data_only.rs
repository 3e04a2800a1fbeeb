//! `--data-only`: loading into tables the user's migrations created, with their foreign
//! keys and triggers in place, so that no constraint fails midway and no user trigger
//! fires on restored rows.
//!
//! - As a superuser (like `pg_restore --data-only --disable-triggers`): each table's load
//!   transaction disables all of its triggers — foreign-key checks included — and puts
//!   every trigger back in the state it had. Tables load in parallel.
//! - Otherwise: tables load in foreign-key order (referenced tables first). Tables that
//!   reference each other load together in one transaction with their constraints
//!   deferred, which needs the constraints to be `DEFERRABLE`; a table that references
//!   itself lands its rows in one statement. User triggers are disabled on the tables
//!   the restoring role owns; on others they fire, and the output says so.

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio_postgres::Client;

use super::RestoreError;
use crate::db::{DbError, DbSettings};
use crate::format::manifest::TableEntry;
use crate::format::{quote_ident, TableName};

/// How a data-only restore keeps constraints and triggers quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Superuser: every trigger (foreign-key checks included) disabled per table.
    TriggersDisabled,
    /// Not a superuser: foreign-key order, cycles deferred, user triggers disabled on
    /// owned tables.
    ForeignKeyOrder,
}

/// The load order and what it needs.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub method: Method,
    /// Groups of table indexes in load order; a group loads in one transaction (with
    /// constraints deferred when it has more than one table or a deferrable self-reference).
    pub groups: Vec<Vec<usize>>,
    /// Tables whose rows must land in one statement (a non-deferrable self-reference).
    pub staged: HashSet<usize>,
    /// Tables whose user triggers the restoring role may disable.
    pub owned: HashSet<usize>,
    pub warnings: Vec<String>,
}

impl Plan {
    /// One line for the output: what the restore did about constraints and triggers.
    pub fn describe(&self) -> String {
        match self.method {
            Method::TriggersDisabled => {
                "data-only: triggers and foreign-key checks disabled during the load (superuser), then restored as they were".into()
            }
            Method::ForeignKeyOrder => {
                "data-only: loaded in foreign-key order, cycles with constraints deferred, user triggers disabled on owned tables (not a superuser)".into()
            }
        }
    }
}

fn q<'a>(
    target: &'a DbSettings,
    what: &'static str,
) -> impl Fn(tokio_postgres::Error) -> RestoreError + 'a {
    move |e| RestoreError::Db(DbError::query(what, target, e))
}

/// Plans a data-only load of `tables` into the target `client` is connected to.
///
/// # Errors
/// [`RestoreError::ForeignKeyCycle`] when a non-superuser would have to load tables that
/// reference each other through constraints that cannot be deferred; query errors.
pub(super) async fn plan(
    client: &Client,
    target: &DbSettings,
    tables: &[TableEntry],
) -> Result<Plan, RestoreError> {
    let superuser: bool = client
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(q(target, "checking the restoring role"))?
        .get(0);
    if superuser {
        return Ok(Plan {
            method: Method::TriggersDisabled,
            groups: (0..tables.len()).map(|t| vec![t]).collect(),
            staged: HashSet::new(),
            owned: (0..tables.len()).collect(),
            warnings: Vec::new(),
        });
    }
    let edges = foreign_keys(client, target, tables).await?;
    let names: Vec<TableName> = tables.iter().map(|t| t.name.clone()).collect();
    let (groups, staged) = load_order(&names, &edges)?;
    let (owned, warnings) = owned_tables(client, target, tables).await?;
    Ok(Plan {
        method: Method::ForeignKeyOrder,
        groups,
        staged,
        owned,
        warnings,
    })
}

/// The foreign keys among `tables` (partitions folded into their roots), as
/// referencing -> referenced, each with whether every such constraint is deferrable.
async fn foreign_keys(
    client: &Client,
    target: &DbSettings,
    tables: &[TableEntry],
) -> Result<BTreeMap<(usize, usize), bool>, RestoreError> {
    let index: HashMap<&TableName, usize> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| (&t.name, i))
        .collect();
    let rows = client
        .query(
            "SELECT rn.nspname::text, r.relname::text, fn.nspname::text, f.relname::text, c.condeferrable \
             FROM pg_constraint c \
             JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.conrelid), c.conrelid) \
             JOIN pg_namespace rn ON rn.oid = r.relnamespace \
             JOIN pg_class f ON f.oid = coalesce(pg_partition_root(c.confrelid), c.confrelid) \
             JOIN pg_namespace fn ON fn.oid = f.relnamespace \
             WHERE c.contype = 'f' AND c.conparentid = 0",
            &[],
        )
        .await
        .map_err(q(target, "reading foreign keys"))?;
    let mut edges: BTreeMap<(usize, usize), bool> = BTreeMap::new();
    for row in rows {
        let from = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let to = TableName::new(row.get::<_, String>(2), row.get::<_, String>(3));
        let deferrable: bool = row.get(4);
        if let (Some(&a), Some(&b)) = (index.get(&from), index.get(&to)) {
            let e = edges.entry((a, b)).or_insert(true);
            *e = *e && deferrable;
        }
    }
    Ok(edges)
}

/// Groups of tables in load order (referenced before referencing; tables that reference
/// each other in one group, checked at commit), and the tables that reference themselves
/// through a constraint that cannot be deferred (loaded through a staging table).
///
/// # Errors
/// [`RestoreError::ForeignKeyCycle`] for a group held together by a constraint that
/// cannot be deferred.
fn load_order(
    tables: &[TableName],
    edges: &BTreeMap<(usize, usize), bool>,
) -> Result<(Vec<Vec<usize>>, HashSet<usize>), RestoreError> {
    let mut groups = Vec::new();
    let mut staged = HashSet::new();
    for component in strongly_connected(tables.len(), edges) {
        if component.len() > 1 {
            let fixed = edges.iter().any(|((a, b), deferrable)| {
                !*deferrable && component.contains(a) && component.contains(b)
            });
            if fixed {
                let mut names: Vec<String> =
                    component.iter().map(|&t| tables[t].to_string()).collect();
                names.sort();
                return Err(RestoreError::ForeignKeyCycle { tables: names });
            }
        } else if edges.get(&(component[0], component[0])) == Some(&false) {
            staged.insert(component[0]);
        }
        groups.push(component);
    }
    Ok((groups, staged))
}

/// The tables whose user triggers the restoring role may disable (it owns them), and a
/// warning for each table with user triggers it does not own.
async fn owned_tables(
    client: &Client,
    target: &DbSettings,
    tables: &[TableEntry],
) -> Result<(HashSet<usize>, Vec<String>), RestoreError> {
    let names: Vec<String> = tables.iter().map(|t| t.name.quoted()).collect();
    let owned_rows = client
        .query(
            "SELECT n::text, pg_has_role(c.relowner, 'USAGE') FROM unnest($1::text[]) n \
             JOIN pg_class c ON c.oid = to_regclass(n)",
            &[&names],
        )
        .await
        .map_err(q(target, "checking table owners"))?;
    let mut owned = HashSet::new();
    let mut warnings = Vec::new();
    for row in owned_rows {
        let name: String = row.get(0);
        let Some(t) = names.iter().position(|n| *n == name) else {
            continue;
        };
        if row.get::<_, bool>(1) {
            owned.insert(t);
        } else if has_user_triggers(client, target, &tables[t].name).await? {
            warnings.push(format!(
                "user triggers on {} will fire on restored rows: the restoring role does not own the table",
                tables[t].name
            ));
        }
    }
    Ok((owned, warnings))
}

async fn has_user_triggers(
    client: &Client,
    target: &DbSettings,
    table: &TableName,
) -> Result<bool, RestoreError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE NOT tgisinternal AND tgenabled <> 'D' \
               AND tgrelid IN (SELECT relid FROM pg_partition_tree(to_regclass($1)) UNION SELECT to_regclass($1)))",
            &[&table.quoted()],
        )
        .await
        .map_err(q(target, "reading triggers"))?
        .get(0))
}

/// Tarjan's strongly connected components of `edges` (a → b: a references b), each
/// component listed after every component it references.
fn strongly_connected(n: usize, edges: &BTreeMap<(usize, usize), bool>) -> Vec<Vec<usize>> {
    let mut adjacency = vec![Vec::new(); n];
    for &(a, b) in edges.keys() {
        adjacency[a].push(b);
    }
    struct State {
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(v: usize, adjacency: &[Vec<usize>], s: &mut State) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for &w in &adjacency[v] {
            match s.index[w] {
                None => {
                    visit(w, adjacency, s);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            component.sort_unstable();
            s.out.push(component);
        }
    }
    let mut state = State {
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if state.index[v].is_none() {
            visit(v, &adjacency, &mut state);
        }
    }
    // Tarjan emits a component only after every component reachable from it: exactly
    // "referenced tables first".
    state.out
}

/// The relations of `table` on the target: itself and all its partitions, quoted.
async fn relations(
    client: &Client,
    target: &DbSettings,
    table: &TableName,
) -> Result<Vec<String>, RestoreError> {
    Ok(client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1) \
                OR c.oid IN (SELECT relid FROM pg_partition_tree(to_regclass($1))) \
             ORDER BY 1",
            &[&table.quoted()],
        )
        .await
        .map_err(q(target, "listing partitions"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Triggers switched off for a load, and how to put them back.
#[derive(Debug)]
pub(super) struct DisabledTriggers {
    relations: Vec<String>,
    which: &'static str,
    /// (relation, trigger, tgenabled) of triggers not in the default state `O`.
    special: Vec<(String, String, String)>,
}

/// Disables the triggers of `table` (and its partitions) inside the caller's transaction:
/// `ALL` (superuser) or `USER`.
pub(super) async fn disable_triggers(
    client: &Client,
    target: &DbSettings,
    table: &TableName,
    all: bool,
) -> Result<DisabledTriggers, RestoreError> {
    let relations = relations(client, target, table).await?;
    let which = if all { "ALL" } else { "USER" };
    let rows = client
        .query(
            &format!(
                "SELECT format('%I.%I', n.nspname, c.relname), t.tgname::text, t.tgenabled::text \
                 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE t.tgrelid = ANY($1::text[]::regclass[]) AND t.tgenabled <> 'O' {}",
                if all { "" } else { "AND NOT t.tgisinternal" }
            ),
            &[&relations],
        )
        .await
        .map_err(q(target, "reading trigger states"))?;
    let special = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for relation in &relations {
        client
            .batch_execute(&format!("ALTER TABLE {relation} DISABLE TRIGGER {which}"))
            .await
            .map_err(|e| {
                RestoreError::table(table, DbError::query("disabling triggers", target, e))
            })?;
    }
    Ok(DisabledTriggers {
        relations,
        which,
        special,
    })
}

impl DisabledTriggers {
    /// Puts every trigger back in the state it had, inside the same transaction.
    pub(super) async fn restore(
        self,
        client: &Client,
        target: &DbSettings,
        table: &TableName,
    ) -> Result<(), RestoreError> {
        let err = |e| RestoreError::table(table, DbError::query("re-enabling triggers", target, e));
        for relation in &self.relations {
            client
                .batch_execute(&format!(
                    "ALTER TABLE {relation} ENABLE TRIGGER {}",
                    self.which
                ))
                .await
                .map_err(err)?;
        }
        for (relation, trigger, state) in &self.special {
            let action = match state.as_str() {
                "D" => "DISABLE TRIGGER",
                "R" => "ENABLE REPLICA TRIGGER",
                "A" => "ENABLE ALWAYS TRIGGER",
                _ => continue,
            };
            client
                .batch_execute(&format!(
                    "ALTER TABLE {relation} {action} {}",
                    quote_ident(trigger)
                ))
                .await
                .map_err(err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_come_referenced_first() {
        // 0 -> 1 (0 references 1), 1 <-> 2 (a cycle), 3 alone, 3 -> 0.
        let edges: BTreeMap<(usize, usize), bool> = [
            ((0, 1), true),
            ((1, 2), true),
            ((2, 1), true),
            ((3, 0), false),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            strongly_connected(4, &edges),
            vec![vec![1, 2], vec![0], vec![3]]
        );
    }

    fn names(n: usize) -> Vec<TableName> {
        (0..n)
            .map(|i| TableName::new("public", format!("t{i}")))
            .collect()
    }

    #[test]
    fn deferrable_cycles_load_together_and_fixed_self_references_are_staged() {
        // 0 -> 1, 1 <-> 2 (deferrable), 3 references itself (not deferrable).
        let edges: BTreeMap<(usize, usize), bool> = [
            ((0, 1), true),
            ((1, 2), true),
            ((2, 1), true),
            ((3, 3), false),
        ]
        .into_iter()
        .collect();
        let (groups, staged) = load_order(&names(4), &edges).expect("a load order");
        assert_eq!(groups, vec![vec![1, 2], vec![0], vec![3]]);
        assert_eq!(staged, HashSet::from([3]));
    }

    #[test]
    fn a_cycle_held_by_a_constraint_that_cannot_be_deferred_is_refused_naming_its_tables() {
        let edges: BTreeMap<(usize, usize), bool> =
            [((0, 1), true), ((1, 0), false), ((2, 2), true)]
                .into_iter()
                .collect();
        match load_order(&names(3), &edges) {
            Err(RestoreError::ForeignKeyCycle { tables }) => {
                assert_eq!(tables, vec!["public.t0", "public.t1"]);
            }
            other => panic!("expected a foreign key cycle, got {other:?}"),
        }
    }
}
