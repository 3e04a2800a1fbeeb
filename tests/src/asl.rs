//! A walker for the part of the Amazon States Language that `statemachine/backup.asl.json`
//! uses, so tests can run the real definition against the real function binaries: Pass
//! (`Result`, `Parameters`, `ResultPath`), Task (`arn:aws:states:::lambda:invoke` with
//! `Parameters`, `ResultSelector`, `ResultPath`, `TimeoutSeconds`, `Retry`, `Catch`),
//! Choice (`StringEquals`, `BooleanEquals`, `IsPresent`, `And`, `Or`, `Not`), Succeed and
//! Fail, with reference paths `$`, `$.a.b` and `$$.Execution.Id`.
//!
//! It follows the language's rules where the definition relies on them (a Lambda error's
//! name is its `errorType` and its cause the error JSON; `Retry` before `Catch`;
//! `States.ALL`; a missing path is `States.Runtime`), and refuses any field it does not
//! implement, so the definition cannot grow a construct these tests silently ignore.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde_json::{json, Map, Value};

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

    fn runtime(cause: impl Into<String>) -> Self {
        Self::new("States.Runtime", cause)
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

/// Runs `definition` on `input` until it succeeds, fails, or takes `max_transitions`.
///
/// # Panics
/// On a definition this walker does not understand (a test failure, by design).
pub async fn run(
    definition: &Value,
    input: Value,
    execution_id: &str,
    invoker: &impl Invoker,
    max_transitions: usize,
) -> Walk {
    let states = definition["States"].as_object().expect("States");
    let mut name = definition["StartAt"].as_str().expect("StartAt").to_owned();
    let mut data = input.clone();
    let mut walk = Walk {
        visited: Vec::new(),
        outcome: Outcome::Failed(StateError::new("Walker.TooManyTransitions", "")),
        invocations: BTreeMap::new(),
    };
    for _ in 0..max_transitions {
        walk.visited.push(name.clone());
        let state = states
            .get(&name)
            .unwrap_or_else(|| panic!("no state {name}"))
            .as_object()
            .expect("state object");
        let context = json!({
            "Execution": {"Id": execution_id, "Input": input, "Name": execution_id.rsplit(':').next()},
            "State": {"Name": name},
        });
        let step = match state["Type"].as_str().expect("Type") {
            "Pass" => pass(state, data.clone(), &context).map(|d| (next(state), d)),
            "Choice" => choose(state, &data).map(|n| (n, data.clone())),
            "Task" => task(state, data.clone(), &context, invoker, &mut walk, &name).await,
            "Succeed" => {
                allow(state, &["Type", "Comment"]);
                walk.outcome = Outcome::Succeeded(data);
                return walk;
            }
            "Fail" => {
                allow(state, &["Type", "Comment", "Error", "Cause"]);
                let text = |k: &str| state.get(k).and_then(Value::as_str).unwrap_or("");
                walk.outcome = Outcome::Failed(StateError::new(text("Error"), text("Cause")));
                return walk;
            }
            other => panic!("state type {other} is not supported by the walker"),
        };
        match step {
            Ok((n, d)) => {
                name = n;
                data = d;
            }
            Err(e) => {
                walk.outcome = Outcome::Failed(e);
                return walk;
            }
        }
    }
    walk
}

/// Fails the test if `state` has a field outside `known`.
fn allow(state: &Map<String, Value>, known: &[&str]) {
    for key in state.keys() {
        assert!(
            known.contains(&key.as_str()),
            "field {key} is not supported by the walker"
        );
    }
}

fn next(state: &Map<String, Value>) -> String {
    state["Next"].as_str().expect("Next").to_owned()
}

fn pass(state: &Map<String, Value>, data: Value, context: &Value) -> Result<Value, StateError> {
    allow(
        state,
        &[
            "Type",
            "Comment",
            "Result",
            "Parameters",
            "ResultPath",
            "Next",
        ],
    );
    let result = match (state.get("Result"), state.get("Parameters")) {
        (Some(result), _) => result.clone(),
        (None, Some(template)) => apply_template(template, &data, context)?,
        (None, None) => data.clone(),
    };
    set_result(data, state.get("ResultPath"), result)
}

fn choose(state: &Map<String, Value>, data: &Value) -> Result<String, StateError> {
    allow(state, &["Type", "Comment", "Choices", "Default"]);
    for rule in state["Choices"].as_array().expect("Choices") {
        if matches(rule, data)? {
            return Ok(rule["Next"].as_str().expect("Next").to_owned());
        }
    }
    state
        .get("Default")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| StateError::new("States.NoChoiceMatched", ""))
}

fn matches(rule: &Value, data: &Value) -> Result<bool, StateError> {
    let rule = rule.as_object().expect("choice rule");
    if let Some(all) = rule.get("And") {
        for r in all.as_array().expect("And") {
            if !matches(r, data)? {
                return Ok(false);
            }
        }
        return Ok(true);
    }
    if let Some(any) = rule.get("Or") {
        for r in any.as_array().expect("Or") {
            if matches(r, data)? {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    if let Some(not) = rule.get("Not") {
        return Ok(!matches(not, data)?);
    }
    let path = rule["Variable"].as_str().expect("Variable");
    let value = get_path(data, &Value::Null, path);
    for (op, expected) in rule {
        match op.as_str() {
            "Variable" | "Next" => {}
            "IsPresent" => return Ok(value.is_ok() == expected.as_bool().expect("bool")),
            "StringEquals" => return Ok(value?.as_str() == expected.as_str()),
            "BooleanEquals" => return Ok(value?.as_bool() == expected.as_bool()),
            other => panic!("choice operator {other} is not supported by the walker"),
        }
    }
    panic!("choice rule without an operator");
}

async fn task(
    state: &Map<String, Value>,
    data: Value,
    context: &Value,
    invoker: &impl Invoker,
    walk: &mut Walk,
    name: &str,
) -> Result<(String, Value), StateError> {
    allow(
        state,
        &[
            "Type",
            "Comment",
            "Resource",
            "Parameters",
            "ResultSelector",
            "ResultPath",
            "TimeoutSeconds",
            "Retry",
            "Catch",
            "Next",
        ],
    );
    assert_eq!(
        state["Resource"].as_str(),
        Some(LAMBDA_INVOKE),
        "only {LAMBDA_INVOKE} tasks are supported"
    );
    let timeout = Duration::from_secs(
        state
            .get("TimeoutSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(60),
    );
    let retriers = state
        .get("Retry")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut attempts = vec![0_u64; retriers.len()];
    let outcome = loop {
        let attempt = async {
            let params = apply_template(&state["Parameters"], &data, context)?;
            let function = params["FunctionName"]
                .as_str()
                .ok_or_else(|| StateError::runtime("FunctionName is not a string"))?
                .to_owned();
            let payload = params.get("Payload").cloned().unwrap_or(json!({}));
            *walk.invocations.entry(name.to_owned()).or_default() += 1;
            let response = invoker.invoke(&function, payload, timeout).await?;
            let result =
                json!({"Payload": response, "StatusCode": 200, "ExecutedVersion": "$LATEST"});
            match state.get("ResultSelector") {
                Some(selector) => apply_template(selector, &result, context),
                None => Ok(result),
            }
        }
        .await;
        let error = match attempt {
            Ok(result) => break Ok(result),
            Err(e) => e,
        };
        let retrier = retriers
            .iter()
            .position(|r| error_matches(&r["ErrorEquals"], &error.error));
        match retrier {
            Some(i) if attempts[i] < retriers[i]["MaxAttempts"].as_u64().unwrap_or(3) => {
                attempts[i] += 1;
                // The real interval grows by BackoffRate; a short pause keeps tests fast.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => break Err(error),
        }
    };
    match outcome {
        Ok(result) => Ok((
            next(state),
            set_result(data, state.get("ResultPath"), result)?,
        )),
        Err(error) => {
            let catcher = state.get("Catch").and_then(Value::as_array).and_then(|cs| {
                cs.iter()
                    .find(|c| error_matches(&c["ErrorEquals"], &error.error))
            });
            match catcher {
                Some(c) => {
                    let output = json!({"Error": error.error, "Cause": error.cause});
                    let data = set_result(data, c.get("ResultPath"), output)?;
                    Ok((c["Next"].as_str().expect("Next").to_owned(), data))
                }
                None => Err(error),
            }
        }
    }
}

fn error_matches(names: &Value, error: &str) -> bool {
    names
        .as_array()
        .expect("ErrorEquals")
        .iter()
        .any(|n| n == "States.ALL" && error != "States.Runtime" || n == error)
}

/// Evaluates a reference path: `$`, `$.a.b` on `data`, `$$.a.b` on `context`.
pub fn get_path(data: &Value, context: &Value, path: &str) -> Result<Value, StateError> {
    let (root, rest) = if let Some(rest) = path.strip_prefix("$$") {
        (context, rest)
    } else if let Some(rest) = path.strip_prefix('$') {
        (data, rest)
    } else {
        panic!("{path} is not a reference path");
    };
    let mut value = root;
    for field in rest.split('.').filter(|f| !f.is_empty()) {
        assert!(
            !field.contains('[') && !field.contains('*'),
            "path {path}: only plain field paths are supported by the walker"
        );
        value = value
            .get(field)
            .ok_or_else(|| StateError::runtime(format!("the path {path} does not exist")))?;
    }
    Ok(value.clone())
}

/// Builds a payload from a template: fields named `x.$` take the value of their path.
pub fn apply_template(
    template: &Value,
    data: &Value,
    context: &Value,
) -> Result<Value, StateError> {
    match template {
        Value::Object(fields) => {
            let mut out = Map::new();
            for (key, value) in fields {
                match key.strip_suffix(".$") {
                    Some(name) => {
                        let path = value.as_str().expect("a path");
                        assert!(
                            !path.starts_with("States."),
                            "intrinsic functions are not supported by the walker"
                        );
                        out.insert(name.to_owned(), get_path(data, context, path)?);
                    }
                    None => {
                        out.insert(key.clone(), apply_template(value, data, context)?);
                    }
                }
            }
            Ok(Value::Object(out))
        }
        other => Ok(other.clone()),
    }
}

/// Places `result` in `data` at `ResultPath` (absent: replaces it; null: discards it).
fn set_result(data: Value, path: Option<&Value>, result: Value) -> Result<Value, StateError> {
    let path = match path {
        None => return Ok(result),
        Some(Value::Null) => return Ok(data),
        Some(p) => p.as_str().expect("ResultPath"),
    };
    let fields: Vec<&str> = path
        .strip_prefix('$')
        .expect("ResultPath starts with $")
        .split('.')
        .filter(|f| !f.is_empty())
        .collect();
    if fields.is_empty() {
        return Ok(result);
    }
    let mut data = data;
    let mut slot = &mut data;
    for field in &fields {
        if !slot.is_object() {
            return Err(StateError::runtime(format!(
                "ResultPath {path} does not fit the state's input"
            )));
        }
        slot = slot
            .as_object_mut()
            .expect("object")
            .entry((*field).to_owned())
            .or_insert(Value::Object(Map::new()));
    }
    *slot = result;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_templates() {
        let data = json!({"export": {"run_id": null, "done": true}, "mode": "full"});
        let ctx = json!({"Execution": {"Id": "arn:x"}});
        assert_eq!(
            get_path(&data, &ctx, "$.export.done").ok(),
            Some(json!(true))
        );
        assert_eq!(
            get_path(&data, &ctx, "$$.Execution.Id").ok(),
            Some(json!("arn:x"))
        );
        assert_eq!(
            get_path(&data, &ctx, "$.nope").map_err(|e| e.error),
            Err("States.Runtime".to_owned())
        );
        let t = json!({"a.$": "$.mode", "b": {"c.$": "$.export.run_id"}, "d": 1});
        assert_eq!(
            apply_template(&t, &data, &ctx).ok(),
            Some(json!({"a": "full", "b": {"c": null}, "d": 1}))
        );
        assert_eq!(
            set_result(json!({"a": 1}), Some(&json!("$.b.c")), json!(2)).ok(),
            Some(json!({"a": 1, "b": {"c": 2}}))
        );
        assert_eq!(
            substitute(
                "{\"F\": \"${ExportFunctionArn}\"}",
                &[("ExportFunctionArn", "fn")]
            ),
            "{\"F\": \"fn\"}"
        );
    }
}
