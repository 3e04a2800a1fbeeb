//! CloudWatch metrics through the Embedded Metric Format: one JSON line on stdout per
//! invocation, which CloudWatch Logs turns into metrics with no API call and no extra
//! permission. Namespace `Tidemark`, one dimension, `database`.
//!
//! The metric names are a contract with the alarms in `template.yaml` and `terraform/`.

use std::io::Write;

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

pub const NAMESPACE: &str = "Tidemark";
pub const DIMENSION: &str = "database";

/// Rows an export slice wrote.
pub const ROWS_EXPORTED: &str = "RowsExported";
/// Compressed bytes an export slice wrote.
pub const BYTES_EXPORTED: &str = "BytesExported";
/// From a run's first slice to its seal.
pub const BACKUP_DURATION_SECONDS: &str = "BackupDurationSeconds";
/// 1 when a run is sealed into a backup of one point in time (0 when the failure step
/// records a failed run, or the backup had to be sealed as mixing moments).
pub const BACKUP_SUCCEEDED: &str = "BackupSucceeded";
/// 1 when a run spanning slices could not be brought to one snapshot and was sealed as
/// mixing moments (it fails verification).
pub const BACKUP_INCONSISTENT: &str = "BackupInconsistent";
pub const VERIFICATION_SUCCEEDED: &str = "VerificationSucceeded";
pub const VERIFICATION_FAILED: &str = "VerificationFailed";
/// The measured recovery time of a verified backup.
pub const RESTORE_SECONDS: &str = "RestoreSeconds";
/// Objects a prune deleted.
pub const PRUNED_OBJECTS: &str = "PrunedObjects";

/// A CloudWatch unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Bytes,
    Seconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Bytes => "Bytes",
            Unit::Seconds => "Seconds",
        }
    }
}

/// Values of one event, for one database.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSet {
    database: String,
    values: Vec<(&'static str, Unit, f64)>,
}

impl MetricSet {
    pub fn new(database: impl Into<String>) -> Self {
        Self {
            database: database.into(),
            values: Vec::new(),
        }
    }

    /// Adds a value (a name given twice keeps the last value).
    #[must_use]
    pub fn with(mut self, name: &'static str, unit: Unit, value: f64) -> Self {
        self.values.retain(|(n, _, _)| *n != name);
        self.values.push((name, unit, value));
        self
    }

    /// The EMF document for `timestamp`.
    pub fn to_document(&self, timestamp: DateTime<Utc>) -> Value {
        let definitions: Vec<Value> = self
            .values
            .iter()
            .map(|(name, unit, _)| json!({"Name": name, "Unit": unit.as_str()}))
            .collect();
        let mut doc = Map::new();
        doc.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp.timestamp_millis(),
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [[DIMENSION]],
                    "Metrics": definitions,
                }],
            }),
        );
        doc.insert(DIMENSION.into(), Value::String(self.database.clone()));
        for (name, _, value) in &self.values {
            doc.insert((*name).into(), json!(value));
        }
        Value::Object(doc)
    }

    /// Writes the document as one line on stdout, where Lambda sends it to CloudWatch
    /// Logs. A failed write is logged, never fatal: metrics must not fail a backup.
    pub fn emit(&self) {
        if self.values.is_empty() {
            return;
        }
        let line = self.to_document(Utc::now()).to_string();
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "could not write the metrics line");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_follow_the_embedded_metric_format() {
        let at = DateTime::parse_from_rfc3339("2026-11-22T06:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let doc = MetricSet::new("orders")
            .with(ROWS_EXPORTED, Unit::Count, 10.0)
            .with(BYTES_EXPORTED, Unit::Bytes, 2048.0)
            .with(ROWS_EXPORTED, Unit::Count, 12.0)
            .to_document(at);
        let aws = &doc["_aws"];
        assert_eq!(aws["Timestamp"], json!(1_795_327_200_000_i64));
        let directive = &aws["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "Tidemark");
        assert_eq!(directive["Dimensions"], json!([["database"]]));
        // Every declared metric has a value member and every dimension a string member.
        let metrics = directive["Metrics"].as_array().expect("metrics");
        assert_eq!(metrics.len(), 2);
        for m in metrics {
            let name = m["Name"].as_str().expect("name");
            assert!(doc[name].is_number(), "{name} has no value");
        }
        assert_eq!(doc["database"], "orders");
        assert_eq!(doc["RowsExported"], json!(12.0));
        assert_eq!(doc["BytesExported"], json!(2048.0));
        let bytes = metrics.iter().find(|m| m["Name"] == BYTES_EXPORTED);
        assert_eq!(bytes.map(|m| &m["Unit"]), Some(&json!("Bytes")));
    }
}
