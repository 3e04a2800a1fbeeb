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
use tidemark_core::db::{DatabaseSource, DbSettings};
use tidemark_core::error_chain;
use tidemark_core::store::{self, StoreSettings};
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
    #[command(flatten)]
    store: StoreSettings,
    #[command(flatten)]
    database: DatabaseSource,
    /// The pg_dump that captures and compares schemas (default: pg_dump on PATH); it must
    /// be at least the server's major version. pg_dumpall is taken from the same directory.
    #[arg(long, env = "TIDEMARK_PG_DUMP", global = true, value_name = "PATH")]
    pg_dump: Option<PathBuf>,
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

impl GlobalArgs {
    /// Opens the configured store.
    async fn open_store(&self) -> Result<store::DynStore, String> {
        self.store.open().await
    }

    /// The source database's settings (its secret fetched, if one is named).
    async fn resolve_database(&self) -> Result<DbSettings, String> {
        self.database.resolve().await.map_err(|e| error_chain(&e))
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
