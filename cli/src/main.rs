//! `tidemark`: the core operations on a laptop or a cron host, against S3 or a directory.

mod backup;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tidemark_core::check::{self, DatabaseCheck, PgDumpCheck, StoreCheck};
use tidemark_core::db::{DatabaseSource, SslMode, Support};
use tidemark_core::error_chain;
use tidemark_core::store::{self, StoreUrl};
use tidemark_core::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "tidemark",
    version,
    about = "Incremental, verified, logical PostgreSQL backups into S3 or a directory"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Settings every subcommand shares; the Lambda functions read the same variables.
#[derive(Args)]
struct GlobalArgs {
    /// Where backups live: s3://bucket/prefix, file:///abs/path or a directory path.
    #[arg(long, env = "TIDEMARK_STORE", global = true, value_name = "URL")]
    store: Option<String>,
    /// PostgreSQL URL, postgres://user:password@host:port/db?sslmode=verify-full.
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    database_url: Option<String>,
    /// Secrets Manager secret (id or ARN) in the RDS format, instead of a URL.
    #[arg(long, env = "TIDEMARK_SECRET_ID", global = true, value_name = "ID")]
    secret_id: Option<String>,
    /// PEM bundle of CAs that sign the server certificate (e.g. the RDS global bundle).
    #[arg(long, env = "TIDEMARK_CA_FILE", global = true, value_name = "PATH")]
    ca_file: Option<PathBuf>,
    /// TLS mode, overriding the URL's or secret's: disable, prefer, require, verify-ca, verify-full.
    #[arg(long, env = "TIDEMARK_SSLMODE", global = true, value_name = "MODE", value_parser = parse_sslmode)]
    sslmode: Option<SslMode>,
    /// The pg_dump that captures and compares schemas (default: pg_dump on PATH); it must
    /// be at least the server's major version. pg_dumpall is taken from the same directory.
    #[arg(long, env = "TIDEMARK_PG_DUMP", global = true, value_name = "PATH")]
    pg_dump: Option<PathBuf>,
    /// How long a failed store request is tried again, in seconds (0: only the SDK's
    /// quick retries), riding out throttling and short outages.
    #[arg(long, env = "TIDEMARK_STORE_RETRY_SECS", global = true, value_name = "SECONDS", value_parser = parse_store_retry)]
    store_retry: Option<std::time::Duration>,
    /// Print results as JSON on stdout.
    #[arg(long, env = "TIDEMARK_JSON", global = true)]
    json: bool,
    /// More log detail on stderr (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Connect to the database and round-trip a probe object in the store.
    Check,
    /// Take a backup: export slices until done, then seal the manifest; prints the backup id.
    Backup(backup::BackupArgs),
    /// Run one export slice (what the export Lambda does); prints its JSON report.
    Export(backup::ExportArgs),
    /// Seal a finished run into a manifest (what the manifest Lambda does).
    Manifest(backup::ManifestArgs),
    /// List the backups in the store.
    List,
    /// Restore a backup into a database.
    Restore(backup::RestoreArgs),
    /// Prove a backup restorable: restore it into a scratch database and compare.
    Verify(backup::VerifyArgs),
    /// Apply the retention policy and delete what no kept backup needs.
    Prune(backup::PruneArgs),
}

fn parse_store_retry(s: &str) -> Result<std::time::Duration, String> {
    tidemark_core::store::retry::parse_budget(s)
}

fn parse_sslmode(s: &str) -> Result<SslMode, String> {
    s.parse()
        .map_err(|e: tidemark_core::db::DbError| e.to_string())
}

impl GlobalArgs {
    fn store_retry_policy(&self) -> store::RetryPolicy {
        match self.store_retry {
            Some(budget) => store::RetryPolicy {
                budget,
                ..store::RetryPolicy::default()
            },
            None => store::RetryPolicy::default(),
        }
    }

    /// Opens the configured store.
    async fn open_store(&self) -> Result<store::DynStore, String> {
        let raw = self.store.as_deref().ok_or_else(|| {
            "no store configured: pass --store (or TIDEMARK_STORE) with s3://bucket/prefix or a directory".to_owned()
        })?;
        let url: StoreUrl = raw
            .parse()
            .map_err(|e| format!("--store (TIDEMARK_STORE): {}", error_chain(&e)))?;
        store::open(&url, self.store_retry_policy())
            .await
            .map_err(|e| error_chain(&e))
    }

    fn database(&self) -> DatabaseSource {
        DatabaseSource {
            url: self
                .database_url
                .clone()
                .filter(|u| !u.trim().is_empty())
                .map(Into::into),
            secret_id: self.secret_id.clone().filter(|s| !s.trim().is_empty()),
            ca_file: self.ca_file.clone(),
            sslmode: self.sslmode,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(LogFormat::from_env(), cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let outcome = match &cli.command {
            Command::Check => return run_check(&cli.global).await,
            Command::Backup(args) => backup::backup(&cli.global, args).await,
            Command::Export(args) => backup::export(&cli.global, args).await,
            Command::Manifest(args) => backup::manifest(&cli.global, args).await,
            Command::List => backup::list(&cli.global).await,
            Command::Restore(args) => backup::restore(&cli.global, args).await,
            Command::Verify(args) => backup::verify(&cli.global, args).await,
            Command::Prune(args) => backup::prune(&cli.global, args).await,
        };
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("error: {message}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn run_check(global: &GlobalArgs) -> ExitCode {
    let database = async {
        let settings = global.database().resolve().await?;
        check::check_database(&settings).await
    }
    .await
    .map_err(|e| error_chain(&e));
    // Probing pg_dump needs the database; without it, only find the tool.
    let pg_dump = async {
        if database.is_err() {
            return check::locate_pg_dump(global.pg_dump.as_deref())
                .await
                .map_err(|e| error_chain(&e));
        }
        let settings = global
            .database()
            .resolve()
            .await
            .map_err(|e| error_chain(&e))?;
        check::check_pg_dump(&settings, global.pg_dump.as_deref())
            .await
            .map_err(|e| error_chain(&e))
    }
    .await;
    let store = async {
        let store = global.open_store().await?;
        check::check_store(store.as_ref())
            .await
            .map_err(|e| error_chain(&e))
    }
    .await;

    // A directory store holds the database's data: it should be its owner's only.
    let exposed = match global.store.as_deref().map(str::parse::<StoreUrl>) {
        Some(Ok(StoreUrl::Local(path))) => store::readable_by_others(&path)
            .unwrap_or(false)
            .then_some(path),
        _ => None,
    };
    let ok = database.is_ok() && pg_dump.is_ok() && store.is_ok();
    if global.json {
        let report = json!({
            "ok": ok,
            "database": outcome_json(&database),
            "pg_dump": outcome_json(&pg_dump),
            "store": outcome_json(&store),
            "store_readable_by_others": exposed.is_some(),
        });
        println!("{report:#}");
    } else {
        println!("{}", database_line(&database));
        println!("{}", pg_dump_line(&pg_dump));
        println!("{}", store_line(&store));
        if let Some(path) = &exposed {
            println!(
                "store     warn  {} can be read by other users of this machine; it holds the database's data: chmod -R go-rwx {}",
                path.display(),
                path.display()
            );
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn outcome_json<T: serde::Serialize>(outcome: &Result<T, String>) -> serde_json::Value {
    match outcome {
        Ok(value) => {
            let mut v = serde_json::to_value(value).unwrap_or_default();
            if let Some(map) = v.as_object_mut() {
                map.insert("ok".into(), true.into());
            }
            v
        }
        Err(error) => json!({ "ok": false, "error": error }),
    }
}

fn database_line(outcome: &Result<DatabaseCheck, String>) -> String {
    match outcome {
        Ok(db) => format!(
            "database  {}PostgreSQL {} at {}, TLS {} (sslmode {}); {}",
            if db.server.support == Support::Supported {
                "ok    "
            } else {
                "warn  "
            },
            db.server.server_version,
            db.target,
            if db.server.tls { "on" } else { "off" },
            db.sslmode,
            db.server.support.describe(db.server.version())
        ),
        Err(e) => format!("database  FAIL  {e}"),
    }
}

fn pg_dump_line(outcome: &Result<PgDumpCheck, String>) -> String {
    match outcome {
        Ok(p) if !p.probed => format!(
            "pg_dump   --    pg_dump {} at {}; not probed (the database check failed)",
            p.version, p.path
        ),
        Ok(p) => format!(
            "pg_dump   ok    pg_dump {} at {} (server {}); dumped the schema of {} through the TLS relay in {} ms",
            p.version,
            p.path,
            p.server_major,
            p.probe_table.as_deref().unwrap_or("the database"),
            p.millis
        ),
        Err(e) => format!("pg_dump   FAIL  {e}"),
    }
}

fn store_line(outcome: &Result<StoreCheck, String>) -> String {
    match outcome {
        Ok(s) => format!(
            "store     ok    {}: {}-byte probe created (second create refused), read back, deleted; {} requests in {} ms",
            s.location, s.probe_bytes, s.requests, s.millis
        ),
        Err(e) => format!("store     FAIL  {e}"),
    }
}
