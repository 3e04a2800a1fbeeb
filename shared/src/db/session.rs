//! A connection that knows which server it is on, so that every error it gives names the
//! server and what was being done, without the settings passed beside it.

use std::ops::Deref;

use tokio_postgres::Client;

use super::copy::CopyError;
use super::{DbError, DbSettings};

/// A connection (its statements through [`Deref`] to [`Client`]) and the server it is on.
pub struct Session {
    client: Client,
    /// The server as errors name it (`user@host:port/dbname`, never the password).
    target: String,
}

impl Session {
    /// Opens a connection with the pinned session settings (see [`super::connect`]).
    ///
    /// # Errors
    /// [`DbError::Connect`] naming the server.
    pub async fn connect(settings: &DbSettings) -> Result<Self, DbError> {
        Ok(Self::new(super::connect(settings).await?, settings))
    }

    /// A session on a connection already open to the server `settings` names.
    pub fn new(client: Client, settings: &DbSettings) -> Self {
        Self {
            client,
            target: settings.to_string(),
        }
    }

    /// The server, as errors name it.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Maps a failed statement to a [`DbError`] naming `what` was done, and where.
    pub fn failed(&self, what: &'static str) -> impl Fn(tokio_postgres::Error) -> DbError + '_ {
        move |source| DbError::query_at(what, &self.target, source)
    }

    /// Maps a failed COPY read to a [`DbError`] naming `what` was done, and where.
    pub fn failed_copy(&self, what: &'static str) -> impl Fn(CopyError) -> DbError + '_ {
        move |e| DbError::copy(what, &self.target, e)
    }

    /// An answer of the server that Tidemark cannot read (`reason` says why).
    pub fn unexpected(&self, what: &'static str, answer: &str, reason: String) -> DbError {
        DbError::Unexpected {
            what,
            target: self.target.clone(),
            answer: answer.to_owned(),
            reason,
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("target", &self.target)
            .finish()
    }
}

impl Deref for Session {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}
