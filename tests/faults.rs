//! A misbehaving guest costs one request, never the host: traps give 500, the memory cap 500,
//! the deadline 504, each with the words the contract promises, and the host serves on. A guest
//! that fails after its response has started gives the client a response that looks cut, never
//! a short one that looks whole.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use blackbox::{HostProcess, get_request, guest, http_client, read_response};
use futures::future::join_all;

struct Answer {
    status: u16,
    request_id: Option<String>,
    body: String,
}

async fn get(client: &reqwest::Client, url: &str) -> Answer {
    let response = client
        .get(url)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap_or_else(|error| panic!("GET {url} failed: {error}"));
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = response
        .text()
        .await
        .unwrap_or_else(|error| panic!("GET {url}: reading the body failed: {error}"));
    Answer {
        status,
        request_id,
        body,
    }
}

async fn assert_healthy(client: &reqwest::Client, host: &HostProcess, after: &str) {
    let answer = get(client, &host.url("/")).await;
    assert_eq!(
        answer.status, 200,
        "after {after}, GET / got {} {:?}",
        answer.status, answer.body
    );
    assert_eq!(answer.body, "ok\n", "after {after}");
}

#[tokio::test]
async fn trap_gives_500_trapped() {
    let host = HostProcess::start(&guest("faults"), &[]);
    let client = http_client();
    let answer = get(&client, &host.url("/trap")).await;
    assert_eq!(answer.status, 500, "/trap: {:?}", answer.body);
    assert!(
        answer.body.contains("trapped"),
        "/trap body should say `trapped`: {:?}",
        answer.body
    );
    assert_healthy(&client, &host, "a trap").await;
}

#[tokio::test]
async fn memory_cap_gives_500_and_the_next_request_is_fine() {
    let host = HostProcess::start(&guest("faults"), &["--memory-limit", "16MiB"]);
    let client = http_client();
    let answer = get(&client, &host.url("/grow")).await;
    assert_eq!(
        answer.status, 500,
        "/grow with --memory-limit 16MiB: {:?}",
        answer.body
    );
    assert!(
        answer.body.contains("memory limit") && answer.body.contains("16 MiB"),
        "/grow body should say `memory limit` and `16 MiB`: {:?}",
        answer.body
    );
    let answer = get(&client, &host.url("/grow?mb=4")).await;
    assert_eq!(
        answer.status, 200,
        "/grow?mb=4 after a refused /grow: {:?}",
        answer.body
    );
    assert_eq!(answer.body, "grew 4 MiB\n");
    assert_healthy(&client, &host, "a memory cap").await;
}

#[tokio::test]
async fn hoarding_host_resources_gives_500_and_the_next_request_is_fine() {
    let host = HostProcess::start(&guest("faults"), &[]);
    let client = http_client();
    let answer = get(&client, &host.url("/hoard")).await;
    assert_eq!(answer.status, 500, "/hoard: {:?}", answer.body);
    assert!(
        answer
            .body
            .contains("host resources exhausted: the app held 10000 host resources"),
        "/hoard body should say which limit it reached: {:?}",
        answer.body
    );
    let answer = get(&client, &host.url("/hoard?count=9000")).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "held 9000 header maps\n"),
        "/hoard?count=9000 after a refused /hoard"
    );
    assert_healthy(&client, &host, "hoarded host resources").await;
}

#[tokio::test]
async fn spinning_guest_is_stopped_at_the_deadline() {
    let host = HostProcess::start(&guest("faults"), &["--timeout", "1"]);
    let client = http_client();
    let started = Instant::now();
    let answer = get(&client, &host.url("/spin")).await;
    let took = started.elapsed();
    assert_eq!(
        answer.status, 504,
        "/spin with --timeout 1: {:?}",
        answer.body
    );
    assert!(
        answer.body.contains("timeout"),
        "/spin body should say `timeout`: {:?}",
        answer.body
    );
    assert!(
        took < Duration::from_secs(10),
        "/spin with --timeout 1 took {took:?}"
    );
    println!("/spin answered 504 after {took:?}");
    assert_healthy(&client, &host, "a spinning guest").await;
}

#[tokio::test]
async fn sleeping_guest_is_stopped_and_logged_with_its_request_id() {
    let host = HostProcess::start(&guest("faults"), &["--timeout", "1"]);
    let client = http_client();
    let started = Instant::now();
    let answer = get(&client, &host.url("/sleep?ms=3000")).await;
    let took = started.elapsed();
    assert_eq!(
        answer.status, 504,
        "/sleep?ms=3000 with --timeout 1: {:?}",
        answer.body
    );
    assert!(
        answer.body.contains("timeout"),
        "the 504 body should say `timeout`: {:?}",
        answer.body
    );
    // Well before the guest would have woken up (3 s): the deadline stopped it.
    assert!(
        took < Duration::from_millis(2900),
        "the 504 came after {took:?}, not at the 1 s deadline"
    );
    let id = answer
        .request_id
        .expect("the 504 answer has no x-request-id header");
    let wanted = format!("request_id={id}");
    // The log line may be written just after the answer: poll for it.
    let logged = blackbox::poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        host.log().contains(&wanted).then_some(())
    });
    assert!(
        logged.is_some(),
        "the error log has no line with `{wanted}`:\n{}",
        host.log()
    );
    assert_healthy(&client, &host, "a sleeping guest").await;
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Healthy,
    Sleep,
    Trap,
    Grow,
    Spin,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Healthy => "/",
            Kind::Sleep => "/sleep?ms=200",
            Kind::Trap => "/trap",
            Kind::Grow => "/grow",
            Kind::Spin => "/spin",
        }
    }

    /// The status and a word of the body the contract promises.
    fn expected(self) -> (u16, &'static str) {
        match self {
            Kind::Healthy => (200, "ok"),
            Kind::Sleep => (200, "slept 200 ms"),
            Kind::Trap => (500, "trapped"),
            Kind::Grow => (500, "memory limit"),
            Kind::Spin => (504, "timeout"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_mixed_faults_leaves_the_host_serving() {
    let mut host = HostProcess::start(
        &guest("faults"),
        &[
            "--worker-class",
            "gevent",
            "--worker-connections",
            "256",
            // Generous: twenty guests growing to their cap at once on a loaded machine must
            // reach it before the deadline, or they are answered 504 instead of 500.
            "--timeout",
            "10",
            "--memory-limit",
            "16MiB",
        ],
    );
    let client = http_client();
    // 200 requests: 120 healthy `/`, 20 each of the others, interleaved.
    let kinds: Vec<Kind> = (0..200)
        .map(|i| match i % 10 {
            0..=5 => Kind::Healthy,
            6 => Kind::Sleep,
            7 => Kind::Trap,
            8 => Kind::Grow,
            _ => Kind::Spin,
        })
        .collect();
    let started = Instant::now();
    let answers = join_all(kinds.iter().map(|kind| {
        let client = client.clone();
        let url = host.url(kind.path());
        async move { get(&client, &url).await }
    }))
    .await;
    println!("200 mixed requests took {:?}", started.elapsed());
    let mut wrong = Vec::new();
    for (kind, answer) in kinds.iter().zip(&answers) {
        let (status, word) = kind.expected();
        if answer.status != status || !answer.body.contains(word) {
            wrong.push(format!(
                "{} -> {} {:?} (expected {status} with `{word}`)",
                kind.path(),
                answer.status,
                answer.body.trim_end()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 200 answers were wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert_healthy(&client, &host, "the burst").await;
    assert!(host.is_alive(), "the host died in the burst");
}

/// How a `/partial` response ends after its first MiBs: the guest's failures, an end it
/// leaves unfinished, and two whole ends (one with the guest still working after it, until it is
/// stopped at its deadline).
const PARTIAL_ENDINGS: [&str; 7] = [
    "trap",
    "grow",
    "spin",
    "sleep",
    "drop",
    "finish",
    "finish-sleep",
];

/// What a raw client sees of a response: the status, the body bytes it got, and whether the
/// message ended as HTTP says a complete one ends (the chunked terminator, or all of the
/// declared `Content-Length`) rather than with the connection closing under it.
struct Seen {
    status: u16,
    body: usize,
    complete: bool,
}

/// Sends `GET target` on a new connection and reads the response to its end or to the
/// connection's end, whichever is first.
fn raw_get(host: &HostProcess, target: &str) -> Seen {
    let mut stream = TcpStream::connect(host.addr()).expect("cannot connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(&get_request(target, &host.addr().to_string(), &[]))
        .unwrap();
    let mut bytes = Vec::new();
    // A cut ends in EOF or a reset; a whole message ends where its framing says.
    let mut chunk = vec![0; 64 * 1024];
    let started = Instant::now();
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => panic!(
                "{target}: reading failed after {:?}: {error}",
                started.elapsed()
            ),
        }
        if read_response(&mut bytes.as_slice()).is_ok() {
            break;
        }
    }
    match read_response(&mut bytes.as_slice()) {
        Ok(response) => Seen {
            status: response.status,
            body: response.body.len(),
            complete: true,
        },
        Err(_) => {
            let head_end = bytes
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .unwrap_or_else(|| {
                    panic!(
                        "{target}: no response head in {:?}",
                        String::from_utf8_lossy(&bytes)
                    )
                });
            let status = String::from_utf8_lossy(&bytes[9..12]).parse().unwrap_or(0);
            Seen {
                status,
                body: bytes.len() - head_end - 4,
                complete: false,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_guest_could_not_finish_looks_cut() {
    let host = HostProcess::start(
        &guest("faults"),
        &["--timeout", "2", "--memory-limit", "32MiB"],
    );
    let client = http_client();
    for length in ["0", "1"] {
        for ending in PARTIAL_ENDINGS {
            let whole = ending.starts_with("finish");
            if whole && length == "1" {
                continue; // a body one MiB short of its length cannot finish
            }
            let target = format!("/partial?mb=3&then={ending}&length={length}");
            let seen = tokio::task::block_in_place(|| raw_get(&host, &target));
            assert_eq!(
                seen.status, 200,
                "{target}: the head was sent before the failure"
            );
            assert!(
                seen.body >= 3 << 20,
                "{target}: the client got {} bytes, fewer than the 3 MiB the guest sent",
                seen.body
            );
            assert_eq!(
                seen.complete,
                whole,
                "{target}: a raw client saw a {} message",
                if seen.complete { "complete" } else { "cut" }
            );

            let response = client
                .get(host.url(&target))
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .unwrap_or_else(|error| panic!("{target}: no response head: {error}"));
            let body = response.bytes().await;
            assert_eq!(
                body.is_ok(),
                whole,
                "{target}: reqwest read the body as {}",
                match &body {
                    Ok(bytes) => format!("complete, {} bytes", bytes.len()),
                    Err(error) => format!("failed: {error}"),
                }
            );
            assert_healthy(&client, &host, &target).await;
        }
    }
    assert!(
        host.log().contains("the response was cut short"),
        "the error log does not say that responses were cut:\n{}",
        host.log()
    );
}

#[test]
fn a_capability_stream_that_fails_midway_cuts_the_response() {
    // The request body is cut at 1 MiB (--limit-request-body), so the encryption stream the
    // guest splices into its response fails after its first MiB.
    let host = HostProcess::start(&guest("faults"), &["--limit-request-body", "1MiB"]);
    let mut stream = TcpStream::connect(host.addr()).expect("cannot connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "POST /crypto/echo HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        host.addr()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = vec![b'p'; 256 * 1024];
        for _ in 0..16 {
            let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            // The host stops reading at the limit: a failed write is expected.
            if writer.write_all(&framed).is_err() {
                return;
            }
        }
        let _ = writer.write_all(b"0\r\n\r\n");
    });
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let _ = sender.join();
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(12)]).into_owned();
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "the response began {text:?}"
    );
    assert!(
        read_response(&mut bytes.as_slice()).is_err(),
        "the encrypted echo of a body cut at 1 MiB arrived as a complete message of {} bytes",
        bytes.len()
    );
}
