//! What the commands print: JSON, byte sizes, a spinner on a terminal.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressState, ProgressStyle};

pub(crate) fn json<T: serde::Serialize>(value: &T) -> Result<String, String> {
    serde_json::to_string_pretty(value).map_err(|e| e.to_string())
}

/// `n` bytes for people: `512 B`, `1.50 MiB`.
pub(crate) fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}

/// A spinner line on stderr when it is a terminal (none otherwise), showing `status()`
/// afresh on every tick.
pub(crate) fn spinner(status: impl Fn() -> String + Send + Sync + 'static) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let status = Arc::new(status);
    let style = ProgressStyle::with_template("{spinner} {elapsed_precise} {status}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .with_key(
            "status",
            move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&status());
            },
        );
    let bar = ProgressBar::new_spinner().with_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

/// Clears the spinner's line.
pub(crate) fn finish(spinner: Option<ProgressBar>) {
    if let Some(bar) = spinner {
        bar.finish_and_clear();
    }
}
