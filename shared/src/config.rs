//! Settings shared by the CLI flags and the Lambda environment: the same names, parsed
//! the same way (`TIDEMARK_SCHEMAS`, `TIDEMARK_TABLE_MODES`, `TIDEMARK_CHUNK_BYTES`, ...).
//!
//! An operation's settings are declared once, as a clap struct beside the operation
//! ([`crate::export::ExportSettings`], [`crate::prune::PruneSettings`],
//! [`crate::verify::VerifySettings`], [`crate::db::DatabaseSource`] for the connection,
//! [`crate::store::StoreSettings`] for the store): flag, variable
//! and default on each field. The CLI flattens the struct; the functions read the same
//! struct with [`from_env`], whose errors name the variable. The value parsers here are
//! the ones both use.

use std::time::Duration;

use crate::export::{ExportOptions, ExportSettings};
use crate::format::TableMode;
use crate::prune::PruneSettings;

/// `123`, `64KiB`, `64MiB`, `1GiB` (also KB/MB/GB as powers of 1000).
///
/// # Errors
/// A message naming the bad value.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("not a size: {s:?} (e.g. 64MiB)"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    n.checked_mul(factor)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("size out of range: {s:?}"))
}

/// A duration such as `24h`, `30d`, `90min`.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e}: {s:?} (e.g. 24h, 30d)"))
}

/// `NAME=MODE`, e.g. `public.articles=append`.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_table_mode(s: &str) -> Result<(String, TableMode), String> {
    let (name, mode) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("expected NAME=MODE, got {s:?}"))?;
    Ok((name.trim().to_owned(), mode.trim().parse()?))
}

/// A name in a comma-separated list (`public, sales`): without the spaces around it.
///
/// # Errors
/// An empty name (a stray comma).
pub fn parse_name(s: &str) -> Result<String, String> {
    let name = s.trim();
    if name.is_empty() {
        return Err("an empty name (a stray comma?)".to_owned());
    }
    Ok(name.to_owned())
}

/// A whole number of seconds (`3600`).
///
/// # Errors
/// A message naming the bad value.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse()
        .map(Duration::from_secs)
        .map_err(|_| format!("not a whole number of seconds: {s:?}"))
}

/// A settings struct read from environment variables, as the Lambda functions get them:
/// the same struct, flags, variables and defaults as the CLI's (each field's `env`).
/// `env` looks a variable up, so tests need not touch the process environment; a blank
/// variable is an unset one.
///
/// # Errors
/// One line naming the variable and its bad value.
pub fn from_env<T: clap::Args + clap::FromArgMatches>(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<T, String> {
    let mut argv = Vec::new();
    let mut variables = Vec::new();
    for arg in T::augment_args(clap::Command::new("settings")).get_arguments() {
        let (Some(var), Some(long)) = (arg.get_env().and_then(|v| v.to_str()), arg.get_long())
        else {
            continue;
        };
        if let Some(value) = env(var).filter(|v| !v.trim().is_empty()) {
            argv.push(format!("--{long}={}", value.trim()));
            // A value that may hold a password (DATABASE_URL) is never repeated.
            let shown = if arg.is_hide_env_values_set() {
                String::new()
            } else {
                format!(" {value:?}")
            };
            variables.push((format!("--{long}"), var.to_owned(), shown));
        }
    }
    let matches = settings_command::<T>()
        .try_get_matches_from(argv)
        .map_err(|e| {
            // Name the variable the value came from, not the flag clap knows it by.
            let flag = match e.get(clap::error::ContextKind::InvalidArg) {
                Some(clap::error::ContextValue::String(arg)) => arg.split(' ').next(),
                _ => None,
            };
            let reason = std::error::Error::source(&e)
                .map_or_else(|| e.kind().to_string(), ToString::to_string);
            match variables.iter().find(|(f, ..)| Some(f.as_str()) == flag) {
                Some((_, var, shown)) => format!("{var}: invalid value{shown}: {reason}"),
                None => e.to_string(),
            }
        })?;
    T::from_arg_matches(&matches).map_err(|e| e.to_string())
}

/// The defaults a settings struct declares (what [`from_env`] gives with nothing set).
///
/// # Panics
/// When a declared default does not parse: a bug in the declaration, caught by tests.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    settings_command::<T>()
        .try_get_matches_from(Vec::<String>::new())
        .and_then(|m| T::from_arg_matches(&m))
        .unwrap_or_else(|e| panic!("the declared defaults of a settings struct parse: {e}"))
}

/// `T`'s flags with their variables' names, which [`from_env`] looks up itself rather
/// than clap reading the process environment.
fn settings_command<T: clap::Args>() -> clap::Command {
    T::augment_args(clap::Command::new("settings").no_binary_name(true))
        .mut_args(|arg| arg.env(None))
}

/// `TIDEMARK_PG_DUMP`: the pg_dump to use (the Lambda layer's); `None`: pg_dump on PATH.
pub fn pg_dump_from_env(env: &dyn Fn(&str) -> Option<String>) -> Option<std::path::PathBuf> {
    env("TIDEMARK_PG_DUMP")
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().into())
}

/// Export options from environment variables (as the Lambda functions get them).
/// `env` looks a variable up, so tests need not touch the process environment.
///
/// # Errors
/// A message naming the variable and its bad value.
pub fn export_options_from_env(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ExportOptions, String> {
    Ok(ExportOptions {
        settings: from_env::<ExportSettings>(env)?,
        pg_dump: pg_dump_from_env(env),
        ..ExportOptions::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_and_store_settings_come_from_the_environment() {
        use crate::db::DatabaseSource;
        use crate::store::StoreSettings;
        use secrecy::ExposeSecret;

        let env = |name: &str| match name {
            "DATABASE_URL" => Some("postgres://app:pw@db/app".to_owned()),
            "TIDEMARK_SSLMODE" => Some("verify-full".to_owned()),
            "TIDEMARK_STORE_RETRY_SECS" => Some("5".to_owned()),
            _ => None,
        };
        let source: DatabaseSource = from_env(&env).expect("parses");
        assert_eq!(
            source.url.as_ref().map(|u| u.expose_secret().to_owned()),
            Some("postgres://app:pw@db/app".to_owned())
        );
        assert_eq!(source.sslmode, Some(crate::db::SslMode::VerifyFull));
        let store: StoreSettings = from_env(&env).expect("parses");
        assert_eq!(store.retry_policy().budget, Duration::from_secs(5));
        let missing = store.url().expect_err("no store");
        assert!(missing.contains("TIDEMARK_STORE"), "{missing}");

        let bad = |name: &str| (name == "TIDEMARK_SSLMODE").then(|| "sometimes".to_owned());
        let err = from_env::<DatabaseSource>(&bad).expect_err("bad sslmode");
        assert!(
            err.starts_with("TIDEMARK_SSLMODE") && err.contains("sometimes"),
            "{err}"
        );
    }

    #[test]
    fn workers_are_one_to_the_most_and_whole() {
        assert_eq!(parse_workers("4"), Ok(4));
        assert_eq!(parse_workers(" 0 "), Ok(1));
        assert_eq!(parse_workers("1000"), Ok(MAX_WORKERS));
        assert!(parse_workers("-1").is_err_and(|e| e.contains("\"-1\"")));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2 GB"), Ok(2_000_000_000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn table_modes_parse() {
        assert_eq!(
            parse_table_mode("public.articles=append"),
            Ok(("public.articles".to_owned(), TableMode::Append))
        );
        assert!(parse_table_mode("articles").is_err());
        assert!(parse_table_mode("articles=sometimes").is_err());
    }

    #[test]
    fn export_options_come_from_the_environment() {
        let env = |name: &str| match name {
            "TIDEMARK_SCHEMAS" => Some("public, sales".to_owned()),
            "TIDEMARK_TABLE_MODES" => Some("articles=append,sales.t=snapshot".to_owned()),
            "TIDEMARK_CHUNK_BYTES" => Some("8MiB".to_owned()),
            "TIDEMARK_WORKERS" => Some("4".to_owned()),
            _ => None,
        };
        let opts = export_options_from_env(&env).expect("parses");
        assert_eq!(opts.settings.selection.schemas, ["public", "sales"]);
        assert_eq!(opts.settings.selection.modes.len(), 2);
        assert_eq!(
            (opts.settings.chunk_bytes, opts.settings.workers),
            (8 << 20, 4)
        );

        let defaults = export_options_from_env(&|_| None).expect("defaults");
        assert_eq!(defaults.settings.selection.schemas, ["public"]);
        assert_eq!(
            (defaults.settings.chunk_bytes, defaults.settings.gap_ttl),
            (64 << 20, Duration::from_secs(3600))
        );

        for (var, value) in [
            ("TIDEMARK_ZSTD_LEVEL", "40"),
            ("TIDEMARK_TABLES", "a,,b"),
            ("TIDEMARK_CHUNK_ROWS", "0"),
        ] {
            let bad = |name: &str| (name == var).then(|| value.to_owned());
            let err = export_options_from_env(&bad).expect_err(var);
            assert!(
                err.starts_with(var) && err.contains(value),
                "{var}={value}: {err}"
            );
        }

        let bad = |name: &str| (name == "TIDEMARK_WORKERS").then(|| "many".to_owned());
        let err = export_options_from_env(&bad).expect_err("bad number");
        assert!(
            err.contains("TIDEMARK_WORKERS") && err.contains("many"),
            "{err}"
        );
    }
}

/// `TIDEMARK_PRUNE_GRACE` (e.g. `24h`): how long leftovers of dead runs stay, read
/// with the other [`PruneSettings`].
///
/// # Errors
/// A message naming the variable and its bad value.
pub fn prune_grace_from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Duration, String> {
    Ok(from_env::<PruneSettings>(env)?.grace)
}

/// The retention policy of the [`PruneSettings`] in the environment.
///
/// # Errors
/// A message naming the variable and its bad value.
pub fn retention_policy_from_env(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<crate::retention::RetentionPolicy, String> {
    Ok(from_env::<PruneSettings>(env)?.policy())
}

/// The variable `name` parsed (see [`named`]).
///
/// # Errors
/// The parser's error, naming the variable.
pub fn setting<T>(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    named(name, env(name).as_deref(), parse)
}

/// A setting's value parsed, a blank value being no value; an error names the setting as
/// the caller calls it (`TIDEMARK_KEEP_DAILY`, `--keep-daily`).
///
/// # Errors
/// The parser's error, prefixed with `name`.
pub fn named<T>(
    name: &str,
    value: Option<&str>,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    value
        .filter(|v| !v.trim().is_empty())
        .map(|v| parse(v).map_err(|e| format!("{name}: {e}")))
        .transpose()
}

/// Database connections an export, restore or verify uses when not told (`--workers`).
pub const DEFAULT_WORKERS: usize = 2;

/// The most connections one process opens (`--workers` above it is taken as this).
pub const MAX_WORKERS: usize = 64;

/// A number of workers (`--workers 4`): a whole number, taken as 1 to [`MAX_WORKERS`].
///
/// # Errors
/// The value, when it is not a whole number.
pub fn parse_workers(v: &str) -> Result<usize, String> {
    v.trim()
        .parse::<usize>()
        .map(|n| n.clamp(1, MAX_WORKERS))
        .map_err(|_| format!("not a whole number: {v:?}"))
}

/// Most workers of one run (`--concurrency`).
pub const MAX_CONCURRENCY: usize = 256;

/// A number of concurrent workers, 1 to [`MAX_CONCURRENCY`] (`--concurrency 4`).
///
/// # Errors
/// The value, when it is not a whole number in that range.
pub fn parse_concurrency(v: &str) -> Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_CONCURRENCY).contains(&n) => Ok(n),
        _ => Err(format!(
            "{v:?} is not a number of workers from 1 to {MAX_CONCURRENCY}"
        )),
    }
}

/// A retention count (`--keep-daily 7`).
///
/// # Errors
/// The value, when it is not a whole number from 0.
pub fn parse_count(v: &str) -> Result<u32, String> {
    v.trim()
        .parse::<u32>()
        .map_err(|_| format!("not a count: {v:?}"))
}

/// The age under which every backup is kept (`--keep-within 30d`).
///
/// # Errors
/// The value and why it is not a duration.
pub fn parse_keep_within(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v.trim()).map_err(|e| format!("{e}: {v:?}"))
}

/// The time zone of the retention calendar (`--timezone Europe/Paris`).
///
/// # Errors
/// The value, when it is not an IANA time zone name.
pub fn parse_timezone(v: &str) -> Result<chrono_tz::Tz, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("unknown time zone {v:?} (e.g. Europe/Paris)"))
}

#[cfg(test)]
mod retention_env_tests {
    use super::*;

    #[test]
    fn the_policy_comes_from_the_environment() {
        let env = |name: &str| match name {
            "TIDEMARK_KEEP_LAST" => Some("3".to_owned()),
            "TIDEMARK_KEEP_WITHIN" => Some("2d 12h".to_owned()),
            "TIDEMARK_TIMEZONE" => Some("Europe/Paris".to_owned()),
            _ => None,
        };
        let policy = retention_policy_from_env(&env).expect("parses");
        assert_eq!(policy.keep_last, Some(3));
        assert_eq!(
            policy.keep_daily, None,
            "an explicit rule replaces the default"
        );
        assert_eq!(policy.keep_within, Some(Duration::from_secs(60 * 3600)));
        assert_eq!(policy.timezone, chrono_tz::Europe::Paris);

        let default = retention_policy_from_env(&|_| None).expect("default");
        assert_eq!(
            (
                default.keep_daily,
                default.keep_weekly,
                default.keep_monthly
            ),
            (Some(7), Some(4), Some(12))
        );

        let bad = |name: &str| (name == "TIDEMARK_TIMEZONE").then(|| "Mars/Olympus".to_owned());
        assert!(retention_policy_from_env(&bad)
            .expect_err("bad zone")
            .contains("Mars/Olympus"));
        let zero = |name: &str| (name == "TIDEMARK_KEEP_DAILY").then(|| "0".to_owned());
        assert!(
            retention_policy_from_env(&zero).expect("parses").is_empty(),
            "refused later by the plan"
        );
    }
}
