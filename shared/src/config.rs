//! Settings shared by the CLI flags and the Lambda environment: the same names, parsed
//! the same way (`TIDEMARK_SCHEMAS`, `TIDEMARK_TABLE_MODES`, `TIDEMARK_CHUNK_BYTES`, ...).

use std::time::Duration;

use crate::catalog::TableSelection;
use crate::export::ExportOptions;
use crate::format::TableMode;

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

fn list(value: Option<String>) -> Vec<String> {
    value
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
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
    let mut opts = ExportOptions::default();
    let schemas = list(env("TIDEMARK_SCHEMAS"));
    opts.selection = TableSelection {
        schemas: if schemas.is_empty() {
            vec!["public".to_owned()]
        } else {
            schemas
        },
        tables: list(env("TIDEMARK_TABLES")),
        modes: list(env("TIDEMARK_TABLE_MODES"))
            .iter()
            .map(|m| parse_table_mode(m).map_err(|e| format!("TIDEMARK_TABLE_MODES: {e}")))
            .collect::<Result<_, _>>()?,
    };
    let number = |name: &str| -> Result<Option<u64>, String> {
        env(name)
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("{name}: not a whole number: {v:?}"))
            })
            .transpose()
    };
    if let Some(rows) = number("TIDEMARK_CHUNK_ROWS")? {
        opts.chunk_rows = rows.max(1);
    }
    if let Some(bytes) = env("TIDEMARK_CHUNK_BYTES").filter(|v| !v.trim().is_empty()) {
        opts.chunk_bytes = parse_size(&bytes).map_err(|e| format!("TIDEMARK_CHUNK_BYTES: {e}"))?;
    }
    if let Some(workers) = setting(env, "TIDEMARK_WORKERS", parse_workers)? {
        opts.workers = workers;
    }
    if let Some(level) = number("TIDEMARK_ZSTD_LEVEL")? {
        opts.zstd_level = level.clamp(1, 19) as i32;
    }
    if let Some(ttl) = number("TIDEMARK_GAP_TTL_SECS")? {
        opts.gap_ttl = Duration::from_secs(ttl);
    }
    if let Some(every) = number("TIDEMARK_DEEP_EVERY")? {
        opts.deep_every = every.min(u64::from(u32::MAX)) as u32;
    }
    if let Some(rounds) = number("TIDEMARK_PASS_ROUNDS")? {
        opts.max_pass_rounds = rounds.clamp(1, 100) as u32;
    }
    opts.pg_dump = pg_dump_from_env(env);
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(opts.selection.schemas, ["public", "sales"]);
        assert_eq!(opts.selection.modes.len(), 2);
        assert_eq!((opts.chunk_bytes, opts.workers), (8 << 20, 4));

        let bad = |name: &str| (name == "TIDEMARK_WORKERS").then(|| "many".to_owned());
        let err = export_options_from_env(&bad).expect_err("bad number");
        assert!(
            err.contains("TIDEMARK_WORKERS") && err.contains("many"),
            "{err}"
        );
    }
}

/// `TIDEMARK_PRUNE_GRACE` (e.g. `24h`): how long leftovers of dead runs stay; `None`
/// when unset.
///
/// # Errors
/// A message naming the variable and its bad value.
pub fn prune_grace_from_env(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Duration>, String> {
    env("TIDEMARK_PRUNE_GRACE")
        .filter(|v| !v.trim().is_empty())
        .map(|v| parse_duration(&v).map_err(|e| format!("TIDEMARK_PRUNE_GRACE: {e}")))
        .transpose()
}

/// The retention policy from `TIDEMARK_KEEP_LAST`, `_HOURLY`, `_DAILY`, `_WEEKLY`,
/// `_MONTHLY`, `_YEARLY`, `TIDEMARK_KEEP_WITHIN` (e.g. `30d`), `TIDEMARK_MAX_TOTAL_SIZE`
/// (e.g. `500GiB`) and `TIDEMARK_TIMEZONE` (e.g. `Europe/Paris`). With no `KEEP` rule
/// at all, the documented default (daily 7, weekly 4, monthly 12).
///
/// # Errors
/// A message naming the variable and its bad value.
pub fn retention_policy_from_env(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<crate::retention::RetentionPolicy, String> {
    let count = |name: &str| setting(env, name, parse_count);
    let mut policy = crate::retention::RetentionPolicy::empty();
    policy.keep_last = count("TIDEMARK_KEEP_LAST")?;
    policy.keep_hourly = count("TIDEMARK_KEEP_HOURLY")?;
    policy.keep_daily = count("TIDEMARK_KEEP_DAILY")?;
    policy.keep_weekly = count("TIDEMARK_KEEP_WEEKLY")?;
    policy.keep_monthly = count("TIDEMARK_KEEP_MONTHLY")?;
    policy.keep_yearly = count("TIDEMARK_KEEP_YEARLY")?;
    policy.keep_within = setting(env, "TIDEMARK_KEEP_WITHIN", parse_keep_within)?;
    policy.max_total_size = setting(env, "TIDEMARK_MAX_TOTAL_SIZE", parse_size)?;
    if let Some(zone) = setting(env, "TIDEMARK_TIMEZONE", parse_timezone)? {
        policy.timezone = zone;
    }
    Ok(policy.or_default_rules())
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
