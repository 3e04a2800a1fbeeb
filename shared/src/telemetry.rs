//! Logging: one `tracing` subscriber for the CLI and the Lambda functions.
//!
//! Human-readable lines on a terminal; one JSON object per line in Lambda
//! (`AWS_LAMBDA_LOG_FORMAT=json`) or wherever `TIDEMARK_LOG_FORMAT=json` asks for it, so
//! CloudWatch Logs Insights can query fields. Logs go to stderr: stdout is for results.
//! `RUST_LOG` overrides the level; otherwise `verbosity` raises Tidemark's own level only,
//! so the AWS SDK never logs request or response bodies unless asked explicitly.

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

impl LogFormat {
    /// JSON when `AWS_LAMBDA_LOG_FORMAT` or `TIDEMARK_LOG_FORMAT` is `json`, else human.
    pub fn from_env() -> Self {
        let wants_json =
            |var: &str| std::env::var(var).is_ok_and(|v| v.eq_ignore_ascii_case("json"));
        if wants_json("AWS_LAMBDA_LOG_FORMAT") || wants_json("TIDEMARK_LOG_FORMAT") {
            LogFormat::Json
        } else {
            LogFormat::Human
        }
    }
}

/// The filter for a verbosity: 0 = info, 1 = debug, 2+ = trace (Tidemark's targets only).
pub fn default_filter(verbosity: u8) -> String {
    let level = match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    format!("warn,tidemark={level},tidemark_core={level}")
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(format: LogFormat, verbosity: u8) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter(verbosity)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _already_set = match format {
        LogFormat::Human => builder.with_target(false).compact().try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
