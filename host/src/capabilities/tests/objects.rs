//! `host:capabilities/objects` as a guest calls it, on the local store (the default).

use super::{Fixture, app, apps, data_dir, pattern};
use crate::capabilities::host::capabilities::objects::{Host, ObjectError, ObjectInfo, PartInfo};

type Answer<T> = Result<T, ObjectError>;

async fn put(fixture: &mut Fixture, key: &str, data: &[u8]) -> Answer<ObjectInfo> {
    fixture
        .view()
        .put(key.to_owned(), data.to_vec())
        .await
        .expect("put does not trap")
}

async fn head(fixture: &mut Fixture, key: &str) -> Answer<Option<ObjectInfo>> {
    fixture
        .view()
        .head(key.to_owned())
        .await
        .expect("head does not trap")
}

/// The object's description and bytes from `start`, as a guest reads them.
async fn get(
    fixture: &mut Fixture,
    key: &str,
    start: u64,
    length: Option<u64>,
) -> Answer<(ObjectInfo, Vec<u8>)> {
    let (info, stream) = fixture
        .view()
        .get(key.to_owned(), start, length)
        .await
        .expect("get does not trap")?;
    let bytes = fixture
        .read_stream(stream)
        .await
        .expect("the object's stream reads");
    Ok((info, bytes))
}

async fn delete(fixture: &mut Fixture, key: &str) -> Answer<()> {
    fixture
        .view()
        .delete(key.to_owned())
        .await
        .expect("delete does not trap")
}

async fn list(fixture: &mut Fixture, prefix: &str) -> Answer<Vec<String>> {
    Ok(fixture
        .view()
        .list_objects(prefix.to_owned())
        .await
        .expect("list-objects does not trap")?
        .into_iter()
        .map(|info| info.key)
        .collect())
}

async fn upload_bytes(
    fixture: &mut Fixture,
    key: &str,
    upload_id: &str,
    number: u32,
    data: &[u8],
) -> Answer<PartInfo> {
    fixture
        .view()
        .upload_part_bytes(key.to_owned(), upload_id.to_owned(), number, data.to_vec())
        .await
        .expect("upload-part-bytes does not trap")
}

async fn list_parts(fixture: &mut Fixture, key: &str, upload_id: &str) -> Answer<Vec<PartInfo>> {
    fixture
        .view()
        .list_parts(key.to_owned(), upload_id.to_owned())
        .await
        .expect("list-parts does not trap")
}

async fn create_multipart(fixture: &mut Fixture, key: &str) -> Answer<String> {
    fixture
        .view()
        .create_multipart(key.to_owned())
        .await
        .expect("create-multipart does not trap")
}

#[tokio::test]
async fn objects_are_put_read_described_and_deleted() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "files").await;
    let data = pattern(300_000);
    let info = put(&mut fixture, "reports/2024/q1.pdf", &data)
        .await
        .expect("stored");
    assert_eq!(info.key, "reports/2024/q1.pdf");
    assert_eq!(info.size, data.len() as u64);
    assert!(!info.etag.is_empty());
    let described = head(&mut fixture, "reports/2024/q1.pdf")
        .await
        .expect("head")
        .expect("the object exists");
    assert_eq!(
        (described.size, &described.etag, described.modified),
        (info.size, &info.etag, info.modified)
    );
    let (got_info, bytes) = get(&mut fixture, "reports/2024/q1.pdf", 0, None)
        .await
        .expect("read");
    assert_eq!(got_info.etag, info.etag);
    assert_eq!(bytes, data);

    // A put replaces the object, and its etag changes.
    let replaced = put(&mut fixture, "reports/2024/q1.pdf", b"short")
        .await
        .expect("replaced");
    assert_eq!(replaced.size, 5);
    assert_ne!(replaced.etag, info.etag);
    let (_, bytes) = get(&mut fixture, "reports/2024/q1.pdf", 0, None)
        .await
        .expect("read");
    assert_eq!(bytes, b"short");

    delete(&mut fixture, "reports/2024/q1.pdf")
        .await
        .expect("deleted");
    assert!(
        head(&mut fixture, "reports/2024/q1.pdf")
            .await
            .expect("head")
            .is_none()
    );
    let missing = get(&mut fixture, "reports/2024/q1.pdf", 0, None).await;
    assert!(matches!(missing, Err(ObjectError::NotFound)), "{missing:?}");
    // Removing a missing object is not an error.
    delete(&mut fixture, "reports/2024/q1.pdf")
        .await
        .expect("deleting again");
    delete(&mut fixture, "never/stored")
        .await
        .expect("deleting what never was");
}

#[tokio::test]
async fn ranges_read_from_start_for_length_or_to_the_end() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "files").await;
    // More than one chunk of the object's stream.
    let data = pattern(600_000);
    put(&mut fixture, "video", &data).await.expect("stored");
    let size = data.len() as u64;
    for (start, length, expected) in [
        (0, Some(10), &data[..10]),
        (3, Some(4), &data[3..7]),
        (262_140, Some(300_000), &data[262_140..562_140]),
        (599_990, None, &data[599_990..]),
        // A length past the end reads to the end; a start at the end reads nothing.
        (599_000, Some(5_000), &data[599_000..]),
        (size, None, &[][..]),
        (7, Some(0), &[][..]),
    ] {
        let (info, bytes) = get(&mut fixture, "video", start, length)
            .await
            .expect("a range inside the object");
        // The description is the whole object's.
        assert_eq!(info.size, size);
        assert_eq!(bytes, expected, "{start} for {length:?}");
    }
    for start in [size + 1, u64::MAX] {
        let refused = get(&mut fixture, "video", start, Some(1)).await;
        assert!(
            matches!(refused, Err(ObjectError::InvalidRange)),
            "{start}: {refused:?}"
        );
    }
}

#[tokio::test]
async fn listings_are_by_prefix_and_sorted_by_key() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "files").await;
    for key in ["b/c", "a", "ab", "a/b", "a/b/c", "with space.txt", "a.b"] {
        put(&mut fixture, key, key.as_bytes())
            .await
            .expect("stored");
    }
    assert_eq!(
        list(&mut fixture, "").await.expect("listed"),
        ["a", "a.b", "a/b", "a/b/c", "ab", "b/c", "with space.txt"]
    );
    assert_eq!(
        list(&mut fixture, "a").await.expect("listed"),
        ["a", "a.b", "a/b", "a/b/c", "ab"]
    );
    assert_eq!(
        list(&mut fixture, "a/").await.expect("listed"),
        ["a/b", "a/b/c"]
    );
    assert_eq!(list(&mut fixture, "a/b/").await.expect("listed"), ["a/b/c"]);
    assert_eq!(
        list(&mut fixture, "with").await.expect("listed"),
        ["with space.txt"]
    );
    assert!(list(&mut fixture, "zzz").await.expect("listed").is_empty());
    let listed = fixture
        .view()
        .list_objects("a/b".to_owned())
        .await
        .expect("list-objects does not trap")
        .expect("listed");
    assert_eq!(
        listed
            .iter()
            .map(|info| (info.key.as_str(), info.size))
            .collect::<Vec<_>>(),
        [("a/b", 3), ("a/b/c", 5)]
    );
}

#[tokio::test]
async fn keys_outside_the_rules_are_refused() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "files").await;
    let long = "k".repeat(1025);
    for key in [
        "",
        "/absolute",
        "a//b",
        "trailing/",
        "../escape",
        "a/./b",
        "a/../b",
        "tab\there",
        long.as_str(),
    ] {
        let refused = put(&mut fixture, key, b"x").await;
        assert!(
            matches!(refused, Err(ObjectError::InvalidKey(_))),
            "{key:?}: {refused:?}"
        );
        let refused = fixture
            .view()
            .get(key.to_owned(), 0, None)
            .await
            .expect("get does not trap");
        assert!(
            matches!(refused, Err(ObjectError::InvalidKey(_))),
            "{key:?}"
        );
    }
    let refused = list(&mut fixture, &long).await;
    assert!(
        matches!(refused, Err(ObjectError::InvalidKey(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn multipart_uploads_follow_s3_rules() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "files").await;
    let first = pattern(5 << 20);
    let last = b"the end".to_vec();
    let upload = create_multipart(&mut fixture, "big.bin")
        .await
        .expect("an upload");
    // Parts arrive in any order; a repeat replaces the earlier part.
    upload_bytes(&mut fixture, "big.bin", &upload, 2, b"draft")
        .await
        .expect("stored");
    let second = upload_bytes(&mut fixture, "big.bin", &upload, 2, &last)
        .await
        .expect("stored");
    let source = fixture.stream_of(&first);
    let one = fixture
        .view()
        .upload_part(
            "big.bin".to_owned(),
            upload.clone(),
            1,
            source,
            first.len() as u64,
        )
        .await
        .expect("upload-part does not trap")
        .expect("stored");
    let listed = list_parts(&mut fixture, "big.bin", &upload)
        .await
        .expect("listed");
    assert_eq!(
        listed
            .iter()
            .map(|part| (part.number, part.size, part.etag.clone()))
            .collect::<Vec<_>>(),
        [
            (1, first.len() as u64, one.etag.clone()),
            (2, last.len() as u64, second.etag.clone())
        ]
    );
    // Nothing is visible before the upload completes.
    assert!(head(&mut fixture, "big.bin").await.expect("head").is_none());
    // A small part that is not the last, and a part that was never stored, are refused.
    let small = create_multipart(&mut fixture, "small.bin")
        .await
        .expect("an upload");
    let a = upload_bytes(&mut fixture, "small.bin", &small, 1, b"tiny")
        .await
        .expect("stored");
    let b = upload_bytes(&mut fixture, "small.bin", &small, 2, b"tiny")
        .await
        .expect("stored");
    let refused = fixture
        .view()
        .complete_multipart("small.bin".to_owned(), small.clone(), vec![a, b])
        .await
        .expect("complete-multipart does not trap");
    assert!(
        matches!(refused, Err(ObjectError::InvalidPart(_))),
        "{refused:?}"
    );
    let mut never = second.clone();
    never.number = 3;
    let refused = fixture
        .view()
        .complete_multipart(
            "big.bin".to_owned(),
            upload.clone(),
            vec![one.clone(), never],
        )
        .await
        .expect("complete-multipart does not trap");
    assert!(
        matches!(refused, Err(ObjectError::InvalidPart(_))),
        "{refused:?}"
    );

    let info = fixture
        .view()
        .complete_multipart("big.bin".to_owned(), upload.clone(), listed)
        .await
        .expect("complete-multipart does not trap")
        .expect("completed");
    assert_eq!(info.size, (first.len() + last.len()) as u64);
    // Read across the boundary of the parts.
    let (_, bytes) = get(&mut fixture, "big.bin", (5 << 20) - 3, None)
        .await
        .expect("read");
    assert_eq!(bytes, [&first[first.len() - 3..], &last[..]].concat());
    // The upload is over.
    let over = list_parts(&mut fixture, "big.bin", &upload).await;
    assert!(matches!(over, Err(ObjectError::NoSuchUpload)), "{over:?}");

    // An aborted upload is gone, and a part number outside 1..=10000 is refused.
    for number in [0, 10_001] {
        let refused = upload_bytes(&mut fixture, "small.bin", &small, number, b"x").await;
        assert!(
            matches!(refused, Err(ObjectError::InvalidPart(_))),
            "{refused:?}"
        );
    }
    fixture
        .view()
        .abort_multipart("small.bin".to_owned(), small.clone())
        .await
        .expect("abort-multipart does not trap")
        .expect("aborted");
    let gone = list_parts(&mut fixture, "small.bin", &small).await;
    assert!(matches!(gone, Err(ObjectError::NoSuchUpload)), "{gone:?}");
    let refused = upload_bytes(&mut fixture, "small.bin", "not-an-upload-id", 1, b"x").await;
    assert!(
        matches!(refused, Err(ObjectError::NoSuchUpload)),
        "{refused:?}"
    );
    // An upload belongs to its key.
    let other = create_multipart(&mut fixture, "one-key")
        .await
        .expect("an upload");
    let refused = upload_bytes(&mut fixture, "another-key", &other, 1, b"x").await;
    assert!(
        matches!(refused, Err(ObjectError::NoSuchUpload)),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_part_stream_of_the_wrong_length_stores_nothing() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "files").await;
    let upload = create_multipart(&mut fixture, "part.bin")
        .await
        .expect("an upload");
    for (held, declared) in [(10, 11), (10, 9), (0, 1)] {
        let source = fixture.stream_of(&pattern(held));
        let refused = fixture
            .view()
            .upload_part("part.bin".to_owned(), upload.clone(), 1, source, declared)
            .await
            .expect("upload-part does not trap");
        assert!(
            matches!(refused, Err(ObjectError::LengthMismatch(_))),
            "{held} bytes declared as {declared}: {refused:?}"
        );
    }
    assert!(
        list_parts(&mut fixture, "part.bin", &upload)
            .await
            .expect("listed")
            .is_empty()
    );
}

#[tokio::test]
async fn apps_cannot_reach_each_others_objects() {
    let dir = data_dir();
    let [mut first, mut second] = apps(dir.path(), ["first", "second"]).await;
    put(&mut first, "secret.txt", b"first's")
        .await
        .expect("stored");
    let upload = create_multipart(&mut first, "upload.bin")
        .await
        .expect("an upload");

    assert!(
        head(&mut second, "secret.txt")
            .await
            .expect("head")
            .is_none()
    );
    let missing = get(&mut second, "secret.txt", 0, None).await;
    assert!(matches!(missing, Err(ObjectError::NotFound)), "{missing:?}");
    assert!(list(&mut second, "").await.expect("listed").is_empty());
    // Its own object of the same key is another object.
    put(&mut second, "secret.txt", b"second's")
        .await
        .expect("stored");
    delete(&mut second, "secret.txt").await.expect("deleted");
    let (_, bytes) = get(&mut first, "secret.txt", 0, None)
        .await
        .expect("still there");
    assert_eq!(bytes, b"first's");
    // Another app's upload id is no upload of this app.
    let refused = list_parts(&mut second, "upload.bin", &upload).await;
    assert!(
        matches!(refused, Err(ObjectError::NoSuchUpload)),
        "{refused:?}"
    );
    let refused = upload_bytes(&mut second, "upload.bin", &upload, 1, b"x").await;
    assert!(
        matches!(refused, Err(ObjectError::NoSuchUpload)),
        "{refused:?}"
    );
    // No key climbs out of the app's directory.
    for key in [
        "../first/objects/secret.txt.o",
        "../first/objects/secret%2Etxt.o",
    ] {
        let refused = get(&mut second, key, 0, None).await;
        assert!(
            matches!(refused, Err(ObjectError::InvalidKey(_))),
            "{refused:?}"
        );
    }
    assert_eq!(list(&mut first, "").await.expect("listed"), ["secret.txt"]);
}
