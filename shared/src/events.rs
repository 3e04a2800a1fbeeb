//! The payloads the functions accept: exactly their Step Functions payload (as the state
//! machine's `Parameters` build it), an empty `{}` (a console test: defaults), or the raw
//! EventBridge "Scheduled Event" envelope (whose `detail` carries the payload, if any).
//! Anything else — an unknown field, a wrong type, an id that is not one — is refused
//! naming the field, before anything is read or written: a wrong payload never does real
//! work.

use serde::Deserialize;
use serde_json::Value;

use crate::config::{parse_keep_within, parse_size, parse_timezone};
use crate::error::{Classified, ErrorKind};
use crate::failure::Failure;
use crate::prune::PruneSettings;

/// A payload that is not what the function accepts.
#[derive(Debug, thiserror::Error)]
#[error("invalid event: {0}")]
pub struct EventError(pub String);

impl Classified for EventError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::BadInput
    }
}

/// Unwraps an EventBridge Scheduled Event (or any `aws.*` event) to its `detail`.
fn unwrap_envelope(event: Value) -> Result<Value, EventError> {
    match event {
        Value::Null => Ok(Value::Object(Default::default())),
        Value::Object(mut map) if map.contains_key("detail-type") && map.contains_key("source") => {
            match map.remove("detail") {
                None | Some(Value::Null) => Ok(Value::Object(Default::default())),
                Some(detail @ Value::Object(_)) => Ok(detail),
                Some(_) => Err(EventError("\"detail\" must be an object".into())),
            }
        }
        object @ Value::Object(_) => Ok(object),
        _ => Err(EventError("the payload must be a JSON object".into())),
    }
}

/// Deserializes the payload; an error names the field at fault (`keep_daily: invalid
/// value: integer `-1`, expected u32`).
fn parse<T: for<'de> Deserialize<'de>>(event: Value) -> Result<T, EventError> {
    serde_path_to_error::deserialize(unwrap_envelope(event)?).map_err(|e| {
        let path = e.path().to_string();
        let cause = e.into_inner();
        if path == "." {
            EventError(cause.to_string())
        } else {
            EventError(format!("{path}: {cause}"))
        }
    })
}

/// Longest run or backup id accepted.
const MAX_ID_LEN: usize = 64;

/// Checks an optional run or backup id field: 1 to 64 of `A-Z a-z 0-9 - _ .`, not
/// starting with `.` (ids become object keys). The error shows at most the id's start.
fn check_id(field: &str, id: Option<&str>) -> Result<(), EventError> {
    let Some(id) = id else { return Ok(()) };
    let fine = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if fine {
        return Ok(());
    }
    let shown: String = id.chars().take(24).collect();
    let more = if id.chars().count() > 24 {
        format!("... ({} bytes)", id.len())
    } else {
        String::new()
    };
    Err(EventError(format!(
        "{field} {shown:?}{more} is not an id such as 20261122T120000Z-0a1b2c"
    )))
}

/// `full` or `incremental`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    Full,
    Incremental,
}

/// What the export function is asked to do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportEvent {
    /// Continue this run; absent: the run in flight, or a new one.
    #[serde(default)]
    pub run_id: Option<String>,
    /// For a new run; default incremental (full when there is no parent).
    #[serde(default)]
    pub mode: Option<RunMode>,
    /// The Step Functions execution that runs it: the lease names it, so the failure
    /// step can release a run whose first slice failed before reporting its id.
    #[serde(default)]
    pub execution: Option<String>,
    /// Workers of the run at once (the state machine's `concurrency`, else the
    /// function's `TIDEMARK_CONCURRENCY`): above 1 a slice fans the run's export out.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Run one worker of the fanned-out run `run_id` in this slot (one iteration of the
    /// state machine's Map) instead of a slice.
    #[serde(default)]
    pub worker: Option<usize>,
}

/// What the manifest function is asked to seal, or the failed run it is asked to record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEvent {
    /// The run to seal; absent: the run holding the lease.
    #[serde(default)]
    pub run_id: Option<String>,
    /// Set by the state machine's failure step: record the failure and release the lease
    /// instead of sealing.
    #[serde(default)]
    pub failure: Option<FailureEvent>,
}

/// A failed run as the state machine's `Catch` reports it:
/// `{"run_id": "..." | null, "execution": "arn:...", "error": {"Error": "...", "Cause": "..."}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureEvent {
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub execution: Option<String>,
    #[serde(default)]
    pub error: Value,
}

impl FailureEvent {
    /// The failure to record. A Lambda error's `Cause` is itself JSON
    /// (`{"errorType", "errorMessage"}`); its message is what a reader wants.
    pub fn to_failure(&self) -> Failure {
        let text = |v: &Value| v.as_str().map(str::to_owned);
        let (error, cause) = match &self.error {
            Value::String(error) => (error.clone(), String::new()),
            Value::Object(map) => (
                map.get("Error").and_then(text).unwrap_or_default(),
                map.get("Cause").and_then(text).unwrap_or_default(),
            ),
            _ => (String::new(), String::new()),
        };
        let cause = match serde_json::from_str::<Value>(&cause) {
            Ok(Value::Object(map)) => map.get("errorMessage").and_then(text).unwrap_or(cause),
            _ => cause,
        };
        Failure {
            run_id: self.run_id.clone(),
            execution: self.execution.clone(),
            error: if error.is_empty() {
                "Unknown".to_owned()
            } else {
                error
            },
            cause,
        }
    }
}

/// What the verify function is asked to check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyEvent {
    /// The backup to verify (the manifest step's output carries it); absent: the newest
    /// backup not verified yet.
    #[serde(default)]
    pub backup_id: Option<String>,
}

/// Parses the verify function's payload.
///
/// # Errors
/// [`EventError`] naming what is wrong.
pub fn verify_event(event: Value) -> Result<VerifyEvent, EventError> {
    let parsed: VerifyEvent = parse(event)?;
    check_id("backup_id", parsed.backup_id.as_deref())?;
    Ok(parsed)
}

/// What the prune function is asked to do: a dry run, and policy fields that override
/// the environment's (`keep_daily` overrides `TIDEMARK_KEEP_DAILY`, and so on).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneEvent {
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub keep_last: Option<u32>,
    #[serde(default)]
    pub keep_hourly: Option<u32>,
    #[serde(default)]
    pub keep_daily: Option<u32>,
    #[serde(default)]
    pub keep_weekly: Option<u32>,
    #[serde(default)]
    pub keep_monthly: Option<u32>,
    #[serde(default)]
    pub keep_yearly: Option<u32>,
    #[serde(default)]
    pub keep_within: Option<String>,
    #[serde(default)]
    pub max_total_size: Option<String>,
    #[serde(default)]
    pub timezone: Option<String>,
}

impl PruneEvent {
    /// `settings` (from the environment) with the policy fields this event sets in
    /// their place.
    ///
    /// # Errors
    /// [`EventError`] naming the field whose value does not parse.
    pub fn overriding(&self, settings: &PruneSettings) -> Result<PruneSettings, EventError> {
        fn field<T>(
            name: &str,
            value: Option<&str>,
            parse: fn(&str) -> Result<T, String>,
        ) -> Result<Option<T>, EventError> {
            crate::config::named(name, value, parse).map_err(EventError)
        }
        let mut out = settings.clone();
        let counts = [
            (&mut out.keep_last, self.keep_last),
            (&mut out.keep_hourly, self.keep_hourly),
            (&mut out.keep_daily, self.keep_daily),
            (&mut out.keep_weekly, self.keep_weekly),
            (&mut out.keep_monthly, self.keep_monthly),
            (&mut out.keep_yearly, self.keep_yearly),
        ];
        for (slot, value) in counts {
            if value.is_some() {
                *slot = value;
            }
        }
        let within = field(
            "keep_within",
            self.keep_within.as_deref(),
            parse_keep_within,
        )?;
        out.keep_within = within.or(out.keep_within);
        let size = field("max_total_size", self.max_total_size.as_deref(), parse_size)?;
        out.max_total_size = size.or(out.max_total_size);
        let zone = field("timezone", self.timezone.as_deref(), parse_timezone)?;
        out.timezone = zone.or(out.timezone);
        Ok(out)
    }
}

/// Parses the prune function's payload (the state machine passes `{}`).
///
/// # Errors
/// [`EventError`] naming what is wrong.
pub fn prune_event(event: Value) -> Result<PruneEvent, EventError> {
    parse(event)
}

/// Parses the export function's payload.
///
/// # Errors
/// [`EventError`] naming what is wrong.
pub fn export_event(event: Value) -> Result<ExportEvent, EventError> {
    let parsed: ExportEvent = parse(event)?;
    check_id("run_id", parsed.run_id.as_deref())?;
    if let Some(n) = parsed.concurrency {
        crate::config::parse_concurrency(&n.to_string())
            .map_err(|e| EventError(format!("concurrency: {e}")))?;
    }
    if parsed.worker.is_some() && parsed.run_id.is_none() {
        return Err(EventError(
            "worker: a worker needs the run_id of a fanned-out run".into(),
        ));
    }
    Ok(parsed)
}

/// Parses the manifest function's payload.
///
/// # Errors
/// [`EventError`] naming what is wrong.
pub fn manifest_event(event: Value) -> Result<ManifestEvent, EventError> {
    let parsed: ManifestEvent = parse(event)?;
    check_id("run_id", parsed.run_id.as_deref())?;
    if let Some(failure) = &parsed.failure {
        check_id("failure.run_id", failure.run_id.as_deref())?;
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_three_shapes_parse() {
        assert_eq!(export_event(json!({})).ok(), Some(ExportEvent::default()));
        assert_eq!(
            export_event(json!({"mode": "incremental", "run_id": null})).ok(),
            Some(ExportEvent {
                run_id: None,
                mode: Some(RunMode::Incremental),
                ..ExportEvent::default()
            })
        );
        assert_eq!(
            export_event(json!({"mode": "full", "run_id": "r1"})).ok(),
            Some(ExportEvent {
                run_id: Some("r1".into()),
                mode: Some(RunMode::Full),
                ..ExportEvent::default()
            })
        );
        assert_eq!(
            export_event(json!({"run_id": "r1", "worker": 2, "concurrency": 4})).ok(),
            Some(ExportEvent {
                run_id: Some("r1".into()),
                worker: Some(2),
                concurrency: Some(4),
                ..ExportEvent::default()
            })
        );
        for bad in [
            json!({"concurrency": 0}),
            json!({"concurrency": 1000}),
            json!({"worker": 0}),
        ] {
            let err = export_event(bad.clone()).expect_err("refused");
            assert!(
                err.0.contains("concurrency") || err.0.contains("run_id"),
                "{bad}: {}",
                err.0
            );
        }
        let scheduled = json!({
            "version": "0", "id": "x", "detail-type": "Scheduled Event", "source": "aws.events",
            "account": "1", "time": "2026-11-22T00:00:00Z", "region": "eu-west-1",
            "resources": ["arn:aws:events:eu-west-1:1:rule/r"], "detail": {"mode": "full"}
        });
        assert_eq!(
            export_event(scheduled).ok().and_then(|e| e.mode),
            Some(RunMode::Full)
        );
        let bare =
            json!({"detail-type": "Scheduled Event", "source": "aws.scheduler", "detail": {}});
        assert_eq!(manifest_event(bare).ok(), Some(ManifestEvent::default()));
    }

    #[test]
    fn failure_payloads_carry_the_lambda_error_message() {
        let event = manifest_event(json!({"failure": {
            "run_id": "20261122T060000Z-3f9a1c",
            "execution": "arn:aws:states:eu-west-1:1:execution:tidemark:x",
            "error": {"Error": "Tidemark.Fatal", "Cause": "{\"errorType\":\"Tidemark.Fatal\",\"errorMessage\":\"table public.x does not exist\"}"}
        }}))
        .expect("parses");
        let failure = event.failure.expect("failure").to_failure();
        assert_eq!(failure.error, "Tidemark.Fatal");
        assert_eq!(failure.cause, "table public.x does not exist");
        assert_eq!(failure.run_id.as_deref(), Some("20261122T060000Z-3f9a1c"));

        let timeout = manifest_event(
            json!({"failure": {"run_id": null, "error": {"Error": "States.Timeout", "Cause": ""}}}),
        )
        .expect("parses")
        .failure
        .expect("failure")
        .to_failure();
        assert_eq!(
            (timeout.error.as_str(), timeout.run_id),
            ("States.Timeout", None)
        );

        let err = manifest_event(json!({"failure": {"run_id": "a/b"}})).expect_err("bad id");
        assert!(err.to_string().contains("failure.run_id"), "{err}");
    }

    #[test]
    fn prune_payloads() {
        assert_eq!(prune_event(json!({})).ok(), Some(PruneEvent::default()));
        let e = prune_event(json!({"dry_run": true, "keep_daily": 3})).expect("parses");
        assert!(e.dry_run);
        let settings = e.overriding(&PruneSettings::default()).expect("overrides");
        assert_eq!((settings.keep_daily, settings.keep_last), (Some(3), None));
        let e = prune_event(json!({"keep_within": "a while"})).expect("parses");
        let err = e
            .overriding(&PruneSettings::default())
            .expect_err("bad duration");
        assert!(err.to_string().contains("keep_within"), "{err}");
        let err = prune_event(json!({"keep_dayly": 3})).expect_err("typo");
        assert!(err.to_string().contains("keep_dayly"), "{err}");
    }

    #[test]
    fn every_function_refuses_fields_it_does_not_take() {
        let err = verify_event(json!({"backup_id": "b1", "mode": "weird"})).expect_err("mode");
        assert!(err.to_string().contains("unknown field `mode`"), "{err}");
        let err = prune_event(json!({"run_id": 5})).expect_err("run_id");
        assert!(err.to_string().contains("unknown field `run_id`"), "{err}");
        let err = manifest_event(json!({"run_id": "r1", "rows": 5})).expect_err("rows");
        assert!(err.to_string().contains("unknown field `rows`"), "{err}");
        let err = manifest_event(json!({"failure": {"run_id": null, "error": {}, "extra": 1}}))
            .expect_err("extra");
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
        let scheduled = json!({"detail-type": "Scheduled Event", "source": "aws.scheduler", "detail": {"mood": 1}});
        assert!(export_event(scheduled).is_err());
    }

    #[test]
    fn a_long_id_is_not_echoed_whole() {
        let long = "a".repeat(1 << 20);
        let err = export_event(json!({"run_id": long}))
            .expect_err("too long")
            .to_string();
        assert!(err.len() < 200, "{} bytes", err.len());
        assert!(err.contains("1048576 bytes"), "{err}");
    }

    #[test]
    fn malformed_payloads_are_named() {
        for (event, needle) in [
            (json!({"mode": "weekly"}), "weekly"),
            (json!({"run_id": 5}), "invalid type"),
            (json!([1, 2]), "JSON object"),
            (json!({"run_id": "../../etc"}), "run_id"),
            (json!({"backup_id": "../../x"}), "unknown field `backup_id`"),
            (json!({"pad": "x".repeat(1000)}), "unknown field `pad`"),
            (
                json!({"run_id": "r1", "done": false}),
                "unknown field `done`",
            ),
        ] {
            let err = export_event(event).expect_err("malformed").to_string();
            assert!(
                err.starts_with("invalid event") && err.contains(needle),
                "{err}"
            );
        }
    }

    #[test]
    fn a_wrong_type_or_value_names_its_field() {
        let cases = [
            (
                export_event(json!({"run_id": 5})).map(|_| ()),
                "run_id: invalid type: integer `5`",
            ),
            (
                export_event(json!({"mode": "weekly"})).map(|_| ()),
                "mode: unknown variant `weekly`",
            ),
            (
                prune_event(json!({"keep_daily": -1})).map(|_| ()),
                "keep_daily: invalid value: integer `-1`",
            ),
            (
                verify_event(json!({"backup_id": []})).map(|_| ()),
                "backup_id: invalid type: sequence",
            ),
        ];
        for (result, needle) in cases {
            let err = result.expect_err("malformed").to_string();
            assert!(err.contains(needle), "{err} (wanted {needle})");
        }
    }
}
