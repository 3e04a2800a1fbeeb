//! The local-directory store: the S3 layout as files under one directory.
//!
//! Every write goes to a temporary file under `.tidemark/tmp/` in the same file system,
//! is flushed to disk, and then appears under its key in one atomic step: `rename` for an
//! unconditional write, `link` (which fails if the key exists) for a create-if-absent.
//! Conditional replaces compare and rename while holding an exclusive `flock` on
//! `.tidemark/write.lock`, so they are safe between processes, not only between tasks.
//!
//! An object's entity tag is the SHA-256 of its content: it changes whenever the content
//! does, and it doubles as the object's checksum. `head` therefore reads the whole object;
//! listings do not.
//!
//! A backup holds a database's data: files are created 0600 and directories 0700 (the
//! owner only), whatever the umask, as restic does.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{
    sha256_hex, validate_key, validate_prefix, ETag, ListedObject, ObjectMeta, ObjectStream,
    PendingUpload, PutReceipt, ReadStore, StoreError, StoredObject, WriteCondition, WriteStore,
};

const INTERNAL_DIR: &str = ".tidemark";
const COPY_BUFFER: usize = 256 * 1024;
/// Modes of what the store creates: readable by its owner only.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

/// Creates `path` and its missing parents, each 0700.
fn create_private_dirs(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Creates a new file 0600 (the umask can only take bits away).
fn create_private_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Whether the store's directory, its top folders, or the documents in `manifests/` and
/// `state/` (few, unlike chunks) can be read or entered by others than their owner.
///
/// # Errors
/// I/O errors reading metadata.
pub fn readable_by_others(root: &Path) -> io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let mut paths = vec![root.to_path_buf()];
    for dir in ["manifests", "state", "chunks", "runs", "verifications"] {
        paths.push(root.join(dir));
    }
    for dir in ["manifests", "state"] {
        match fs::read_dir(root.join(dir)) {
            Ok(entries) => {
                for entry in entries {
                    paths.push(entry?.path());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    for path in paths {
        match fs::metadata(&path) {
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// A store in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (without creating) a directory store rooted at `root`. The directory is created
    /// on the first write.
    ///
    /// # Errors
    /// [`StoreError::NotADirectory`] when `root` exists and is not a directory.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        match fs::metadata(root) {
            Ok(meta) if !meta.is_dir() => Err(StoreError::NotADirectory {
                path: root.display().to_string(),
            }),
            _ => Ok(Self {
                root: root.to_path_buf(),
            }),
        }
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn object_path(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join(INTERNAL_DIR).join("tmp")
    }

    /// Creates the root, the temp directory and `path`'s parent.
    fn prepare_write(&self, key: &str, path: &Path) -> Result<PathBuf, StoreError> {
        if let Ok(meta) = fs::metadata(&self.root) {
            if !meta.is_dir() {
                return Err(StoreError::NotADirectory {
                    path: self.root.display().to_string(),
                });
            }
        }
        let io_err = |source| StoreError::Io {
            operation: "create directory for",
            key: key.to_owned(),
            source,
        };
        let tmp_dir = self.tmp_dir();
        create_private_dirs(&tmp_dir).map_err(io_err)?;
        if let Some(parent) = path.parent() {
            create_private_dirs(parent).map_err(io_err)?;
        }
        Ok(tmp_dir.join(format!("{}.tmp", uuid::Uuid::new_v4())))
    }

    /// Holds the store-wide write lock until dropped.
    fn lock(&self, key: &str) -> Result<File, StoreError> {
        let path = self.root.join(INTERNAL_DIR).join("write.lock");
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(FILE_MODE)
                .open(&path)
        }
        .and_then(|file| file.lock().map(|()| file))
        .map_err(|source| StoreError::Io {
            operation: "lock the store for",
            key: key.to_owned(),
            source,
        })?;
        Ok(file)
    }

    /// Moves a flushed temporary file to `path` under `condition`.
    fn commit(
        &self,
        key: &str,
        tmp: &Path,
        path: &Path,
        condition: &WriteCondition,
    ) -> Result<(), StoreError> {
        let io_err = |operation| {
            move |source| StoreError::Io {
                operation,
                key: key.to_owned(),
                source,
            }
        };
        match condition {
            WriteCondition::Always => fs::rename(tmp, path).map_err(io_err("rename into"))?,
            WriteCondition::IfAbsent => {
                let _guard = self.lock(key)?;
                match fs::hard_link(tmp, path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(StoreError::PreconditionFailed {
                            key: key.to_owned(),
                        })
                    }
                    Err(e) => return Err(io_err("link into")(e)),
                }
                let _ = fs::remove_file(tmp);
            }
            WriteCondition::IfMatch(expected) => {
                let _guard = self.lock(key)?;
                let current = match hash_file(path) {
                    Ok((_, etag)) => etag,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(StoreError::PreconditionFailed {
                            key: key.to_owned(),
                        })
                    }
                    Err(e) => return Err(io_err("read")(e)),
                };
                if &current != expected {
                    return Err(StoreError::PreconditionFailed {
                        key: key.to_owned(),
                    });
                }
                fs::rename(tmp, path).map_err(io_err("rename into"))?;
            }
        }
        if let Some(parent) = path.parent() {
            sync_dir(parent).map_err(io_err("sync directory of"))?;
        }
        Ok(())
    }

    fn put_blocking(
        &self,
        key: &str,
        body: &[u8],
        condition: &WriteCondition,
    ) -> Result<PutReceipt, StoreError> {
        let path = self.object_path(key)?;
        let tmp = self.prepare_write(key, &path)?;
        let result = (|| {
            let mut file = create_private_file(&tmp)?;
            file.write_all(body)?;
            file.sync_all()
        })()
        .map_err(|source| StoreError::Io {
            operation: "write",
            key: key.to_owned(),
            source,
        })
        .and_then(|()| self.commit(key, &tmp, &path, condition));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        let sha256 = sha256_hex(body);
        Ok(PutReceipt {
            etag: ETag(sha256.clone()),
            sha256,
            size: body.len() as u64,
        })
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<ListedObject>, StoreError> {
        validate_prefix(prefix)?;
        // Walk only the deepest directory the prefix names.
        let start_rel = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if start_rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(start_rel)
        };
        let mut out = Vec::new();
        let mut pending = vec![(start, start_rel.to_owned())];
        while let Some((dir, rel)) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => continue,
                Err(source) => {
                    return Err(StoreError::Io {
                        operation: "list",
                        key: prefix.to_owned(),
                        source,
                    })
                }
            };
            for entry in entries {
                let entry = entry.map_err(|source| StoreError::Io {
                    operation: "list",
                    key: prefix.to_owned(),
                    source,
                })?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue; // not a key this store could have written
                };
                if rel.is_empty() && name == INTERNAL_DIR {
                    continue;
                }
                let key = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let meta = entry.metadata().map_err(|source| StoreError::Io {
                    operation: "list",
                    key: key.clone(),
                    source,
                })?;
                if meta.is_dir() {
                    if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                        pending.push((entry.path(), key));
                    }
                } else if meta.is_file() && key.starts_with(prefix) {
                    out.push(ListedObject {
                        key,
                        size: meta.len(),
                        last_modified: meta.modified().ok(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// Size and SHA-256 entity tag of a file.
fn hash_file(path: &Path) -> io::Result<(u64, ETag)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, ETag(hex::encode(hasher.finalize()))))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

async fn blocking<T: Send + 'static>(
    key: &str,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io {
            operation: "run blocking I/O for",
            key: key.to_owned(),
            source: io::Error::other(e.to_string()),
        })?
}

/// The temporary files in `dir` (none if it does not exist).
fn list_temp_files(dir: &Path) -> io::Result<Vec<PendingUpload>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".tmp") {
            continue;
        }
        out.push(PendingUpload {
            key: String::new(),
            initiated: entry.metadata()?.modified().ok(),
            upload_id: name,
        });
    }
    out.sort_by(|a, b| a.upload_id.cmp(&b.upload_id));
    Ok(out)
}

#[async_trait]
impl ReadStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn get(&self, key: &str) -> Result<ObjectStream, StoreError> {
        let path = self.object_path(key)?;
        let file = tokio::fs::File::open(&path).await.map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                StoreError::NotFound {
                    key: key.to_owned(),
                }
            } else {
                StoreError::Io {
                    operation: "open",
                    key: key.to_owned(),
                    source,
                }
            }
        })?;
        let size = file
            .metadata()
            .await
            .map_err(|source| StoreError::Io {
                operation: "stat",
                key: key.to_owned(),
                source,
            })?
            .len();
        Ok(ObjectStream {
            size,
            body: Box::pin(file),
        })
    }

    async fn read(&self, key: &str) -> Result<Option<StoredObject>, StoreError> {
        let path = self.object_path(key)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(StoredObject {
                etag: ETag(sha256_hex(&bytes)),
                bytes: Bytes::from(bytes),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io {
                operation: "read",
                key: key.to_owned(),
                source,
            }),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let path = self.object_path(key)?;
        let owned_key = key.to_owned();
        blocking(key, move || match hash_file(&path) {
            Ok((size, etag)) => Ok(Some(ObjectMeta { size, etag })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io {
                operation: "read",
                key: owned_key,
                source,
            }),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ListedObject>, StoreError> {
        let store = self.clone();
        let owned = prefix.to_owned();
        blocking(prefix, move || store.list_blocking(&owned)).await
    }
}

#[async_trait]
impl WriteStore for LocalStore {
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        condition: WriteCondition,
    ) -> Result<PutReceipt, StoreError> {
        let store = self.clone();
        let owned = key.to_owned();
        blocking(key, move || store.put_blocking(&owned, &body, &condition)).await
    }

    async fn upload(
        &self,
        key: &str,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<PutReceipt, StoreError> {
        let path = self.object_path(key)?;
        let tmp = {
            let store = self.clone();
            let (key, path) = (key.to_owned(), path.clone());
            blocking(&key.clone(), move || store.prepare_write(&key, &path)).await?
        };
        let written = async {
            let mut file = tokio::fs::File::from_std(create_private_file(&tmp)?);
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; COPY_BUFFER];
            let mut size = 0u64;
            loop {
                let n = body.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).await?;
                size += n as u64;
            }
            file.sync_all().await?;
            Ok::<_, io::Error>((size, hex::encode(hasher.finalize())))
        }
        .await
        .map_err(|source| StoreError::Io {
            operation: "write",
            key: key.to_owned(),
            source,
        });
        let result = match written {
            Ok((size, sha256)) => {
                let store = self.clone();
                let (owned, tmp2) = (key.to_owned(), tmp.clone());
                blocking(key, move || {
                    store.commit(&owned, &tmp2, &path, &WriteCondition::Always)
                })
                .await
                .map(|()| PutReceipt {
                    etag: ETag(sha256.clone()),
                    sha256,
                    size,
                })
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.object_path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                operation: "delete",
                key: key.to_owned(),
                source,
            }),
        }
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        for key in keys {
            self.delete(key).await?;
        }
        Ok(())
    }

    /// A local store's unfinished writes are the temporary files a killed writer left in
    /// `.tidemark/tmp/`. The key they were for is not known, so only a listing of the
    /// whole store (an empty `prefix`) returns them.
    async fn incomplete_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        if !prefix.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self.tmp_dir();
        blocking(".tidemark/tmp", move || {
            list_temp_files(&dir).map_err(|source| StoreError::Io {
                operation: "list the temporary files of",
                key: ".tidemark/tmp".to_owned(),
                source,
            })
        })
        .await
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<(), StoreError> {
        let name = upload.upload_id.as_str();
        if name.contains('/') || !name.ends_with(".tmp") {
            return Err(StoreError::InvalidKey {
                key: name.to_owned(),
                reason: "not a temporary file of this store",
            });
        }
        match tokio::fs::remove_file(self.tmp_dir().join(name)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                operation: "remove the temporary file",
                key: name.to_owned(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_is_not_a_store() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("plain-file");
        fs::write(&file, b"x")?;
        assert!(matches!(
            LocalStore::open(&file),
            Err(StoreError::NotADirectory { .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn failed_condition_leaves_no_temp_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = LocalStore::open(dir.path())?;
        store
            .put("a", Bytes::from_static(b"1"), WriteCondition::IfAbsent)
            .await?;
        let second = store
            .put("a", Bytes::from_static(b"2"), WriteCondition::IfAbsent)
            .await;
        assert!(matches!(second, Err(StoreError::PreconditionFailed { .. })));
        assert_eq!(fs::read_dir(store.tmp_dir())?.count(), 0);
        assert_eq!(fs::read(dir.path().join("a"))?, b"1");
        Ok(())
    }
}
