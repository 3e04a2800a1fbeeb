//! The repository: where every object Tidemark keeps in a store lives. Every key and prefix
//! is built and parsed here and nowhere else; [`backups`] lists the sealed backups and
//! defines the latest one.
//!
//! | key                                              | what                                  |
//! |--------------------------------------------------|---------------------------------------|
//! | `lock`                                           | the lease ([`crate::format::lease`])  |
//! | `state/checkpoint.json`                          | the head of the chain                 |
//! | `state/last-failure.json`                        | the last failed run                   |
//! | `manifests/{backup_id}.json`                     | a sealed backup                       |
//! | `verifications/{backup_id}.json`                 | its last verification                 |
//! | `runs/{run_id}/progress.json`                    | a backup run in flight                |
//! | `runs/verify-{backup_id}/state.json`             | a sliced verification in flight       |
//! | `runs/prune/journal.json`                        | a prune in flight                     |
//! | `runs/{run_id}/items/{schema.table}/{gen}.{part}.json` | a work item of a fanned-out run  |
//! | `runs/{run_id}/slices/{slice}.json`              | the snapshot a worker read in         |
//! | `chunks/{run_id}/{schema.table}/{seq}-{slice}.copy.zst` | rows (`.keys.copy.zst`: key set) |
//! | `chunks/{run_id}/schema/{token}.{part}.sql.zst`  | pg_dump's scripts of a run            |
//!
//! `runs/` holds three kinds of documents, told apart by [`Key::parse`].

pub mod backups;

use std::fmt;

use crate::format::item::ItemPart;
use crate::format::{ChunkKind, TableName};

pub const LOCK_KEY: &str = "lock";
pub const CHECKPOINT_KEY: &str = "state/checkpoint.json";
pub const LAST_FAILURE_KEY: &str = "state/last-failure.json";
pub const PRUNE_JOURNAL_KEY: &str = "runs/prune/journal.json";

/// Prefix of every sealed backup's manifest.
pub const MANIFESTS: &str = "manifests/";
/// Prefix of every verification record.
pub const VERIFICATIONS: &str = "verifications/";
/// Prefix of the documents of operations in flight.
pub const RUNS: &str = "runs/";
/// Prefix of the data and scripts of every run.
pub const CHUNKS: &str = "chunks/";

const VERIFY_RUN: &str = "verify-";
const PRUNE_RUN: &str = "prune";

pub fn manifest_key(backup_id: &str) -> String {
    Key::Manifest(backup_id.to_owned()).to_string()
}

pub fn verification_key(backup_id: &str) -> String {
    Key::Verification(backup_id.to_owned()).to_string()
}

pub fn progress_key(run_id: &str) -> String {
    Key::Progress(run_id.to_owned()).to_string()
}

/// Where a time-boxed verification keeps its place between slices.
pub fn verify_state_key(backup_id: &str) -> String {
    Key::VerifyState(backup_id.to_owned()).to_string()
}

/// Every object a run wrote (chunks and schema scripts) is under this prefix.
pub fn chunk_prefix(run_id: &str) -> String {
    format!("{CHUNKS}{run_id}/")
}

/// Object key of a chunk: `chunks/{run}/{schema.table}/{seq}-{slice}.copy.zst` (rows) or
/// `.../{seq}-{slice}.keys.copy.zst` (live key set).
///
/// The same range redone by the same slice gets the same name. The slice number is in
/// the name so that a write still in flight from a killed slice (a request S3 completes
/// after its sender died) can never replace what the next slice wrote and recorded.
pub fn chunk_key(run_id: &str, table: &TableName, seq: u32, slice: u32, kind: ChunkKind) -> String {
    let suffix = match kind {
        ChunkKind::Rows => "copy.zst",
        ChunkKind::Keys => "keys.copy.zst",
    };
    format!(
        "{}{}/{seq:06}-{slice:03}.{suffix}",
        chunk_prefix(run_id),
        table.key_segment()
    )
}

/// Where the work items of a run whose export is fanned out over workers live.
pub fn items_prefix(run_id: &str) -> String {
    format!("{RUNS}{run_id}/items/")
}

/// One work item of a fanned-out run: `runs/{run}/items/{schema.table}/{generation}.{part}.json`.
pub fn item_key(run_id: &str, table: &TableName, generation: u32, part: ItemPart) -> String {
    format!(
        "{}{}/{generation:03}.{}.json",
        items_prefix(run_id),
        table.key_segment(),
        part.segment()
    )
}

/// Where the workers of a fanned-out run record the snapshot each read in.
pub fn slices_prefix(run_id: &str) -> String {
    format!("{RUNS}{run_id}/slices/")
}

/// A worker's slice: `runs/{run}/slices/{slice}.json`, created if absent, so that each
/// worker's slice number (in its chunk names) is its own.
pub fn slice_key(run_id: &str, slice: u32) -> String {
    format!("{}{slice:06}.json", slices_prefix(run_id))
}

/// The slice number of a key [`slice_key`] made.
pub fn slice_of_key(run_id: &str, key: &str) -> Option<u32> {
    key.strip_prefix(&slices_prefix(run_id))?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// Object key of one of pg_dump's scripts of a run (`part`: `pre-data`, `post-data`,
/// `globals`, `large-objects`); `token` tells apart the captures of slices that died.
pub fn schema_key(run_id: &str, token: &str, part: &str) -> String {
    format!("{}schema/{token}.{part}.sql.zst", chunk_prefix(run_id))
}

/// What a key in the store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Lock,
    Checkpoint,
    LastFailure,
    Manifest(String),
    Verification(String),
    /// The progress document of a backup run.
    Progress(String),
    /// The state of a sliced verification of a backup.
    VerifyState(String),
    PruneJournal,
    /// Any other document under `runs/{run}/` (of an export run, a verification or a
    /// prune, as [`RunOf`] tells).
    RunDocument {
        run: RunOf,
        path: String,
    },
    /// A chunk or schema script of a run: `path` is what follows `chunks/{run_id}/`.
    Chunk {
        run_id: String,
        path: String,
    },
    /// Not a key Tidemark writes.
    Other(String),
}

/// Whose document a key under `runs/` is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RunOf {
    /// A backup run.
    Backup(String),
    /// The verification of this backup.
    Verify(String),
    Prune,
}

impl RunOf {
    fn parse(segment: &str) -> RunOf {
        if segment == PRUNE_RUN {
            RunOf::Prune
        } else if let Some(id) = segment.strip_prefix(VERIFY_RUN) {
            RunOf::Verify(id.to_owned())
        } else {
            RunOf::Backup(segment.to_owned())
        }
    }
}

impl fmt::Display for RunOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunOf::Backup(id) => f.write_str(id),
            RunOf::Verify(id) => write!(f, "{VERIFY_RUN}{id}"),
            RunOf::Prune => f.write_str(PRUNE_RUN),
        }
    }
}

impl Key {
    /// What `key` is.
    pub fn parse(key: &str) -> Key {
        let json_doc = |prefix: &str| {
            key.strip_prefix(prefix)
                .and_then(|k| k.strip_suffix(".json"))
                .filter(|id| !id.is_empty() && !id.contains('/'))
                .map(str::to_owned)
        };
        match key {
            LOCK_KEY => return Key::Lock,
            CHECKPOINT_KEY => return Key::Checkpoint,
            LAST_FAILURE_KEY => return Key::LastFailure,
            PRUNE_JOURNAL_KEY => return Key::PruneJournal,
            _ => {}
        }
        if let Some(id) = json_doc(MANIFESTS) {
            return Key::Manifest(id);
        }
        if let Some(id) = json_doc(VERIFICATIONS) {
            return Key::Verification(id);
        }
        if let Some((run, path)) = key.strip_prefix(RUNS).and_then(|k| k.split_once('/')) {
            if run.is_empty() {
                return Key::Other(key.to_owned());
            }
            return match (RunOf::parse(run), path) {
                (RunOf::Backup(id), "progress.json") => Key::Progress(id),
                (RunOf::Verify(id), "state.json") if !id.is_empty() => Key::VerifyState(id),
                (run, path) => Key::RunDocument {
                    run,
                    path: path.to_owned(),
                },
            };
        }
        if let Some((run_id, path)) = key.strip_prefix(CHUNKS).and_then(|k| k.split_once('/')) {
            if !run_id.is_empty() {
                return Key::Chunk {
                    run_id: run_id.to_owned(),
                    path: path.to_owned(),
                };
            }
        }
        Key::Other(key.to_owned())
    }

    /// The run under `runs/` a document belongs to.
    pub fn run(&self) -> Option<RunOf> {
        match self {
            Key::Progress(id) => Some(RunOf::Backup(id.clone())),
            Key::VerifyState(id) => Some(RunOf::Verify(id.clone())),
            Key::PruneJournal => Some(RunOf::Prune),
            Key::RunDocument { run, .. } => Some(run.clone()),
            _ => None,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Lock => f.write_str(LOCK_KEY),
            Key::Checkpoint => f.write_str(CHECKPOINT_KEY),
            Key::LastFailure => f.write_str(LAST_FAILURE_KEY),
            Key::PruneJournal => f.write_str(PRUNE_JOURNAL_KEY),
            Key::Manifest(id) => write!(f, "{MANIFESTS}{id}.json"),
            Key::Verification(id) => write!(f, "{VERIFICATIONS}{id}.json"),
            Key::Progress(id) => write!(f, "{RUNS}{id}/progress.json"),
            Key::VerifyState(id) => write!(f, "{RUNS}{VERIFY_RUN}{id}/state.json"),
            Key::RunDocument { run, path } => write!(f, "{RUNS}{run}/{path}"),
            Key::Chunk { run_id, path } => write!(f, "{}{path}", chunk_prefix(run_id)),
            Key::Other(key) => f.write_str(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "20261122T120000Z-0a1b2c";

    #[test]
    fn every_key_parses_back_to_what_built_it() {
        let table = TableName::new("public", "Order Lines");
        let keys = [
            Key::Lock,
            Key::Checkpoint,
            Key::LastFailure,
            Key::PruneJournal,
            Key::Manifest(ID.into()),
            Key::Verification(ID.into()),
            Key::Progress(ID.into()),
            Key::VerifyState(ID.into()),
            Key::RunDocument {
                run: RunOf::Backup(ID.into()),
                path: "other.json".into(),
            },
            Key::Chunk {
                run_id: ID.into(),
                path: "public.t/000001-001.copy.zst".into(),
            },
            Key::Other("notes/readme.txt".into()),
        ];
        for key in keys {
            assert_eq!(Key::parse(&key.to_string()), key, "{key}");
        }
        let chunk = chunk_key(ID, &table, 7, 2, ChunkKind::Keys);
        assert_eq!(
            chunk,
            format!("chunks/{ID}/public.Order%20Lines/000007-002.keys.copy.zst")
        );
        assert_eq!(
            Key::parse(&chunk),
            Key::Chunk {
                run_id: ID.into(),
                path: "public.Order%20Lines/000007-002.keys.copy.zst".into()
            }
        );
        let script = schema_key(ID, "abcd1234", "pre-data");
        assert_eq!(
            script,
            format!("chunks/{ID}/schema/abcd1234.pre-data.sql.zst")
        );
        assert!(matches!(Key::parse(&script), Key::Chunk { run_id, .. } if run_id == ID));
    }

    #[test]
    fn the_stored_layout_is_what_older_buckets_hold() {
        assert_eq!(manifest_key(ID), format!("manifests/{ID}.json"));
        assert_eq!(verification_key(ID), format!("verifications/{ID}.json"));
        assert_eq!(progress_key(ID), format!("runs/{ID}/progress.json"));
        assert_eq!(verify_state_key(ID), format!("runs/verify-{ID}/state.json"));
        assert_eq!(chunk_prefix(ID), format!("chunks/{ID}/"));
    }

    #[test]
    fn runs_tells_backup_runs_verifications_and_prunes_apart() {
        assert_eq!(
            Key::parse(&format!("runs/verify-{ID}/state.json")).run(),
            Some(RunOf::Verify(ID.into()))
        );
        assert_eq!(
            Key::parse(&format!("runs/{ID}/progress.json")).run(),
            Some(RunOf::Backup(ID.into()))
        );
        assert_eq!(
            Key::parse("runs/prune/journal.json").run(),
            Some(RunOf::Prune)
        );
        assert_eq!(
            Key::parse("runs/prune/other.json").run(),
            Some(RunOf::Prune)
        );
        assert_eq!(Key::parse(&format!("manifests/{ID}.json")).run(), None);
    }

    #[test]
    fn keys_tidemark_does_not_write_are_other() {
        for key in [
            "manifests/",
            "manifests/x.json.bak",
            "manifests/a/b.json",
            "runs/",
            "runs//x",
            "chunks/",
            "chunks//x",
            "state/other.json",
        ] {
            assert_eq!(Key::parse(key), Key::Other(key.into()), "{key}");
        }
    }
}
