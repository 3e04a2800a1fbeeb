//! Retrying store requests: exponential backoff with jitter, within a total time budget.
//!
//! The SDK's own retries (three quick attempts) absorb a lone hiccup; this layer rides out
//! what outlasts them — a throttling burst, a store that is unreachable for a minute, a
//! connection reset while a body streams — by trying the whole operation again, for up to
//! [`RetryPolicy::budget`] in all. Only errors that can pass are retried
//! ([`ErrorKind::Transient`](crate::error::ErrorKind::Transient)); a refused request (403, a failed precondition, a
//! checksum mismatch) fails at once.

use std::future::Future;
use std::time::{Duration, Instant};

use super::StoreError;
use crate::error::Classified;
#[cfg(test)]
use crate::error::ErrorKind;

/// The environment variable that sets [`RetryPolicy::budget`] in seconds.
pub const RETRY_ENV: &str = "TIDEMARK_STORE_RETRY_SECS";

/// Default total time one operation may spend retrying.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(180);

/// How long and how often a failed store request is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total time, from the first attempt, after which a failure is final.
    pub budget: Duration,
    /// Delay before the second attempt; each later one doubles it, up to `max_delay`.
    pub first_delay: Duration,
    /// Longest delay between two attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            budget: DEFAULT_RETRY_BUDGET,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(15),
        }
    }
}

impl RetryPolicy {
    /// No retries beyond the SDK's own (tests that want the first failure).
    pub fn none() -> Self {
        Self {
            budget: Duration::ZERO,
            ..Self::default()
        }
    }

    /// The delay before attempt `attempt + 1` (attempt counts from 1): exponential, capped,
    /// with jitter (between half and all of it) so that many clients do not retry in step.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .first_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_delay);
        let half = exp / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Parses a retry budget in whole or fractional seconds (0 disables retries).
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_budget(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{text:?} must be between 0 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Where a run of attempts stands: when it began and how many were made.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempts {
    started: Instant,
    made: u32,
}

impl Attempts {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            made: 0,
        }
    }

    /// After a failed attempt: the delay before the next one, or `None` when the failure
    /// is final (not retryable, or the budget would be spent).
    pub(crate) fn next_delay(
        &mut self,
        policy: &RetryPolicy,
        err: &StoreError,
    ) -> Option<Duration> {
        self.made += 1;
        if !err.kind().is_transient() {
            return None;
        }
        let delay = policy.delay(self.made);
        (self.started.elapsed() + delay <= policy.budget).then_some(delay)
    }

    /// The error of the last attempt; for an error that could have passed, saying how
    /// long it was tried and what sets that.
    pub(crate) fn give_up(&self, err: StoreError) -> StoreError {
        if !err.kind().is_transient() {
            return err;
        }
        err.with_note(&format!(
            "gave up after {} attempt(s) in {:.0} s; {RETRY_ENV} sets how long to keep trying",
            self.made.max(1),
            self.started.elapsed().as_secs_f64()
        ))
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the policy's budget is spent.
pub(crate) async fn with_retry<T, F, Fut>(
    policy: &RetryPolicy,
    operation: &'static str,
    key: &str,
    mut attempt: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    with_retry_counting(policy, operation, key, |_| attempt()).await
}

/// [`with_retry`], telling each attempt its number (1 for the first): any later attempt
/// follows one that failed with an error that could pass, whose request may therefore
/// have been applied without the answer arriving.
pub(crate) async fn with_retry_counting<T, F, Fut>(
    policy: &RetryPolicy,
    operation: &'static str,
    key: &str,
    mut attempt: F,
) -> Result<T, StoreError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempts = Attempts::new();
    loop {
        match attempt(attempts.made + 1).await {
            Ok(value) => return Ok(value),
            Err(err) => match attempts.next_delay(policy, &err) {
                Some(delay) => {
                    tracing::warn!(
                        operation,
                        key,
                        attempt = attempts.made,
                        retry_in_ms = delay.as_millis() as u64,
                        error = %err,
                        "store request failed; trying again"
                    );
                    tokio::time::sleep(delay).await;
                }
                None => return Err(attempts.give_up(err)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient() -> StoreError {
        StoreError::S3 {
            operation: "GetObject",
            location: "s3://b/k".into(),
            message: "SlowDown (HTTP 503)".into(),
            kind: ErrorKind::Transient,
            source: None,
        }
    }

    fn fast(budget_ms: u64) -> RetryPolicy {
        RetryPolicy {
            budget: Duration::from_millis(budget_ms),
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[test]
    fn delays_grow_are_capped_and_jittered() {
        let policy = RetryPolicy::default();
        for attempt in 1..40 {
            let d = policy.delay(attempt);
            let full = policy
                .first_delay
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(policy.max_delay);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} vs {full:?}"
            );
        }
        assert!(policy.delay(30) <= policy.max_delay);
    }

    #[test]
    fn budgets_parse_and_bad_ones_are_named() {
        assert_eq!(parse_budget("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_budget("0"), Ok(Duration::ZERO));
        assert!(parse_budget("soon").is_err_and(|e| e.contains("soon")));
        assert!(parse_budget("-1").is_err());
        assert!(parse_budget("NaN").is_err());
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let out = with_retry(&fast(5_000), "GetObject", "k", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 4 {
                Err(transient())
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(out.ok(), Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn permanent_errors_fail_at_once() {
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = with_retry(&fast(5_000), "GetObject", "k", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(StoreError::AccessDenied {
                location: "s3://b/k".into(),
                operation: "GetObject",
            })
        })
        .await;
        assert!(matches!(out, Err(StoreError::AccessDenied { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_budget_bounds_the_retries_and_the_error_says_so() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let out: Result<(), _> = with_retry(&fast(50), "PutObject", "k", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(transient())
        })
        .await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(calls.load(Ordering::SeqCst) > 2);
        let message = out.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("gave up after"), "{message}");
        assert!(message.contains("SlowDown (HTTP 503)"), "{message}");
    }
}
