//! Finding and running `pg_dump` / `pg_dumpall`, always through the TLS relay.
//!
//! pg_dump must be at least the server's major version (it refuses newer servers, and an
//! older one may miss newer object kinds). The tool is found at an explicit path
//! (`TIDEMARK_PG_DUMP`, `--pg-dump`) or on `PATH`; `pg_dumpall` is its sibling. The
//! password reaches the child only through a 0600 `PGPASSFILE` in the relay's private
//! directory, never its command line; inherited `PG*` variables are removed so that only
//! Tidemark's settings apply.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use secrecy::ExposeSecret;

use super::SchemaError;
use crate::db::relay::Relay;
use crate::db::DbSettings;

pub use crate::db::version::OLDEST_SUPPORTED_MAJOR as OLDEST_SERVER_MAJOR;

/// A located pg_dump and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgDump {
    pub path: PathBuf,
    /// As it reports itself, e.g. `18.6`.
    pub version: String,
    pub major: u32,
}

/// Which of the two tools to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    PgDump,
    PgDumpAll,
}

impl PgDump {
    /// Finds pg_dump at `explicit`, or on `PATH`, and asks its version.
    ///
    /// # Errors
    /// [`SchemaError::PgDumpNotFound`] naming where it looked, or
    /// [`SchemaError::PgDumpFailed`] when it does not run.
    pub async fn locate(explicit: Option<&Path>) -> Result<PgDump, SchemaError> {
        let path = match explicit {
            Some(p) => {
                if !p.is_file() {
                    return Err(SchemaError::PgDumpNotFound {
                        looked: format!("{} (TIDEMARK_PG_DUMP / --pg-dump)", p.display()),
                    });
                }
                p.to_path_buf()
            }
            None => find_on_path("pg_dump").ok_or_else(|| SchemaError::PgDumpNotFound {
                looked: "PATH (set TIDEMARK_PG_DUMP or --pg-dump to its location)".into(),
            })?,
        };
        let output = tokio::process::Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| SchemaError::PgDumpFailed {
                program: "pg_dump --version",
                path: path.clone(),
                detail: e.to_string(),
            })?;
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        let (version, major) = parse_version(&text).ok_or_else(|| SchemaError::PgDumpFailed {
            program: "pg_dump --version",
            path: path.clone(),
            detail: format!(
                "unrecognised version output {:?}{}",
                text.trim(),
                stderr_tail(&output.stderr)
            ),
        })?;
        Ok(PgDump {
            path,
            version,
            major,
        })
    }

    /// Refuses a pg_dump older than the server, or a server Tidemark does not support.
    ///
    /// # Errors
    /// [`SchemaError::PgDumpTooOld`] or [`SchemaError::ServerTooOld`].
    pub fn check_server(&self, server_version_num: u32) -> Result<(), SchemaError> {
        let server_major = server_version_num / 10_000;
        if server_major < OLDEST_SERVER_MAJOR {
            return Err(SchemaError::ServerTooOld {
                server: server_version_num,
            });
        }
        if self.major < server_major {
            return Err(SchemaError::PgDumpTooOld {
                path: self.path.clone(),
                version: self.version.clone(),
                server_major,
            });
        }
        Ok(())
    }

    fn program_path(&self, program: Program) -> PathBuf {
        match program {
            Program::PgDump => self.path.clone(),
            Program::PgDumpAll => self.path.with_file_name("pg_dumpall"),
        }
    }

    /// Runs `program args` against the database `settings` names, through `relay`;
    /// returns its standard output.
    ///
    /// # Errors
    /// [`SchemaError::PgDumpFailed`] with the relay's own failure if it had one (a refused
    /// certificate, an unreachable server), else the tool's exit status and stderr.
    pub async fn run(
        &self,
        program: Program,
        relay: &Relay,
        settings: &DbSettings,
        args: &[String],
    ) -> Result<Vec<u8>, SchemaError> {
        let path = self.program_path(program);
        let name = match program {
            Program::PgDump => "pg_dump",
            Program::PgDumpAll => "pg_dumpall",
        };
        let failed = |detail: String| SchemaError::PgDumpFailed {
            program: name,
            path: path.clone(),
            detail,
        };
        let mut command = tokio::process::Command::new(&path);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(&key);
            }
        }
        command
            .env("PGHOST", relay.socket_dir())
            .env("PGPORT", relay.port().to_string())
            .env("PGUSER", &settings.user)
            .env("PGDATABASE", &settings.dbname)
            .env("PGSSLMODE", "disable")
            .env("PGAPPNAME", format!("tidemark-{name}"))
            .env(
                "PGCONNECT_TIMEOUT",
                settings.connect_timeout.as_secs().max(2).to_string(),
            );
        if let Some(password) = &settings.password {
            let line = format!("*:*:*:*:{}\n", passfile_escape(password.expose_secret()));
            let file_name = format!("pgpass-{}", uuid::Uuid::new_v4().simple());
            let passfile = relay
                .private_file(&file_name, line.as_bytes())
                .map_err(|e| failed(format!("writing its password file: {e}")))?;
            command.env("PGPASSFILE", passfile);
        } else {
            command.env("PGPASSFILE", "/dev/null");
        }
        // Reads standard output and error together, then waits.
        let output = command
            .spawn()
            .map_err(|e| failed(format!("cannot start it: {e}")))?
            .wait_with_output()
            .await
            .map_err(|e| failed(format!("waiting for it: {e}")))?;
        if let Some(cause) = relay.failure() {
            return Err(failed(cause));
        }
        if !output.status.success() {
            let tail = stderr_tail(&output.stderr);
            return Err(failed(format!("{}{tail}", output.status)));
        }
        Ok(output.stdout)
    }
}

/// `pg_dump (PostgreSQL) 18.6` or `... 15.18 (Debian 15.18-0+deb12u1)`: `("18.6", 18)`.
fn parse_version(text: &str) -> Option<(String, u32)> {
    let rest = text.split(')').nth(1)?.trim();
    let version = rest.split_whitespace().next()?;
    let major = version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((version.to_owned(), major))
}

fn passfile_escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace(':', "\\:")
}

fn stderr_tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(8);
    format!(": {}", lines[start..].join(" | "))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 18.6\n"),
            Some(("18.6".into(), 18))
        );
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(("15.18".into(), 15))
        );
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 17beta2"),
            Some(("17beta2".into(), 17))
        );
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn server_versions_are_checked() {
        let tool = PgDump {
            path: "/usr/bin/pg_dump".into(),
            version: "15.18".into(),
            major: 15,
        };
        assert!(tool.check_server(150_018).is_ok());
        assert!(tool.check_server(130_000).is_ok());
        let too_old = tool.check_server(160_002).expect_err("refused");
        let text = too_old.to_string();
        assert!(
            text.contains("15.18") && text.contains("16") && text.contains("/usr/bin/pg_dump"),
            "{text}"
        );
        assert!(matches!(
            tool.check_server(120_000),
            Err(SchemaError::ServerTooOld { .. })
        ));
    }

    #[test]
    fn passfile_fields_are_escaped() {
        assert_eq!(passfile_escape(r"a:b\c"), r"a\:b\\c");
    }
}
