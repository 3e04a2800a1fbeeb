//! Export: one time-boxed slice of a backup run.
//!
//! The first slice takes the lease, records in one snapshot where every table stands
//! (`pg_current_snapshot()`, the high-water mark of each `append` table) and writes
//! `runs/{id}/progress.json`. Every slice then exports key ranges until the deadline
//! nears, recording each finished range in the progress document. A slice killed at any
//! point loses only what it had not recorded; the next slice redoes that under the same
//! chunk names, so nothing is lost or duplicated.
//!
//! Within one slice all workers share one exported snapshot, so a run that finishes in
//! one slice is a single point in time. A run that spans slices has read its tables in
//! several snapshots; once every range is exported, a **consistency pass** brings every
//! table to one slice's snapshot: in that one snapshot, each table exports what changed
//! since the oldest snapshot its data is of (`changes` tables: the `xmin` filter plus the
//! live key set and fingerprint of now; `append` tables: the keys past their cursor and
//! earlier gaps; keyless and `snapshot` tables: whole again), the catalog is read again
//! (tables created, changed or dropped meanwhile), and the schema and sequences are
//! taken in it. A round only counts if it finishes within one slice; an unfinished round
//! is rolled back and the next slice starts another from its own snapshot. After
//! `max_pass_rounds` the run is sealed as not one point in time, loudly. Ranges, not
//! rows, are the unit of work:
//! - tables with a primary key are cut into ranges of `rows_per_chunk` keys (bounds from
//!   an index-only scan), one chunk per range; a big table is first split into up to
//!   `workers` lanes of about equal size, which connections export at once;
//! - keyless tables are exported whole in one statement, cut into chunks as they stream,
//!   and restarted if a slice ends in the middle.
//!
//! What a range exports depends on the table's [`ExportScope`](crate::format::progress::ExportScope): every row, the rows
//! changed since the parent's snapshot (`xmin` at or after its `xmin`, which over-exports
//! a little and never misses a change; the same read also yields the live key set and
//! the fingerprint of the whole table), or the keys past an `append` cursor (and earlier
//! gaps, probed again for late commits until a TTL).
//!
//! **Fan-out** (`concurrency` above 1): a run that needs more than one slice leaves its
//! remaining ranges to workers of other invocations, which claim them as work items in
//! the store, each in a snapshot of its own (`items`, `fanned`); the slices fold finished
//! items in and run the consistency pass.
//!
//! # Layout
//! - `options`: how a slice runs and what it reports;
//! - `slice`: one slice, start to end (`export_slice`);
//! - `plan`: a new run's kind, parent, table scopes, ranges and lanes;
//! - `state`: what the slice's workers share and when the progress is written;
//! - `worker`: the connection pool and its reconnects;
//! - `range`, `keyless`, `append`: what one unit of work reads and writes;
//! - `pass`: the consistency pass; `seal`: the manifest;
//! - `sql`: SQL fragments.

mod append;
mod fanned;
mod items;
mod keyless;
mod options;
mod pass;
mod plan;
mod range;
mod seal;
mod slice;
mod sql;
mod state;
mod worker;

pub use fanned::{export_worker, WorkerReport};
pub use options::{ExportMeter, ExportOptions, ExportSettings, SliceReport};
pub(crate) use plan::table_shape;
pub use slice::export_slice;

#[cfg(test)]
mod tests;
