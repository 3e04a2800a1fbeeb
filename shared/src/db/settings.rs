//! Connection settings: parsed from a `postgres://` URL or an RDS-format secret.
//!
//! The password lives in a [`SecretString`] from the moment it is parsed; neither `Debug`
//! nor any error of this module ever shows it, nor the URL it came in.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::DbError;

/// How the connection uses TLS, with libpq's meaning for each mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS if the server offers it, without verifying the certificate (libpq's default).
    #[default]
    Prefer,
    /// TLS always; the certificate is verified only against an explicit CA file.
    Require,
    /// TLS always; the certificate chain must lead to a trusted CA.
    VerifyCa,
    /// TLS always; trusted chain, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    /// The name libpq uses.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = DbError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(DbError::InvalidSettings(format!(
                    "unknown sslmode {other:?} (use disable, prefer, require, verify-ca or verify-full)"
                )))
            }
        })
    }
}

/// Everything needed to open a connection.
#[derive(Clone)]
pub struct DbSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<SecretString>,
    pub dbname: String,
    pub sslmode: SslMode,
    /// PEM bundle of trusted CAs (e.g. the RDS global bundle); replaces the system roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub application_name: String,
}

impl fmt::Debug for DbSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("ca_file", &self.ca_file)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// Shown to people: `user@host:port/dbname`, never the password.
impl fmt::Display for DbSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(
                f,
                "{}@[{}]:{}/{}",
                self.user, self.host, self.port, self.dbname
            )
        } else {
            write!(
                f,
                "{}@{}:{}/{}",
                self.user, self.host, self.port, self.dbname
            )
        }
    }
}

const DEFAULT_PORT: u16 = 5432;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl DbSettings {
    fn new(host: String, user: String, password: Option<SecretString>, dbname: String) -> Self {
        Self {
            host,
            port: DEFAULT_PORT,
            user,
            password,
            dbname,
            sslmode: SslMode::default(),
            ca_file: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            application_name: "tidemark".to_owned(),
        }
    }

    /// Parses `postgres://user:password@host:port/dbname?sslmode=...`.
    ///
    /// Recognised query parameters: `sslmode`, `sslrootcert`, `connect_timeout` (seconds),
    /// `application_name`, and `host` (a Unix-socket directory).
    ///
    /// # Errors
    /// [`DbError::InvalidSettings`] saying what is wrong, without repeating the URL.
    pub fn from_url(raw: &SecretString) -> Result<Self, DbError> {
        let invalid = |reason: String| DbError::InvalidSettings(format!("database URL: {reason}"));
        let url = url::Url::parse(raw.expose_secret().trim())
            .map_err(|e| invalid(format!("not a valid URL ({e})")))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(invalid(format!(
                "scheme must be postgres:// or postgresql://, not {}://",
                url.scheme()
            )));
        }
        let decode = |part: &str, what: &str| {
            percent_decode_str(part)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| invalid(format!("{what} is not valid UTF-8 after percent-decoding")))
        };
        let user = match url.username() {
            "" => "postgres".to_owned(),
            u => decode(u, "user name")?,
        };
        let password = url
            .password()
            .map(|p| decode(p, "password").map(SecretString::from))
            .transpose()?;
        let host = url
            .host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .unwrap_or_default();
        let dbname = match url.path().trim_start_matches('/') {
            "" => user.clone(),
            d => decode(d, "database name")?,
        };
        let mut settings = Self::new(host, user, password, dbname);
        if let Some(port) = url.port() {
            settings.port = port;
        }
        for (name, value) in url.query_pairs() {
            match name.as_ref() {
                "sslmode" => settings.sslmode = value.parse()?,
                "sslrootcert" => settings.ca_file = Some(PathBuf::from(value.as_ref())),
                "connect_timeout" => {
                    let secs: u64 = value
                        .parse()
                        .map_err(|_| invalid("connect_timeout must be whole seconds".into()))?;
                    settings.connect_timeout = Duration::from_secs(secs.max(1));
                }
                "application_name" => settings.application_name = value.into_owned(),
                "host" => settings.host = value.into_owned(),
                "dbname" => settings.dbname = value.into_owned(),
                "user" => settings.user = value.into_owned(),
                "port" => {
                    settings.port = value
                        .parse()
                        .map_err(|_| invalid("port must be a number from 1 to 65535".into()))?
                }
                other => {
                    return Err(invalid(format!(
                        "unsupported parameter {other:?} (supported: sslmode, sslrootcert, connect_timeout, application_name, host, port, dbname, user)"
                    )))
                }
            }
        }
        if settings.host.is_empty() {
            return Err(invalid("no host".into()));
        }
        Ok(settings)
    }

    /// Parses a Secrets Manager secret in the RDS format:
    /// `{"username","password","host","port","dbname"}`, optionally `"sslmode"`.
    /// `port` may be a number or a numeric string; `dbname` defaults to `postgres`.
    ///
    /// # Errors
    /// [`DbError::InvalidSecret`] naming the field that is missing or malformed; the
    /// secret's values are never repeated.
    pub fn from_secret_json(secret_id: &str, json: &SecretString) -> Result<Self, DbError> {
        let invalid = |reason: &str| DbError::InvalidSecret {
            secret_id: secret_id.to_owned(),
            reason: reason.to_owned(),
        };
        // Parse into a Value first: serde's typed errors would quote the offending value.
        let value: Value =
            serde_json::from_str(json.expose_secret()).map_err(|_| invalid("not a JSON object"))?;
        let object = value
            .as_object()
            .ok_or_else(|| invalid("not a JSON object"))?;
        let text = |field: &str, required: bool| -> Result<Option<String>, DbError> {
            match object.get(field) {
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                None | Some(Value::Null) if !required => Ok(None),
                None | Some(Value::Null) => Err(invalid(&format!("field {field:?} is missing"))),
                Some(_) => Err(invalid(&format!(
                    "field {field:?} must be a non-empty string"
                ))),
            }
        };
        let user = text("username", true)?.unwrap_or_default();
        let password = text("password", true)?.map(SecretString::from);
        let host = text("host", true)?.unwrap_or_default();
        let dbname = text("dbname", false)?.unwrap_or_else(|| "postgres".to_owned());
        let mut settings = Self::new(host, user, password, dbname);
        match object.get("port") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                settings.port = n
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p > 0)
                    .ok_or_else(|| invalid("field \"port\" must be from 1 to 65535"))?;
            }
            Some(Value::String(s)) => {
                settings.port = s
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| invalid("field \"port\" must be from 1 to 65535"))?;
            }
            Some(_) => return Err(invalid("field \"port\" must be a number")),
        }
        if let Some(mode) = text("sslmode", false)? {
            settings.sslmode = mode
                .parse()
                .map_err(|_| invalid("field \"sslmode\" is not a known sslmode"))?;
        }
        Ok(settings)
    }

    /// The same server and credentials, another database.
    pub fn with_dbname(&self, dbname: &str) -> Self {
        Self {
            dbname: dbname.to_owned(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "s3cr3t-p@ss:w/rd";

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    #[test]
    fn parses_a_full_url() -> Result<(), DbError> {
        let s = DbSettings::from_url(&secret(
            "postgresql://app%40corp:s3cr3t-p%40ss%3Aw%2Frd@db.example.com:6543/sales%20db?sslmode=verify-full&sslrootcert=/etc/rds.pem&connect_timeout=3",
        ))?;
        assert_eq!(s.user, "app@corp");
        assert_eq!(
            s.password.as_ref().map(|p| p.expose_secret().to_owned()),
            Some(PASSWORD.to_owned())
        );
        assert_eq!(s.host, "db.example.com");
        assert_eq!(s.port, 6543);
        assert_eq!(s.dbname, "sales db");
        assert_eq!(s.sslmode, SslMode::VerifyFull);
        assert_eq!(s.ca_file, Some(PathBuf::from("/etc/rds.pem")));
        assert_eq!(s.connect_timeout, Duration::from_secs(3));
        Ok(())
    }

    #[test]
    fn defaults_follow_libpq() -> Result<(), DbError> {
        let s = DbSettings::from_url(&secret("postgres://alice@localhost"))?;
        assert_eq!((s.port, s.dbname.as_str()), (5432, "alice"));
        assert_eq!(s.sslmode, SslMode::Prefer);
        assert!(s.password.is_none());
        let v6 = DbSettings::from_url(&secret("postgres://u@[::1]:5433/d"))?;
        assert_eq!(
            (v6.host.as_str(), v6.to_string()),
            ("::1", "u@[::1]:5433/d".to_owned())
        );
        Ok(())
    }

    #[test]
    fn no_output_shows_the_password() -> Result<(), DbError> {
        let s = DbSettings::from_url(&secret(
            "postgres://app:s3cr3t-p%40ss%3Aw%2Frd@db:5432/x?sslmode=require",
        ))?;
        for shown in [format!("{s:?}"), s.to_string(), format!("{s:#?}")] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
        Ok(())
    }

    #[test]
    fn bad_urls_are_named_without_echoing_them() {
        for raw in [
            "mysql://app:s3cr3t@db/x",
            "postgres://app:s3cr3t@db:99999/x",
            "postgres://app:s3cr3t@db/x?sslmode=sometimes",
            "postgres://app:s3cr3t@db/x?password=s3cr3t",
            "not a url s3cr3t",
            "postgres://app:s3cr3t@/x",
        ] {
            match DbSettings::from_url(&secret(raw)) {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(!msg.contains("s3cr3t"), "{raw}: {msg}");
                    assert!(
                        msg.starts_with("database URL") || msg.contains("sslmode"),
                        "{msg}"
                    );
                }
                Ok(s) => panic!("{raw} accepted as {s:?}"),
            }
        }
    }

    #[test]
    fn parses_an_rds_secret() -> Result<(), DbError> {
        let s = DbSettings::from_secret_json(
            "arn:secret",
            &secret(
                r#"{"engine":"postgres","username":"app","password":"pw","host":"h","port":"5433","dbname":"d","sslmode":"verify-full"}"#,
            ),
        )?;
        assert_eq!(
            (s.user.as_str(), s.host.as_str(), s.port, s.dbname.as_str()),
            ("app", "h", 5433, "d")
        );
        assert_eq!(s.sslmode, SslMode::VerifyFull);
        let n = DbSettings::from_secret_json(
            "arn:secret",
            &secret(r#"{"username":"app","password":"pw","host":"h","port":5432}"#),
        )?;
        assert_eq!((n.port, n.dbname.as_str()), (5432, "postgres"));
        Ok(())
    }

    #[test]
    fn bad_secrets_name_the_field_not_the_value() {
        for (json, field) in [
            (r#"{"username":"app","host":"h"}"#, "password"),
            (
                r#"{"username":"app","password":12345678,"host":"h"}"#,
                "password",
            ),
            (
                r#"{"username":"app","password":"s3cr3t","host":"h","port":"s3cr3t"}"#,
                "port",
            ),
            (
                r#"{"username":"app","password":"s3cr3t","port":5432}"#,
                "host",
            ),
            (r#"s3cr3t"#, "JSON"),
        ] {
            match DbSettings::from_secret_json("my-secret", &secret(json)) {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(field) && msg.contains("my-secret"), "{msg}");
                    assert!(
                        !msg.contains("s3cr3t") && !msg.contains("12345678"),
                        "{msg}"
                    );
                }
                Ok(s) => panic!("{json} accepted as {s:?}"),
            }
        }
    }
}
