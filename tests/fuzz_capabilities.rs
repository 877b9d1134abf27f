//! The fuzz targets of the argument checks the crypto and HMAC registry capabilities make on
//! what a guest passes, through the probe guest on a real host (SQLite, the embedded default):
//! - crypto: key ids valid, altered or foreign, IVs of any length, offsets across the whole
//!   `u64` range. A valid call is AES-CTR at that offset whatever the split (a part encrypted in
//!   two pieces is the part encrypted at once, a stream agrees with a call, decryption inverts
//!   encryption); anything else is the typed refusal the WIT names, never a trap.
//! - registry: random sequences of begin, add-part-bytes, parts, finish (with any claimed parts
//!   list), tag and discard on a few names, checked against a model of the WIT's rules.
//!
//! `tests/fuzz crypto_arguments` and `tests/fuzz registry_sequences` run them long.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use blackbox::{AppHost, Backends, Services, fuzzing, query_encode};
use proptest::prelude::*;
use serde_json::{Value, json};

const MAX_PART_NUMBER: u32 = 10_000;

/// The variant of a typed refusal (`RegistryError::MissingParts([3])` → `MissingParts`).
fn error_of(answer: &Value) -> String {
    let error = answer["error"].as_str().unwrap_or_default();
    let variant = error.split('(').next().unwrap_or_default();
    variant.rsplit("::").next().unwrap_or_default().to_owned()
}

/// A fresh key id of the probe app.
async fn new_key(probe: &AppHost) -> String {
    let (status, answer) = probe.call("GET", "/crypto/key", "").await;
    assert_eq!(status, 200, "{answer}");
    answer["key_id"].as_str().expect("a key id").to_owned()
}

// ---- crypto ---------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum KeyChoice {
    Valid,
    /// The valid id with one character changed.
    Altered(usize),
    Other(String),
}

#[derive(Debug, Clone)]
struct CryptoCase {
    key: KeyChoice,
    iv: Vec<u8>,
    offset: u64,
    data: Vec<u8>,
    split: usize,
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..100_000,
        2 => (0u64..300).prop_map(|back| u64::MAX - back),
        1 => any::<u64>(),
    ]
}

fn crypto_case() -> impl Strategy<Value = CryptoCase> {
    (
        prop_oneof![
            6 => Just(KeyChoice::Valid),
            1 => any::<usize>().prop_map(KeyChoice::Altered),
            1 => prop::sample::select(vec!["", "bogus", "AAAA", "host:crypto:v1:other"])
                .prop_map(|id| KeyChoice::Other(id.to_owned())),
        ],
        prop_oneof![
            6 => prop::collection::vec(any::<u8>(), 16),
            1 => prop::collection::vec(any::<u8>(), 0..40),
        ],
        offset(),
        prop::collection::vec(any::<u8>(), 0..200),
        any::<usize>(),
    )
        .prop_map(|(key, iv, offset, data, split)| CryptoCase {
            key,
            iv,
            offset,
            data,
            split,
        })
}

/// `mode` (encrypt, decrypt, stream) of `data`: the bytes, or the refusal.
async fn apply(
    probe: &AppHost,
    key: &str,
    iv: &[u8],
    offset: u64,
    mode: &str,
    data: &[u8],
) -> Result<Result<Vec<u8>, String>, TestCaseError> {
    let path = format!(
        "/crypto/apply?mode={mode}&enc={key}&iv={}&offset={offset}",
        hex::encode(iv)
    );
    let (status, answer) = probe.call("POST", &path, data.to_vec()).await;
    match status {
        200 => Ok(Ok(hex::decode(answer["data"].as_str().unwrap_or_default())
            .map_err(|error| {
                TestCaseError::fail(format!("not hex: {error}"))
            })?)),
        400 => Ok(Err(error_of(&answer))),
        other => Err(TestCaseError::fail(format!(
            "{mode} answered {other}: {answer}"
        ))),
    }
}

async fn check_crypto(
    probe: &AppHost,
    valid_key: &str,
    case: CryptoCase,
) -> Result<(), TestCaseError> {
    let key = match &case.key {
        KeyChoice::Valid => valid_key.to_owned(),
        KeyChoice::Altered(at) => {
            let mut chars: Vec<char> = valid_key.chars().collect();
            let at = at % chars.len();
            chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
            chars.into_iter().collect()
        }
        KeyChoice::Other(id) => id.clone(),
    };
    let key_valid = matches!(case.key, KeyChoice::Valid);
    let iv_valid = case.iv.len() == 16;
    let in_range = case.offset.checked_add(case.data.len() as u64).is_some();
    let whole = apply(probe, &key, &case.iv, case.offset, "encrypt", &case.data).await?;
    if !key_valid || !iv_valid || !in_range {
        let refusal = whole.err().unwrap_or_default();
        let mut expected = Vec::new();
        if !key_valid {
            expected.push("InvalidKey");
        }
        if !iv_valid {
            expected.push("InvalidIv");
        }
        if !in_range {
            expected.push("OutOfRange");
        }
        // When several are wrong, any of their refusals will do.
        prop_assert!(
            expected.contains(&refusal.as_str()),
            "expected one of {:?}, got {:?}",
            expected,
            refusal
        );
        if !in_range && key_valid && iv_valid {
            let streamed = apply(probe, &key, &case.iv, case.offset, "stream", &case.data).await?;
            prop_assert!(streamed.is_err(), "a stream past offset 2^64 was encrypted");
        }
        return Ok(());
    }
    let whole = whole.map_err(|refusal| TestCaseError::fail(format!("refused: {refusal}")))?;
    prop_assert_eq!(whole.len(), case.data.len());
    // Stateless CTR: two pieces at their own offsets are the whole.
    let split = case.split % (case.data.len() + 1);
    let (head, tail) = case.data.split_at(split);
    let first = apply(probe, &key, &case.iv, case.offset, "encrypt", head).await?;
    let second = apply(
        probe,
        &key,
        &case.iv,
        case.offset + split as u64,
        "encrypt",
        tail,
    )
    .await?;
    let pieces = [
        first.map_err(TestCaseError::fail)?,
        second.map_err(TestCaseError::fail)?,
    ]
    .concat();
    prop_assert_eq!(&pieces, &whole, "encrypted in two pieces at {}", split);
    let streamed = apply(probe, &key, &case.iv, case.offset, "stream", &case.data)
        .await?
        .map_err(TestCaseError::fail)?;
    prop_assert_eq!(&streamed, &whole, "the stream differs from the call");
    let plain = apply(probe, &key, &case.iv, case.offset, "decrypt", &whole)
        .await?
        .map_err(TestCaseError::fail)?;
    prop_assert_eq!(&plain, &case.data, "decryption did not invert encryption");
    if !case.data.is_empty() && case.data.len() >= 16 {
        prop_assert_ne!(&whole, &case.data, "the data came back unencrypted");
    }
    Ok(())
}

#[test]
fn crypto_arguments() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut services = Services::start(Backends::SqliteLocal);
    let probe = AppHost::start(&mut services, "probe", "fuzz", &[]);
    let key = runtime.block_on(new_key(&probe));
    fuzzing::run("crypto_arguments", 60, crypto_case(), |case| {
        runtime.block_on(check_crypto(&probe, &key, case))
    });
}

// ---- registry -------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// Key 0 or 1 of the case, or 2: an id no host issued.
    Begin(usize, usize),
    AddBytes(usize, u32, Vec<u8>, String),
    Parts(usize),
    /// The model's parts as stored (when `None`), or a claimed list.
    Finish(usize, Option<Vec<(u32, u64, String)>>),
    Tag(usize),
    Discard(usize),
}

/// The names of a case: short, empty, long, and anything Unicode.
fn names() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![
            4 => "[a-z]{1,6}",
            1 => Just(String::new()),
            1 => (200usize..2000).prop_map(|n| "n".repeat(n)),
            1 => any::<String>(),
        ],
        3,
    )
}

fn part_number() -> impl Strategy<Value = u32> {
    prop_oneof![6 => 1u32..5, 1 => Just(0u32), 1 => 9_999u32..10_002, 1 => any::<u32>()]
}

fn etag() -> impl Strategy<Value = String> {
    prop_oneof![3 => "e[0-9]", 1 => any::<String>()]
}

fn op() -> impl Strategy<Value = Op> {
    let name = 0usize..3;
    prop_oneof![
        3 => (name.clone(), prop_oneof![4 => 0usize..2, 1 => Just(2usize)]).prop_map(|(n, k)| Op::Begin(n, k)),
        5 => (name.clone(), part_number(), prop::collection::vec(any::<u8>(), 0..64), etag())
            .prop_map(|(n, p, d, e)| Op::AddBytes(n, p, d, e)),
        1 => name.clone().prop_map(Op::Parts),
        3 => (
            name.clone(),
            prop::option::weighted(
                0.5,
                prop::collection::vec((part_number(), 0u64..70, etag()), 0..5),
            ),
        )
            .prop_map(|(n, claimed)| Op::Finish(n, claimed)),
        1 => name.clone().prop_map(Op::Tag),
        1 => name.prop_map(Op::Discard),
    ]
}

#[derive(Debug, Clone, Default)]
struct Entry {
    key: usize,
    parts: BTreeMap<u32, (u64, String)>,
    tag: Option<String>,
}

/// The parts as JSON, by number.
fn parts_json(parts: &[(u32, u64, String)]) -> Value {
    json!(
        parts
            .iter()
            .map(|(number, size, etag)| json!({"number": number, "size": size, "etag": etag}))
            .collect::<Vec<_>>()
    )
}

static CASES: AtomicU64 = AtomicU64::new(0);

/// The names the registry takes: 1 to 1024 bytes.
fn name_is_valid(name: &str) -> bool {
    (1..=1024).contains(&name.len())
}

async fn check_registry(
    probe: &AppHost,
    keys: &[String; 2],
    names: Vec<String>,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    // Each case has names of its own on the one host.
    let case = CASES.fetch_add(1, Ordering::Relaxed);
    // The empty name stays empty, to be refused.
    let names: Vec<String> = names
        .iter()
        .map(|name| {
            if name.is_empty() {
                String::new()
            } else {
                format!("c{case}/{name}")
            }
        })
        .collect();
    // Keyed by name: two of a case's names may be the same.
    let mut model: BTreeMap<String, Entry> = BTreeMap::new();
    for op in ops {
        let n = match &op {
            Op::Begin(n, _)
            | Op::AddBytes(n, ..)
            | Op::Parts(n)
            | Op::Finish(n, _)
            | Op::Tag(n)
            | Op::Discard(n) => *n,
        };
        if !name_is_valid(&names[n]) {
            let (route, method) = match &op {
                Op::Begin(..) => ("begin", "POST"),
                Op::AddBytes(..) => ("add-bytes", "PUT"),
                Op::Parts(_) => ("parts", "GET"),
                Op::Finish(..) => ("finish-list", "POST"),
                Op::Tag(_) => ("tag", "GET"),
                Op::Discard(_) => ("discard", "POST"),
            };
            let key = &keys[0];
            let (_, answer) = probe
                .call(
                    method,
                    &format!(
                        "/registry/{route}?name={}&key_id={key}&part=1",
                        query_encode(&names[n])
                    ),
                    "[]",
                )
                .await;
            prop_assert_eq!(
                error_of(&answer),
                "InvalidName",
                "{} of a {}-byte name: {}",
                route,
                names[n].len(),
                answer
            );
            continue;
        }
        match op {
            Op::Begin(n, k) => {
                let key = keys.get(k).map_or("bogus-key", String::as_str);
                let (status, answer) = probe
                    .call(
                        "POST",
                        &format!(
                            "/registry/begin?name={}&key_id={key}",
                            query_encode(&names[n])
                        ),
                        "",
                    )
                    .await;
                let expected = if k == 2 {
                    Err("InvalidKey")
                } else {
                    match model.get(&names[n]) {
                        Some(entry) if entry.key != k => Err("EntryExists"),
                        _ => Ok(()),
                    }
                };
                match expected {
                    Ok(()) => {
                        prop_assert_eq!(status, 200, "begin: {}", answer);
                        model.entry(names[n].clone()).or_insert_with(|| Entry {
                            key: k,
                            ..Entry::default()
                        });
                    }
                    Err(error) => prop_assert_eq!(error_of(&answer), error, "begin: {}", answer),
                }
            }
            Op::AddBytes(n, number, data, etag) => {
                let (status, answer) = probe
                    .call(
                        "PUT",
                        &format!(
                            "/registry/add-bytes?name={}&part={number}&etag={}",
                            query_encode(&names[n]),
                            query_encode(&etag)
                        ),
                        data.clone(),
                    )
                    .await;
                let valid_number = (1..=MAX_PART_NUMBER).contains(&number);
                match model.get_mut(&names[n]) {
                    None => {
                        let error = error_of(&answer);
                        prop_assert!(
                            error == "UnknownEntry"
                                || (!valid_number && error == "InvalidPartNumber"),
                            "add-part-bytes without an entry: {}",
                            answer
                        );
                    }
                    Some(_) if !valid_number => {
                        prop_assert_eq!(error_of(&answer), "InvalidPartNumber", "{}", answer)
                    }
                    Some(entry) if entry.tag.is_some() => {
                        prop_assert_eq!(error_of(&answer), "Finished", "{}", answer)
                    }
                    Some(entry) => {
                        prop_assert_eq!(status, 200, "add-part-bytes: {}", answer);
                        prop_assert_eq!(answer["size"].as_u64(), Some(data.len() as u64));
                        entry.parts.insert(number, (data.len() as u64, etag));
                    }
                }
            }
            Op::Parts(n) => {
                let (status, answer) = probe
                    .call(
                        "GET",
                        &format!("/registry/parts?name={}", query_encode(&names[n])),
                        "",
                    )
                    .await;
                match model.get(&names[n]) {
                    None => prop_assert_eq!(error_of(&answer), "UnknownEntry", "{}", answer),
                    Some(entry) => {
                        prop_assert_eq!(status, 200, "parts: {}", answer);
                        let expected: Vec<(u32, u64, String)> = entry
                            .parts
                            .iter()
                            .map(|(number, (size, etag))| (*number, *size, etag.clone()))
                            .collect();
                        prop_assert_eq!(answer, parts_json(&expected));
                    }
                }
            }
            Op::Finish(n, claimed) => {
                let stored: Vec<(u32, u64, String)> =
                    model.get(&names[n]).map_or_else(Vec::new, |entry| {
                        entry
                            .parts
                            .iter()
                            .map(|(number, (size, etag))| (*number, *size, etag.clone()))
                            .collect()
                    });
                let list = claimed.unwrap_or_else(|| stored.clone());
                let (status, answer) = probe
                    .call(
                        "POST",
                        &format!("/registry/finish-list?name={}", query_encode(&names[n])),
                        parts_json(&list).to_string(),
                    )
                    .await;
                let Some(entry) = model.get_mut(&names[n]) else {
                    prop_assert!(
                        status != 200,
                        "finish of an entry that does not exist: {}",
                        answer
                    );
                    continue;
                };
                // Each number 1 to 10000, and each once.
                let mut numbers: Vec<u32> = list.iter().map(|(number, _, _)| *number).collect();
                numbers.sort_unstable();
                let numbers_valid = numbers.windows(2).all(|pair| pair[0] != pair[1])
                    && numbers
                        .iter()
                        .all(|number| (1..=MAX_PART_NUMBER).contains(number));
                if !numbers_valid {
                    prop_assert_eq!(error_of(&answer), "InvalidPartNumber", "finish: {}", answer);
                    continue;
                }
                if let Some(tag) = &entry.tag {
                    prop_assert_eq!(status, 200, "finish again: {}", answer);
                    prop_assert_eq!(answer["tag"].as_str(), Some(tag.as_str()), "finish again");
                    continue;
                }
                // Parts 1 to n, each as recorded, is the one list that finishes an entry.
                let contiguous = list
                    .iter()
                    .enumerate()
                    .all(|(index, (number, _, _))| *number as usize == index + 1);
                let as_recorded = list.iter().all(|(number, size, etag)| {
                    entry.parts.get(number) == Some(&(*size, etag.clone()))
                });
                let acceptable = !list.is_empty() && contiguous && as_recorded;
                if acceptable {
                    prop_assert_eq!(status, 200, "finish of {:?}: {}", list, answer);
                    let tag = answer["tag"].as_str().unwrap_or_default().to_owned();
                    prop_assert_eq!(tag.len(), 64, "a tag is 64 hex digits: {}", answer);
                    entry.tag = Some(tag);
                } else {
                    prop_assert!(
                        status != 200,
                        "finish of {:?} with recorded {:?} was accepted: {}",
                        list,
                        entry.parts,
                        answer
                    );
                    prop_assert!(
                        [400, 409].contains(&status),
                        "finish of {:?}: {} {}",
                        list,
                        status,
                        answer
                    );
                }
            }
            Op::Tag(n) => {
                let (status, answer) = probe
                    .call(
                        "GET",
                        &format!("/registry/tag?name={}", query_encode(&names[n])),
                        "",
                    )
                    .await;
                match model.get(&names[n]) {
                    None => prop_assert_eq!(error_of(&answer), "UnknownEntry", "{}", answer),
                    Some(Entry { tag: None, .. }) => {
                        prop_assert_eq!(error_of(&answer), "Unfinished", "{}", answer)
                    }
                    Some(Entry { tag: Some(tag), .. }) => {
                        prop_assert_eq!(status, 200, "tag: {}", answer);
                        prop_assert_eq!(answer["tag"].as_str(), Some(tag.as_str()));
                    }
                }
            }
            Op::Discard(n) => {
                let (status, answer) = probe
                    .call(
                        "POST",
                        &format!("/registry/discard?name={}", query_encode(&names[n])),
                        "",
                    )
                    .await;
                if model.remove(&names[n]).is_some() {
                    prop_assert_eq!(status, 200, "discard: {}", answer);
                } else {
                    prop_assert!(
                        status == 200 || error_of(&answer) == "UnknownEntry",
                        "discard of nothing: {}",
                        answer
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn registry_sequences() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut services = Services::start(Backends::SqliteLocal);
    let probe = AppHost::start(&mut services, "probe", "fuzz", &[]);
    let keys = runtime.block_on(async { [new_key(&probe).await, new_key(&probe).await] });
    fuzzing::run(
        "registry_sequences",
        40,
        (names(), prop::collection::vec(op(), 1..16)),
        |(names, ops)| runtime.block_on(check_registry(&probe, &keys, names, ops)),
    );
}
