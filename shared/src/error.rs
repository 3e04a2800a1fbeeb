//! What kind of failure an error is, decided once where it happened.
//!
//! Two places classify failures of the outside world: the store ([`crate::store::StoreError`]:
//! S3 answers and local I/O) and the database ([`crate::db::transient`]: SQLSTATE classes
//! and lost connections, also for what pg_dump reports). Every other error is either a
//! kind of its own (a lease held by another run, a missing chunk, a bug) or wraps one of
//! those as its `#[source]` and hands its kind up unchanged. The Lambda functions turn a
//! kind into a `Tidemark.*` error type with one `match`; the CLI prints the chain.

/// What a failure means for whoever decides what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Another run holds the lease: wait for it, do not start a second one.
    Locked,
    /// The network, the server or a service failed for now (a timeout, throttling, a lost
    /// connection): the same operation may succeed if tried again.
    Transient,
    /// Another writer changed what this one read (a failed precondition, progress moved
    /// on): read again and decide again.
    Conflict,
    /// The request itself cannot be taken (an event field of the wrong type or value):
    /// nothing was read or written.
    BadInput,
    /// Stored data is damaged or missing (a checksum that does not match, a missing chunk,
    /// a document that does not parse).
    Corrupt,
    /// Anything else trying again will not fix: configuration, refused access, a statement
    /// the server refuses, a run that does not exist.
    Fatal,
    /// A bug in Tidemark (a worker panicked): never retried, reported as such.
    Bug,
}

impl ErrorKind {
    /// Whether the same operation, tried again unchanged, may succeed.
    pub fn is_transient(self) -> bool {
        self == ErrorKind::Transient
    }

    /// Whether running the whole step again (which reads everything again) may succeed:
    /// transient failures and conflicts.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Transient | ErrorKind::Conflict)
    }
}

/// An error that knows its [`ErrorKind`].
pub trait Classified: std::error::Error {
    /// The kind, decided where the failure happened and handed up unchanged.
    fn kind(&self) -> ErrorKind;

    /// Whether running the step again may succeed ([`ErrorKind::is_retryable`]).
    fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorKind;

    #[test]
    fn only_transient_failures_and_conflicts_are_worth_another_step() {
        use ErrorKind::*;
        for kind in [Locked, Transient, Conflict, BadInput, Corrupt, Fatal, Bug] {
            assert_eq!(
                kind.is_retryable(),
                matches!(kind, Transient | Conflict),
                "{kind:?}"
            );
            assert_eq!(kind.is_transient(), kind == Transient, "{kind:?}");
        }
    }
}
