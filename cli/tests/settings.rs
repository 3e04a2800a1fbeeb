//! Every setting the README documents works in the CLI and in the Lambda functions alike.
//! The test walks the README's settings tables (`| flag | env | ... |`): each flag must
//! read its variable (the CLI's help names it, a bad value in the variable is refused
//! naming the flag), and each variable must change what the functions run with. Every
//! `TIDEMARK_*` variable the code reads must be documented.

use std::collections::BTreeSet;
use std::process::Output;

use tidemark_core::config::{
    export_options_from_env, prune_grace_from_env, retention_policy_from_env,
};

const README: &str = include_str!("../../README.md");

/// Variables documented in the tables that the test does not look up in the functions'
/// settings, and why.
const NOT_A_FUNCTION_SETTING: &[(&str, &str)] = &[
    ("TIDEMARK_JSON", "the functions always return JSON"),
    (
        "TIDEMARK_SLICE_SECONDS",
        "a Lambda invocation is bounded by its own timeout (and TIDEMARK_SLICE_MARGIN_SECS)",
    ),
    (
        "RUST_LOG",
        "a log filter: the CLI and the functions start logging with the same telemetry::init, which reads it",
    ),
];

const SUBCOMMANDS: &[&str] = &[
    "check", "backup", "export", "manifest", "list", "restore", "verify", "prune",
];

/// (flag, variable) pairs of the README's settings tables.
fn documented() -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut in_table = false;
    for line in README.lines() {
        if line.starts_with("| flag | env |") {
            in_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        if !in_table || line.starts_with("| ---") {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let ticked = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(|s| {
                    s.split_whitespace()
                        .next()
                        .unwrap_or("")
                        .trim_end_matches(',')
                        .to_owned()
                })
                .filter(|s| !s.is_empty())
                .collect()
        };
        let flags: Vec<String> = ticked(cells[1])
            .into_iter()
            .filter(|f| f.starts_with("--"))
            .collect();
        let vars: Vec<String> = ticked(cells[2])
            .into_iter()
            .filter(|v| v.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .collect();
        if vars.is_empty() {
            continue;
        }
        if flags.is_empty() {
            // `-v` and RUST_LOG: no long flag.
            pairs.extend(vars.into_iter().map(|v| (String::new(), v)));
            continue;
        }
        assert_eq!(
            flags.len(),
            vars.len(),
            "README row pairs flags with variables: {line}"
        );
        pairs.extend(flags.into_iter().zip(vars));
    }
    pairs
}

fn tidemark(args: &[&str], envs: &[(&str, &str)]) -> Output {
    tidemark_tests::run_cli(env!("CARGO_BIN_EXE_tidemark"), args, envs)
}

/// A good and (if the value is parsed) a bad value for each variable.
fn samples(var: &str) -> (&'static str, Option<&'static str>) {
    match var {
        "TIDEMARK_SCHEMAS" => ("app,audit", None),
        "TIDEMARK_TABLES" => ("orders,app.items", None),
        "TIDEMARK_TABLE_MODES" => ("orders=append", Some("orders=fastest")),
        "TIDEMARK_CHUNK_ROWS" => ("5000", Some("many")),
        "TIDEMARK_CHUNK_BYTES" => ("1MiB", Some("12 parsecs")),
        "TIDEMARK_WORKERS" => ("7", Some("lots")),
        "TIDEMARK_CONCURRENCY" => ("4", Some("many")),
        "TIDEMARK_SLICE_SECONDS" => ("60", Some("soon")),
        "TIDEMARK_ZSTD_LEVEL" => ("5", Some("max")),
        "TIDEMARK_PASS_ROUNDS" => ("9", Some("nine")),
        "TIDEMARK_GAP_TTL_SECS" => ("2", Some("2s")),
        "TIDEMARK_DEEP_EVERY" => ("3", Some("weekly")),
        "TIDEMARK_KEEP_LAST"
        | "TIDEMARK_KEEP_HOURLY"
        | "TIDEMARK_KEEP_DAILY"
        | "TIDEMARK_KEEP_WEEKLY"
        | "TIDEMARK_KEEP_MONTHLY"
        | "TIDEMARK_KEEP_YEARLY" => ("3", Some("-1")),
        "TIDEMARK_KEEP_WITHIN" => ("30d", Some("a while")),
        "TIDEMARK_MAX_TOTAL_SIZE" => ("1GiB", Some("big")),
        "TIDEMARK_TIMEZONE" => ("Europe/Paris", Some("Mars/Olympus")),
        "TIDEMARK_PRUNE_GRACE" => ("2h", Some("later")),
        "TIDEMARK_STORE" => ("s3://bucket/prefix", Some("ftp://x/y")),
        "TIDEMARK_STORE_RETRY_SECS" => ("30", Some("forever")),
        "DATABASE_URL" => ("postgres://app@db.example/app", Some("mysql://x")),
        "TIDEMARK_SECRET_ID" => ("arn:aws:secretsmanager:eu-west-1:1:secret:db", None),
        "TIDEMARK_CA_FILE" => ("/etc/ssl/rds-global.pem", None),
        "TIDEMARK_SSLMODE" => ("verify-full", Some("maybe")),
        "TIDEMARK_PG_DUMP" => ("/opt/tidemark/bin/pg_dump", None),
        "TIDEMARK_JSON" => ("true", Some("sure")),
        "RUST_LOG" => ("off", None),
        other => panic!("{other} is documented but this test has no sample value for it"),
    }
}

/// A variable lookup, as the functions get the environment.
type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// One thing the functions read from the environment, rendered to compare.
type Reader = fn(Lookup) -> Result<String, String>;

/// Everything the functions read from the environment.
const READERS: &[Reader] = &[
    |env| export_options_from_env(env).map(|o| format!("{o:?}")),
    |env| retention_policy_from_env(env).map(|p| format!("{p:?}")),
    |env| prune_grace_from_env(env).map(|g| format!("{g:?}")),
    |env| tidemark_lambda::database_source(env).map(|d| format!("{d:?}")),
    |env| tidemark_lambda::store_retry(env).map(|r| format!("{r:?}")),
    |env| tidemark_lambda::slice_margin(env).map(|m| format!("{m:?}")),
    // No store at all is an error too, but not a bad value.
    |env| match tidemark_lambda::store_url(env) {
        Ok(url) => Ok(format!("{url:?}")),
        Err(e) if e.contains("is not set") => Ok("unset".to_owned()),
        Err(e) => Err(e),
    },
];

/// Whether setting `var` to `value` changes what the Lambda functions run with; a bad
/// value's error.
fn lambda_reads(var: &str, value: &str) -> Result<bool, String> {
    let none = |_: &str| None;
    let set = |name: &str| (name == var).then(|| value.to_owned());
    let mut changed = false;
    for read in READERS {
        let before = read(&none)?;
        changed |= read(&set)? != before;
    }
    Ok(changed)
}

/// The help blocks (an option line and its description) of every subcommand and the
/// top level, with the subcommand each is from.
fn help_blocks() -> Vec<(Option<&'static str>, String)> {
    let mut blocks = Vec::new();
    for sub in std::iter::once(None).chain(SUBCOMMANDS.iter().copied().map(Some)) {
        let mut args: Vec<&str> = sub.into_iter().collect();
        args.push("--help");
        let out = tidemark(&args, &[]);
        assert!(out.status.success(), "tidemark {args:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut current = String::new();
        for line in text.lines() {
            if line.trim_start().starts_with('-') && !current.is_empty() {
                blocks.push((sub, std::mem::take(&mut current)));
            }
            current.push_str(line);
            current.push('\n');
        }
        blocks.push((sub, current));
    }
    blocks
}

#[test]
fn every_documented_setting_works_in_the_cli_and_the_lambdas() {
    let pairs = documented();
    assert!(
        pairs.len() >= 25,
        "the README's settings tables were found: {pairs:?}"
    );
    let blocks = help_blocks();
    let scratch = tempfile::tempdir().expect("tempdir");
    let scratch_store = scratch.path().to_str().expect("utf8");
    for (flag, var) in &pairs {
        let (good, bad) = samples(var);

        // The CLI: the flag reads the variable, and a bad value in it is refused.
        if !flag.is_empty() {
            let (sub, block) = blocks
                .iter()
                .find(|(_, b)| {
                    b.split(|c: char| c.is_whitespace() || c == ',')
                        .any(|w| w == flag.as_str())
                })
                .unwrap_or_else(|| panic!("no subcommand has {flag}"));
            assert!(
                block.contains(&format!("[env: {var}")),
                "{flag} does not read {var}:\n{block}"
            );
            if let Some(bad) = bad {
                // A global option is tried with `check`, which reads them all.
                let mut args = vec![sub.unwrap_or("check")];
                if *sub == Some("manifest") {
                    args.extend(["--run", "x"]);
                }
                let mut envs = vec![(var.as_str(), bad)];
                if var != "TIDEMARK_STORE" {
                    envs.push(("TIDEMARK_STORE", scratch_store));
                }
                let out = tidemark(&args, &envs);
                let stderr = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(
                    matches!(out.status.code(), Some(1 | 2)),
                    "{var}={bad} is refused: {stderr}"
                );
                // The core's own name for it, where the flag is not the CLI's to give.
                let named = match var.as_str() {
                    "DATABASE_URL" => "database URL",
                    _ => var.as_str(),
                };
                assert!(
                    stderr.contains(flag.as_str()) || stderr.contains(named),
                    "the error names {flag} or {var}: {stderr}"
                );
            }
        }

        if var == "RUST_LOG" {
            // No flag: it silences the log lines `check` writes by default.
            let envs = [("TIDEMARK_STORE", scratch_store)];
            let loud = tidemark(&["check"], &envs);
            assert!(String::from_utf8_lossy(&loud.stderr).contains("store usable"));
            let quiet = tidemark(&["check"], &[envs[0], ("RUST_LOG", good)]);
            assert!(
                !String::from_utf8_lossy(&quiet.stderr).contains("store usable"),
                "RUST_LOG={good} is honoured"
            );
        }

        // The functions: the variable changes what they run with; a bad value is refused
        // naming the variable.
        if NOT_A_FUNCTION_SETTING.iter().any(|(v, _)| v == var) {
            continue;
        }
        assert_eq!(
            lambda_reads(var, good),
            Ok(true),
            "{var}={good} changes nothing the Lambda functions read"
        );
        if let Some(bad) = bad {
            match lambda_reads(var, bad) {
                Err(e) => assert!(e.contains(var.as_str()), "{e}"),
                Ok(_) => panic!("the functions accept {var}={bad}"),
            }
        }
    }

    // Every variable the code reads is documented.
    let documented: BTreeSet<&str> = README
        .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
        .filter(|w| w.starts_with("TIDEMARK_"))
        .collect();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut read = BTreeSet::new();
    let mut dirs = vec![
        std::path::PathBuf::from(root).join("shared/src"),
        std::path::PathBuf::from(root).join("cli/src"),
        std::path::PathBuf::from(root).join("functions"),
    ];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if !path.ends_with("tests") {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read source");
                for word in text.split('"').skip(1).step_by(2) {
                    if word.starts_with("TIDEMARK_")
                        && word.len() > "TIDEMARK_".len()
                        && word.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                    {
                        read.insert(word.to_owned());
                    }
                }
            }
        }
    }
    let missing: Vec<&String> = read
        .iter()
        .filter(|v| !documented.contains(v.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "read but not documented in the README: {missing:?}"
    );
}
