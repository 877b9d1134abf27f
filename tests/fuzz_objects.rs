//! The fuzz target of the argument checks the objects capability makes on what a guest passes,
//! through the probe guest on a real host, on the local store and on a real S3 API server:
//! hostile keys (empty, `.`/`..` segments, control characters, long segments, anything
//! Unicode), part numbers and declared lengths across the whole `u32`/`u64` range, and read
//! offsets and lengths past the object. Every answer is the typed refusal the README states or
//! exactly S3's result, never a trap: a stored key lists back as itself, a read returns exactly
//! the bytes asked for, a refused part stores nothing.
//!
//! `FUZZ_SECONDS=600 cargo test --release -p blackbox --test fuzz_objects -- local` runs the
//! local store long (`tests/fuzz objects`).

use blackbox::{AppHost, Backends, Services, fuzzing, query_encode};
use proptest::prelude::*;
use serde_json::Value;

const MAX_KEY: usize = 1024;
const MAX_PART_NUMBER: u32 = 10_000;
const MAX_PART_SIZE: u64 = 5 << 30;
/// The longest file name of the local store (a segment percent-encoded, `.o` after the last).
const MAX_FILE_NAME: usize = 255;

#[derive(Debug, Clone)]
struct Case {
    key: String,
    content: Vec<u8>,
    start: u64,
    length: Option<u64>,
    part: u32,
    declared: u64,
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-zA-Z0-9._~-]{1,12}",
        2 => prop::sample::select(vec!["", ".", "..", "...", "%2e", "a b", "a\u{0}b", "\t", "é", "日本", "+", "%", "\u{7f}", "\u{85}"])
            .prop_map(str::to_owned),
        1 => any::<String>(),
        1 => (1usize..300).prop_map(|n| "x".repeat(n)),
        1 => (1usize..100).prop_map(|n| "é".repeat(n)),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::collection::vec(segment(), 1..4).prop_map(|segments| segments.join("/")),
        1 => (1000usize..1030).prop_map(|n| "k/".repeat(n / 2 + 1)[..n].to_owned()),
        1 => (1020usize..1030).prop_map(|n| "k".repeat(n)),
    ]
}

fn position() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..70, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
}

fn case() -> impl Strategy<Value = Case> {
    (
        key(),
        prop::collection::vec(any::<u8>(), 0..64),
        position(),
        prop::option::weighted(0.7, position()),
        prop_oneof![0u32..3, 9_999u32..10_002, Just(u32::MAX), any::<u32>()],
        prop_oneof![
            Just(None),
            Just(Some(MAX_PART_SIZE + 1)),
            Just(Some(u64::MAX)),
            (0u64..70).prop_map(Some)
        ],
    )
        .prop_map(|(key, content, start, length, part, declared)| Case {
            declared: declared.unwrap_or(content.len() as u64),
            key,
            content,
            start,
            length,
            part,
        })
}

/// The README's key rules, and on the local store the file-name length of a segment.
fn key_is_valid(key: &str, backends: Backends) -> bool {
    let segments: Vec<&str> = key.split('/').collect();
    let file_names_fit = segments.iter().enumerate().all(|(index, segment)| {
        let encoded: usize = segment
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_~".contains(&b) {
                    1
                } else {
                    3
                }
            })
            .sum();
        let suffix = if index + 1 == segments.len() { 2 } else { 0 };
        encoded + suffix <= MAX_FILE_NAME
    });
    !key.is_empty()
        && key.len() <= MAX_KEY
        && segments
            .iter()
            .all(|segment| !["", ".", ".."].contains(segment))
        && !key.chars().any(char::is_control)
        && (backends == Backends::PostgresS3 || file_names_fit)
}

fn error_of(answer: &Value) -> String {
    answer["error"].as_str().unwrap_or_default().to_owned()
}

async fn check(probe: &AppHost, backends: Backends, case: Case) -> Result<(), TestCaseError> {
    let key = query_encode(&case.key);
    let size = case.content.len() as u64;
    let (status, answer) = probe
        .call(
            "PUT",
            &format!("/objects/put?key={key}"),
            case.content.clone(),
        )
        .await;
    if !key_is_valid(&case.key, backends) {
        prop_assert_eq!(status, 400, "{:?} stored: {}", case.key, answer);
        prop_assert!(error_of(&answer).contains("InvalidKey"), "{}", answer);
        return Ok(());
    }
    prop_assert_eq!(status, 200, "{:?} refused: {}", case.key, answer);
    prop_assert_eq!(answer["key"].as_str(), Some(case.key.as_str()));
    prop_assert_eq!(answer["size"].as_u64(), Some(size));

    // Listed back as itself, whatever a file system or S3 made of it.
    let (status, listed) = probe
        .call("GET", &format!("/objects/list?prefix={key}"), "")
        .await;
    prop_assert_eq!(status, 200, "{}", listed);
    let keys: Vec<&str> = listed
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item["key"].as_str())
                .collect()
        })
        .unwrap_or_default();
    prop_assert!(
        keys.contains(&case.key.as_str()),
        "{:?} lists as {:?}",
        case.key,
        keys
    );

    // A read returns exactly the bytes asked for, and past the end is a range error.
    let length = case
        .length
        .map(|l| format!("&length={l}"))
        .unwrap_or_default();
    let (status, bytes) = probe
        .bytes(
            "GET",
            &format!("/objects/get?key={key}&start={}{length}", case.start),
            "",
        )
        .await;
    if case.start > size {
        prop_assert_eq!(status, 416, "{}", String::from_utf8_lossy(&bytes));
    } else {
        prop_assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        let end = case
            .length
            .map_or(size, |length| size.min(case.start.saturating_add(length)));
        prop_assert_eq!(&bytes[..], &case.content[case.start as usize..end as usize]);
    }

    // A part: out-of-range numbers and sizes refused before anything is read or stored.
    let (status, created) = probe
        .call("POST", &format!("/objects/multipart?key={key}"), "")
        .await;
    prop_assert_eq!(status, 200, "{}", created);
    let upload = created["upload_id"].as_str().unwrap_or_default().to_owned();
    let (status, stored) = probe
        .call(
            "PUT",
            &format!(
                "/objects/part?key={key}&upload_id={upload}&part={}&length={}",
                case.part, case.declared
            ),
            case.content.clone(),
        )
        .await;
    let part_valid = (1..=MAX_PART_NUMBER).contains(&case.part);
    if !part_valid || case.declared > MAX_PART_SIZE {
        prop_assert_eq!(
            status,
            400,
            "part {} of {} bytes stored: {}",
            case.part,
            case.declared,
            stored
        );
        prop_assert!(error_of(&stored).contains("InvalidPart"), "{}", stored);
    } else if case.declared != size {
        prop_assert!(
            (400..500).contains(&status),
            "a part of the wrong length got {}: {}",
            status,
            stored
        );
    } else {
        prop_assert_eq!(status, 200, "{}", stored);
        prop_assert_eq!(stored["number"].as_u64(), Some(u64::from(case.part)));
    }
    let (status, parts) = probe
        .call(
            "GET",
            &format!("/objects/parts?key={key}&upload_id={upload}"),
            "",
        )
        .await;
    prop_assert_eq!(status, 200, "{}", parts);
    let expected = usize::from(part_valid && case.declared == size);
    prop_assert_eq!(parts.as_array().map_or(0, Vec::len), expected, "{}", parts);
    let (status, aborted) = probe
        .call(
            "POST",
            &format!("/objects/abort?key={key}&upload_id={upload}"),
            "",
        )
        .await;
    prop_assert_eq!(status, 200, "{}", aborted);
    let (status, deleted) = probe
        .call("DELETE", &format!("/objects/delete?key={key}"), "")
        .await;
    prop_assert_eq!(status, 200, "{}", deleted);
    Ok(())
}

fn run(backends: Backends, name: &str, cases: u32) {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut services = Services::start(backends);
    let probe = AppHost::start(&mut services, "probe", "fuzz", &[]);
    fuzzing::run(name, cases, case(), |case| {
        runtime.block_on(check(&probe, backends, case))
    });
}

#[test]
fn object_arguments_on_the_local_store() {
    run(Backends::SqliteLocal, "object_arguments_local", 150);
}

#[test]
fn object_arguments_on_s3() {
    run(Backends::PostgresS3, "object_arguments_s3", 30);
}
