//! gunicorn's request limits, over raw sockets: `--limit-request-line`, `--limit-request-fields`,
//! `--limit-request-field_size`, and malformed requests. Every refusal is the host's own answer:
//! the status, `Connection: close`, and the connection closed after it.

use std::net::SocketAddr;

use blackbox::{HostProcess, RawResponse, get_request, guest, raw_answer, raw_request};

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
