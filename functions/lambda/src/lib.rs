//! What every Tidemark Lambda function shares: configuration read once at cold start
//! from the same variables the CLI reads, the error type Step Functions retries on, and
//! the time budget of one invocation.

use std::time::{Duration, Instant, SystemTime};

use lambda_runtime::{Context, Diagnostic};
use tidemark_core::config;
use tidemark_core::db::{DatabaseSource, DbSettings};
use tidemark_core::error::{Classified, ErrorKind};
use tidemark_core::events::EventError;
use tidemark_core::metrics::MetricSet;
use tidemark_core::prune::PruneError;
use tidemark_core::run::RunError;
use tidemark_core::store::{self, DynStore, StoreSettings, StoreUrl};
use tidemark_core::telemetry::{self, LogFormat};
use tidemark_core::verify::VerifyError;

/// `error_type` of failures worth retrying (Step Functions `Retry` matches it).
pub const RETRYABLE: &str = "Tidemark.Retryable";
/// `error_type` of failures that retrying will not fix (bad input, bad configuration).
pub const FATAL: &str = "Tidemark.Fatal";
/// `error_type` of a payload the function does not take (nothing was read or written).
pub const BAD_INPUT: &str = "Tidemark.BadInput";
/// `error_type` when another run holds the lease.
pub const LOCKED: &str = "Tidemark.Locked";
/// `error_type` of a bug in Tidemark (a worker panicked): never retried; please report it.
pub const BUG: &str = "Tidemark.Bug";

/// A failed invocation, typed for Step Functions.
#[derive(Debug)]
pub struct FunctionError {
    pub error_type: &'static str,
    pub message: String,
}

impl FunctionError {
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            error_type: FATAL,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FunctionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

impl From<FunctionError> for Diagnostic {
    fn from(e: FunctionError) -> Self {
        Diagnostic {
            error_type: e.error_type.to_owned(),
            error_message: e.message,
        }
    }
}

/// The `error_type` of each kind of failure: the one place a kind becomes the error a
/// state machine sees.
pub fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Locked => LOCKED,
        ErrorKind::Transient | ErrorKind::Conflict => RETRYABLE,
        ErrorKind::BadInput => BAD_INPUT,
        ErrorKind::Corrupt | ErrorKind::Fatal => FATAL,
        ErrorKind::Bug => BUG,
    }
}

impl FunctionError {
    /// A failed invocation from a core error: typed by its kind, with the whole cause
    /// chain as the message, logged once here.
    pub fn from_error(error: &dyn Classified) -> Self {
        let kind = error.kind();
        let error_type = error_type(kind);
        let message = tidemark_core::error_chain(error);
        tracing::error!(error_type, ?kind, error = %message, "invocation failed");
        Self {
            error_type,
            message,
        }
    }
}

impl From<RunError> for FunctionError {
    fn from(e: RunError) -> Self {
        Self::from_error(&e)
    }
}

impl From<PruneError> for FunctionError {
    fn from(e: PruneError) -> Self {
        Self::from_error(&e)
    }
}

impl From<VerifyError> for FunctionError {
    fn from(e: VerifyError) -> Self {
        Self::from_error(&e)
    }
}

impl From<EventError> for FunctionError {
    fn from(e: EventError) -> Self {
        Self::from_error(&e)
    }
}

/// Starts JSON logging (Lambda sets `AWS_LAMBDA_LOG_FORMAT`; JSON is the default here).
pub fn init_tracing() {
    let format = match std::env::var("AWS_LAMBDA_LOG_FORMAT") {
        Ok(v) if v.eq_ignore_ascii_case("text") => LogFormat::Human,
        _ => LogFormat::Json,
    };
    telemetry::init(format, 0);
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The store settings ([`StoreSettings`]: `TIDEMARK_STORE`, `TIDEMARK_STORE_RETRY_SECS`),
/// from `lookup` (the process environment in [`store_from_env`]).
///
/// # Errors
/// A message naming the variable with a bad value.
pub fn store_settings(lookup: &dyn Fn(&str) -> Option<String>) -> Result<StoreSettings, String> {
    config::from_env(lookup)
}

/// The store URL `TIDEMARK_STORE` names, from `lookup`.
///
/// # Errors
/// A message naming the variable, for a missing or malformed store URL.
pub fn store_url(lookup: &dyn Fn(&str) -> Option<String>) -> Result<StoreUrl, String> {
    store_settings(lookup)?.url()
}

/// How long failed store requests are retried: `TIDEMARK_STORE_RETRY_SECS`, from `lookup`.
///
/// # Errors
/// A message naming the variable, for a value that is not a number of seconds.
pub fn store_retry(lookup: &dyn Fn(&str) -> Option<String>) -> Result<store::RetryPolicy, String> {
    Ok(store_settings(lookup)?.retry_policy())
}

/// The store the environment names (see [`store_settings`]).
///
/// # Errors
/// A message naming the variable, for a missing or malformed store URL or retry budget.
pub async fn store_from_env() -> Result<DynStore, String> {
    store_settings(&env)?.open().await
}

/// Where the database settings come from ([`DatabaseSource`]: `DATABASE_URL` or
/// `TIDEMARK_SECRET_ID`, with `TIDEMARK_CA_FILE` and `TIDEMARK_SSLMODE`), from `lookup`.
///
/// # Errors
/// A message naming the variable with a bad value.
pub fn database_source(lookup: &dyn Fn(&str) -> Option<String>) -> Result<DatabaseSource, String> {
    let source: DatabaseSource = config::from_env(lookup)?;
    if let Some(url) = &source.url {
        // Refused at cold start, naming the variable (the error never shows the URL).
        DbSettings::from_url(url).map_err(|e| format!("DATABASE_URL: {e}"))?;
    }
    Ok(source)
}

/// Database settings from the process environment (a secret is fetched once, at cold
/// start); see [`database_source`].
///
/// # Errors
/// The settings error, without any secret.
pub async fn database_from_env() -> Result<DbSettings, String> {
    database_source(&env)?
        .resolve()
        .await
        .map_err(|e| tidemark_core::error_chain(&e))
}

/// An empty metric set for this deployment's `database` dimension: `TIDEMARK_DATABASE`
/// (the deployment sets it, and its alarms watch that value), else the store URL.
pub fn metrics() -> MetricSet {
    MetricSet::new(
        env("TIDEMARK_DATABASE")
            .or_else(|| env("TIDEMARK_STORE"))
            .unwrap_or_else(|| "default".to_owned()),
    )
}

/// Safety margin before the invocation deadline: `TIDEMARK_SLICE_MARGIN_SECS` (seconds,
/// fractions allowed; default 60), from `lookup`.
///
/// # Errors
/// A message naming the variable and the value, when it is not a number of seconds.
pub fn slice_margin(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Duration, String> {
    const VAR: &str = "TIDEMARK_SLICE_MARGIN_SECS";
    match lookup(VAR).filter(|v| !v.trim().is_empty()) {
        None => Ok(Duration::from_secs(60)),
        Some(text) => {
            let secs: f64 = text
                .trim()
                .parse()
                .map_err(|_| format!("{VAR}: {text:?} is not a number of seconds"))?;
            if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
                return Err(format!(
                    "{VAR}: {text:?} must be a number of seconds, 0 or more"
                ));
            }
            Ok(Duration::from_secs_f64(secs))
        }
    }
}

/// What a slice keeps of its invocation after a consistency-pass round, to record its
/// progress and return.
pub const PASS_SAFETY: Duration = Duration::from_secs(15);

/// How long a consistency-pass round may run: to the invocation deadline less
/// [`PASS_SAFETY`] (or less `margin`, if smaller). `None` when the invocation's deadline
/// is already past as it starts: Lambda never does that, emulators do (`cargo lambda
/// watch` sends a fixed 600000 ms since the epoch), and an unbounded round is then the
/// only one that can finish.
pub fn pass_deadline(context: &Context, margin: Duration) -> Option<Instant> {
    Some(Instant::now() + remaining(context)?.saturating_sub(margin.min(PASS_SAFETY)))
}

/// The instant Lambda ends the invocation (its deadline); `None` when that is already
/// past as it starts (an emulator's fixed deadline, see [`pass_deadline`]).
pub fn invocation_end(context: &Context) -> Option<Instant> {
    Some(Instant::now() + remaining(context)?)
}

/// The instant by which new work must stop: the invocation deadline less `margin`.
pub fn work_deadline(context: &Context, margin: Duration) -> Instant {
    Instant::now()
        + remaining(context)
            .unwrap_or_default()
            .saturating_sub(margin)
}

/// The time left to the invocation's deadline; `None` when it is already past.
fn remaining(context: &Context) -> Option<Duration> {
    context.deadline().duration_since(SystemTime::now()).ok()
}

/// Who holds the lease: the function name and request id.
pub fn holder(context: &Context) -> String {
    format!(
        "lambda:{}:{}",
        context.env_config.function_name, context.request_id
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_core::format::FormatError;
    use tidemark_core::store::StoreError;

    /// Each kind, by a real error of that kind, to the error type the state machine's
    /// Retry and Catch rules see.
    #[test]
    fn each_kind_of_failure_has_one_error_type() {
        let now = chrono::Utc::now();
        let cases: Vec<(Box<dyn Classified>, ErrorKind, &str)> = vec![
            (
                Box::new(RunError::Locked {
                    run_id: "r1".into(),
                    since: now,
                    expires: now,
                }),
                ErrorKind::Locked,
                LOCKED,
            ),
            (
                Box::new(RunError::SnapshotLost {
                    detail: "connection closed".into(),
                }),
                ErrorKind::Transient,
                RETRYABLE,
            ),
            (
                Box::new(RunError::Conflict {
                    run_id: "r1".into(),
                }),
                ErrorKind::Conflict,
                RETRYABLE,
            ),
            (
                Box::new(EventError("run_id: invalid type".into())),
                ErrorKind::BadInput,
                BAD_INPUT,
            ),
            (
                Box::new(RunError::Format(FormatError::Store(
                    StoreError::ChecksumMismatch {
                        key: "chunks/x".into(),
                        expected: "a".into(),
                        actual: "b".into(),
                    },
                ))),
                ErrorKind::Corrupt,
                FATAL,
            ),
            (
                Box::new(RunError::NoSuchRun {
                    run_id: "r1".into(),
                }),
                ErrorKind::Fatal,
                FATAL,
            ),
            (
                Box::new(RunError::WorkerPanicked {
                    run_id: "r1".into(),
                    detail: "task 3 panicked".into(),
                }),
                ErrorKind::Bug,
                BUG,
            ),
        ];
        for (error, kind, error_type) in cases {
            assert_eq!(error.kind(), kind, "{error}");
            let failed = FunctionError::from_error(error.as_ref());
            assert_eq!(failed.error_type, error_type, "{kind:?}");
            assert_eq!(failed.message, tidemark_core::error_chain(error.as_ref()));
        }
    }
}
