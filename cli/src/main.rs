//! `tidemark`: the core operations on a laptop or a cron host, against S3 or a directory.

mod backup;
mod check;
mod export;
mod list;
mod manifest;
mod output;
mod prune;
mod restore;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tidemark_core::db::{DatabaseSource, DbSettings, SslMode};
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
    Export(export::ExportArgs),
    /// Seal a finished run into a manifest (what the manifest Lambda does).
    Manifest(manifest::ManifestArgs),
    /// List the backups in the store.
    List,
    /// Restore a backup into a database.
    Restore(restore::RestoreArgs),
    /// Prove a backup restorable: restore it into a scratch database and compare.
    Verify(verify::VerifyArgs),
    /// Apply the retention policy and delete what no kept backup needs.
    Prune(prune::PruneArgs),
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

    /// The source database's settings (its secret fetched, if one is named).
    async fn resolve_database(&self) -> Result<DbSettings, String> {
        self.database().resolve().await.map_err(|e| error_chain(&e))
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
            Command::Check => return check::check(&cli.global).await,
            Command::Backup(args) => backup::backup(&cli.global, args).await,
            Command::Export(args) => export::export(&cli.global, args).await,
            Command::Manifest(args) => manifest::manifest(&cli.global, args).await,
            Command::List => list::list(&cli.global).await,
            Command::Restore(args) => restore::restore(&cli.global, args).await,
            Command::Verify(args) => verify::verify(&cli.global, args).await,
            Command::Prune(args) => prune::prune(&cli.global, args).await,
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
