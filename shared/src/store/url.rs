//! Store URLs: `s3://bucket/prefix`, `file:///abs/path`, or a plain path.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::StoreError;

/// Where a store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// An S3 bucket and a key prefix (no leading or trailing `/`; may be empty).
    S3 { bucket: String, prefix: String },
    /// A local directory (absolute).
    Local(PathBuf),
}

impl FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| StoreError::InvalidUrl {
            url: raw.to_owned(),
            reason: reason.to_owned(),
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(invalid("empty"));
        }
        if let Some(rest) = trimmed.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !valid_bucket_name(bucket) {
                return Err(invalid(
                    "bucket names are 3-63 characters of a-z, 0-9, '.' and '-'",
                ));
            }
            let prefix = prefix.trim_matches('/');
            if !prefix.is_empty() {
                super::validate_key(prefix).map_err(|e| invalid(&e.to_string()))?;
            }
            return Ok(StoreUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        if let Some(rest) = trimmed.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(invalid(
                    "file:// URLs take an absolute path (file:///var/backups)",
                ));
            }
            return Ok(StoreUrl::Local(PathBuf::from(rest)));
        }
        if let Some((scheme, _)) = trimmed.split_once("://") {
            return Err(invalid(&format!(
                "unsupported scheme {scheme:?} (use s3://bucket/prefix, file:///path or a path)"
            )));
        }
        let path = Path::new(trimmed);
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| invalid(&format!("cannot resolve a relative path: {e}")))?
                .join(path)
        };
        Ok(StoreUrl::Local(absolute))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUrl::Local(path) => write!(f, "{}", path.display()),
        }
    }
}

fn valid_bucket_name(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<StoreUrl, StoreError> {
        s.parse()
    }

    #[test]
    fn s3_urls() {
        assert_eq!(
            parse("s3://my-bucket/backups/prod/").ok(),
            Some(StoreUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "backups/prod".into()
            })
        );
        assert_eq!(
            parse("s3://my-bucket").ok(),
            Some(StoreUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
            })
        );
        assert!(parse("s3://My_Bucket/x").is_err());
        assert!(parse("s3://ab").is_err());
        assert!(parse("s3://bucket/a/../b").is_err());
    }

    #[test]
    fn local_paths() {
        assert_eq!(
            parse("file:///var/backups").ok(),
            Some(StoreUrl::Local("/var/backups".into()))
        );
        assert_eq!(
            parse("/var/backups").ok(),
            Some(StoreUrl::Local("/var/backups".into()))
        );
        match parse("relative/dir") {
            Ok(StoreUrl::Local(p)) => assert!(p.is_absolute() && p.ends_with("relative/dir")),
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse("file://relative").is_err());
        assert!(parse("gs://bucket").is_err());
        assert!(parse("  ").is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in ["s3://bucket-1/a/b", "s3://bucket-1", "/tmp/store"] {
            assert_eq!(parse(s).map(|u| u.to_string()).ok().as_deref(), Some(s));
        }
    }
}
