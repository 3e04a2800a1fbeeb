//! Connections that know which server they are on, so that every error they give names
//! the server and what was being done, without the settings passed beside them; and the
//! snapshot transaction an export reads in.
//!
//! A [`Connection`] owns the connection. Work is done through a [`Session`], a cheap view
//! of one: either of the connection itself ([`Connection::session`]) or of a snapshot
//! transaction on it ([`Snapshot::session`]), so the same export code reads in either.

use std::ops::Deref;

use tokio_postgres::{Client, IsolationLevel, Transaction};

use super::copy::CopyError;
use super::{DbError, DbSettings};
use crate::format::quote_literal;

/// A connection to the server and its name for errors.
pub struct Connection {
    client: Client,
    /// The server as errors name it (`user@host:port/dbname`, never the password).
    target: String,
}

impl Connection {
    /// Opens a connection with the pinned session settings (see [`super::connect`]).
    ///
    /// # Errors
    /// [`DbError::Connect`] naming the server.
    pub async fn connect(settings: &DbSettings) -> Result<Self, DbError> {
        Ok(Self {
            client: super::connect(settings).await?,
            target: settings.to_string(),
        })
    }

    /// Statements on the connection, outside any transaction of this type.
    pub fn session(&self) -> Session<'_> {
        Session {
            client: &self.client,
            target: &self.target,
        }
    }

    /// Starts a repeatable-read, read-only transaction: in a snapshot of its own
    /// (`import` `None`), or in the exported snapshot `import` names (`SET TRANSACTION
    /// SNAPSHOT`), which must still be held by the transaction that exported it.
    ///
    /// # Errors
    /// [`DbError::Query`] naming the server, when the transaction cannot start or the
    /// snapshot cannot be imported.
    pub async fn snapshot(&mut self, import: Option<&str>) -> Result<Snapshot<'_>, DbError> {
        let target = self.target.as_str();
        let txn = self
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| DbError::query_at("starting a snapshot transaction", target, e))?;
        if let Some(id) = import {
            txn.batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(id)))
                .await
                .map_err(|e| DbError::query_at("importing the snapshot", target, e))?;
        }
        Ok(Snapshot { txn, target })
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("target", &self.target)
            .finish()
    }
}

/// A repeatable-read, read-only transaction: one moment of the database. It ends with
/// [`Snapshot::commit`]; dropped without it (an error on the way), it rolls back.
pub struct Snapshot<'a> {
    txn: Transaction<'a>,
    target: &'a str,
}

impl Snapshot<'_> {
    /// Statements in the snapshot.
    pub fn session(&self) -> Session<'_> {
        Session {
            client: self.txn.client(),
            target: self.target,
        }
    }

    /// Ends the transaction.
    ///
    /// # Errors
    /// [`DbError::Query`] when the COMMIT fails (the connection was lost).
    pub async fn commit(self) -> Result<(), DbError> {
        let target = self.target;
        self.txn
            .commit()
            .await
            .map_err(|e| DbError::query_at("ending the snapshot transaction", target, e))
    }
}

impl std::fmt::Debug for Snapshot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// A connection's statements (through [`Deref`] to [`Client`]) and the server it is on,
/// for errors that name it.
#[derive(Clone, Copy)]
pub struct Session<'a> {
    client: &'a Client,
    target: &'a str,
}

impl Session<'_> {
    /// The server, as errors name it.
    pub fn target(&self) -> &str {
        self.target
    }

    /// Maps a failed statement to a [`DbError`] naming `what` was done, and where.
    pub fn failed(&self, what: &'static str) -> impl Fn(tokio_postgres::Error) -> DbError + '_ {
        move |source| DbError::query_at(what, self.target, source)
    }

    /// Maps a failed COPY read to a [`DbError`] naming `what` was done, and where.
    pub fn failed_copy(&self, what: &'static str) -> impl Fn(CopyError) -> DbError + '_ {
        move |e| DbError::copy(what, self.target, e)
    }

    /// An answer of the server that Tidemark cannot read (`reason` says why).
    pub fn unexpected(&self, what: &'static str, answer: &str, reason: String) -> DbError {
        DbError::Unexpected {
            what,
            target: self.target.to_owned(),
            answer: answer.to_owned(),
            reason,
        }
    }
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("target", &self.target)
            .finish()
    }
}

impl Deref for Session<'_> {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.client
    }
}
