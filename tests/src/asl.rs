//! Runs `statemachine/backup.asl.json` on **aws-local-stepfunctions** (npm), an independent
//! TypeScript implementation of the Amazon States Language (Pass, Task, Choice, Map,
//! Parallel, Retry, Catch, timeouts), so tests exercise the real definition on an engine
//! this project did not write. `tests/asl/driver.mjs` runs it under Node; every Task state
//! is overridden to call back here, where the [`Invoker`] (the runtime API emulator that
//! runs the function binaries) is invoked as the `lambda:invoke` integration would: with the
//! state's `FunctionName` and `Payload`, a Lambda error's `errorType` as the error name and
//! its error document as the cause. `scripts/test` installs the engine
//! (`TIDEMARK_TEST_ASL_ENGINE`).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde_json::{json, Value};

/// The only Task resource the definition uses.
pub const LAMBDA_INVOKE: &str = "arn:aws:states:::lambda:invoke";

/// A failed state: the error name and cause Step Functions would report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateError {
    pub error: String,
    pub cause: String,
}

impl StateError {
    pub fn new(error: impl Into<String>, cause: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            cause: cause.into(),
        }
    }
}

/// Calls a Lambda function: the `FunctionName` after substitution, the payload, and the
/// state's timeout. A function error is `Err` with its `errorType` as the error name.
pub trait Invoker {
    fn invoke(
        &self,
        function: &str,
        payload: Value,
        timeout: Duration,
    ) -> impl Future<Output = Result<Value, StateError>>;
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded(Value),
    Failed(StateError),
}

/// An execution: the states entered, in order, and how it ended.
#[derive(Debug, Clone)]
pub struct Walk {
    pub visited: Vec<String>,
    pub outcome: Outcome,
    /// Task invocations per state, retries included.
    pub invocations: BTreeMap<String, usize>,
}

impl Walk {
    pub fn count(&self, state: &str) -> usize {
        self.visited.iter().filter(|s| *s == state).count()
    }
}

/// Replaces each `${Name}` with its value, as SAM's `DefinitionSubstitutions` and
/// terraform's `templatefile` do.
pub fn substitute(definition: &str, values: &[(&str, &str)]) -> String {
    values.iter().fold(definition.to_owned(), |text, (k, v)| {
        text.replace(&format!("${{{k}}}"), v)
    })
}

/// Retry waits in tests: every retrier's interval is this (the definition's are seconds).
const RETRY_MS: u64 = 50;

/// Runs `definition` on `input` until it succeeds, fails, or enters more than
/// `max_transitions` states.
///
/// # Panics
/// When the engine is not installed or its driver fails (a test failure, by design).
pub async fn run(
    definition: &Value,
    input: Value,
    execution_id: &str,
    invoker: &impl Invoker,
    max_transitions: usize,
) -> Walk {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let engine = std::env::var("TIDEMARK_TEST_ASL_ENGINE")
        .expect("TIDEMARK_TEST_ASL_ENGINE: the States Language engine (scripts/test installs it)");
    let driver = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("asl/driver.mjs");
    let mut child = tokio::process::Command::new("node")
        .arg(&driver)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs the engine's driver");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let request = json!({
        "engine": engine,
        "definition": definition,
        "input": input,
        "context": {
            "Execution": {"Id": execution_id, "Input": input, "Name": execution_id.rsplit(':').next()},
        },
        "max_transitions": max_transitions,
        "retry_ms": RETRY_MS,
    });
    let send = |message: Value| format!("{message}\n").into_bytes();
    stdin
        .write_all(&send(request))
        .await
        .expect("the driver reads its request");
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let line = line.expect("the driver's output").unwrap_or_else(|| {
                    panic!("the engine's driver ended without a result")
                });
                let Some(message) = line.strip_prefix("@@asl ") else {
                    continue;
                };
                let message: Value = serde_json::from_str(message).expect("a driver message");
                if let Some(end) = message.get("end") {
                    return walk_of(end, &message);
                }
                let id = message["invoke"].clone();
                let function = message["function"].as_str().expect("FunctionName").to_owned();
                let timeout = Duration::from_secs(message["timeout"].as_u64().unwrap_or(60));
                let payload = message["payload"].clone();
                pending.push(async move {
                    (id, invoker.invoke(&function, payload, timeout).await)
                });
            }
            Some((id, result)) = pending.next(), if !pending.is_empty() => {
                let reply = match result {
                    Ok(value) => json!({"id": id, "ok": value}),
                    Err(e) => json!({"id": id, "error": e.error, "cause": e.cause}),
                };
                // An execution that ended (a timeout) no longer listens.
                let _ = stdin.write_all(&send(reply)).await;
            }
        }
    }
}

/// The walk the driver's last message describes.
fn walk_of(end: &Value, message: &Value) -> Walk {
    let outcome = match (end.get("succeeded"), end.get("failed")) {
        (Some(output), _) => Outcome::Succeeded(output.clone()),
        (None, Some(failed)) => Outcome::Failed(StateError::new(
            failed["error"].as_str().unwrap_or_default(),
            failed["cause"].as_str().unwrap_or_default(),
        )),
        _ => panic!("the driver's end is neither success nor failure: {end}"),
    };
    let visited = message["visited"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let invocations = message["invocations"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0) as usize))
                .collect()
        })
        .unwrap_or_default();
    Walk {
        visited,
        outcome,
        invocations,
    }
}
