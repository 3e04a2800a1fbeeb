//! Verification documents: the record of a backup's last verification, and the state of
//! one in flight.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::format::{Fingerprint, FingerprintOf, TableName};
use crate::repo::verification_key;
use crate::schema::compare::SchemaCheck;

/// `verifications/{backup_id}.json`: the last verification of a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub version: u32,
    pub backup_id: String,
    pub ok: bool,
    pub verified_at: DateTime<Utc>,
    /// The measured recovery time: restoring the whole backup into an empty database.
    pub restore_seconds: f64,
    /// Restore plus comparison.
    pub seconds: f64,
    /// Stored bytes the backup needs.
    pub bytes: u64,
    pub rows: u64,
    pub tables: Vec<TableVerification>,
    /// The restored schema against the recorded one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<SchemaCheck>,
    /// Why the verification failed before it could compare tables (a corrupt chunk, a
    /// modified manifest), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One table's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableVerification {
    pub name: TableName,
    pub ok: bool,
    pub expected: Fingerprint,
    pub actual: Option<Fingerprint>,
    /// What was compared: the rows, or only the keys (`append` between deep checks).
    #[serde(default, skip_serializing_if = "FingerprintOf::is_rows")]
    pub of: FingerprintOf,
}

/// Most failed tables a [`VerificationSummary`] names.
const SUMMARY_FAILED_TABLES: usize = 10;
/// Longest error a [`VerificationSummary`] carries (cut on a character boundary).
const SUMMARY_ERROR_BYTES: usize = 1000;

/// What a verification found, in a size that does not grow with the database (the Lambda
/// result; Step Functions caps a task result at 256 KiB). The whole record is in the store
/// under `record`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerificationSummary {
    pub backup_id: String,
    pub ok: bool,
    pub verified_at: DateTime<Utc>,
    pub restore_seconds: f64,
    pub seconds: f64,
    pub bytes: u64,
    pub rows: u64,
    /// Tables compared.
    pub tables: usize,
    /// Tables that differ.
    pub tables_failed: usize,
    /// The first of them (at most ten).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed_tables: Vec<String>,
    /// Schema differences found (0 when the schema matched or was not compared).
    pub schema_differences: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Key of the whole record in the store.
    pub record: String,
}

impl Verification {
    /// The record's summary.
    pub fn summary(&self) -> VerificationSummary {
        let failed: Vec<&TableVerification> = self.tables.iter().filter(|t| !t.ok).collect();
        VerificationSummary {
            backup_id: self.backup_id.clone(),
            ok: self.ok,
            verified_at: self.verified_at,
            restore_seconds: self.restore_seconds,
            seconds: self.seconds,
            bytes: self.bytes,
            rows: self.rows,
            tables: self.tables.len(),
            tables_failed: failed.len(),
            failed_tables: failed
                .iter()
                .take(SUMMARY_FAILED_TABLES)
                .map(|t| t.name.to_string())
                .collect(),
            schema_differences: self.schema.as_ref().map_or(0, |s| s.differences.len()),
            error: self
                .error
                .clone()
                .map(|e| crate::failure::shorten(e, SUMMARY_ERROR_BYTES)),
            record: verification_key(&self.backup_id),
        }
    }
}

/// `runs/verify-{backup_id}/state.json`: the in-flight state of a sliced verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyState {
    pub version: u32,
    pub backup_id: String,
    pub scratch: String,
    /// How far the restore into the scratch database got.
    #[serde(default)]
    pub resume: ResumePoint,
    /// The restore is complete; only the comparison is left.
    #[serde(default)]
    pub restored: bool,
    pub restore_seconds: f64,
    #[serde(default)]
    pub rows: u64,
}

/// Where a time-boxed restore stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// The pre-data script is applied.
    pub schema_applied: bool,
    /// Tables completely loaded.
    pub loaded: Vec<TableName>,
}
