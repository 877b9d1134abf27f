//! `host:capabilities/hmac-registry` as a guest calls it, on the host's SQLite tables.

use aws_lc_rs::hmac;
use wasmtime::component::Resource;

use super::{Fixture, app, apps, data_dir};
use crate::capabilities::hmac_registry::PartMac;
use crate::capabilities::host::capabilities::crypto::Host as _;
use crate::capabilities::host::capabilities::hmac_registry::{
    Host, HostPartMac, Part, RegistryError,
};

type Answer<T> = Result<T, RegistryError>;

async fn new_key(fixture: &mut Fixture) -> String {
    fixture
        .view()
        .generate_key()
        .await
        .expect("generate-key does not trap")
}

async fn begin(fixture: &mut Fixture, name: &str, key_id: &str) -> Answer<()> {
    fixture
        .view()
        .begin(name.to_owned(), key_id.to_owned())
        .await
        .expect("begin does not trap")
}

async fn add_bytes(fixture: &mut Fixture, name: &str, number: u32, data: &[u8]) -> Answer<Part> {
    fixture
        .view()
        .add_part_bytes(name.to_owned(), number, data.to_vec(), etag(number))
        .await
        .expect("add-part-bytes does not trap")
}

async fn parts(fixture: &mut Fixture, name: &str) -> Answer<Vec<Part>> {
    fixture
        .view()
        .parts(name.to_owned())
        .await
        .expect("parts does not trap")
}

async fn finish(fixture: &mut Fixture, name: &str, stored: &[Part]) -> Answer<String> {
    fixture
        .view()
        .finish(name.to_owned(), stored.to_vec())
        .await
        .expect("finish does not trap")
}

async fn tag(fixture: &mut Fixture, name: &str) -> Answer<String> {
    fixture
        .view()
        .tag(name.to_owned())
        .await
        .expect("tag does not trap")
}

/// What the object store would call part `number`.
fn etag(number: u32) -> String {
    format!("etag-{number}")
}

fn part(number: u32, size: u64) -> Part {
    Part {
        number,
        size,
        etag: etag(number),
    }
}

fn numbers(parts: &[Part]) -> Vec<(u32, u64, String)> {
    parts
        .iter()
        .map(|part| (part.number, part.size, part.etag.clone()))
        .collect()
}

/// The tag of `parts` (numbered from 1) by the construction the WIT documents, for the data
/// key behind `key_id`.
fn documented_tag(fixture: &Fixture, key_id: &str, parts: &[&[u8]]) -> String {
    let data_key = fixture
        .capabilities
        .crypto
        .unwrap_key(key_id)
        .expect("the app's own key id");
    let key = hmac::Key::new(hmac::HMAC_SHA256, &data_key);
    let mut message = b"host-hmac-v1".to_vec();
    message.extend((parts.len() as u32).to_be_bytes());
    for (index, bytes) in parts.iter().enumerate() {
        let number = index as u32 + 1;
        let part_mac = hmac::sign(&key, &[&number.to_be_bytes()[..], bytes].concat());
        message.extend((bytes.len() as u64).to_be_bytes());
        message.extend(part_mac.as_ref());
    }
    hex::encode(hmac::sign(&key, &message))
}

#[tokio::test]
async fn parts_in_any_order_finish_with_the_documented_tag() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "uploads").await;
    let key = new_key(&mut fixture).await;
    begin(&mut fixture, "report.pdf", &key)
        .await
        .expect("begun");
    // A retry of begin with the same key is safe; another key is refused.
    begin(&mut fixture, "report.pdf", &key)
        .await
        .expect("begun again");
    let other_key = new_key(&mut fixture).await;
    let refused = begin(&mut fixture, "report.pdf", &other_key).await;
    assert!(
        matches!(refused, Err(RegistryError::EntryExists)),
        "{refused:?}"
    );
    assert!(matches!(
        tag(&mut fixture, "report.pdf").await,
        Err(RegistryError::Unfinished)
    ));

    let recorded = add_bytes(&mut fixture, "report.pdf", 2, b"second part")
        .await
        .expect("recorded");
    assert_eq!(numbers(&[recorded]), [(2, 11, etag(2))]);
    add_bytes(&mut fixture, "report.pdf", 1, b"a first try")
        .await
        .expect("recorded");
    // Sent again, the part replaces the earlier one.
    add_bytes(&mut fixture, "report.pdf", 1, b"first")
        .await
        .expect("recorded");
    let listed = parts(&mut fixture, "report.pdf").await.expect("listed");
    assert_eq!(numbers(&listed), [(1, 5, etag(1)), (2, 11, etag(2))]);

    let finished = finish(&mut fixture, "report.pdf", &listed)
        .await
        .expect("finished");
    assert_eq!(finished.len(), 64);
    assert_eq!(
        finished,
        documented_tag(&fixture, &key, &[b"first", b"second part"])
    );
    assert_eq!(
        tag(&mut fixture, "report.pdf").await.expect("a tag"),
        finished
    );
    // Finishing again gives the same tag, whatever is listed; no part is taken any more.
    assert_eq!(
        finish(&mut fixture, "report.pdf", &[])
            .await
            .expect("a tag"),
        finished
    );
    let refused = add_bytes(&mut fixture, "report.pdf", 3, b"late").await;
    assert!(
        matches!(refused, Err(RegistryError::Finished)),
        "{refused:?}"
    );

    fixture
        .view()
        .discard("report.pdf".to_owned())
        .await
        .expect("discard does not trap")
        .expect("discarded");
    let gone = parts(&mut fixture, "report.pdf").await;
    assert!(matches!(gone, Err(RegistryError::UnknownEntry)), "{gone:?}");
}

#[tokio::test]
async fn a_tapped_part_is_recorded_once_its_stream_has_ended() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "uploads").await;
    let key = new_key(&mut fixture).await;
    begin(&mut fixture, "movie", &key).await.expect("begun");
    let bytes = super::pattern(600_000);

    let source = fixture.stream_of(&bytes);
    let (stream, mac) = fixture
        .view()
        .tap("movie".to_owned(), 1, source)
        .await
        .expect("tap does not trap")
        .expect("tapped");
    let borrowed = Resource::<PartMac>::new_borrow(mac.rep());
    assert_eq!(fixture.view().number(borrowed).await.expect("a number"), 1);
    // The stream passes the bytes on unchanged.
    let passed = fixture.read_stream(stream).await.expect("the stream reads");
    assert_eq!(passed, bytes);
    let borrowed = Resource::<PartMac>::new_borrow(mac.rep());
    let size = fixture.view().size(borrowed).await.expect("a size");
    assert_eq!(size, bytes.len() as u64);
    let recorded = fixture
        .view()
        .add_part("movie".to_owned(), mac, etag(1))
        .await
        .expect("add-part does not trap")
        .expect("recorded");
    assert_eq!(numbers(&[recorded]), [(1, bytes.len() as u64, etag(1))]);

    // A part whose stream was not read to its end is not recorded.
    let source = fixture.stream_of(b"the rest");
    let (_unread, mac) = fixture
        .view()
        .tap("movie".to_owned(), 2, source)
        .await
        .expect("tap does not trap")
        .expect("tapped");
    let refused = fixture
        .view()
        .add_part("movie".to_owned(), mac, etag(2))
        .await
        .expect("add-part does not trap");
    assert!(
        matches!(refused, Err(RegistryError::IncompletePart)),
        "{refused:?}"
    );

    let listed = parts(&mut fixture, "movie").await.expect("listed");
    let finished = finish(&mut fixture, "movie", &listed)
        .await
        .expect("finished");
    assert_eq!(finished, documented_tag(&fixture, &key, &[&bytes]));
    let source = fixture.stream_of(b"more");
    let refused = fixture
        .view()
        .tap("movie".to_owned(), 2, source)
        .await
        .expect("tap does not trap");
    assert!(matches!(refused, Err(RegistryError::Finished)));
}

#[tokio::test]
async fn names_are_1_to_1024_bytes() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "uploads").await;
    let key = new_key(&mut fixture).await;
    let longest = "n".repeat(1024);
    begin(&mut fixture, &longest, &key)
        .await
        .expect("1024 bytes is a name");
    // Bytes are counted, not characters: 513 two-byte characters are too many.
    let (long, wide) = ("n".repeat(1025), "é".repeat(513));
    for name in ["", long.as_str(), wide.as_str()] {
        let refused = begin(&mut fixture, name, &key).await;
        assert!(
            matches!(refused, Err(RegistryError::InvalidName)),
            "{} bytes: {refused:?}",
            name.len()
        );
        let refused = parts(&mut fixture, name).await;
        assert!(
            matches!(refused, Err(RegistryError::InvalidName)),
            "{refused:?}"
        );
        let refused = finish(&mut fixture, name, &[part(1, 1)]).await;
        assert!(
            matches!(refused, Err(RegistryError::InvalidName)),
            "{refused:?}"
        );
    }
}

#[tokio::test]
async fn unknown_entries_and_foreign_keys_are_refused() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "uploads").await;
    let refused = parts(&mut fixture, "never-begun").await;
    assert!(
        matches!(refused, Err(RegistryError::UnknownEntry)),
        "{refused:?}"
    );
    let refused = tag(&mut fixture, "never-begun").await;
    assert!(
        matches!(refused, Err(RegistryError::UnknownEntry)),
        "{refused:?}"
    );
    let refused = add_bytes(&mut fixture, "never-begun", 1, b"x").await;
    assert!(
        matches!(refused, Err(RegistryError::UnknownEntry)),
        "{refused:?}"
    );
    let refused = finish(&mut fixture, "never-begun", &[part(1, 1)]).await;
    assert!(
        matches!(refused, Err(RegistryError::UnknownEntry)),
        "{refused:?}"
    );
    let source = fixture.stream_of(b"x");
    let refused = fixture
        .view()
        .tap("never-begun".to_owned(), 1, source)
        .await
        .expect("tap does not trap");
    assert!(matches!(refused, Err(RegistryError::UnknownEntry)));
    let refused = begin(&mut fixture, "entry", "not a key id").await;
    assert!(
        matches!(refused, Err(RegistryError::InvalidKey)),
        "{refused:?}"
    );
}

#[tokio::test]
async fn part_numbers_are_1_to_10000_each_once() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "uploads").await;
    let key = new_key(&mut fixture).await;
    begin(&mut fixture, "entry", &key).await.expect("begun");
    for number in [0, 10_001, u32::MAX] {
        let refused = add_bytes(&mut fixture, "entry", number, b"x").await;
        assert!(
            matches!(refused, Err(RegistryError::InvalidPartNumber)),
            "{number}: {refused:?}"
        );
    }
    for number in 1..=3 {
        add_bytes(&mut fixture, "entry", number, b"xyz")
            .await
            .expect("recorded");
    }
    for stored in [
        vec![part(0, 3), part(1, 3)],
        vec![part(1, 3), part(10_001, 3)],
        vec![part(1, 3), part(2, 3), part(2, 3), part(3, 3)],
    ] {
        let refused = finish(&mut fixture, "entry", &stored).await;
        assert!(
            matches!(refused, Err(RegistryError::InvalidPartNumber)),
            "{:?}: {refused:?}",
            numbers(&stored)
        );
    }
    let refused = finish(&mut fixture, "entry", &[part(1, 3), part(3, 3)]).await;
    assert!(
        matches!(&refused, Err(RegistryError::MissingParts(missing)) if missing == &[2]),
        "{refused:?}"
    );
    let refused = finish(&mut fixture, "entry", &[]).await;
    assert!(
        matches!(&refused, Err(RegistryError::MissingParts(missing)) if missing == &[1]),
        "{refused:?}"
    );
    let mut other_etag = part(2, 3);
    other_etag.etag = "stored-again".to_owned();
    let refused = finish(&mut fixture, "entry", &[part(1, 3), other_etag, part(3, 4)]).await;
    assert!(
        matches!(&refused, Err(RegistryError::MismatchedParts(parts)) if parts == &[2, 3]),
        "{refused:?}"
    );
    // A recorded part the store does not hold is a mismatch too.
    let refused = finish(&mut fixture, "entry", &[part(1, 3), part(2, 3)]).await;
    assert!(
        matches!(&refused, Err(RegistryError::MismatchedParts(parts)) if parts == &[3]),
        "{refused:?}"
    );
    let stored = [part(1, 3), part(2, 3), part(3, 3)];
    let finished = finish(&mut fixture, "entry", &stored)
        .await
        .expect("finished");
    // A finished entry still checks the numbers it is given.
    let refused = finish(&mut fixture, "entry", &[part(0, 3)]).await;
    assert!(
        matches!(refused, Err(RegistryError::InvalidPartNumber)),
        "{refused:?}"
    );
    let refused = finish(&mut fixture, "entry", &[part(1, 3), part(1, 3)]).await;
    assert!(
        matches!(refused, Err(RegistryError::InvalidPartNumber)),
        "{refused:?}"
    );
    assert_eq!(
        finish(&mut fixture, "entry", &[part(7, 1)])
            .await
            .expect("the tag"),
        finished
    );
}

#[tokio::test]
async fn verified_reads_pass_the_recorded_bytes_and_refuse_changed_ones() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "uploads").await;
    let key = new_key(&mut fixture).await;
    begin(&mut fixture, "doc", &key).await.expect("begun");
    let source = fixture.stream_of(b"");
    let refused = fixture
        .view()
        .verify_stream("doc".to_owned(), 1, source, 0, 1)
        .await
        .expect("verify-stream does not trap");
    assert!(matches!(refused, Err(RegistryError::Unfinished)));
    add_bytes(&mut fixture, "doc", 1, b"hello ")
        .await
        .expect("recorded");
    add_bytes(&mut fixture, "doc", 2, b"world")
        .await
        .expect("recorded");
    finish(&mut fixture, "doc", &[part(1, 6), part(2, 5)])
        .await
        .expect("finished");

    for (first, stored, skip, take, expected) in [
        (1, &b"hello world"[..], 0, u64::MAX, &b"hello world"[..]),
        (1, &b"hello world"[..], 3, 5, &b"lo wo"[..]),
        (2, &b"world"[..], 1, 100, &b"orld"[..]),
    ] {
        let source = fixture.stream_of(stored);
        let stream = fixture
            .view()
            .verify_stream("doc".to_owned(), first, source, skip, take)
            .await
            .expect("verify-stream does not trap")
            .expect("verified");
        let read = fixture.read_stream(stream).await.expect("the stream reads");
        assert_eq!(read, expected, "from part {first}, {skip}+{take}");
    }
    // A changed first part is an answer; a changed later part fails the stream.
    let source = fixture.stream_of(b"jello world");
    let refused = fixture
        .view()
        .verify_stream("doc".to_owned(), 1, source, 0, u64::MAX)
        .await
        .expect("verify-stream does not trap");
    assert!(matches!(refused, Err(RegistryError::Tampered(1))));
    let source = fixture.stream_of(b"hello World");
    let stream = fixture
        .view()
        .verify_stream("doc".to_owned(), 1, source, 0, u64::MAX)
        .await
        .expect("verify-stream does not trap")
        .expect("the first part is good");
    let read = fixture.read_stream(stream).await;
    assert!(read.is_err(), "{read:?}");
    let source = fixture.stream_of(b"world");
    let refused = fixture
        .view()
        .verify_stream("doc".to_owned(), 3, source, 0, u64::MAX)
        .await
        .expect("verify-stream does not trap");
    assert!(matches!(refused, Err(RegistryError::InvalidPartNumber)));
}

#[tokio::test]
async fn apps_see_only_their_own_entries() {
    let dir = data_dir();
    let [mut first, mut second] = apps(dir.path(), ["first", "second"]).await;
    let first_key = new_key(&mut first).await;
    begin(&mut first, "shared-name", &first_key)
        .await
        .expect("begun");
    add_bytes(&mut first, "shared-name", 1, b"first's bytes")
        .await
        .expect("recorded");
    let first_tag = finish(&mut first, "shared-name", &[part(1, 13)])
        .await
        .expect("finished");

    let unseen = parts(&mut second, "shared-name").await;
    assert!(
        matches!(unseen, Err(RegistryError::UnknownEntry)),
        "{unseen:?}"
    );
    let unseen = tag(&mut second, "shared-name").await;
    assert!(
        matches!(unseen, Err(RegistryError::UnknownEntry)),
        "{unseen:?}"
    );
    let refused = begin(&mut second, "shared-name", &first_key).await;
    assert!(
        matches!(refused, Err(RegistryError::InvalidKey)),
        "{refused:?}"
    );
    // The same name is the second app's own.
    let second_key = new_key(&mut second).await;
    begin(&mut second, "shared-name", &second_key)
        .await
        .expect("begun");
    assert!(
        parts(&mut second, "shared-name")
            .await
            .expect("listed")
            .is_empty()
    );
    second
        .view()
        .discard("shared-name".to_owned())
        .await
        .expect("discard does not trap")
        .expect("discarded");
    assert_eq!(
        tag(&mut first, "shared-name").await.expect("still there"),
        first_tag
    );
    assert_eq!(
        numbers(&parts(&mut first, "shared-name").await.expect("listed")),
        [(1, 13, etag(1))]
    );
}
