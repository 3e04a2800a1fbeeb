//! One conformance suite, run against every store adapter: the local directory and S3
//! (through the real S3-protocol server that scripts/test starts).

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tidemark_core::store::{
    ETag, LocalStore, S3Store, S3StoreOptions, StoreError, WriteCondition, WriteStore,
};
use tidemark_tests::{local_store, pseudo_random_bytes, s3_store};
use tokio::io::{AsyncRead, AsyncReadExt};

type Store = Arc<dyn WriteStore>;

/// Part size used by the multipart tests: S3's minimum, so a few parts stay small.
const PART: usize = 5 * 1024 * 1024;

async fn read_all(store: &Store, key: &str) -> Vec<u8> {
    let mut stream = store.get(key).await.expect("get");
    let mut out = Vec::new();
    stream.body.read_to_end(&mut out).await.expect("read body");
    assert_eq!(stream.size, out.len() as u64, "advertised size of {key}");
    out
}

async fn put_read_head_round_trip(store: Store) {
    let body = Bytes::from_static(b"{\"hello\": \"tidemark\"}\n");
    let receipt = store
        .put(
            "state/checkpoint.json",
            body.clone(),
            WriteCondition::Always,
        )
        .await
        .expect("put");
    assert_eq!(receipt.sha256, hex(&Sha256::digest(&body)));
    assert_eq!(receipt.size, body.len() as u64);

    let read = store
        .read("state/checkpoint.json")
        .await
        .expect("read")
        .expect("object exists");
    assert_eq!(read.bytes, body);
    assert_eq!(read.etag, receipt.etag);
    let head = store
        .head("state/checkpoint.json")
        .await
        .expect("head")
        .expect("object exists");
    assert_eq!((head.size, &head.etag), (body.len() as u64, &receipt.etag));
    assert_eq!(read_all(&store, "state/checkpoint.json").await, body);

    let replaced = store
        .put(
            "state/checkpoint.json",
            Bytes::from_static(b"{}"),
            WriteCondition::Always,
        )
        .await
        .expect("overwrite");
    assert_ne!(replaced.etag, receipt.etag, "etag must change with content");
}

async fn missing_objects(store: Store) {
    assert!(store.read("nothing/here").await.expect("read").is_none());
    assert!(store.head("nothing/here").await.expect("head").is_none());
    assert!(matches!(
        store.get("nothing/here").await,
        Err(StoreError::NotFound { ref key }) if key == "nothing/here"
    ));
    store
        .delete("nothing/here")
        .await
        .expect("deleting a missing object is fine");
    assert!(store.list("nothing/").await.expect("list").is_empty());
}

async fn invalid_keys_are_refused(store: Store) {
    for key in ["", "/abs", "a/../b", "a//b", ".tidemark/tmp/x"] {
        let result = store
            .put(key, Bytes::from_static(b"x"), WriteCondition::Always)
            .await;
        assert!(
            matches!(result, Err(StoreError::InvalidKey { .. })),
            "{key:?}: {result:?}"
        );
    }
}

async fn create_if_absent_race_has_one_winner(store: Store) {
    for round in 0..5 {
        let key = format!("lock-{round}");
        let writers: Vec<_> = (0..2)
            .map(|writer| {
                let store = store.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let body = Bytes::from(format!("writer {writer}"));
                    (
                        writer,
                        store.put(&key, body, WriteCondition::IfAbsent).await,
                    )
                })
            })
            .collect();
        let mut winners = Vec::new();
        for handle in writers {
            let (writer, result) = handle.await.expect("task");
            match result {
                Ok(_) => winners.push(writer),
                Err(StoreError::PreconditionFailed { key: k }) => assert_eq!(k, key),
                Err(other) => panic!("unexpected error: {other}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let stored = store.read(&key).await.expect("read").expect("exists");
        assert_eq!(stored.bytes, Bytes::from(format!("writer {}", winners[0])));
    }
}

async fn if_match_refuses_a_stale_etag(store: Store) {
    let first = store
        .put("lock", Bytes::from_static(b"v1"), WriteCondition::IfAbsent)
        .await
        .expect("create");
    let second = store
        .put(
            "lock",
            Bytes::from_static(b"v2"),
            WriteCondition::IfMatch(first.etag.clone()),
        )
        .await
        .expect("replace with the current etag");
    let stale = store
        .put(
            "lock",
            Bytes::from_static(b"v3"),
            WriteCondition::IfMatch(first.etag),
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::PreconditionFailed { .. })),
        "stale etag accepted: {stale:?}"
    );
    let missing = store
        .put(
            "no-such",
            Bytes::from_static(b"x"),
            WriteCondition::IfMatch(second.etag.clone()),
        )
        .await;
    assert!(matches!(
        missing,
        Err(StoreError::PreconditionFailed { .. })
    ));
    assert!(store.head("no-such").await.expect("head").is_none());
    let current = store.read("lock").await.expect("read").expect("exists");
    assert_eq!(
        (current.bytes.as_ref(), &current.etag),
        (&b"v2"[..], &second.etag)
    );
}

/// Read-modify-write loops from several tasks: with If-Match no increment is lost.
async fn concurrent_if_match_loses_no_update(store: Store) {
    store
        .put(
            "counter",
            Bytes::from_static(b"0"),
            WriteCondition::IfAbsent,
        )
        .await
        .expect("create");
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    loop {
                        let cur = store.read("counter").await.expect("read").expect("exists");
                        let n: u64 = std::str::from_utf8(&cur.bytes)
                            .expect("utf8")
                            .parse()
                            .expect("number");
                        let next = Bytes::from((n + 1).to_string());
                        match store
                            .put("counter", next, WriteCondition::IfMatch(cur.etag))
                            .await
                        {
                            Ok(_) => break,
                            Err(StoreError::PreconditionFailed { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let end = store.read("counter").await.expect("read").expect("exists");
    assert_eq!(end.bytes.as_ref(), b"20");
}

async fn multipart_upload_round_trips_byte_exact(store: Store) {
    let data = pseudo_random_bytes(2 * PART + PART / 2 + 123, 42);
    let mut reader: &[u8] = &data;
    let receipt = store
        .upload("chunks/r1/public.big/000001.copy.zst", &mut reader)
        .await
        .expect("upload");
    assert_eq!(receipt.size, data.len() as u64);
    assert_eq!(receipt.sha256, hex(&Sha256::digest(&data)));
    let back = read_all(&store, "chunks/r1/public.big/000001.copy.zst").await;
    assert!(back == data, "content differs after a multipart round trip");
    let head = store
        .head("chunks/r1/public.big/000001.copy.zst")
        .await
        .expect("head")
        .expect("exists");
    assert_eq!(head.size, data.len() as u64);

    // Exactly one part's worth, and an empty object, take the single-request path.
    for len in [PART, 0, 10] {
        let data = pseudo_random_bytes(len, 7);
        let mut reader: &[u8] = &data;
        let key = format!("small/{len}");
        let receipt = store.upload(&key, &mut reader).await.expect("upload");
        assert_eq!(receipt.sha256, hex(&Sha256::digest(&data)));
        assert!(read_all(&store, &key).await == data, "{len} bytes differ");
    }
}

/// A body that yields `good` bytes, then fails.
struct FailingReader {
    good: std::io::Cursor<Vec<u8>>,
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.good.position() as usize >= self.good.get_ref().len() {
            return std::task::Poll::Ready(Err(std::io::Error::other("source broke")));
        }
        std::pin::Pin::new(&mut self.good).poll_read(cx, buf)
    }
}

async fn failed_upload_leaves_nothing(store: Store) {
    for len in [100, 2 * PART + 1] {
        let mut reader = FailingReader {
            good: std::io::Cursor::new(pseudo_random_bytes(len, 3)),
        };
        let result = store.upload("chunks/broken", &mut reader).await;
        assert!(
            matches!(result, Err(StoreError::Io { .. })),
            "{len}: {result:?}"
        );
        assert!(store.head("chunks/broken").await.expect("head").is_none());
    }
    assert!(store.list("").await.expect("list").is_empty());
}

async fn listing_spans_pages_and_respects_the_prefix(store: Store) {
    let mut expected = Vec::new();
    for i in 0..25 {
        let key = format!("runs/r1/part-{i:03}");
        store
            .put(&key, Bytes::from(vec![b'x'; i]), WriteCondition::Always)
            .await
            .expect("put");
        expected.push(key);
    }
    for other in ["runs/r10/x", "runsx", "manifests/b1.json"] {
        store
            .put(other, Bytes::from_static(b"y"), WriteCondition::Always)
            .await
            .expect("put");
    }
    let listed = store.list("runs/r1/").await.expect("list");
    let keys: Vec<_> = listed.iter().map(|o| o.key.clone()).collect();
    assert_eq!(keys, expected);
    assert!(listed.iter().enumerate().all(|(i, o)| o.size == i as u64));
    assert!(listed.iter().all(|o| o.last_modified.is_some()));

    let all = store.list("").await.expect("list all");
    assert_eq!(all.len(), 28);
    let runs = store.list("runs").await.expect("list partial name");
    assert_eq!(runs.len(), 27, "'runs' matches runs/... and runsx");
}

async fn batched_delete(store: Store) {
    let keys: Vec<String> = (0..1005).map(|i| format!("chunks/old/{i:05}")).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in keys.chunks(100) {
        let store = store.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            for key in chunk {
                store
                    .put(&key, Bytes::from_static(b"z"), WriteCondition::Always)
                    .await
                    .expect("put");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task");
    }
    store
        .put(
            "chunks/keep",
            Bytes::from_static(b"k"),
            WriteCondition::Always,
        )
        .await
        .expect("put");
    assert_eq!(store.list("chunks/").await.expect("list").len(), 1006);

    let mut doomed = keys.clone();
    doomed.push("chunks/never-existed".into());
    store.delete_many(&doomed).await.expect("delete_many");
    let left: Vec<_> = store
        .list("chunks/")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(left, vec!["chunks/keep".to_owned()]);
    store.delete_many(&[]).await.expect("empty batch");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod local {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let (_dir, store) = local_store();
                    super::$name(Arc::new(store)).await;
                }
            )*
        }
        mod s3 {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let store = s3_store(S3StoreOptions {
                        part_size: PART,
                        list_page_size: 7,
                        ..S3StoreOptions::default()
                    })
                    .await;
                    super::$name(Arc::new(store)).await;
                }
            )*
        }
    };
}

conformance!(
    put_read_head_round_trip,
    missing_objects,
    invalid_keys_are_refused,
    create_if_absent_race_has_one_winner,
    if_match_refuses_a_stale_etag,
    concurrent_if_match_loses_no_update,
    multipart_upload_round_trips_byte_exact,
    failed_upload_leaves_nothing,
    listing_spans_pages_and_respects_the_prefix,
    batched_delete,
);

#[tokio::test]
async fn s3_failed_multipart_is_aborted() {
    let store = s3_store(S3StoreOptions {
        part_size: PART,
        ..S3StoreOptions::default()
    })
    .await;
    let mut reader = FailingReader {
        good: std::io::Cursor::new(pseudo_random_bytes(2 * PART + 1, 9)),
    };
    assert!(store.upload("chunks/broken", &mut reader).await.is_err());
    let (bucket, _) = bucket_and_prefix(&store);
    let uploads = store
        .client()
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .expect("list uploads");
    assert!(
        uploads.uploads().is_empty(),
        "multipart upload left behind: {:?}",
        uploads.uploads()
    );
}

#[tokio::test]
async fn s3_missing_bucket_is_named() {
    let config = tidemark_tests::aws_config().await;
    let store = S3Store::new(
        &config,
        "tidemark-no-such-bucket",
        "p",
        S3StoreOptions::default(),
    );
    let err = store
        .put("x", Bytes::from_static(b"x"), WriteCondition::Always)
        .await
        .expect_err("bucket does not exist");
    assert!(
        matches!(err, StoreError::NoSuchBucket { ref bucket } if bucket == "tidemark-no-such-bucket"),
        "{err}"
    );
    assert!(err.to_string().contains("tidemark-no-such-bucket"));
}

#[tokio::test]
async fn s3_store_keeps_to_its_prefix() {
    let store = s3_store(S3StoreOptions::default()).await;
    store
        .put("a/b", Bytes::from_static(b"x"), WriteCondition::Always)
        .await
        .expect("put");
    let (bucket, prefix) = bucket_and_prefix(&store);
    let raw = store
        .client()
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .expect("list");
    let keys: Vec<_> = raw.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, vec![format!("{prefix}/a/b")]);
}

#[test]
fn local_store_rejects_a_file_as_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let err = LocalStore::open(&file).expect_err("a file is no store");
    assert!(err.to_string().contains("is not a directory"), "{err}");
}

#[tokio::test]
async fn local_conditional_writes_hold_between_handles() {
    // Two independent handles on one directory: each opens and flocks the lock file
    // itself, and flock excludes per open file, exactly as between two processes.
    let (dir, first) = local_store();
    let second = LocalStore::open(first.root()).expect("open again");
    let a = first
        .put("lock", Bytes::from_static(b"a"), WriteCondition::IfAbsent)
        .await
        .expect("create");
    second
        .put(
            "lock",
            Bytes::from_static(b"b"),
            WriteCondition::IfMatch(a.etag.clone()),
        )
        .await
        .expect("replace through the other handle");
    let stale = first
        .put(
            "lock",
            Bytes::from_static(b"c"),
            WriteCondition::IfMatch(a.etag),
        )
        .await;
    assert!(matches!(stale, Err(StoreError::PreconditionFailed { .. })));
    let bogus = first
        .put(
            "lock",
            Bytes::from_static(b"d"),
            WriteCondition::IfMatch(ETag("nope".into())),
        )
        .await;
    assert!(matches!(bogus, Err(StoreError::PreconditionFailed { .. })));
    drop(dir);
}

fn bucket_and_prefix(store: &S3Store) -> (String, String) {
    let location = tidemark_core::store::ReadStore::location(store);
    let rest = location.trim_start_matches("s3://");
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    (bucket.to_owned(), prefix.to_owned())
}
