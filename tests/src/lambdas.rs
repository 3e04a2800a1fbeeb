//! The function binaries running under `cargo lambda watch --only-lambda-apis`, the
//! Lambda runtime API emulator: each binary polls the emulator as it would poll Lambda,
//! and tests invoke them over HTTP with the Lambda Invoke API's path.
//!
//! The binaries are the ones `cargo test --workspace` builds next to the test executable
//! (each function package has integration tests, so cargo builds its binary). A nested
//! `cargo build -p ...` would unify features differently and rebuild the AWS SDK on every
//! run, so instead the test refuses a binary older than the sources it is built from.
//! The emulator comes from `TIDEMARK_CARGO_LAMBDA` (scripts/test installs it) or `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::asl::{Invoker, StateError};

/// The four function binaries.
pub const FUNCTIONS: [&str; 4] = [
    "tidemark-export",
    "tidemark-manifest",
    "tidemark-verify",
    "tidemark-prune",
];

/// The emulator and one running process per function; all are killed on drop.
#[derive(Debug)]
pub struct Emulator {
    port: u16,
    watch: Child,
    functions: Vec<Child>,
    /// Each function's stdout (the EMF metric lines) and stderr (its JSON logs).
    pub logs: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Where cargo put this test's executable's sibling binaries (`target/debug`).
pub fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// The newest modification time of the Rust sources and manifests under `dir`, outside
/// `tests/` folders.
fn newest_source(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return newest;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let modified = if path.is_dir() {
            // Tests are not part of a binary.
            if path.file_name().is_some_and(|n| n == "tests") {
                continue;
            }
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs" || e == "toml") {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH)
        } else {
            continue;
        };
        newest = newest.max(modified);
    }
    newest
}

/// Fails the test if a function binary is missing or older than its sources.
pub fn check_binaries(workspace: &Path, bin: &Path) {
    let sources = ["shared/src", "functions"]
        .iter()
        .map(|d| newest_source(&workspace.join(d)))
        .max()
        .unwrap_or(std::time::UNIX_EPOCH);
    for name in FUNCTIONS {
        let built = std::fs::metadata(bin.join(name)).and_then(|m| m.modified());
        assert!(
            built.is_ok_and(|t| t >= sources),
            "{} is missing or older than its sources: run `cargo test --workspace` \
             (or `cargo build -p {name}`) first",
            bin.join(name).display()
        );
    }
}

impl Emulator {
    /// Starts the emulator and the four functions with `env` (plus the Lambda variables).
    ///
    /// # Panics
    /// If a binary or cargo-lambda is missing, or the emulator does not start.
    pub async fn start(env: &[(String, String)]) -> Self {
        let port = free_port();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let logs = tempfile::tempdir().expect("log dir");
        let program =
            std::env::var("TIDEMARK_CARGO_LAMBDA").unwrap_or_else(|_| "cargo-lambda".into());
        let watch_log = std::fs::File::create(logs.path().join("watch.log")).expect("log");
        let watch = Command::new(&program)
            .args([
                "lambda",
                "watch",
                "--only-lambda-apis",
                "-A",
                "127.0.0.1",
                "-P",
            ])
            .arg(port.to_string())
            .current_dir(&workspace)
            .stdin(Stdio::null())
            .stdout(watch_log.try_clone().expect("log"))
            .stderr(watch_log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {program} lambda watch (scripts/test installs cargo-lambda): {e}")
            });
        let mut emulator = Self {
            port,
            watch,
            functions: Vec::new(),
            logs,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "cargo lambda watch did not listen on {port}: {}",
                emulator.log("watch")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let bin = binary_dir();
        check_binaries(&workspace, &bin);
        for name in FUNCTIONS {
            let path = bin.join(name);
            let out = std::fs::File::create(emulator.logs.path().join(format!("{name}.out")))
                .expect("log");
            let err = std::fs::File::create(emulator.logs.path().join(format!("{name}.err")))
                .expect("log");
            let child = Command::new(&path)
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env(
                    "AWS_LAMBDA_RUNTIME_API",
                    format!("http://127.0.0.1:{port}/.rt/{name}"),
                )
                .env("AWS_LAMBDA_FUNCTION_NAME", name)
                .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
                .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
                .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
            emulator.functions.push(child);
        }
        emulator
    }

    /// What a function (or `watch`) wrote to stdout (`.out`) or stderr (`.err`).
    pub fn log(&self, file: &str) -> String {
        let path = if file == "watch" {
            self.logs.path().join("watch.log")
        } else {
            self.logs.path().join(file)
        };
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The Embedded Metric Format documents a function printed on stdout.
    pub fn metrics(&self, function: &str) -> Vec<Value> {
        self.log(&format!("{function}.out"))
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("_aws").is_some())
            .collect()
    }

    async fn post(&self, function: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
        let head = format!(
            "POST /2015-03-31/functions/{function}/invocations HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
        let head = String::from_utf8_lossy(&response[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
        // The emulator answers with a Content-Length body and closes (Connection: close).
        Ok((status, response[split + 4..].to_vec()))
    }
}

impl Invoker for Emulator {
    async fn invoke(
        &self,
        function: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<Value, StateError> {
        let body = serde_json::to_vec(&payload).expect("payload");
        let (status, body) = tokio::time::timeout(timeout, self.post(function, &body))
            .await
            .map_err(|_| {
                StateError::new(
                    "States.Timeout",
                    format!("{function} took over {timeout:?}"),
                )
            })?
            .map_err(|e| StateError::new("Lambda.ServiceException", e.to_string()))?;
        let text = String::from_utf8_lossy(&body).to_string();
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::String(text.clone()));
        match status {
            200 => Ok(value),
            // A function error: Step Functions names it by its errorType, with the whole
            // error document as the cause.
            _ => match value.get("errorType").and_then(Value::as_str) {
                Some(error_type) => Err(StateError::new(error_type, text)),
                None => Err(StateError::new(
                    "Lambda.ServiceException",
                    format!("HTTP {status}: {text}"),
                )),
            },
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        for child in self
            .functions
            .iter_mut()
            .chain(std::iter::once(&mut self.watch))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
