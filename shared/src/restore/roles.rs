//! Creating the roles the backup's objects need (`create_roles`).

use super::error::RestoreError;
use crate::db::{DbError, DbSettings};
use crate::schema::apply::ApplyError;
use crate::schema::{self, Script};
use std::collections::HashSet;
use tokio_postgres::Client;

/// Creates the roles the globals script names that the target lacks (with their
/// attributes, settings and memberships); returns their names.
pub(super) async fn create_roles(
    client: &Client,
    target: &DbSettings,
    globals: &Script,
) -> Result<Vec<String>, RestoreError> {
    let existing: HashSet<String> = client
        .query("SELECT rolname::text FROM pg_roles", &[])
        .await
        .map_err(|e| DbError::query("listing roles", target, e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let role_of = |s: &schema::Statement, verb: &str| -> Option<String> {
        let tokens = s.tokens();
        match tokens.as_slice() {
            [schema::script::Token::Word(v), schema::script::Token::Word(role), name, ..]
                if v == verb && role == "role" =>
            {
                match name {
                    schema::script::Token::Word(w) => Some(w.clone()),
                    schema::script::Token::Quoted(q) => Some(q.clone()),
                    _ => None,
                }
            }
            _ => None,
        }
    };
    let statements: Vec<&schema::Statement> = globals
        .entries()
        .flat_map(|e| e.statements.iter())
        .collect();
    let created: Vec<String> = statements
        .iter()
        .filter_map(|s| role_of(s, "create"))
        .filter(|r| !existing.contains(r))
        .collect();
    if created.is_empty() {
        return Ok(created);
    }
    let mut sql = vec!["BEGIN".to_owned()];
    for s in &statements {
        let for_new = role_of(s, "create")
            .or_else(|| role_of(s, "alter"))
            .is_some_and(|r| created.contains(&r));
        // Memberships of a new role: `GRANT a TO b ...` naming a created role.
        let grant = s.words(1).first().map(String::as_str) == Some("grant")
            && !s.text.to_uppercase().contains(" ON ")
            && s.tokens().iter().any(|t| match t {
                schema::script::Token::Word(w) | schema::script::Token::Quoted(w) => {
                    created.contains(w)
                }
                _ => false,
            });
        if for_new || grant {
            sql.push(s.text.trim_end_matches(';').to_owned());
        }
    }
    sql.push("COMMIT".to_owned());
    client.batch_execute(&sql.join(";\n")).await.map_err(|e| {
        RestoreError::Apply(ApplyError {
            section: "globals",
            object: format!("roles {}", created.join(", ")),
            cause: e,
        })
    })?;
    Ok(created)
}
