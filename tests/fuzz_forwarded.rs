//! The fuzz target of the proxy headers (`--forwarded-allow-ips`), through a real host and the
//! faults guest's `/info`, which answers with the scheme, authority and headers it was given.
//! Heads carry any number of `X-Forwarded-Proto`, `-Host`, `-For` and `Forwarded` lines with
//! hostile values (lists, blanks, bad authorities, bytes past ASCII). One host trusts the
//! loopback peer, one does not. What the guest must see:
//! - from an untrusted peer: none of those headers, `X-Forwarded-For` = the peer, the scheme
//!   `http` and the client's own `Host`;
//! - from a trusted peer: the scheme `https` exactly when the first `X-Forwarded-Proto` says so,
//!   the first `X-Forwarded-Host` when it is a valid authority (else `Host`), and every hop of
//!   every `X-Forwarded-For` line, in order, then the peer.
//!
//! `tests/fuzz forwarded` runs it long.

use blackbox::{HostProcess, fuzzing, guest, raw_answer};
use proptest::prelude::*;
use serde_json::Value;

const PEER: &str = "127.0.0.1";
const HOST: &str = "fuzz.test";

#[derive(Debug, Clone)]
struct Head {
    /// (lowercase name, raw value) in the order sent.
    lines: Vec<(&'static str, Vec<u8>)>,
}

impl Head {
    fn values(&self, name: &str) -> Vec<&[u8]> {
        self.lines
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    fn bytes(&self) -> Vec<u8> {
        let mut head =
            format!("GET /info HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n").into_bytes();
        for (name, value) in &self.lines {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        head
    }
}

fn value(typical: Vec<&'static str>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        6 => prop::sample::select(typical).prop_map(|v| v.as_bytes().to_vec()),
        2 => "[ -~]{0,24}".prop_map(|v| v.trim().as_bytes().to_vec()),
        1 => prop::collection::vec(prop_oneof![0x21u8..0x7f, 0x80u8..=0xff], 1..12),
    ]
    .boxed()
}

fn line() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    prop_oneof![
        (
            Just("x-forwarded-proto"),
            value(vec![
                "https",
                "HTTPS",
                "http",
                "https, http",
                "wss",
                "https ,",
                "ftp"
            ])
        ),
        (
            Just("x-forwarded-host"),
            value(vec![
                "a.example",
                "a.example:8443",
                "b.example , c.example",
                "[::1]:80",
                "bad host",
                "a/b",
                "x:99999",
                "@",
                "a.example:",
                ",a.example",
                "user@a.example",
            ])
        ),
        (
            Just("x-forwarded-for"),
            value(vec![
                "1.2.3.4",
                "1.2.3.4, 5.6.7.8",
                "::1",
                "unknown",
                ",",
                "1.2.3.4,,5.6.7.8",
                "_hidden",
            ])
        ),
        (
            Just("forwarded"),
            value(vec![
                "for=1.2.3.4;proto=https",
                "for=\"[::1]\"",
                "host=a.example"
            ])
        ),
        (Just("x-other"), value(vec!["kept"])),
    ]
}

fn head() -> impl Strategy<Value = Head> {
    prop::collection::vec(line(), 0..6).prop_map(|lines| Head { lines })
}

/// A value as the host reads it: visible ASCII (and tabs) only, else it is not text.
fn text(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
        .map(str::trim)
}

struct Seen {
    scheme: String,
    authority: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn seen(host: &HostProcess, head: &Head) -> Result<Seen, TestCaseError> {
    let response = raw_answer(host.addr(), &head.bytes());
    prop_assert_eq!(response.status, 200, "GET /info: {}", response.body_text());
    let json: Value = serde_json::from_slice(&response.body)
        .map_err(|error| TestCaseError::fail(format!("/info is not JSON: {error}")))?;
    let string = |key: &str| json[key].as_str().unwrap_or_default().to_owned();
    let headers = json["headers"]
        .as_array()
        .map(|pairs| {
            pairs
                .iter()
                .map(|pair| {
                    (
                        pair[0].as_str().unwrap_or_default().to_owned(),
                        pair[1].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Seen {
        scheme: string("scheme"),
        authority: string("authority"),
        headers,
    })
}

fn untrusted(host: &HostProcess, head: &Head) -> Result<(), TestCaseError> {
    let seen = seen(host, head)?;
    prop_assert_eq!(seen.scheme.as_str(), "http");
    prop_assert_eq!(seen.authority.as_str(), HOST);
    for name in ["x-forwarded-proto", "x-forwarded-host", "forwarded"] {
        prop_assert!(
            seen.all(name).is_empty(),
            "{name} reached the guest from an untrusted peer"
        );
    }
    prop_assert_eq!(seen.all("x-forwarded-for"), vec![PEER]);
    Ok(())
}

fn trusted(host: &HostProcess, head: &Head) -> Result<(), TestCaseError> {
    let seen = seen(host, head)?;
    let https = head
        .values("x-forwarded-proto")
        .first()
        .and_then(|value| text(value))
        .is_some_and(|proto| proto.eq_ignore_ascii_case("https"));
    prop_assert_eq!(seen.scheme.as_str(), if https { "https" } else { "http" });
    let forwarded_host = head
        .values("x-forwarded-host")
        .first()
        .and_then(|value| text(value))
        .and_then(|hosts| hosts.split(',').next())
        .map(str::trim)
        .filter(|host| !host.is_empty() && host.parse::<http::uri::Authority>().is_ok());
    prop_assert_eq!(seen.authority.as_str(), forwarded_host.unwrap_or(HOST));
    let mut chain: Vec<&str> = head
        .values("x-forwarded-for")
        .into_iter()
        .filter_map(text)
        .filter(|hops| !hops.is_empty())
        .collect();
    chain.push(PEER);
    prop_assert_eq!(seen.all("x-forwarded-for"), vec![chain.join(", ")]);
    Ok(())
}

#[test]
fn proxy_headers_reach_the_guest_only_from_trusted_peers() {
    let trusting = HostProcess::start(&guest("faults"), &["--forwarded-allow-ips", PEER]);
    let distrusting =
        HostProcess::start(&guest("faults"), &["--forwarded-allow-ips", "10.0.0.0/8"]);
    fuzzing::run("forwarded", 200, head(), |head| {
        trusted(&trusting, &head)?;
        untrusted(&distrusting, &head)
    });
}
