//! The sealed backups: one listing, and one definition of the latest.

use crate::format::manifest::Manifest;
use crate::format::{read_doc, FormatError};
use crate::repo::{Key, MANIFESTS};
use crate::store::ReadStore;

/// Every sealed backup's manifest, oldest first: by the time it was sealed
/// (`created_at`), then by id. Never by object times, which a copied bucket
/// (`aws s3 sync`) does not keep.
///
/// # Errors
/// Store errors and manifests that do not parse (naming them).
pub async fn manifests(store: &dyn ReadStore) -> Result<Vec<Manifest>, FormatError> {
    let mut out = Vec::new();
    for object in store.list(MANIFESTS).await? {
        if !matches!(Key::parse(&object.key), Key::Manifest(_)) {
            continue;
        }
        if let Some((manifest, _)) = read_doc::<Manifest>(store, &object.key).await? {
            out.push(manifest);
        }
    }
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// The id of the latest sealed backup: the last of [`manifests`].
///
/// # Errors
/// As [`manifests`].
pub async fn latest_id(store: &dyn ReadStore) -> Result<Option<String>, FormatError> {
    Ok(manifests(store).await?.pop().map(|m| m.id))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::format::write_doc;
    use crate::repo::manifest_key;
    use crate::store::{LocalStore, WriteCondition};

    const FIXTURE: &str = include_str!("../format/fixtures/manifest-v2.json");

    fn manifest(id: &str, created_at: &str) -> Manifest {
        let mut value: serde_json::Value = serde_json::from_str(FIXTURE).expect("the fixture");
        value["id"] = id.into();
        value["created_at"] = created_at.into();
        serde_json::from_value(value).expect("a manifest")
    }

    /// A bucket copied with `aws s3 sync` gives every object the time of the copy, in
    /// whatever order it copied them: the latest backup is still the newest manifest.
    #[tokio::test]
    async fn the_latest_backup_is_the_newest_manifest_whatever_the_object_times() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path()).expect("store");
        let older = manifest("20261130T120000Z-aaaaaa", "2026-11-30T12:00:05Z");
        let newer = manifest("20261201T120000Z-bbbbbb", "2026-12-01T12:00:05Z");
        let copied_at = SystemTime::now();
        for (m, copied) in [
            (&newer, copied_at),
            (&older, copied_at + Duration::from_secs(60)),
        ] {
            let key = manifest_key(&m.id);
            write_doc(&store, &key, m, WriteCondition::Always)
                .await
                .expect("written");
            let file = std::fs::File::options()
                .write(true)
                .open(dir.path().join(&key))
                .expect("the object's file");
            file.set_modified(copied).expect("set the object time");
        }
        // Not a manifest: never listed.
        std::fs::write(dir.path().join("manifests/notes.txt"), "x").expect("written");
        let listed: Vec<String> = manifests(&store)
            .await
            .expect("listed")
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(listed, vec![older.id.clone(), newer.id.clone()]);
        assert_eq!(latest_id(&store).await.expect("latest"), Some(newer.id));
    }
}
