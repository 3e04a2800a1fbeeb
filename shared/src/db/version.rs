//! Which PostgreSQL versions Tidemark serves.
//!
//! Every major from [`OLDEST_SUPPORTED_MAJOR`] to [`NEWEST_TESTED_MAJOR`] runs the whole
//! round trip in `scripts/compat` (backup, incremental, verify, restore, compared with
//! pg_dump 18 and ordered COPY). The floor is a hard one: the run's snapshot bookkeeping
//! uses `pg_current_snapshot()` and `xid8` (PostgreSQL 13), and verify drops its scratch
//! databases `WITH (FORCE)` (13). A newer major than the newest tested is served (pg_dump
//! must be at least that major, which the schema capture checks), with a warning.

use std::fmt;

/// The oldest major Tidemark backs up, verifies and restores into.
pub const OLDEST_SUPPORTED_MAJOR: u32 = 13;
/// The newest major the version matrix runs.
pub const NEWEST_TESTED_MAJOR: u32 = 18;

/// A server version as `server_version_num` gives it (e.g. `130023` for 13.23).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion(pub u32);

impl ServerVersion {
    /// The major version (13, 14, ...).
    pub fn major(self) -> u32 {
        self.0 / 10_000
    }

    /// Parses the leading `major.minor` of a `server_version` string (`15.18 (Debian
    /// 15.18-0+deb12u1)`, `18beta1`, `13.23`).
    pub fn parse(text: &str) -> Option<ServerVersion> {
        let digits = |s: &str| -> Option<(u32, usize)> {
            let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            s[..end].parse().ok().map(|n| (n, end))
        };
        let text = text.trim();
        let (major, end) = digits(text)?;
        if major < 10 {
            // 9.6.24 style: the major is two parts; Tidemark refuses these anyway.
            return Some(ServerVersion(major * 10_000));
        }
        let minor = text[end..]
            .strip_prefix('.')
            .and_then(|rest| digits(rest).map(|(n, _)| n))
            .unwrap_or(0);
        Some(ServerVersion(major * 10_000 + minor))
    }

    /// How Tidemark serves this version.
    pub fn support(self) -> Support {
        match self.major() {
            m if m < OLDEST_SUPPORTED_MAJOR => Support::TooOld,
            m if m > NEWEST_TESTED_MAJOR => Support::Untested,
            _ => Support::Supported,
        }
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major(), self.0 % 10_000)
    }
}

/// Whether Tidemark serves a server version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Support {
    /// In the tested range.
    Supported,
    /// Older than the oldest supported major: refused.
    TooOld,
    /// Newer than the newest tested major: served with a warning.
    Untested,
}

impl Support {
    /// A sentence for `tidemark check` and errors.
    pub fn describe(self, version: ServerVersion) -> String {
        let range = format!("PostgreSQL {OLDEST_SUPPORTED_MAJOR} to {NEWEST_TESTED_MAJOR}");
        match self {
            Support::Supported => format!("supported ({range})"),
            Support::TooOld => format!(
                "PostgreSQL {} is not supported (Tidemark supports {range})",
                version.major()
            ),
            Support::Untested => format!(
                "PostgreSQL {} is newer than any version Tidemark is tested with ({range}); \
                 it may work, with a pg_dump at least as new",
                version.major()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_version_strings() {
        let cases = [
            ("15.18 (Debian 15.18-0+deb12u1)", 150018),
            ("13.23", 130023),
            ("18.4", 180004),
            ("18beta1", 180000),
            ("17.0 on x86_64", 170000),
            ("9.6.24", 90000),
        ];
        for (text, num) in cases {
            assert_eq!(
                ServerVersion::parse(text),
                Some(ServerVersion(num)),
                "{text}"
            );
        }
        assert_eq!(ServerVersion::parse("PostgreSQL"), None);
        assert_eq!(ServerVersion::parse(""), None);
        assert_eq!(ServerVersion(130023).to_string(), "13.23");
    }

    #[test]
    fn support_follows_the_tested_range() {
        assert_eq!(ServerVersion(120022).support(), Support::TooOld);
        assert_eq!(ServerVersion(130000).support(), Support::Supported);
        assert_eq!(ServerVersion(180004).support(), Support::Supported);
        assert_eq!(ServerVersion(190000).support(), Support::Untested);
        assert!(Support::TooOld
            .describe(ServerVersion(120022))
            .contains("PostgreSQL 12 is not supported (Tidemark supports PostgreSQL 13 to 18)"));
    }
}
