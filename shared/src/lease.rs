//! The run lease (`lock`): one run at a time per store prefix.
//!
//! Taken with create-if-absent, or with If-Match over a lease that has expired (its holder
//! died) or that the same run already holds (the next slice of a run). Renewed while the
//! run works; released by writing it back already expired, so the next taker replaces it
//! with If-Match and two racing takers cannot both win.
//!
//! A lease is live until it expires, unless its holder ran on this machine and its
//! process is gone (killed, crashed, the machine rebooted): then it is stale at once, as
//! restic treats such locks, and the next run takes it over and resumes the run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::format::lease::{HolderProcess, Lease};
use crate::format::{read_doc, write_doc, FormatError, FORMAT_VERSION};
use crate::repo::LOCK_KEY;
use crate::run::RunError;
use crate::store::{ETag, StoreError, WriteCondition, WriteStore};

/// A lease this process holds, with the tag needed to renew or release it.
#[derive(Debug, Clone)]
pub struct HeldLease {
    pub lease: Lease,
    pub etag: ETag,
}

/// How long a lease lasts without renewal: what a holder that died elsewhere (a Lambda
/// that timed out, another machine) costs the next run at most. Holders renew it every
/// quarter of this while they work.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5 * 60);

/// This machine's host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`).
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// Clock ticks from boot to the start of process `pid`, if it exists.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses; field 22 is
    // the 20th after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This process, as a lease records it; `None` where it cannot be told (no `/proc`).
pub fn this_process() -> Option<HolderProcess> {
    let pid = std::process::id();
    Some(HolderProcess {
        host: host_name()?,
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()?
            .trim()
            .to_owned(),
        pid_namespace: std::fs::read_link("/proc/self/ns/pid")
            .ok()?
            .to_string_lossy()
            .into_owned(),
        pid,
        start_ticks: start_ticks(pid)?,
    })
}

/// Whether `holder` ran on this machine (same host, boot and PID namespace) and is gone:
/// rebooted since, or no process with its PID and start time.
fn is_gone(holder: &HolderProcess, here: &HolderProcess) -> bool {
    if holder.host != here.host || holder.pid_namespace != here.pid_namespace {
        return false; // another machine or container: only expiry tells
    }
    holder.boot_id != here.boot_id || start_ticks(holder.pid) != Some(holder.start_ticks)
}

/// Whether `lease` still excludes others at `now`: not expired, and not held by a
/// process of this machine that is gone.
pub fn is_live(lease: &Lease, now: chrono::DateTime<Utc>) -> bool {
    if lease.expires_at <= now {
        return false;
    }
    match (&lease.process, this_process()) {
        (Some(holder), Some(here)) if is_gone(holder, &here) => {
            tracing::warn!(
                run_id = lease.run_id,
                holder = lease.holder,
                pid = holder.pid,
                "the lease's holder on this machine is gone: taking the lease over"
            );
            false
        }
        _ => true,
    }
}

/// Who is running: `host:pid`, or whatever the caller says (a Lambda request id).
pub fn default_holder() -> String {
    let host = host_name().unwrap_or_else(|| "localhost".to_owned());
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
        Some((lease, _)) if lease.run_id != run_id && is_live(&lease, Utc::now()) => {
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
    chrono::TimeDelta::from_std(ttl).unwrap_or(chrono::TimeDelta::minutes(5))
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
            Some((lease, etag)) if !is_live(lease, now) => {
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
            process: this_process(),
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

/// Hands the lease from this process to the run: a process that ends its part of a run
/// on purpose (`tidemark export`, one slice, like a Lambda invocation) keeps the run
/// exclusive until the lease expires, as the next slice expects, instead of leaving a
/// lease that looks like a crashed holder's.
///
/// # Errors
/// Store errors; a lease another process or run holds is left alone.
pub async fn detach(store: &dyn WriteStore, run_id: &str) -> Result<(), RunError> {
    let Some((mut lease, etag)) = current(store).await? else {
        return Ok(());
    };
    if lease.run_id != run_id || lease.process.is_none() || lease.process != this_process() {
        return Ok(());
    }
    lease.process = None;
    match write_doc(store, LOCK_KEY, &lease, WriteCondition::IfMatch(etag)).await {
        Ok(_) => Ok(()),
        Err(e) if precondition(&e) => Ok(()),
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

/// Renews a held lease every quarter of its TTL in the background, for as long as it is
/// kept (dropping it stops the renewal), so a long step between progress writes never
/// lets the lease lapse and a short TTL costs the holder nothing.
#[derive(Debug)]
pub struct Heartbeat {
    run_id: String,
    lost: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    /// Starts renewing `held` in `store` every `ttl / 4`.
    pub fn start(store: Arc<dyn WriteStore>, mut held: HeldLease, ttl: Duration) -> Self {
        let run_id = held.lease.run_id.clone();
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ttl / 4);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is now; the lease was just written
            loop {
                tick.tick().await;
                match renew(store.as_ref(), &mut held, ttl).await {
                    Ok(()) => {}
                    Err(RunError::LeaseLost { run_id }) => {
                        tracing::error!(run_id, "the lease was taken over by another run");
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    // A store hiccup: the next beat tries again, well before expiry.
                    Err(e) => tracing::warn!(error = %e, "renewing the lease failed"),
                }
            }
        });
        Self { run_id, lost, task }
    }

    /// Keeps the lease of `run_id` renewed every `ttl / 4` for one of several processes
    /// working on the run at once (the workers of a fanned-out export): each beat takes or
    /// keeps the lease for the run, whoever of them wrote it last, and only another run
    /// holding it counts as lost.
    pub fn start_shared(
        store: Arc<dyn WriteStore>,
        run_id: &str,
        holder: &str,
        ttl: Duration,
    ) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        let (run, holder) = (run_id.to_owned(), holder.to_owned());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ttl / 4);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match acquire(store.as_ref(), &run, "backup", &holder, ttl).await {
                    Ok(_) => {}
                    Err(RunError::Locked { run_id, .. }) => {
                        tracing::error!(
                            run = run,
                            by = run_id,
                            "the lease was taken over by another run"
                        );
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "renewing the lease failed"),
                }
            }
        });
        Self {
            run_id: run_id.to_owned(),
            lost,
            task,
        }
    }

    /// [`RunError::LeaseLost`] once another run took the lease over.
    ///
    /// # Errors
    /// [`RunError::LeaseLost`].
    pub fn check(&self) -> Result<(), RunError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(RunError::LeaseLost {
                run_id: self.run_id.clone(),
            });
        }
        Ok(())
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_gone_one_is_told() {
        let Some(here) = this_process() else {
            return; // no /proc: nothing to tell
        };
        assert_eq!(here.pid, std::process::id());
        assert!(!is_gone(&here, &here), "this process is alive");
        // The same PID started at another time is another process (PID reuse).
        let reused = HolderProcess {
            start_ticks: here.start_ticks + 1,
            ..here.clone()
        };
        assert!(is_gone(&reused, &here));
        // A reboot ends every process of the machine.
        let before_reboot = HolderProcess {
            boot_id: "another boot".into(),
            ..here.clone()
        };
        assert!(is_gone(&before_reboot, &here));
        // Another machine or container: only the lease's expiry can tell.
        for other in [
            HolderProcess {
                host: "elsewhere".into(),
                start_ticks: 0,
                ..here.clone()
            },
            HolderProcess {
                pid_namespace: "pid:[1]".into(),
                start_ticks: 0,
                ..here.clone()
            },
        ] {
            assert!(!is_gone(&other, &here));
        }
    }
}
