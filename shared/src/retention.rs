//! Retention: which backups a policy keeps — a pure function of the backups, the policy
//! and `now`, so every rule is testable without a store or a clock.
//!
//! Rules, any of which keeps a backup: the last N; the newest backup of each of the last
//! N hours / days / ISO weeks / months / years that have one (calendar buckets in the
//! policy's time zone); every backup younger than a duration. The newest backup and the
//! newest verified backup are always kept. A total-size cap then drops the oldest kept
//! backups beyond it, never those two. Chains need no rule here: manifests are
//! self-contained, so what a kept incremental needs of its full survives by reference.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;
use serde::Serialize;

/// How many backups to keep, by which rules.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionPolicy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub keep_within: Option<Duration>,
    /// Stored bytes the kept backups may add up to.
    pub max_total_size: Option<u64>,
    /// Time zone of the calendar buckets.
    pub timezone: Tz,
}

impl Default for RetentionPolicy {
    /// The documented default: daily 7, weekly 4, monthly 12, in UTC.
    fn default() -> Self {
        Self {
            keep_daily: Some(7),
            keep_weekly: Some(4),
            keep_monthly: Some(12),
            ..Self::empty()
        }
    }
}

impl RetentionPolicy {
    /// No rule at all (refused by [`plan`]).
    pub fn empty() -> Self {
        Self {
            keep_last: None,
            keep_hourly: None,
            keep_daily: None,
            keep_weekly: None,
            keep_monthly: None,
            keep_yearly: None,
            keep_within: None,
            max_total_size: None,
            timezone: Tz::UTC,
        }
    }

    /// The count rules: last, hourly, daily, weekly, monthly, yearly.
    fn counts(&self) -> [Option<u32>; 6] {
        [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ]
    }

    /// These rules, or — when none of them keeps anything by count or age — the default
    /// policy's, with this size cap and time zone: what a user who sets only
    /// `--max-total-size` or `--timezone` gets.
    pub fn or_default_rules(self) -> Self {
        let any_rule = self.counts().iter().any(Option::is_some) || self.keep_within.is_some();
        if any_rule {
            return self;
        }
        Self {
            max_total_size: self.max_total_size,
            timezone: self.timezone,
            ..Self::default()
        }
    }

    /// Whether no rule keeps anything (a size cap alone keeps nothing either).
    pub fn is_empty(&self) -> bool {
        self.counts().iter().all(|n| n.is_none_or(|n| n == 0)) && self.keep_within.is_none()
    }
}

/// What retention needs to know of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFacts {
    pub id: String,
    pub created_at: DateTime<Utc>,
    /// Stored bytes this backup added (its own run's chunks).
    pub bytes: u64,
    pub verified: bool,
}

/// Why a backup is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeepReason {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
    Within,
    Newest,
    NewestVerified,
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeepReason::Last => "last",
            KeepReason::Hourly => "hourly",
            KeepReason::Daily => "daily",
            KeepReason::Weekly => "weekly",
            KeepReason::Monthly => "monthly",
            KeepReason::Yearly => "yearly",
            KeepReason::Within => "within",
            KeepReason::Newest => "newest",
            KeepReason::NewestVerified => "newest-verified",
        })
    }
}

/// The decision for one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub created_at: DateTime<Utc>,
    pub keep: bool,
    /// Empty for a removed backup.
    pub reasons: Vec<KeepReason>,
    /// Removed by the size cap although a rule kept it.
    pub over_size_cap: bool,
}

/// A policy that keeps nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("empty retention policy: give at least one --keep-* rule (the default is --keep-daily 7 --keep-weekly 4 --keep-monthly 12)")]
pub struct EmptyPolicy;

type Bucket = fn(&DateTime<Tz>) -> (i32, u32, u32, u32);

fn hour_bucket(t: &DateTime<Tz>) -> (i32, u32, u32, u32) {
    (t.year(), t.month(), t.day(), t.hour())
}
fn day_bucket(t: &DateTime<Tz>) -> (i32, u32, u32, u32) {
    (t.year(), t.month(), t.day(), 0)
}
fn week_bucket(t: &DateTime<Tz>) -> (i32, u32, u32, u32) {
    let w = t.iso_week();
    (w.year(), w.week(), 0, 0)
}
fn month_bucket(t: &DateTime<Tz>) -> (i32, u32, u32, u32) {
    (t.year(), t.month(), 0, 0)
}
fn year_bucket(t: &DateTime<Tz>) -> (i32, u32, u32, u32) {
    (t.year(), 0, 0, 0)
}

/// Decides, for every backup, whether `policy` keeps it at `now`. Decisions come newest
/// first.
///
/// # Errors
/// [`EmptyPolicy`] when no rule would keep anything.
pub fn plan(
    backups: &[BackupFacts],
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
) -> Result<Vec<Decision>, EmptyPolicy> {
    if policy.is_empty() {
        return Err(EmptyPolicy);
    }
    let mut sorted: Vec<&BackupFacts> = backups.iter().collect();
    sorted.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    let mut reasons: Vec<Vec<KeepReason>> = vec![Vec::new(); sorted.len()];

    if let Some(n) = policy.keep_last {
        for r in reasons.iter_mut().take(n as usize) {
            r.push(KeepReason::Last);
        }
    }
    let rules: [(Option<u32>, Bucket, KeepReason); 5] = [
        (policy.keep_hourly, hour_bucket, KeepReason::Hourly),
        (policy.keep_daily, day_bucket, KeepReason::Daily),
        (policy.keep_weekly, week_bucket, KeepReason::Weekly),
        (policy.keep_monthly, month_bucket, KeepReason::Monthly),
        (policy.keep_yearly, year_bucket, KeepReason::Yearly),
    ];
    for (count, bucket, reason) in rules {
        let Some(count) = count else { continue };
        let mut seen = HashSet::new();
        for (i, b) in sorted.iter().enumerate() {
            if seen.len() >= count as usize {
                break;
            }
            // Newest first: the first backup met in a bucket is that bucket's newest.
            if seen.insert(bucket(&b.created_at.with_timezone(&policy.timezone))) {
                reasons[i].push(reason);
            }
        }
    }
    if let Some(within) = policy.keep_within {
        let cutoff = now - chrono::TimeDelta::from_std(within).unwrap_or(chrono::TimeDelta::MAX);
        for (i, b) in sorted.iter().enumerate() {
            if b.created_at >= cutoff {
                reasons[i].push(KeepReason::Within);
            }
        }
    }
    if let Some(r) = reasons.first_mut() {
        r.push(KeepReason::Newest);
    }
    if let Some(i) = sorted.iter().position(|b| b.verified) {
        reasons[i].push(KeepReason::NewestVerified);
    }

    let mut decisions: Vec<Decision> = sorted
        .iter()
        .zip(reasons)
        .map(|(b, reasons)| Decision {
            id: b.id.clone(),
            created_at: b.created_at,
            keep: !reasons.is_empty(),
            reasons,
            over_size_cap: false,
        })
        .collect();
    if let Some(cap) = policy.max_total_size {
        apply_size_cap(&mut decisions, &sorted, cap);
    }
    Ok(decisions)
}

/// From the newest on, drops each kept backup that would bring the kept total over
/// `cap` — never the newest or the newest verified. `decisions` and `sorted` are in the
/// same order, newest first.
fn apply_size_cap(decisions: &mut [Decision], sorted: &[&BackupFacts], cap: u64) {
    let mut total = 0u64;
    for (d, b) in decisions.iter_mut().zip(sorted) {
        if !d.keep {
            continue;
        }
        total = total.saturating_add(b.bytes);
        let protected = d.reasons.contains(&KeepReason::Newest)
            || d.reasons.contains(&KeepReason::NewestVerified);
        if total > cap && !protected {
            d.keep = false;
            d.over_size_cap = true;
            total -= b.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_keep_rule_means_the_default_rules_with_the_cap_and_zone_given() {
        let mut given = RetentionPolicy::empty();
        given.max_total_size = Some(1 << 30);
        given.timezone = Tz::Europe__Paris;
        let policy = given.or_default_rules();
        assert_eq!(
            (policy.keep_daily, policy.keep_weekly, policy.keep_monthly),
            (Some(7), Some(4), Some(12))
        );
        assert_eq!(policy.max_total_size, Some(1 << 30));
        assert_eq!(policy.timezone, Tz::Europe__Paris);

        let mut last = RetentionPolicy::empty();
        last.keep_last = Some(0);
        assert_eq!(
            last.clone().or_default_rules(),
            last,
            "a rule given, even 0, stays"
        );
    }
    use proptest::prelude::*;
    use rstest::rstest;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    fn backups(times: &[&str]) -> Vec<BackupFacts> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| BackupFacts {
                id: format!("b{i}"),
                created_at: at(t),
                bytes: 100,
                verified: false,
            })
            .collect()
    }

    fn kept(decisions: &[Decision]) -> Vec<String> {
        let mut ids: Vec<String> = decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.clone())
            .collect();
        ids.sort();
        ids
    }

    fn policy(f: impl FnOnce(&mut RetentionPolicy)) -> RetentionPolicy {
        let mut p = RetentionPolicy::empty();
        f(&mut p);
        p
    }

    const NOW: &str = "2026-11-22T12:00:00Z";

    #[rstest]
    // Two backups on one day: daily keeps the later one of that day.
    #[case::daily_keeps_the_newest_of_a_day(
        &["2026-11-20T01:00:00Z", "2026-11-20T23:00:00Z", "2026-11-21T05:00:00Z"],
        policy(|p| p.keep_daily = Some(2)), &["b1", "b2"])]
    // Fewer backups than slots: all kept.
    #[case::fewer_backups_than_slots(
        &["2026-11-20T01:00:00Z", "2026-11-21T01:00:00Z"], policy(|p| p.keep_daily = Some(30)), &["b0", "b1"])]
    // ISO weeks: Sunday 2026-11-15 and Monday 2026-11-16 are different weeks.
    #[case::week_boundary_is_monday(
        &["2026-11-14T10:00:00Z", "2026-11-15T10:00:00Z", "2026-11-16T10:00:00Z"],
        policy(|p| p.keep_weekly = Some(2)), &["b1", "b2"])]
    // Year boundary for ISO weeks: 2026-12-31 (Thu) and 2027-01-01 (Fri) share ISO week 53 of 2026.
    #[case::iso_week_spans_new_year(
        &["2026-12-31T10:00:00Z", "2027-01-01T10:00:00Z", "2027-01-04T10:00:00Z"],
        policy(|p| p.keep_weekly = Some(2)), &["b1", "b2"])]
    #[case::month_boundary(
        &["2026-09-30T23:59:59Z", "2026-10-01T00:00:00Z", "2026-10-31T00:00:00Z"],
        policy(|p| p.keep_monthly = Some(2)), &["b0", "b2"])]
    #[case::year_boundary(
        &["2025-12-31T23:00:00Z", "2026-01-01T01:00:00Z", "2026-06-01T00:00:00Z"],
        policy(|p| p.keep_yearly = Some(5)), &["b0", "b2"])]
    // Ties: two backups at the same instant in one bucket keep exactly one.
    #[case::ties_keep_one(
        &["2026-11-21T10:00:00Z", "2026-11-21T10:00:00Z"], policy(|p| p.keep_daily = Some(1)), &["b1"])]
    #[case::keep_last(
        &["2026-11-18T00:00:00Z", "2026-11-19T00:00:00Z", "2026-11-20T00:00:00Z", "2026-11-21T00:00:00Z"],
        policy(|p| p.keep_last = Some(2)), &["b2", "b3"])]
    #[case::keep_within(
        &["2026-11-20T11:00:00Z", "2026-11-20T13:00:00Z", "2026-11-21T00:00:00Z"],
        policy(|p| p.keep_within = Some(Duration::from_secs(2 * 86400))), &["b1", "b2"])]
    // The size cap drops the oldest kept beyond it, never the newest.
    #[case::size_cap_drops_the_oldest(
        &["2026-11-19T00:00:00Z", "2026-11-20T00:00:00Z", "2026-11-21T00:00:00Z"],
        policy(|p| { p.keep_last = Some(3); p.max_total_size = Some(200); }), &["b1", "b2"])]
    #[case::size_cap_never_drops_the_newest(
        &["2026-11-20T00:00:00Z", "2026-11-21T00:00:00Z"],
        policy(|p| { p.keep_last = Some(2); p.max_total_size = Some(10); }), &["b1"])]
    fn policies_in_utc(
        #[case] times: &[&str],
        #[case] policy: RetentionPolicy,
        #[case] expected: &[&str],
    ) {
        let decisions = plan(&backups(times), &policy, at(NOW)).expect("valid policy");
        assert_eq!(kept(&decisions), expected);
    }

    #[rstest]
    // 2026-03-08 02:00 local does not exist in New York (DST starts): 06:30Z and 07:30Z
    // are 01:30 EST and 03:30 EDT, the same local day; 04:30Z is the evening before.
    #[case::dst_spring_forward(
        &["2026-03-08T04:30:00Z", "2026-03-08T06:30:00Z", "2026-03-08T07:30:00Z"], &["b0", "b2"])]
    // 2026-11-01 01:00-02:00 happens twice (DST ends): 05:30Z and 06:30Z are both 01:30
    // on 1 November locally; 2 November 04:30Z is still 1 November (23:30 EST), 05:30Z
    // is 2 November.
    #[case::dst_fall_back(
        &["2026-11-01T05:30:00Z", "2026-11-01T06:30:00Z", "2026-11-02T04:30:00Z", "2026-11-02T05:30:00Z"],
        &["b2", "b3"])]
    fn daily_buckets_follow_the_time_zone(#[case] times: &[&str], #[case] expected: &[&str]) {
        let policy = policy(|p| {
            p.keep_daily = Some(10);
            p.timezone = chrono_tz::America::New_York;
        });
        let decisions = plan(&backups(times), &policy, at(NOW)).expect("valid policy");
        assert_eq!(kept(&decisions), expected);
    }

    #[test]
    fn the_newest_verified_is_always_kept() {
        let mut history = backups(&[
            "2026-11-01T00:00:00Z",
            "2026-11-10T00:00:00Z",
            "2026-11-20T00:00:00Z",
        ]);
        history[0].verified = true;
        let decisions = plan(&history, &policy(|p| p.keep_last = Some(1)), at(NOW)).expect("valid");
        assert_eq!(kept(&decisions), ["b0", "b2"]);
        let b0 = decisions.iter().find(|d| d.id == "b0").expect("b0");
        assert_eq!(b0.reasons, [KeepReason::NewestVerified]);
    }

    #[test]
    fn an_empty_policy_is_refused() {
        assert_eq!(
            plan(&backups(&[NOW]), &RetentionPolicy::empty(), at(NOW)),
            Err(EmptyPolicy)
        );
        let zero = policy(|p| {
            p.keep_daily = Some(0);
            p.max_total_size = Some(1);
        });
        assert_eq!(plan(&backups(&[NOW]), &zero, at(NOW)), Err(EmptyPolicy));
        assert!(!RetentionPolicy::default().is_empty());
    }

    proptest! {
        /// Whatever the history and policy: the newest backup is kept, every decision is
        /// explained, and no backup disappears from the plan.
        #[test]
        fn newest_is_always_kept(
            offsets in proptest::collection::vec(0i64..(400 * 86400), 1..40),
            last in proptest::option::of(0u32..5),
            daily in proptest::option::of(0u32..10),
            weekly in proptest::option::of(0u32..6),
            cap in proptest::option::of(0u64..2000),
        ) {
            let now = at(NOW);
            let history: Vec<BackupFacts> = offsets.iter().enumerate().map(|(i, o)| BackupFacts {
                id: format!("b{i:03}"),
                created_at: now - chrono::TimeDelta::seconds(*o),
                bytes: 100,
                verified: i % 7 == 3,
            }).collect();
            let policy = policy(|p| { p.keep_last = last; p.keep_daily = daily; p.keep_weekly = weekly; p.keep_monthly = Some(1); p.max_total_size = cap; });
            let decisions = plan(&history, &policy, now).expect("keep_monthly makes it valid");
            prop_assert_eq!(decisions.len(), history.len());
            prop_assert!(decisions[0].keep);
            for d in &decisions {
                prop_assert_eq!(d.keep, !d.reasons.is_empty() && !d.over_size_cap);
            }
            if let Some(newest_verified) = decisions.iter().find(|d| history.iter().any(|h| h.id == d.id && h.verified)) {
                prop_assert!(newest_verified.keep);
            }
        }
    }
}
