//! `--forwarded-allow-ips`: a trusted proxy's `X-Forwarded-Proto`/`-Host` reach the guest as
//! the scheme and authority; an untrusted peer's are removed, and `X-Forwarded-For` is its address.

use blackbox::{HostProcess, guest, http_client};
use serde_json::Value;

struct Info {
    scheme: String,
    authority: String,
    headers: Vec<(String, String)>,
}

impl Info {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn info(host: &HostProcess, headers: &[(&str, &str)]) -> Info {
    let mut request = http_client().get(host.url("/info"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("GET /info failed");
    assert_eq!(response.status(), 200, "GET /info");
    let text = response.text().await.unwrap();
    let json: Value = serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("/info is not JSON ({error}): {text}"));
    let string = |key: &str| {
        json[key]
            .as_str()
            .unwrap_or_else(|| panic!("/info has no string {key:?}: {text}"))
            .to_owned()
    };
    let headers = json["headers"]
        .as_array()
        .unwrap_or_else(|| panic!("/info has no headers array: {text}"))
        .iter()
        .map(|pair| {
            let name = pair[0].as_str().expect("header name").to_owned();
            let value = pair[1].as_str().expect("header value").to_owned();
            (name, value)
        })
        .collect();
    println!("/info: {text}");
    Info {
        scheme: string("scheme"),
        authority: string("authority"),
        headers,
    }
}

#[tokio::test]
async fn loopback_is_trusted_by_default() {
    let host = HostProcess::start(&guest("faults"), &[]);
    let info = info(
        &host,
        &[
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "example.com"),
        ],
    )
    .await;
    assert_eq!(
        info.scheme, "https",
        "a trusted X-Forwarded-Proto: https should set the scheme"
    );
    assert_eq!(
        info.authority, "example.com",
        "a trusted X-Forwarded-Host should set the authority"
    );
    let forwarded_for = info.header("x-forwarded-for").unwrap_or_default();
    assert!(
        forwarded_for.ends_with("127.0.0.1"),
        "x-forwarded-for should end with the peer's address, got {forwarded_for:?}"
    );
}

#[tokio::test]
async fn untrusted_peer_loses_its_proxy_headers() {
    let host = HostProcess::start(&guest("faults"), &["--forwarded-allow-ips", "10.1.2.3"]);
    let info = info(
        &host,
        &[
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "example.com"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Prefix", "/evil"),
        ],
    )
    .await;
    assert_eq!(
        info.header("x-forwarded-prefix"),
        None,
        "a client set the path prefix (a WSGI app's SCRIPT_NAME)"
    );
    assert_eq!(
        info.scheme, "http",
        "an untrusted X-Forwarded-Proto must not set the scheme"
    );
    // reqwest sends `Host: 127.0.0.1:<port>`.
    assert_eq!(
        info.authority,
        host.addr().to_string(),
        "the authority should be the Host header's"
    );
    assert_eq!(
        info.header("x-forwarded-proto"),
        None,
        "x-forwarded-proto reached the guest"
    );
    assert_eq!(
        info.header("x-forwarded-host"),
        None,
        "x-forwarded-host reached the guest"
    );
    assert_eq!(
        info.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "x-forwarded-for from an untrusted peer should be just its address"
    );
}
