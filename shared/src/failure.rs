//! Closing a failed backup run: the state machine's failure step records what failed in
//! `state/last-failure.json` and releases the run's lease, so the next scheduled run can
//! start (and finish the failed run's work) without waiting for the lease to expire.
//!
//! Only a lease held by the named run is released: a run that failed because another run
//! holds the lease ("locked by run X") leaves that lease alone.

use chrono::Utc;

use crate::format::failure::FailureRecord;
use crate::format::{read_doc, write_doc, FORMAT_VERSION};
use crate::lease;
use crate::repo::LAST_FAILURE_KEY;
use crate::run::RunError;
use crate::store::{WriteCondition, WriteStore};

/// Longest cause kept in the record.
const MAX_CAUSE_BYTES: usize = 4096;

/// What failed, as the failing step reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failure {
    pub run_id: Option<String>,
    pub execution: Option<String>,
    pub error: String,
    pub cause: String,
}

/// The error name of a run refused because another run holds the lease.
const LOCKED: &str = "Tidemark.Locked";

/// Records `failure` and releases the lease of its run, if that run holds it.
///
/// A failure with no run id (the first slice failed before reporting one) is matched to
/// the run whose lease names the same execution as its holder. A `Tidemark.Locked`
/// failure does not overwrite the record of the failed run that still holds the lease:
/// that record says why the schedule is stuck.
///
/// # Errors
/// Store errors (retryable ones are worth retrying: the record is overwritten as a whole).
pub async fn record_failure(
    store: &dyn WriteStore,
    failure: Failure,
) -> Result<FailureRecord, RunError> {
    let current = lease::current(store).await?.map(|(l, _)| l);
    if failure.error == LOCKED {
        if let (Some(previous), Some(holder)) = (last_failure(store).await?, &current) {
            if previous.error != LOCKED && previous.run_id.as_ref() == Some(&holder.run_id) {
                tracing::warn!(
                    run_id = holder.run_id,
                    "a run was refused by the lease of the failed run {}; keeping that run's failure record",
                    holder.run_id
                );
                return Ok(FailureRecord {
                    lease_released: false,
                    ..previous
                });
            }
        }
    }
    let run_id = match (&failure.run_id, &failure.execution) {
        (Some(run_id), _) => Some(run_id.clone()),
        (None, Some(execution)) if failure.error != LOCKED => current
            .as_ref()
            .filter(|l| {
                l.operation == "backup"
                    && l.holder.split_whitespace().next() == Some(execution.as_str())
            })
            .map(|l| l.run_id.clone()),
        _ => None,
    };
    let lease_released = match &run_id {
        Some(run_id) => lease::release(store, run_id).await?,
        None => false,
    };
    let record = FailureRecord {
        version: FORMAT_VERSION,
        run_id,
        execution: failure.execution,
        error: failure.error,
        cause: shorten(failure.cause, MAX_CAUSE_BYTES),
        failed_at: Utc::now(),
        lease_released,
    };
    write_doc(store, LAST_FAILURE_KEY, &record, WriteCondition::Always).await?;
    tracing::warn!(
        run_id = record.run_id.as_deref().unwrap_or("-"),
        error = %record.error,
        lease_released,
        "backup run failed"
    );
    Ok(record)
}

/// The last failure recorded, if any.
///
/// # Errors
/// Store errors; a record that does not parse.
pub async fn last_failure(store: &dyn WriteStore) -> Result<Option<FailureRecord>, RunError> {
    Ok(read_doc::<FailureRecord>(store, LAST_FAILURE_KEY)
        .await?
        .map(|(record, _)| record))
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut.
pub(crate) fn shorten(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(" [...]");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_cut_on_a_character_boundary() {
        assert_eq!(shorten("short".into(), 10), "short");
        let cut = shorten("ééééé".into(), 5);
        assert_eq!(cut, "éé [...]");
    }
}
