//! Database access: where the settings come from, TLS, and opening a session.
//!
//! Settings come from a `postgres://` URL (`--database-url` / `DATABASE_URL`) or from a
//! Secrets Manager secret in the RDS format (`--secret-id` / `TIDEMARK_SECRET_ID`), see
//! [`DatabaseSource`]. TLS goes through `native-tls` with libpq's `sslmode` meanings and an
//! optional CA bundle (the RDS global bundle is the common one). Every session pins the
//! settings that change how values are written as text, so a chunk means the same thing on
//! any server.

pub mod copy;
pub mod relay;
mod session;
mod settings;
pub mod version;

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::{Client, NoTls};

pub use self::session::{Connection, Session, Snapshot};
pub use self::settings::{DbSettings, SslMode};
pub use self::version::{ServerVersion, Support};
use crate::error::{Classified, ErrorKind};

/// Settings every Tidemark session pins, as `pg_dump` does, so that COPY text is the same
/// on every server and client. `row_security = off` makes a table whose row-level security
/// would hide rows from this role an error instead of a silently partial copy.
pub const SESSION_SETTINGS: &str = "SET DateStyle = 'ISO'; SET IntervalStyle = 'postgres'; \
     SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET bytea_output = 'hex'; \
     SET client_encoding = 'UTF8'; SET standard_conforming_strings = on; SET row_security = off";

/// Errors of database access. None of them ever holds a password or a full URL.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("no database configured: pass --database-url (or DATABASE_URL) or --secret-id (or TIDEMARK_SECRET_ID)")]
    NotConfigured,
    #[error("give either a database URL or a secret id, not both")]
    Ambiguous,
    #[error("{0}")]
    InvalidSettings(String),
    #[error("secret {secret_id}: {reason}")]
    InvalidSecret { secret_id: String, reason: String },
    #[error("cannot read secret {secret_id}: {message}")]
    SecretUnavailable {
        secret_id: String,
        message: String,
        kind: ErrorKind,
    },
    #[error("CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("TLS setup failed: {0}")]
    Tls(#[source] native_tls::Error),
    #[error("cannot connect to PostgreSQL at {target}: {detail}{hint}")]
    Connect {
        target: String,
        /// The error with its causes, e.g. "error performing TLS handshake: ... certificate
        /// verify failed" (tokio-postgres shows only the first part).
        detail: String,
        hint: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{target}: {detail}")]
    UnsupportedServer { target: String, detail: String },
    #[error("{what} on {target}: {detail}")]
    Query {
        what: &'static str,
        target: String,
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement of a restore that the server refused, in the server's own words
    /// (message, DETAIL, HINT). The error is kept for its SQLSTATE and kind, not as a
    /// `#[source]`: its text is the message already.
    #[error("{what}: {}", server_message(cause))]
    Statement {
        what: String,
        cause: tokio_postgres::Error,
    },
    #[error("{what} on {target}: COPY output ended in the middle of a row")]
    CopyCut { what: &'static str, target: String },
    #[error("{what} on {target}: the server answered {answer:?}: {reason}")]
    Unexpected {
        what: &'static str,
        target: String,
        answer: String,
        reason: String,
    },
}

impl DbError {
    /// A failed statement on the server `settings` name.
    pub fn query(what: &'static str, settings: &DbSettings, source: tokio_postgres::Error) -> Self {
        Self::query_at(what, &settings.to_string(), source)
    }

    /// A failed statement on the server `target` (as [`DbSettings`] displays it).
    pub fn query_at(what: &'static str, target: &str, source: tokio_postgres::Error) -> Self {
        DbError::Query {
            what,
            target: target.to_owned(),
            detail: crate::error_chain(&source),
            source,
        }
    }

    /// A failed COPY read on the server `target`: the server's error, or a cut-off stream.
    pub fn copy(what: &'static str, target: &str, e: copy::CopyError) -> Self {
        match e {
            copy::CopyError::Db(source) => Self::query_at(what, target, source),
            copy::CopyError::Cut => DbError::CopyCut {
                what,
                target: target.to_owned(),
            },
        }
    }

    /// A statement the server refused during a restore, in the server's words.
    pub fn statement(what: impl Into<String>, cause: tokio_postgres::Error) -> Self {
        DbError::Statement {
            what: what.into(),
            cause,
        }
    }
}

/// Server unreachable, connection lost, a secret service hiccup: transient; bad settings,
/// refused credentials, refused statements: fatal.
impl Classified for DbError {
    fn kind(&self) -> ErrorKind {
        match self {
            DbError::SecretUnavailable { kind, .. } => *kind,
            DbError::Connect { source, .. } | DbError::Query { source, .. } => kind_of(source),
            DbError::Statement { cause, .. } => kind_of(cause),
            DbError::CopyCut { .. } => ErrorKind::Transient,
            DbError::NotConfigured
            | DbError::Ambiguous
            | DbError::InvalidSettings(_)
            | DbError::InvalidSecret { .. }
            | DbError::CaFile { .. }
            | DbError::Tls(_)
            | DbError::UnsupportedServer { .. }
            | DbError::Unexpected { .. } => ErrorKind::Fatal,
        }
    }
}

/// [`transient`] as a kind: a PostgreSQL error is transient or fatal.
pub(crate) fn kind_of(error: &tokio_postgres::Error) -> ErrorKind {
    if transient(error) {
        ErrorKind::Transient
    } else {
        ErrorKind::Fatal
    }
}

/// Whether a database error may pass if the work is tried again: the classifier of
/// PostgreSQL errors, one of the two in Tidemark (the other is AWS's,
/// [`crate::aws::error_kind`]). Server errors by SQLSTATE class: 08 (connection), 53
/// (resources), 57P (shutdown, crash); otherwise network trouble (an I/O cause, or
/// [`transient_text`]). Bad SQL, a constraint, a refused certificate or password are not.
pub fn transient(error: &tokio_postgres::Error) -> bool {
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        return code.starts_with("08") || code.starts_with("53") || code.starts_with("57P");
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(c) = cause {
        if c.is::<std::io::Error>() {
            return true;
        }
        cause = c.source();
    }
    transient_text(&crate::error_chain(error))
}

/// Whether a database failure known only by its text (a client error without a cause,
/// or what pg_dump printed) is network trouble: a timeout, a refused or closed connection.
pub fn transient_text(text: &str) -> bool {
    let text = text.to_lowercase();
    [
        "timeout",
        "timed out",
        "connection closed",
        "server closed the connection",
        "connection refused",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// The server's message for a failed statement: message, detail and hint.
pub fn server_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" (DETAIL: {detail})"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!(" (HINT: {hint})"));
            }
            text
        }
        None => crate::error_chain(e),
    }
}

/// Where the database settings come from, as given on the command line or in the
/// environment, before any lookup: the connection settings of every operation, declared
/// once. The CLI flattens this struct (global flags); the functions read it from their
/// environment with [`crate::config::from_env`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DatabaseSource {
    /// PostgreSQL URL, postgres://user:password@host:port/db?sslmode=verify-full.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL",
        value_parser = secret
    )]
    pub url: Option<SecretString>,
    /// Secrets Manager secret (id or ARN) in the RDS format, instead of a URL.
    #[arg(long, env = "TIDEMARK_SECRET_ID", global = true, value_name = "ID")]
    pub secret_id: Option<String>,
    /// PEM bundle of CAs that sign the server certificate (e.g. the RDS global bundle).
    #[arg(long, env = "TIDEMARK_CA_FILE", global = true, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// TLS mode, overriding the URL's or secret's: disable, prefer, require, verify-ca, verify-full.
    #[arg(long, env = "TIDEMARK_SSLMODE", global = true, value_name = "MODE", value_parser = sslmode)]
    pub sslmode: Option<SslMode>,
}

/// A URL kept secret from the moment it is read (it may hold a password); checked when
/// it is used, so that no parse error can show it.
pub(crate) fn secret(text: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(text.to_owned()))
}

fn sslmode(text: &str) -> Result<SslMode, String> {
    text.parse().map_err(|e: DbError| e.to_string())
}

impl DatabaseSource {
    /// Turns the source into settings, fetching the secret if one is named.
    ///
    /// # Errors
    /// [`DbError::NotConfigured`] / [`DbError::Ambiguous`] for zero or two sources; parse
    /// errors; [`DbError::SecretUnavailable`] when Secrets Manager cannot give the secret.
    pub async fn resolve(&self) -> Result<DbSettings, DbError> {
        // A blank setting is an unset one (`DATABASE_URL=` in a shell).
        let url = self
            .url
            .as_ref()
            .filter(|u| !u.expose_secret().trim().is_empty());
        let secret_id = self.secret_id.as_ref().filter(|s| !s.trim().is_empty());
        let mut settings = match (url, secret_id) {
            (Some(_), Some(_)) => return Err(DbError::Ambiguous),
            (None, None) => return Err(DbError::NotConfigured),
            (Some(url), None) => DbSettings::from_url(url)?,
            (None, Some(secret_id)) => {
                let config = crate::aws::sdk_config().await;
                let client = aws_sdk_secretsmanager::Client::new(&config);
                fetch_secret(&client, secret_id).await?
            }
        };
        if let Some(ca) = &self.ca_file {
            settings.ca_file = Some(ca.clone());
        }
        if let Some(mode) = self.sslmode {
            settings.sslmode = mode;
        }
        Ok(settings)
    }
}

/// Reads an RDS-format secret from Secrets Manager.
///
/// # Errors
/// [`DbError::SecretUnavailable`] (not found, denied, unreachable) or
/// [`DbError::InvalidSecret`] (not the RDS format).
pub async fn fetch_secret(
    client: &aws_sdk_secretsmanager::Client,
    secret_id: &str,
) -> Result<DbSettings, DbError> {
    use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata};
    let out = client
        .get_secret_value()
        .secret_id(secret_id)
        .send()
        .await
        .map_err(|err| {
            let message = match err.code() {
                Some("ResourceNotFoundException") => "no such secret".to_owned(),
                Some("AccessDeniedException") => "access denied".to_owned(),
                Some(code) => format!("{code}: {}", err.message().unwrap_or_default()),
                None => DisplayErrorContext(&err).to_string(),
            };
            DbError::SecretUnavailable {
                secret_id: secret_id.to_owned(),
                message,
                kind: crate::aws::error_kind(&err),
            }
        })?;
    let json = out
        .secret_string()
        .map(|s| SecretString::from(s.to_owned()))
        .ok_or_else(|| DbError::InvalidSecret {
            secret_id: secret_id.to_owned(),
            reason: "has no SecretString (binary secrets are not supported)".into(),
        })?;
    DbSettings::from_secret_json(secret_id, &json)
}

/// Loads every certificate of a PEM bundle.
fn load_ca_bundle(path: &Path) -> Result<Vec<native_tls::Certificate>, DbError> {
    let ca_err = |reason: String| DbError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let pem_text = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
    let blocks = pem::parse_many(&pem_text).map_err(|e| ca_err(format!("not PEM: {e}")))?;
    let certs = blocks
        .iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| native_tls::Certificate::from_der(b.contents()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_err(format!("bad certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ca_err("holds no CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn tls_connector(settings: &DbSettings) -> Result<native_tls::TlsConnector, DbError> {
    let mut builder = native_tls::TlsConnector::builder();
    let ca = settings
        .ca_file
        .as_deref()
        .map(load_ca_bundle)
        .transpose()?;
    if let Some(certs) = ca.as_ref() {
        builder.disable_built_in_roots(true);
        for cert in certs {
            builder.add_root_certificate(cert.clone());
        }
    }
    match settings.sslmode {
        SslMode::Disable => {}
        // libpq: prefer/require only encrypt, unless a root certificate is given.
        SslMode::Prefer | SslMode::Require if ca.is_none() => {
            builder.danger_accept_invalid_certs(true);
            builder.danger_accept_invalid_hostnames(true);
        }
        SslMode::Prefer | SslMode::Require | SslMode::VerifyCa => {
            builder.danger_accept_invalid_hostnames(true);
        }
        SslMode::VerifyFull => {}
    }
    builder.build().map_err(DbError::Tls)
}

/// Opens a session with pinned output settings. The connection's background task runs on
/// the current tokio runtime and ends when the returned client is dropped.
///
/// # Errors
/// [`DbError::Connect`] naming `user@host:port/db` and the reason (refused, timed out,
/// TLS verification, authentication), never the password.
pub async fn connect(settings: &DbSettings) -> Result<Client, DbError> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&settings.host)
        .port(settings.port)
        .user(&settings.user)
        .dbname(&settings.dbname)
        .application_name(&settings.application_name)
        .connect_timeout(settings.connect_timeout)
        .keepalives(true);
    if let Some(password) = &settings.password {
        config.password(password.expose_secret());
    }
    let target = settings.to_string();
    let connect_err = |source: tokio_postgres::Error| {
        let detail = crate::error_chain(&source);
        DbError::Connect {
            hint: connect_hint(settings, &detail),
            target: target.clone(),
            detail,
            source,
        }
    };
    let client = if settings.sslmode == SslMode::Disable {
        config.ssl_mode(PgSslMode::Disable);
        let (client, connection) = config.connect(NoTls).await.map_err(connect_err)?;
        spawn_connection(connection, target.clone());
        client
    } else {
        config.ssl_mode(if settings.sslmode == SslMode::Prefer {
            PgSslMode::Prefer
        } else {
            PgSslMode::Require
        });
        let tls = postgres_native_tls::MakeTlsConnector::new(tls_connector(settings)?);
        let (client, connection) = config.connect(tls).await.map_err(connect_err)?;
        spawn_connection(connection, target.clone());
        client
    };
    client
        .batch_execute(SESSION_SETTINGS)
        .await
        .map_err(|source| DbError::query("pinning session settings", settings, source))?;
    Ok(client)
}

fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>, target: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%target, %error, "database connection ended with an error");
        }
    });
}

/// A short suggestion for the failures people hit most.
fn connect_hint(settings: &DbSettings, text: &str) -> &'static str {
    if text.contains("certificate verify failed") || text.contains("self-signed") {
        if settings.ca_file.is_none() {
            " (hint: pass --ca-file with the CA bundle that signed the server certificate)"
        } else {
            " (hint: the CA file does not vouch for this server's certificate)"
        }
    } else if text.contains("hostname mismatch") || text.contains("IP address mismatch") {
        " (hint: the certificate does not name this host; connect by a name it has, or use sslmode=verify-ca)"
    } else if text.contains("server does not support TLS") {
        " (hint: the server has TLS off; use sslmode=disable or prefer only on a trusted network)"
    } else {
        ""
    }
}

/// What [`probe`] learns about a server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerInfo {
    /// `server_version`, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub server_version: String,
    /// `server_version_num`, e.g. `150018`.
    pub server_version_num: u32,
    /// Whether Tidemark serves this version.
    pub support: Support,
    /// Whether this session is encrypted, as the server sees it (`pg_stat_ssl`).
    pub tls: bool,
}

impl ServerInfo {
    pub fn version(&self) -> ServerVersion {
        ServerVersion(self.server_version_num)
    }
}

/// Asks the server its version and whether this session uses TLS.
///
/// # Errors
/// [`DbError::Query`] when the query fails.
pub async fn probe(client: &Client, settings: &DbSettings) -> Result<ServerInfo, DbError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), \
             current_setting('server_version_num')::int4, \
             coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )
        .await
        .map_err(|source| DbError::query("reading the server version", settings, source))?;
    let read = |source| DbError::query("reading the server version", settings, source);
    let num = row.try_get::<_, i32>(1).map_err(read)?.max(0) as u32;
    Ok(ServerInfo {
        server_version: row.try_get(0).map_err(read)?,
        server_version_num: num,
        support: ServerVersion(num).support(),
        tls: row.try_get(2).map_err(read)?,
    })
}
