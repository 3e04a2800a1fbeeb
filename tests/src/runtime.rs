//! A Lambda runtime API emulator that behaves like Lambda where `cargo lambda watch`
//! cannot: each invocation gets a real deadline from the function's configured timeout
//! (`Lambda-Runtime-Deadline-Ms`), and a function still running when the deadline passes
//! is killed (SIGKILL, as Lambda ends a timed-out sandbox) and started again cold, the
//! invocation failing `Sandbox.Timedout`. The runtime API is three endpoints per
//! function (next, response, error, plus init error); each function gets its own port.
//!
//! [`RuntimeEmulator::lie_about_deadline`] tells one chosen invocation it has fifteen
//! minutes while the kill still comes at the configured timeout: a slice whose range
//! outlasts its safety margin, killed mid-work.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};

use crate::asl::{Invoker, StateError};

type Outcome = Result<Value, (String, String)>;

struct Invocation {
    id: String,
    payload: Value,
    deadline_ms: u64,
    done: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Slot {
    queue: VecDeque<Invocation>,
    in_flight: HashMap<String, oneshot::Sender<Outcome>>,
    /// Bumped at each kill: a `next` poll of a dead process must not take work.
    generation: u64,
    invocations: usize,
    lie_on: Vec<usize>,
    kill_on: Vec<(usize, Duration)>,
    kills: usize,
    largest_result: usize,
}

struct Function {
    name: String,
    port: u16,
    timeout: Duration,
    slot: Mutex<Slot>,
    wake: Notify,
    child: Mutex<Option<Child>>,
    env: Vec<(String, String)>,
    binary: PathBuf,
    logs: PathBuf,
}

impl Function {
    fn spawn(&self) {
        let log = |ext: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.logs.join(format!("{}.{ext}", self.name)))
                .expect("log file")
        };
        let mut child = Command::new(&self.binary)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{}", self.port))
            .env("AWS_LAMBDA_FUNCTION_NAME", &self.name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
            .stdin(Stdio::null())
            .stdout(log("out"))
            .stderr(log("err"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        match self.child.lock() {
            Ok(mut slot) => *slot = Some(child),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Kills the process (as Lambda ends a timed-out sandbox) and starts a new one.
    fn kill_and_restart(&self) {
        if let Ok(mut child) = self.child.lock() {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Ok(mut slot) = self.slot.lock() {
            slot.generation += 1;
            slot.kills += 1;
            slot.in_flight.clear();
        }
        self.wake.notify_waiters();
        self.spawn();
    }
}

/// The emulator and one process per function; all killed on drop.
pub struct RuntimeEmulator {
    functions: HashMap<String, Arc<Function>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub logs: tempfile::TempDir,
}

impl std::fmt::Debug for RuntimeEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeEmulator").finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn reply(status: u16, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    response
}

async fn serve(
    req: Request<Incoming>,
    f: Arc<Function>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["2018-06-01", "runtime", "invocation", "next"] => {
            let generation = f.slot.lock().map(|s| s.generation).unwrap_or(0);
            loop {
                let notified = f.wake.notified();
                let taken = match f.slot.lock() {
                    Ok(slot) if slot.generation != generation => {
                        return Ok(reply(410, Bytes::from_static(b"gone")))
                    }
                    Ok(mut slot) => slot.queue.pop_front().map(|inv| {
                        slot.in_flight.insert(inv.id.clone(), inv.done);
                        (inv.id, inv.payload, inv.deadline_ms)
                    }),
                    Err(_) => None,
                };
                if let Some((id, payload, deadline_ms)) = taken {
                    let mut response = reply(
                        200,
                        Bytes::from(serde_json::to_vec(&payload).unwrap_or_default()),
                    );
                    let headers = response.headers_mut();
                    let set = |h: &mut hyper::HeaderMap, k: &'static str, v: String| {
                        if let Ok(v) = v.parse() {
                            h.insert(k, v);
                        }
                    };
                    set(headers, "lambda-runtime-aws-request-id", id);
                    set(
                        headers,
                        "lambda-runtime-deadline-ms",
                        deadline_ms.to_string(),
                    );
                    set(
                        headers,
                        "lambda-runtime-invoked-function-arn",
                        format!("arn:aws:lambda:us-east-1:123456789012:function:{}", f.name),
                    );
                    set(headers, "lambda-runtime-trace-id", "Root=1-0-0".to_owned());
                    set(headers, "content-type", "application/json".to_owned());
                    return Ok(response);
                }
                notified.await;
            }
        }
        ["2018-06-01", "runtime", "invocation", id, kind @ ("response" | "error")] => {
            let sender = f.slot.lock().ok().and_then(|mut s| s.in_flight.remove(*id));
            if let Ok(mut slot) = f.slot.lock() {
                slot.largest_result = slot.largest_result.max(body.len());
            }
            if let Some(sender) = sender {
                let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let outcome = if *kind == "response" {
                    Ok(value)
                } else {
                    let error_type = value
                        .get("errorType")
                        .and_then(Value::as_str)
                        .unwrap_or("Unhandled")
                        .to_owned();
                    Err((error_type, String::from_utf8_lossy(&body).into_owned()))
                };
                let _ = sender.send(outcome);
            }
            Ok(reply(202, Bytes::new()))
        }
        ["2018-06-01", "runtime", "init", "error"] => {
            eprintln!("{}: init error: {}", f.name, String::from_utf8_lossy(&body));
            Ok(reply(202, Bytes::new()))
        }
        _ => Ok(reply(404, Bytes::new())),
    }
}

impl RuntimeEmulator {
    /// Starts each `(function, timeout)` binary (the ones `cargo test --workspace` built
    /// next to the test executable, checked newer than their sources) with `env`.
    pub async fn start(functions: &[(&str, Duration)], env: &[(String, String)]) -> Self {
        let bin_dir = crate::lambdas::binary_dir();
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        crate::lambdas::check_binaries(&workspace, &bin_dir);
        let logs = tempfile::tempdir().expect("log dir");
        let mut map = HashMap::new();
        let mut tasks = Vec::new();
        for (name, timeout) in functions {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let function = Arc::new(Function {
                name: (*name).to_owned(),
                port,
                timeout: *timeout,
                slot: Mutex::new(Slot::default()),
                wake: Notify::new(),
                child: Mutex::new(None),
                env: env.to_vec(),
                binary: bin_dir.join(name),
                logs: logs.path().to_path_buf(),
            });
            let serving = function.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let f = serving.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| serve(req, f.clone()));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }));
            function.spawn();
            map.insert((*name).to_owned(), function);
        }
        Self {
            functions: map,
            tasks,
            logs,
        }
    }

    /// The `nth` invocation (1-based) of `function` is told it has fifteen minutes; the
    /// kill still comes at the configured timeout.
    pub fn lie_about_deadline(&self, function: &str, nth: usize) {
        if let Some(f) = self.functions.get(function) {
            if let Ok(mut slot) = f.slot.lock() {
                slot.lie_on.push(nth);
            }
        }
    }

    /// The `nth` invocation (1-based) of `function` is killed `after` it started, whatever
    /// its deadline: a slice that dies mid-work (a crash, or a range that outlasted its
    /// margin).
    pub fn kill_after(&self, function: &str, nth: usize, after: Duration) {
        if let Some(f) = self.functions.get(function) {
            if let Ok(mut slot) = f.slot.lock() {
                slot.kill_on.push((nth, after));
            }
        }
    }

    /// The largest result (or error document) `function` returned, in bytes: Step
    /// Functions refuses a task result over 256 KiB.
    pub fn largest_result(&self, function: &str) -> usize {
        self.functions
            .get(function)
            .and_then(|f| f.slot.lock().ok().map(|s| s.largest_result))
            .unwrap_or(0)
    }

    /// Invocations and kills of `function` so far.
    pub fn counts(&self, function: &str) -> (usize, usize) {
        self.functions
            .get(function)
            .and_then(|f| f.slot.lock().ok().map(|s| (s.invocations, s.kills)))
            .unwrap_or((0, 0))
    }

    /// What a function wrote to stdout (`NAME.out`) or stderr (`NAME.err`).
    pub fn log(&self, file: &str) -> String {
        std::fs::read_to_string(self.logs.path().join(file)).unwrap_or_default()
    }

    /// The Embedded Metric Format documents a function printed on stdout.
    pub fn metrics(&self, function: &str) -> Vec<Value> {
        self.log(&format!("{function}.out"))
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("_aws").is_some())
            .collect()
    }
}

impl Invoker for RuntimeEmulator {
    async fn invoke(
        &self,
        function: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<Value, StateError> {
        let f = self
            .functions
            .get(function)
            .unwrap_or_else(|| panic!("no function {function}"))
            .clone();
        let mut limit = f.timeout.min(timeout);
        let (done, outcome) = oneshot::channel();
        {
            let mut slot = f.slot.lock().expect("slot");
            slot.invocations += 1;
            let n = slot.invocations;
            let lie = slot.lie_on.contains(&n);
            let told = if lie { Duration::from_secs(900) } else { limit };
            if let Some((_, after)) = slot.kill_on.iter().find(|(k, _)| *k == n) {
                limit = limit.min(*after);
            }
            slot.queue.push_back(Invocation {
                id: uuid::Uuid::new_v4().to_string(),
                payload,
                deadline_ms: now_ms() + told.as_millis() as u64,
                done,
            });
        }
        f.wake.notify_waiters();
        match tokio::time::timeout(limit, outcome).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err((error_type, document)))) => Err(StateError::new(error_type, document)),
            Ok(Err(_)) => Err(StateError::new(
                "Lambda.ServiceException",
                format!("{function}: the process died"),
            )),
            Err(_) => {
                f.kill_and_restart();
                Err(StateError::new(
                    "Sandbox.Timedout",
                    format!(
                        "{{\"errorType\":\"Sandbox.Timedout\",\"errorMessage\":\"Task timed out after {:.2} seconds\"}}",
                        limit.as_secs_f64()
                    ),
                ))
            }
        }
    }
}

impl Drop for RuntimeEmulator {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for f in self.functions.values() {
            if let Ok(mut child) = f.child.lock() {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }
}
