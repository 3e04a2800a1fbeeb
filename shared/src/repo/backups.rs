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
