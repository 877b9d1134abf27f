//! gunicorn's request limits, over raw sockets: `--limit-request-line`, `--limit-request-fields`,
//! `--limit-request-field_size`, and malformed requests. Every refusal is the host's own answer:
//! the status, `Connection: close`, and the connection closed after it. Clients that never
//! finish their heads hold a bounded number of connections (`--max-connections`) for a bounded
//! time (the header timeout), and a well-behaved client is still answered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blackbox::{
    HostProcess, RawResponse, get_request, guest, poll_until, raw_answer, raw_request,
    read_response,
};

/// `GET <target> HTTP/1.1` whose request line (without CRLF) is exactly `length` bytes.
fn request_with_line(addr: SocketAddr, length: usize) -> Vec<u8> {
    let fixed = "GET ".len() + " HTTP/1.1".len() + 1; // + the leading "/"
    assert!(
        length > fixed,
        "a request line needs more than {fixed} bytes"
    );
    let target = format!("/{}", "a".repeat(length - fixed));
    let request = get_request(&target, &addr.to_string(), &[]);
    let line_end = request.windows(2).position(|w| w == b"\r\n").unwrap();
    assert_eq!(
        line_end, length,
        "the request line is not {length} bytes long"
    );
    request
}

/// A request with `fields` header fields in all, Host included.
fn request_with_fields(addr: SocketAddr, fields: usize) -> Vec<u8> {
    let extra: Vec<String> = (1..fields).map(|i| format!("X-Field-{i}: {i}")).collect();
    get_request("/", &addr.to_string(), &extra)
}

/// A request with one header line (`name: value`, without CRLF) of exactly `length` bytes.
fn request_with_header_line(addr: SocketAddr, length: usize) -> Vec<u8> {
    let prefix = "X-Big: ";
    let line = format!("{prefix}{}", "v".repeat(length - prefix.len()));
    assert_eq!(line.len(), length);
    get_request("/", &addr.to_string(), &[line])
}

fn assert_ok(what: &str, response: &RawResponse) {
    assert_eq!(
        response.status,
        200,
        "{what}: expected 200, got {} {:?} {:?}",
        response.status,
        response.headers,
        response.body_text()
    );
}

/// A refusal made by the host: the status, `Connection: close`, and the socket closed.
fn assert_refused(what: &str, response: &RawResponse, status: u16) {
    assert_eq!(
        response.status,
        status,
        "{what}: expected {status}, got {} {:?} {:?}",
        response.status,
        response.headers,
        response.body_text()
    );
    assert!(
        response.says_connection_close(),
        "{what}: the {status} answer has no `Connection: close`; headers: {:?}",
        response.headers
    );
    assert!(
        response.closed_by_server,
        "{what}: the server kept the connection open for 5 s after its {status} answer"
    );
}

fn still_serves(host: &HostProcess, after: &str) {
    let response = raw_answer(
        host.addr(),
        &get_request("/", &host.addr().to_string(), &[]),
    );
    assert_eq!(
        response.status, 200,
        "after {after} the host no longer serves GET /: {response:?}"
    );
}

#[test]
fn default_request_line_limit_is_4094() {
    let host = HostProcess::start(&guest("hello"), &[]);
    let addr = host.addr();
    assert_ok(
        "a 4094-byte request line",
        &raw_answer(addr, &request_with_line(addr, 4094)),
    );
    assert_refused(
        "a 4095-byte request line",
        &raw_request(addr, &request_with_line(addr, 4095)),
        400,
    );
    still_serves(&host, "a too long request line");
}

#[test]
fn request_line_limit_zero_is_unlimited() {
    let host = HostProcess::start(&guest("hello"), &["--limit-request-line", "0"]);
    let addr = host.addr();
    assert_ok(
        "a 20000-byte request line with --limit-request-line 0",
        &raw_answer(addr, &request_with_line(addr, 20_000)),
    );
}

#[test]
fn request_line_limit_clamps_to_8190() {
    let host = HostProcess::start(&guest("hello"), &["--limit-request-line", "100000"]);
    let addr = host.addr();
    assert_ok(
        "an 8190-byte request line with --limit-request-line 100000",
        &raw_answer(addr, &request_with_line(addr, 8190)),
    );
    assert_refused(
        "an 8191-byte request line with --limit-request-line 100000",
        &raw_request(addr, &request_with_line(addr, 8191)),
        400,
    );
    still_serves(&host, "a too long request line");
}

#[test]
fn default_header_field_count_limit_is_100() {
    let host = HostProcess::start(&guest("hello"), &[]);
    let addr = host.addr();
    assert_ok(
        "100 header fields",
        &raw_answer(addr, &request_with_fields(addr, 100)),
    );
    assert_refused(
        "101 header fields",
        &raw_request(addr, &request_with_fields(addr, 101)),
        431,
    );
    still_serves(&host, "too many header fields");
}

#[test]
fn default_header_line_limit_is_8190() {
    let host = HostProcess::start(&guest("hello"), &[]);
    let addr = host.addr();
    assert_ok(
        "an 8190-byte header line",
        &raw_answer(addr, &request_with_header_line(addr, 8190)),
    );
    // The host appends the peer to X-Forwarded-For: the limit holds what the client sent.
    let prefix = "X-Forwarded-For: ";
    let forwarded = format!("{prefix}{}", "1".repeat(8190 - prefix.len()));
    assert_ok(
        "an 8190-byte X-Forwarded-For line",
        &raw_answer(addr, &get_request("/", &addr.to_string(), &[forwarded])),
    );
    assert_refused(
        "an 8191-byte header line",
        &raw_request(addr, &request_with_header_line(addr, 8191)),
        431,
    );
    still_serves(&host, "a too large header line");
}

#[test]
fn field_size_limit_takes_both_spellings() {
    for flag in ["--limit-request-field_size", "--limit-request-field-size"] {
        let host = HostProcess::start(&guest("hello"), &[flag, "100"]);
        let addr = host.addr();
        assert_ok(
            &format!("a 100-byte header line with {flag} 100"),
            &raw_answer(addr, &request_with_header_line(addr, 100)),
        );
        assert_refused(
            &format!("a 101-byte header line with {flag} 100"),
            &raw_request(addr, &request_with_header_line(addr, 101)),
            431,
        );
        still_serves(&host, &format!("a too large header line with {flag}"));
    }
}

#[test]
fn malformed_request_gets_400() {
    let host = HostProcess::start(&guest("hello"), &[]);
    assert_refused(
        "`GARBAGE`",
        &raw_request(host.addr(), b"GARBAGE\r\n\r\n"),
        400,
    );
    still_serves(&host, "a malformed request");
}

/// The contract: every error answer the host makes itself carries a `text/plain` body of one line
/// saying what and why. Checked apart from the statuses above so that a missing body is reported
/// on its own.
#[test]
fn refusals_have_a_one_line_text_body() {
    let host = HostProcess::start(
        &guest("hello"),
        &[
            "--limit-request-line",
            "100",
            "--limit-request-field_size",
            "100",
        ],
    );
    let addr = host.addr();
    // Too many fields and a malformed request are refused by the HTTP parser itself, before
    // there is a request to describe: status and `Connection: close` only (tested above).
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a too long request line", request_with_line(addr, 101)),
        (
            "a too large header line",
            request_with_header_line(addr, 101),
        ),
    ];
    let mut failures = Vec::new();
    for (what, request) in cases {
        let response = raw_request(addr, &request);
        let body = response.body_text();
        let content_type = response
            .header("content-type")
            .unwrap_or_default()
            .to_owned();
        let one_line = !body.trim().is_empty() && body.trim_end_matches('\n').lines().count() == 1;
        if !content_type.starts_with("text/plain") || !one_line {
            failures.push(format!(
                "{what}: {} with content-type {content_type:?} and body {body:?}",
                response.status
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "refusals without a one-line text/plain body:\n{}",
        failures.join("\n")
    );
}

/// Opens a connection and sends a head it never finishes: the request line, then 99 header lines
/// of 8 KB each (within the default limits), and no blank line. Returns once the head is sent or
/// the host has closed the connection.
fn unfinished_head(addr: SocketAddr, stop: &AtomicBool) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    let mut head = get_request("/", &addr.to_string(), &[]);
    head.truncate(head.len() - 2);
    for i in 0..99 {
        head.extend_from_slice(format!("X-Pad-{i:02}: {}\r\n", "p".repeat(8170)).as_bytes());
    }
    let mut sent = 0;
    while sent < head.len() && !stop.load(Ordering::Relaxed) {
        match stream.write(&head[sent..]) {
            Ok(0) => return None,
            Ok(n) => sent += n,
            // Not accepted yet (the backlog holds it) or the host reads slowly: try again.
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
    Some(stream)
}

/// Whether the host has closed `stream` (EOF or reset), waiting at most `wait`.
fn closed_by_host(stream: &mut TcpStream, wait: Duration) -> bool {
    let _ = stream.set_read_timeout(Some(wait));
    let mut byte = [0u8; 1024];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => !matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn unfinished_heads_hold_a_bounded_number_of_connections_and_a_client_is_still_answered() {
    const ATTACKERS: usize = 150;
    const CAP: usize = 20;
    let host = HostProcess::start(
        &guest("hello"),
        &["--max-connections", &CAP.to_string(), "--keep-alive", "1"],
    );
    let addr = host.addr();
    // The host is idle here (the start check's connection is gone once its keep-alive ends).
    let idle_files = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let files = host.open_files();
        std::thread::sleep(Duration::from_millis(200));
        (host.open_files() == files).then_some(files)
    })
    .expect("the host's open files never settled");
    let idle_rss = host.rss_kib();

    // Each attacker keeps a connection with an unfinished head open, and opens a new one as
    // soon as the host closes it.
    let stop = Arc::new(AtomicBool::new(false));
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(mut stream) = unfinished_head(addr, &stop) {
                        while !stop.load(Ordering::Relaxed)
                            && !closed_by_host(&mut stream, Duration::from_millis(100))
                        {
                        }
                    }
                }
            })
        })
        .collect();

    // A well-behaved client arrives while every place is taken and the backlog is full of
    // attackers.
    let place_taken = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        (host.open_files() >= idle_files + CAP).then_some(())
    });
    let mut peak_files = 0;
    let mut peak_rss = 0;
    let mut sample = || {
        peak_files = peak_files.max(host.open_files());
        peak_rss = peak_rss.max(host.rss_kib());
    };
    let started = Instant::now();
    let mut client = TcpStream::connect(addr).expect("cannot connect");
    client
        .write_all(&get_request(
            "/",
            &addr.to_string(),
            &["Connection: close".into()],
        ))
        .unwrap();
    client.set_nonblocking(true).unwrap();
    let mut answer = Vec::new();
    let deadline = Duration::from_secs(120);
    let answered = loop {
        sample();
        let mut chunk = [0u8; 4096];
        match client.read(&mut chunk) {
            Ok(0) => break read_response(&mut answer.as_slice()).ok(),
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => break None,
        }
    };
    let waited = started.elapsed();
    // A little longer under attack, to see that the figures stay where they are.
    while started.elapsed() < waited + Duration::from_secs(3) {
        sample();
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        let _ = attacker.join();
    }

    println!(
        "{ATTACKERS} unfinished heads, --max-connections {CAP}: the client waited {waited:?}; \
         open files {idle_files} idle, {peak_files} at the peak; RSS {idle_rss} KiB idle, \
         {peak_rss} KiB at the peak"
    );
    assert!(
        place_taken.is_some(),
        "the attackers never held {CAP} connections"
    );
    let answered = answered.unwrap_or_else(|| {
        panic!(
            "the client got no answer within {deadline:?} while {ATTACKERS} connections sent \
             unfinished heads: {:?}",
            String::from_utf8_lossy(&answer)
        )
    });
    assert_eq!(answered.status, 200, "the client's answer: {answered:?}");
    // Each of the 150 would hold a descriptor and up to ~800 KiB of head without the cap.
    assert!(
        peak_files <= idle_files + CAP + 4,
        "the host held {peak_files} descriptors under the attack, {idle_files} idle: more \
         connections than --max-connections {CAP}"
    );
    let per_connection_kib = 1024;
    let slack_kib = 24 * 1024;
    assert!(
        peak_rss <= idle_rss + (CAP as u64) * per_connection_kib + slack_kib,
        "the host's RSS grew from {idle_rss} KiB to {peak_rss} KiB under {ATTACKERS} unfinished \
         heads with --max-connections {CAP}"
    );
}

#[test]
fn a_head_trickled_slower_than_the_header_timeout_is_cut() {
    let host = HostProcess::start(&guest("hello"), &["--keep-alive", "1"]);
    let mut stream = TcpStream::connect(host.addr()).expect("cannot connect");
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n", host.addr()).as_bytes())
        .unwrap();
    // One byte of a valid header line every 50 ms, never a blank line.
    let line = b"X-Slow: still coming\r\n";
    let started = Instant::now();
    let mut sent = 0usize;
    let cut = loop {
        if started.elapsed() > Duration::from_secs(30) {
            break None;
        }
        if stream.write_all(&line[sent % line.len()..][..1]).is_err() {
            break Some(started.elapsed());
        }
        sent += 1;
        if closed_by_host(&mut stream, Duration::from_millis(50)) {
            break Some(started.elapsed());
        }
    };
    let cut = cut.expect("a head trickled for 30 s was never cut (--keep-alive 1)");
    println!("a head trickled one byte per 50 ms was cut after {cut:?} and {sent} bytes");
    assert!(
        cut >= Duration::from_millis(900),
        "the head was cut after {cut:?}, before the 1 s header timeout"
    );
    assert!(
        cut < Duration::from_secs(10),
        "the head was cut after {cut:?}, long after the 1 s header timeout"
    );
    still_serves(&host, "a trickled head");
}

/// A client pipelines requests and reads none of the answers: the guest finishes each at once,
/// so no deadline is running while the answers pile up in the socket buffers. With one place
/// under `--max-connections`, nobody else would ever be served if that connection were kept.
#[test]
fn a_client_that_reads_no_answer_is_cut_after_the_timeout() {
    let host = HostProcess::start(
        &guest("hello"),
        &[
            "--max-connections",
            "1",
            "--timeout",
            "2",
            "--keep-alive",
            "1",
        ],
    );
    let addr = host.addr();
    // The start check's connection holds the only place until its keep-alive ends.
    std::thread::sleep(Duration::from_millis(1500));
    let mut attacker = TcpStream::connect(addr).expect("cannot connect");
    attacker
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let pipelined = get_request("/", &addr.to_string(), &[]).repeat(50_000);
    let mut sent = 0;
    let started = Instant::now();
    // Until the host stops reading too: its answers then fill every buffer on the way.
    while sent < pipelined.len() && started.elapsed() < Duration::from_secs(10) {
        match attacker.write(&pipelined[sent..]) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let stalled = Instant::now();
    let cut = closed_by_host_ignoring_answers(&mut attacker, Duration::from_secs(20));
    let client = Instant::now();
    let answer = raw_answer(
        addr,
        &get_request("/", &addr.to_string(), &["Connection: close".into()]),
    );
    println!(
        "the attacker sent {sent} bytes of pipelined requests; cut {:?} after it stalled; \
         the next client was answered in {:?}",
        cut.map(|at| at.duration_since(stalled)),
        client.elapsed()
    );
    assert!(
        cut.is_some(),
        "a connection whose client read no answer for 20 s was still open (--timeout 2)"
    );
    assert_ok("the next client", &answer);
}

/// When the host closes a connection whose answers the client never read, leaving them unread;
/// `None` if it is still open after `wait`. Peeks at nothing: reading would drain the answers.
fn closed_by_host_ignoring_answers(stream: &mut TcpStream, wait: Duration) -> Option<Instant> {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        // A write fails once the host has closed its end (reset, or a broken pipe after it).
        match stream.write(b"x") {
            Err(error)
                if !matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Some(Instant::now());
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    None
}
