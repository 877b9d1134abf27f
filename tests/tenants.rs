//! Many apps in one host, declared as `[[app]]` entries: routing by Host and by path, one app
//! failing in every way while another keeps answering, grants refused, a hostile app guessing
//! another's data, outbound HTTP to a slow upstream, a HUP that replaces one app under load on
//! the others, and the metrics endpoint.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blackbox::{HostProcess, cache_dir, free_port, guest, http_client};
use serde_json::{Value, json};

/// A host serving the apps of `config` (TOML, written to a file of its own), with `args`.
fn serve(config: &str, args: &[&str]) -> (HostProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("host.toml");
    std::fs::write(&config_path, config).expect("write the config");
    (HostProcess::start_with_config(&config_path, args), dir)
}

/// `method path` with `body` to the app behind `host_header`: the status, the body and the
/// time the answer took.
async fn request(
    host: &HostProcess,
    method: &str,
    host_header: &str,
    path: &str,
    body: &str,
) -> (u16, String, Duration) {
    let started = Instant::now();
    let response = http_client()
        .request(method.parse().expect("a method"), host.url(path))
        .header("host", host_header)
        .body(body.to_owned())
        .send()
        .await
        .expect("the host answers");
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    (status, body, started.elapsed())
}

async fn get(host: &HostProcess, host_header: &str, path: &str) -> (u16, String, Duration) {
    request(host, "GET", host_header, path, "").await
}

fn four_apps(upstream: SocketAddr) -> String {
    format!(
        r#"
threads = 4
worker_class = "gthread"
timeout = 20

[[app]]
name = "hello"
component = "{hello}"
hosts = ["hello.test"]
default = true

[[app]]
name = "faults"
component = "{faults}"
path = "/faults"
timeout = 1
memory_limit = "24MiB"
threads = 2
limit_request_body = "1MiB"
limit_request_fields = 8

[[app]]
name = "lenzeye"
component = "{lenzeye}"
hosts = ["files.test"]
memory_limit = "16MiB"

[[app]]
name = "proxy"
component = "{proxy}"
path = "/proxy"
env = ["UPSTREAM_URL=http://{upstream}"]
allow_outbound = ["{upstream}"]
outbound_timeout = 3
limit_request_line = 8000
capabilities = []
"#,
        hello = guest("hello"),
        faults = guest("faults"),
        lenzeye = guest("lenzeye"),
        proxy = guest("api-proxy"),
    )
}

/// An upstream that answers `GET /wait?ms=N` after N ms, keeping connections open between
/// requests, and counting the connections it takes, those still open, and the requests.
struct SlowUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl SlowUpstream {
    fn start() -> SlowUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
        let addr = listener.local_addr().expect("address");
        let upstream = SlowUpstream {
            addr,
            connections: Arc::default(),
            open: Arc::default(),
            requests: Arc::default(),
        };
        let (connections, open, requests) = (
            Arc::clone(&upstream.connections),
            Arc::clone(&upstream.open),
            Arc::clone(&upstream.requests),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                connections.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                let (open, requests) = (Arc::clone(&open), Arc::clone(&requests));
                std::thread::spawn(move || {
                    answer_slowly(stream, &requests);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        upstream
    }
}

/// Answers the requests of one connection until the client closes it or asks to.
fn answer_slowly(mut stream: std::net::TcpStream, requests: &AtomicUsize) {
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).unwrap_or(0) != 1 {
                return;
            }
            head.push(byte[0]);
        }
        requests.fetch_add(1, Ordering::SeqCst);
        let head = String::from_utf8_lossy(&head);
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let ms: u64 = target
            .split_once("ms=")
            .and_then(|(_, ms)| ms.parse().ok())
            .unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
        let close = head.to_ascii_lowercase().contains("\r\nconnection: close");
        let body = format!("upstream saw {target}");
        let answered = write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if close || answered.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_apps_are_routed_and_one_failing_app_does_not_slow_the_others() {
    let upstream = SlowUpstream::start();
    let metrics_port = free_port();
    let metrics_bind = format!("127.0.0.1:{metrics_port}");
    let (host, _dir) = serve(
        &four_apps(upstream.addr),
        &["--metrics-bind", &metrics_bind],
    );

    // Routing: by Host (hello, lenzeye), by path prefix taken off the path (faults, proxy), and
    // the default app for the rest.
    let (status, body, _) = get(&host, "hello.test", "/").await;
    assert_eq!((status, body.contains("Hello")), (200, true), "{body}");
    let (status, body, _) = get(&host, "other.test", "/anything").await;
    assert_eq!((status, body.contains("Hello")), (200, true), "{body}");
    let (status, body, _) = get(&host, "other.test", "/faults").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body, _) = get(&host, "other.test", "/faults/info?x=1").await;
    assert_eq!(status, 200);
    assert!(
        body.contains(r#""path_with_query":"/info?x=1""#)
            && body.contains(r#"["x-forwarded-prefix","/faults"]"#),
        "{body}"
    );
    let (status, body, _) = get(&host, "files.test", "/files").await;
    assert_eq!(status, 401, "lenzeye wants its bearer token: {body}");
    let (status, body, _) = get(&host, "other.test", "/proxy/wait?ms=0").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "upstream saw /wait?ms=0"),
        "{body}"
    );

    let mut alone = Vec::new();
    for _ in 0..100 {
        alone.push(get(&host, "hello.test", "/").await.2);
    }
    alone.sort();

    // The fault app loops, traps and eats memory, over and over, while hello is timed.
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    for path in [
        "/faults/spin",
        "/faults/trap",
        "/faults/grow",
        "/faults/spin",
    ] {
        let stop = Arc::clone(&stop);
        let url = host.url(path);
        attackers.push(tokio::spawn(async move {
            let client = http_client();
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(response) = client.get(&url).send().await {
                    statuses.push(response.status().as_u16());
                }
            }
            statuses
        }));
    }
    // The proxy's upstream takes 2 s: four callers wait on it without holding a CPU.
    let asked = upstream.requests.load(Ordering::SeqCst);
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let url = host.url("/proxy/wait?ms=2000");
        waiting.push(tokio::spawn(async move {
            http_client()
                .get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    until("the four proxied calls reach the upstream", || {
        upstream.requests.load(Ordering::SeqCst) >= asked + 4
    })
    .await;
    let mut latencies = Vec::new();
    for _ in 0..100 {
        let (status, _, latency) = get(&host, "hello.test", "/").await;
        assert_eq!(status, 200);
        latencies.push(latency);
    }
    stop.store(true, Ordering::SeqCst);
    let mut fault_statuses = Vec::new();
    for attacker in attackers {
        fault_statuses.extend(attacker.await.expect("attacker task"));
    }
    for waiter in waiting {
        assert_eq!(waiter.await.expect("waiter").expect("proxied"), 200);
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    let max = latencies[latencies.len() - 1];
    println!(
        "hello alone: p50 {:?}, p99 {:?}; beside a failing app and a waiting proxy: p50 {p50:?}, p99 {p99:?}, max {max:?} over {} requests; the fault app answered {} requests with {:?}",
        alone[50],
        alone[99],
        latencies.len(),
        fault_statuses.len(),
        {
            let mut kinds = fault_statuses.clone();
            kinds.sort();
            kinds.dedup();
            kinds
        }
    );
    assert!(
        fault_statuses.contains(&504) && fault_statuses.contains(&500),
        "the fault app was stopped and trapped: {fault_statuses:?}"
    );
    assert!(
        p99 < Duration::from_millis(500),
        "hello's p99 {p99:?} beside the failing app"
    );

    // The metrics endpoint, per app.
    let metrics_url = format!("http://{metrics_bind}");
    let health = http_client()
        .get(format!("{metrics_url}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    let text = http_client()
        .get(format!("{metrics_url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let samples = parse_prometheus(&text);
    let value = |name: &str, labels: &str| -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .map(|(_, _, v)| *v)
            .unwrap_or_else(|| panic!("no {name}{{{labels}}} in:\n{text}"))
    };
    assert!(value("host_requests_total", r#"app="hello",code="2xx""#) >= 202.0);
    assert!(value("host_timeouts_total", r#"app="faults""#) >= 1.0);
    assert!(value("host_traps_total", r#"app="faults""#) >= 1.0);
    assert!(value("host_memory_limit_refusals_total", r#"app="faults""#) >= 1.0);
    assert!(value("host_outbound_requests_total", r#"app="proxy""#) >= 5.0);
    assert_eq!(
        value("host_memory_cap_bytes", r#"app="faults""#),
        (2 * (24 << 20)) as f64
    );
    assert_eq!(value("host_instances_running", r#"app="hello""#), 0.0);
    assert!(
        value(
            "host_request_duration_seconds_bucket",
            r#"app="hello",le="+Inf""#
        ) >= 202.0
    );
    assert_eq!(value("host_workers", ""), 1.0);
    drop(host);
}

/// Polls `done` every 10 ms; fails the test after 10 s.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `name{labels} value` lines, every one checked to be well formed.
fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("series and value");
            let value: f64 = value.parse().expect("a number");
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            assert!(
                name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{line}"
            );
            (name.to_owned(), labels.to_owned(), value)
        })
        .collect()
}

#[tokio::test]
async fn outbound_http_goes_only_to_granted_hosts_within_the_timeouts() {
    let upstream = SlowUpstream::start();
    let elsewhere = SlowUpstream::start();
    // A fifth app: the same proxy, with one outbound connection at a time, and its upstream
    // given as a secret (a file read when the worker starts).
    let secrets = tempfile::tempdir().expect("temp dir");
    let secret = secrets.path().join("upstream");
    std::fs::write(&secret, format!("http://{}\n", upstream.addr)).expect("write the secret");
    let narrow = format!(
        r#"
[[app]]
name = "narrow"
component = "{proxy}"
path = "/narrow"
secrets = {{ UPSTREAM_URL = "{secret}" }}
allow_outbound = ["{upstream}", "{elsewhere}"]
outbound_connections = 1
outbound_connect_timeout = 0.5
capabilities = []
"#,
        proxy = guest("api-proxy"),
        upstream = upstream.addr,
        elsewhere = elsewhere.addr,
        secret = secret.display()
    );
    let (host, _dir) = serve(&(four_apps(upstream.addr) + &narrow), &[]);

    // Another host than the granted one: refused, and no connection is made.
    let target = format!("http://{}/secret", elsewhere.addr);
    let (status, body, _) = get(
        &host,
        "other.test",
        &format!("/proxy/__proxy/target?url={}", target.replace(':', "%3A")),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("outbound request denied"), "{body}");
    assert_eq!(elsewhere.connections.load(Ordering::SeqCst), 0);
    assert!(
        host.log().contains(&format!(
            "outbound request to {} refused: app `proxy` may call only {}",
            elsewhere.addr, upstream.addr
        )),
        "{}",
        host.log()
    );

    // An upstream slower than the app's first-byte timeout (3 s): 504, well before --timeout.
    let (status, body, took) = get(&host, "other.test", "/proxy/wait?ms=6000").await;
    assert_eq!(status, 504, "{body}");
    assert!(
        took < Duration::from_secs(5),
        "the first-byte timeout did not apply: {took:?}"
    );

    // The granted upstream is still reachable after the refusals, and calls one after another
    // share one connection, closed once it has been idle for a second.
    let connected = upstream.connections.load(Ordering::SeqCst);
    for _ in 0..20 {
        let (status, body, _) = get(&host, "other.test", "/proxy/wait?ms=0").await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst) - connected,
        1,
        "20 calls one after another should go over one connection"
    );
    until("the idle connection is closed", || {
        upstream.open.load(Ordering::SeqCst) == 0
    })
    .await;

    // An app whose one connection is kept for one host can still call another granted host
    // at once: the idle connection is closed for it.
    let (status, body, _) = get(&host, "other.test", "/narrow/wait?ms=0").await;
    assert_eq!(status, 200, "{body}");
    let target = format!("http://{}/elsewhere", elsewhere.addr);
    let (status, body, _) = get(
        &host,
        "other.test",
        &format!("/narrow/__proxy/target?url={}", target.replace(':', "%3A")),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, "upstream saw /elsewhere"),
        "{body}"
    );

    // One connection at a time: a second call waits for it no longer than the connect timeout.
    let asked = upstream.requests.load(Ordering::SeqCst);
    let (first, second) = tokio::join!(get(&host, "other.test", "/narrow/wait?ms=1500"), async {
        until("the first call holds the connection", || {
            upstream.requests.load(Ordering::SeqCst) > asked
        })
        .await;
        get(&host, "other.test", "/narrow/wait?ms=0").await
    });
    assert_eq!(first.0, 200, "{}", first.1);
    assert_eq!(second.0, 502, "{}", second.1);
    assert!(second.1.contains("ConnectionLimitReached"), "{}", second.1);
    assert!(
        host.log()
            .contains("all 1 connections stayed busy for 0.5s (--outbound-connections)"),
        "{}",
        host.log()
    );
}

#[tokio::test]
async fn request_limits_are_each_apps_own() {
    let upstream = SlowUpstream::start();
    let (host, _dir) = serve(&four_apps(upstream.addr), &[]);
    let client = http_client();
    let with_fields = |path: &str, host_header: &str| {
        let mut request = client.get(host.url(path)).header("host", host_header);
        for i in 0..10 {
            request = request.header(format!("x-field-{i}"), "1");
        }
        request.send()
    };
    // Tighter than the host's: the faults app takes 8 header fields.
    let refused = with_fields("/faults", "other.test").await.expect("answer");
    assert_eq!(refused.status().as_u16(), 431);
    let message = refused.text().await.unwrap_or_default();
    assert!(message.contains("(--limit-request-fields)"), "{message}");
    let (status, _, _) = get(&host, "hello.test", "/").await;
    assert_eq!(status, 200);
    assert_eq!(
        with_fields("/", "hello.test")
            .await
            .expect("answer")
            .status(),
        200
    );
    // Looser than the host's 4094: the proxy takes a 6000-byte request line, hello does not.
    let long = format!("/wait?ms=0&pad={}", "x".repeat(6000));
    let (status, body, _) = get(&host, "other.test", &format!("/proxy{long}")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = get(&host, "hello.test", &long).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("(--limit-request-line)"), "{body}");
}

#[tokio::test]
async fn request_bodies_beyond_an_apps_limit_are_refused_or_cut() {
    let upstream = SlowUpstream::start();
    let (host, _dir) = serve(&four_apps(upstream.addr), &[]);
    let client = http_client();

    let small = vec![7u8; 512 << 10];
    let echoed = client
        .post(host.url("/faults/echo"))
        .body(small.clone())
        .send()
        .await
        .expect("answer");
    assert_eq!(echoed.status().as_u16(), 200);
    assert_eq!(echoed.bytes().await.expect("body").len(), small.len());

    // Declared too large: 413 before the app runs.
    let refused = client
        .post(host.url("/faults/echo"))
        .body(vec![7u8; 2 << 20])
        .send()
        .await
        .expect("answer");
    assert_eq!(refused.status().as_u16(), 413);
    let message = refused.text().await.unwrap_or_default();
    assert!(
        message.contains("the body is 2097152 bytes, the limit is 1048576 (--limit-request-body)"),
        "{message}"
    );

    // Chunked, so only counting can tell: the app's read fails at the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..32).map(|_| Ok(vec![7u8; 64 << 10])).collect();
    let streamed = client
        .post(host.url("/faults/echo"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    let echoed = match streamed {
        Ok(response) => response.bytes().await.map_or(0, |body| body.len()),
        Err(_) => 0,
    };
    assert!(
        echoed <= 1 << 20,
        "{echoed} bytes came back through a 1 MiB limit"
    );
    assert!(
        host.log()
            .contains("request body cut: more than the 1048576 bytes of --limit-request-body"),
        "{}",
        host.log()
    );
    // And the app serves on.
    let (status, body, _) = get(&host, "other.test", "/faults").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

#[test]
fn a_component_importing_a_capability_its_app_is_not_granted_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        r#"
[[app]]
name = "hello"
component = "{hello}"
default = true

[[app]]
name = "restricted"
component = "{probe}"
path = "/probe"
capabilities = ["status", "crypto"]
"#,
        hello = guest("hello"),
        probe = guest("probe"),
    );
    let config_path = dir.path().join("host.toml");
    std::fs::write(&config_path, config).expect("write config");
    let output = std::process::Command::new(blackbox::host_bin())
        .args(["serve", "--check-config", "-c"])
        .arg(&config_path)
        .arg("--cache-dir")
        .arg(cache_dir())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .current_dir(dir.path())
        .output()
        .expect("run host");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("app `restricted` imports host:capabilities/")
            && stderr.contains("but is not granted the `"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_app_cannot_reach_another_apps_data_in_the_same_host() {
    let config = format!(
        r#"
[[app]]
name = "owner"
component = "{probe}"
hosts = ["owner.test"]

[[app]]
name = "intruder"
component = "{probe}"
hosts = ["intruder.test"]
default = true
"#,
        probe = guest("probe"),
    );
    let (host, _dir) = serve(&config, &[]);
    // The status and the JSON answer of the probe guest of `app`.
    let call = |app: &'static str, method: &'static str, path: String, body: String| {
        let host = &host;
        async move {
            let (status, body, _) =
                request(host, method, &format!("{app}.test"), &path, &body).await;
            (
                status,
                serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
            )
        }
    };
    let sql = |statement: &str| json!({"statement": statement, "params": []}).to_string();
    assert_eq!(
        call(
            "owner",
            "PUT",
            "/objects/put?key=secret".into(),
            "mine".into()
        )
        .await
        .0,
        200
    );
    assert_eq!(
        call(
            "owner",
            "POST",
            "/sql/execute".into(),
            sql("CREATE TABLE secrets (v TEXT)")
        )
        .await
        .0,
        200
    );
    let (_, key) = call("owner", "GET", "/crypto/key".into(), String::new()).await;
    let key_id = key["key_id"].as_str().expect("a key id").to_owned();
    assert_eq!(
        call(
            "owner",
            "POST",
            format!("/registry/begin?name=entry&key_id={key_id}"),
            String::new()
        )
        .await
        .0,
        200
    );

    // The intruder guesses names: the object, the table, the registry entry, the key.
    assert_eq!(
        call(
            "intruder",
            "GET",
            "/objects/get?key=secret".into(),
            String::new()
        )
        .await
        .0,
        404
    );
    let (_, listed) = call(
        "intruder",
        "GET",
        "/objects/list?prefix=".into(),
        String::new(),
    )
    .await;
    assert_eq!(listed, json!([]));
    assert_eq!(
        call(
            "intruder",
            "POST",
            "/sql/query".into(),
            sql("SELECT v FROM secrets")
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(
            "intruder",
            "GET",
            "/registry/tag?name=entry".into(),
            String::new()
        )
        .await
        .0,
        404
    );
    let (status, answer) = call(
        "intruder",
        "POST",
        format!("/registry/begin?name=taken&key_id={key_id}"),
        String::new(),
    )
    .await;
    assert_eq!(
        status, 400,
        "the owner's key id works for the intruder: {answer}"
    );
    // The owner's data is intact.
    assert_eq!(
        call(
            "owner",
            "GET",
            "/objects/get?key=secret".into(),
            String::new()
        )
        .await
        .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hup_replacing_one_app_fails_no_request_to_the_others() {
    let upstream = SlowUpstream::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let swapped = dir.path().join("swapped.wasm");
    std::fs::copy(guest("faults"), &swapped).expect("copy");
    let config = four_apps(upstream.addr).replace(&guest("faults"), &swapped.to_string_lossy());
    let (host, config_dir) = serve(&config, &["--workers", "2", "--graceful-timeout", "10"]);
    let config_path = config_dir.path().join("host.toml");

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for (host_header, path) in [
        ("hello.test", "/"),
        ("hello.test", "/"),
        ("other.test", "/proxy/wait?ms=300"),
    ] {
        let stop = Arc::clone(&stop);
        let answered = Arc::clone(&answered);
        let url = host.url(path);
        load.push(tokio::spawn(async move {
            // One connection per request: what is measured is the host, not the keep-alive
            // race every HTTP/1.1 server has when it closes an idle connection.
            let client = reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client");
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match client.get(&url).header("host", host_header).send().await {
                    Ok(response) if response.status() == 200 => {
                        ok += 1;
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(response) => failed.push(response.status().to_string()),
                    Err(error) => failed.push(error.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    until("the load is running", || {
        answered.load(Ordering::SeqCst) >= 20
    })
    .await;
    // The faults app becomes hello, in the config file and on disk; then HUP.
    std::fs::copy(guest("hello"), &swapped).expect("swap the component");
    std::fs::write(
        &config_path,
        std::fs::read_to_string(&config_path)
            .expect("config")
            .replace("timeout = 1\n", "timeout = 2\n"),
    )
    .expect("rewrite the config");
    host.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body, _) = get(&host, "other.test", "/faults").await;
        if body.contains("Hello") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new component was not served after HUP; log:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = answered.load(Ordering::SeqCst);
    until("the load goes on after the swap", || {
        answered.load(Ordering::SeqCst) >= before + 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut served = 0;
    for task in load {
        let (ok, failed) = task.await.expect("load task");
        assert!(
            failed.is_empty(),
            "requests failed across the HUP: {failed:?}"
        );
        served += ok;
    }
    println!("{served} requests to the other apps across the HUP, none failed");
    assert!(served > 20, "too little load to tell: {served}");
}

#[tokio::test]
async fn an_app_granted_no_outbound_host_is_told_so() {
    let upstream = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let target = upstream.local_addr().expect("an address");
    let host = HostProcess::start(
        &guest("api-proxy"),
        &["-e", &format!("UPSTREAM_URL=http://{target}")],
    );
    let url = format!("http://{target}/").replace(':', "%3A");
    let response = http_client()
        .get(host.url(&format!("/__proxy/target?url={url}")))
        .send()
        .await
        .expect("the host answers");
    assert_eq!(response.status().as_u16(), 403);
    upstream
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    assert!(upstream.accept().is_err(), "no connection was made");
    let log = host.log();
    assert!(
        log.contains(&format!(
            "outbound request to {target} refused: app `api-proxy` may call no host (grant some with --allow-outbound)"
        )),
        "{log}"
    );
}
