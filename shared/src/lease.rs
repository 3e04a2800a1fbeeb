//! The run lease (`lock`): one run at a time per store prefix.
//!
//! Taken with create-if-absent, or with If-Match over a lease that has expired (its holder
//! died) or that the same run already holds (the next slice of a run). Renewed while the
//! run works; released by writing it back already expired, so the next taker replaces it
//! with If-Match and two racing takers cannot both win.

use std::time::Duration;

use chrono::Utc;

use crate::format::lease::Lease;
use crate::format::{read_doc, write_doc, FormatError, FORMAT_VERSION, LOCK_KEY};
use crate::run::RunError;
use crate::store::{ETag, StoreError, WriteCondition, WriteStore};

/// A lease this process holds, with the tag needed to renew or release it.
#[derive(Debug, Clone)]
pub struct HeldLease {
    pub lease: Lease,
    pub etag: ETag,
}

/// Who is running: `host:pid`, or whatever the caller says (a Lambda request id).
pub fn default_holder() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

fn precondition(e: &FormatError) -> bool {
    matches!(e, FormatError::Store(StoreError::PreconditionFailed { .. }))
}

/// Reads the current lease, if any.
///
/// # Errors
/// Store and format errors.
pub async fn current(store: &dyn WriteStore) -> Result<Option<(Lease, ETag)>, RunError> {
    Ok(read_doc::<Lease>(store, LOCK_KEY).await?)
}

/// Fails with [`RunError::Locked`] if another run holds a live lease.
///
/// # Errors
/// [`RunError::Locked`]; store errors.
pub async fn ensure_free_for(store: &dyn WriteStore, run_id: &str) -> Result<(), RunError> {
    match current(store).await? {
        Some((lease, _)) if lease.run_id != run_id && lease.expires_at > Utc::now() => {
            Err(locked(&lease))
        }
        _ => Ok(()),
    }
}

fn locked(lease: &Lease) -> RunError {
    RunError::Locked {
        run_id: lease.run_id.clone(),
        since: lease.acquired_at,
        expires: lease.expires_at,
    }
}

fn ttl_delta(ttl: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(ttl).unwrap_or(chrono::TimeDelta::minutes(20))
}

/// Takes (or keeps) the lease for `run_id`.
///
/// # Errors
/// [`RunError::Locked`] naming the live holder; store errors.
pub async fn acquire(
    store: &dyn WriteStore,
    run_id: &str,
    operation: &str,
    holder: &str,
    ttl: Duration,
) -> Result<HeldLease, RunError> {
    for _ in 0..5 {
        let now = Utc::now();
        let current = current(store).await?;
        let (condition, acquired_at) = match &current {
            None => (WriteCondition::IfAbsent, now),
            Some((lease, etag)) if lease.run_id == run_id && lease.expires_at > now => {
                (WriteCondition::IfMatch(etag.clone()), lease.acquired_at)
            }
            Some((lease, etag)) if lease.expires_at <= now => {
                (WriteCondition::IfMatch(etag.clone()), now)
            }
            Some((lease, _)) => return Err(locked(lease)),
        };
        let lease = Lease {
            version: FORMAT_VERSION,
            run_id: run_id.to_owned(),
            operation: operation.to_owned(),
            holder: holder.to_owned(),
            acquired_at,
            renewed_at: now,
            expires_at: now + ttl_delta(ttl),
        };
        match write_doc(store, LOCK_KEY, &lease, condition).await {
            Ok(receipt) => {
                tracing::debug!(run_id, expires = %lease.expires_at, "lease taken");
                return Ok(HeldLease {
                    lease,
                    etag: receipt.etag,
                });
            }
            // Somebody else wrote in between: look again.
            Err(e) if precondition(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    match current(store).await? {
        Some((lease, _)) => Err(locked(&lease)),
        None => Err(RunError::LeaseLost {
            run_id: run_id.to_owned(),
        }),
    }
}

/// Extends a held lease by `ttl` from now.
///
/// # Errors
/// [`RunError::LeaseLost`] if another run took it over.
pub async fn renew(
    store: &dyn WriteStore,
    held: &mut HeldLease,
    ttl: Duration,
) -> Result<(), RunError> {
    let now = Utc::now();
    let mut lease = held.lease.clone();
    lease.renewed_at = now;
    lease.expires_at = now + ttl_delta(ttl);
    match write_doc(
        store,
        LOCK_KEY,
        &lease,
        WriteCondition::IfMatch(held.etag.clone()),
    )
    .await
    {
        Ok(receipt) => {
            held.lease = lease;
            held.etag = receipt.etag;
            Ok(())
        }
        Err(e) if precondition(&e) => Err(RunError::LeaseLost {
            run_id: held.lease.run_id.clone(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Releases the lease if `run_id` holds it (writes it back already expired). Returns
/// whether a live lease was released.
///
/// # Errors
/// Store errors; a lease held by someone else is left alone.
pub async fn release(store: &dyn WriteStore, run_id: &str) -> Result<bool, RunError> {
    let Some((mut lease, etag)) = current(store).await? else {
        return Ok(false);
    };
    if lease.run_id != run_id {
        return Ok(false);
    }
    let now = Utc::now();
    if lease.expires_at <= now {
        return Ok(false);
    }
    lease.renewed_at = now;
    lease.expires_at = now;
    match write_doc(store, LOCK_KEY, &lease, WriteCondition::IfMatch(etag)).await {
        Ok(_) => Ok(true),
        // Somebody took it over in between: it is not ours to release any more.
        Err(e) if precondition(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
