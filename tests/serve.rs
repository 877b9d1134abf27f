//! Serving: the hello guest answers, on every kind of bind, with keep-alive as configured, and
//! the compiled component is cached, reloaded and rebuilt when the cache is damaged.

use std::net::SocketAddr;
use std::time::Duration;

use blackbox::{HostProcess, Ready, free_port, get_request, guest, raw_request, raw_request_unix};

const HELLO: &str = "Hello, world!\n";

async fn get_hello(url: &str) {
    let response = blackbox::http_client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|error| panic!("GET {url} failed: {error}"));
    assert_eq!(response.status(), 200, "GET {url}");
    let request_id = response
        .headers()
        .get("x-request-id")
        .map(|value| value.to_str().unwrap_or_default().to_owned());
    assert!(
        request_id.as_deref().is_some_and(|id| !id.is_empty()),
        "GET {url}: no x-request-id header in {:?}",
        response.headers()
    );
    assert_eq!(response.text().await.unwrap(), HELLO, "GET {url}");
}

#[tokio::test]
async fn hello_answers_with_a_request_id() {
    let host = HostProcess::start(&guest("hello"), &[]);
    get_hello(&host.url("/")).await;
    get_hello(&host.url("/any/path?at=all")).await;
    let log = host.log();
    assert!(
        log.contains(&format!(
            "Listening at: http://{} ({})",
            host.addr(),
            host.pid()
        )),
        "the log does not say `Listening at: http://{} ({})`:\n{log}",
        host.addr(),
        host.pid()
    );
}

#[tokio::test]
async fn two_binds_both_answer() {
    let second = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let host = HostProcess::start(&guest("hello"), &["--bind", &second.to_string()]);
    get_hello(&host.url("/")).await;
    // The start only awaited the first bind; the second is polled here.
    let url = format!("http://{second}/");
    let answered = blackbox::poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        std::net::TcpStream::connect(second).ok()
    });
    assert!(
        answered.is_some(),
        "nothing listens on the second bind {second}:\n{}",
        host.log()
    );
    get_hello(&url).await;
}

#[test]
fn unix_socket_bind_answers() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("host.sock");
    let args: Vec<String> = vec![
        "serve".into(),
        guest("hello"),
        "--bind".into(),
        format!("unix:{}", socket.display()),
        "--cache-dir".into(),
        blackbox::cache_dir().to_string_lossy().into_owned(),
    ];
    let host = HostProcess::spawn(&args, &[], Ready::Unix(socket.clone()));
    let response = raw_request_unix(
        &socket,
        &get_request("/", "localhost", &["Connection: close".into()]),
    );
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body_text(), HELLO);
    assert!(response.header("x-request-id").is_some(), "{response:?}");
    let log = host.log();
    assert!(
        log.contains(&format!("Listening at: unix:{}", socket.display())),
        "the log does not say `Listening at: unix:{}`:\n{log}",
        socket.display()
    );
}

#[tokio::test]
async fn port_env_binds_all_interfaces() {
    let port = free_port();
    let args: Vec<String> = vec![
        "serve".into(),
        guest("hello"),
        "--cache-dir".into(),
        blackbox::cache_dir().to_string_lossy().into_owned(),
    ];
    let port_text = port.to_string();
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    let host = HostProcess::spawn(&args, &[("PORT", &port_text)], Ready::Tcp(loopback));
    get_hello(&format!("http://{loopback}/")).await;
    let log = host.log();
    assert!(
        log.contains(&format!("Listening at: http://0.0.0.0:{port}")),
        "with PORT={port} and no --bind the host should listen on 0.0.0.0:{port}:\n{log}"
    );
}

#[test]
fn idle_keep_alive_connection_is_closed_after_keep_alive_seconds() {
    let host = HostProcess::start(&guest("hello"), &["--keep-alive", "1"]);
    let started = std::time::Instant::now();
    let response = raw_request(
        host.addr(),
        &get_request("/", &host.addr().to_string(), &[]),
    );
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body_text(), HELLO);
    assert!(
        response.closed_by_server,
        "with --keep-alive 1 the idle connection was still open 5 s after the response"
    );
    println!("idle connection closed after {:?}", started.elapsed());
}

#[test]
fn keep_alive_zero_closes_after_every_response() {
    let host = HostProcess::start(&guest("hello"), &["--keep-alive", "0"]);
    let response = raw_request(
        host.addr(),
        &get_request("/", &host.addr().to_string(), &[]),
    );
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body_text(), HELLO);
    assert!(
        response.says_connection_close(),
        "with --keep-alive 0 the response should say `connection: close`; headers: {:?}",
        response.headers
    );
    assert!(
        response.closed_by_server,
        "with --keep-alive 0 the connection stayed open"
    );
}

#[tokio::test]
async fn compiled_component_is_cached_and_rebuilt_when_corrupt() {
    let cache = tempfile::tempdir().unwrap();
    let cache_path = cache.path().to_string_lossy().into_owned();
    let args = ["--cache-dir", cache_path.as_str()];

    // A fresh cache: compiled and stored.
    let host = HostProcess::start(&guest("hello"), &args);
    let log = host.log();
    let compiled = log
        .lines()
        .find(|line| line.contains("compiled ") && line.contains("cached at"));
    assert!(
        compiled.is_some(),
        "a fresh --cache-dir should log `compiled … cached at …`:\n{log}"
    );
    get_hello(&host.url("/")).await;
    drop(host);

    let artifacts: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cwasm"))
        .collect();
    assert!(
        !artifacts.is_empty(),
        "no .cwasm file in the cache dir {cache_path}"
    );

    // Same cache: loaded, not compiled.
    let host = HostProcess::start(&guest("hello"), &args);
    let log = host.log();
    let loaded = log
        .lines()
        .find(|line| line.contains("loaded compiled") && line.contains("from cache"));
    assert!(
        loaded.is_some(),
        "the second start should log `loaded compiled … from cache …`:\n{log}"
    );
    get_hello(&host.url("/")).await;
    drop(host);

    // Corrupt every artifact: the host says it rebuilds, and serves.
    for artifact in &artifacts {
        std::fs::write(
            artifact,
            b"this is not a compiled component, just garbage bytes",
        )
        .unwrap();
    }
    let host = HostProcess::start(&guest("hello"), &args);
    let log = host.log();
    assert!(
        log.contains("rebuilding"),
        "a corrupt cache entry should log a warning with `rebuilding`:\n{log}"
    );
    get_hello(&host.url("/")).await;
}

#[test]
fn a_file_that_is_not_a_component_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("not-a-component.wasm");
    std::fs::write(&text, "this is a text file, not a WebAssembly component\n").unwrap();
    let port = free_port();
    let mut child = std::process::Command::new(blackbox::host_bin())
        .arg("serve")
        .arg(&text)
        .args(["--bind", &format!("127.0.0.1:{port}"), "--cache-dir"])
        .arg(dir.path().join("cache"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot start the host");
    let status = blackbox::poll_until(Duration::from_secs(60), Duration::from_millis(20), || {
        child.try_wait().expect("cannot wait for the host")
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("host serve of a text file was still running after 60 s");
    };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("exit: {status}\nstderr:\n{stderr}");
    assert!(
        !status.success(),
        "host serve of a text file exited with {status}"
    );
    assert!(
        !stderr.trim().is_empty(),
        "host serve of a text file failed without a message on stderr"
    );
}
