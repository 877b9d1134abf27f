//! Helpers shared by the black-box tests of `host`, one module per concern; this file holds
//! where the binary and the guests are, and small helpers every test uses.

pub mod fuzzing;
mod host_process;
mod local_store;
mod oracles;
mod postgres;
mod raw_http;
mod relay;
mod s3;
mod services;

pub use host_process::*;
pub use local_store::*;
pub use oracles::*;
pub use postgres::*;
pub use raw_http::*;
pub use relay::*;
pub use s3::*;
pub use services::*;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a host gets to start answering (the first start compiles the component).
pub const START_DEADLINE: Duration = Duration::from_secs(120);
/// How often a starting host's socket is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long a raw exchange waits for the response.
const RAW_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a raw exchange waits for the server to close the connection after the response.
const RAW_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The repository root (the parent of tests/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// The host binary: `$HOST_BIN`, else `<root>/target/release/host`.
pub fn host_bin() -> PathBuf {
    let path = std::env::var_os("HOST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/host"));
    assert!(
        path.is_file(),
        "the host binary {} is missing: run tests/run (it builds it with `cargo build --release -p host`), \
         or point HOST_BIN at a built host",
        path.display()
    );
    path
}

/// The path of `guests/<name>.wasm`.
pub fn guest(name: &str) -> String {
    let path = repo_root().join("guests").join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "the guest {} is missing: run guests/build (tests/run does it first)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// The path of the Python guest `guests/python/<name>`, as `guests/python/build` builds it.
pub fn python_guest(name: &str) -> String {
    let path = repo_root()
        .join("target")
        .join("python-guests")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "the Python guest {} is missing: run guests/python/build (tests/run does it first)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// The path of the JavaScript guest `guests/js/<name>`, as `guests/js/build` builds it.
pub fn js_guest(name: &str) -> String {
    let path = repo_root()
        .join("target")
        .join("js-guests")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "the JavaScript guest {} is missing: run guests/js/build (tests/run does it first)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// `GET path` on `host`: the status, and the body as text.
pub async fn get_text(host: &HostProcess, path: &str) -> (u16, String) {
    let response = http_client()
        .get(host.url(path))
        .send()
        .await
        .expect("the host answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("a body"))
}

/// What a guest's `/served` route says at `path`: the requests the instance that answered has
/// been given, this one included.
pub async fn served_at(host: &HostProcess, path: &str) -> u64 {
    let (status, body) = get_text(host, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    // An instance is kept by its request's task just after its response has gone out: a client
    // sending its next request at once can, on a loaded machine, arrive first and be given a
    // new instance. The tests count what one instance serves, so they leave it that moment.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    body.trim().parse().expect("a count")
}

/// The value of one sample of the master's metrics, by its name and labels.
pub async fn metric(metrics_port: u16, sample: &str) -> u64 {
    let text = http_client()
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .expect("the metrics endpoint answers")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {sample} in:\n{text}"))
        .parse()
        .expect("a number")
}

/// POSTs 5 MiB of random bytes to `path`, an echo, and asserts that they come back whole.
pub async fn assert_echoes_5_mib(host: &HostProcess, path: &str) {
    let body = random_bytes(5 << 20, 7);
    let response = http_client()
        .post(host.url(path))
        .body(body.clone())
        .send()
        .await
        .expect("the host answers");
    assert_eq!(response.status().as_u16(), 200);
    let echoed = response.bytes().await.expect("the whole body");
    assert!(
        echoed == body,
        "{} bytes came back, not the 5 MiB sent",
        echoed.len()
    );
}

/// Asks `path`, which makes the instance hold more memory for good, until the host refuses it
/// (at most 20 times): memory a kept instance holds adds up over its requests, up to the limit,
/// and the refusal is logged as the memory limit.
pub async fn assert_memory_adds_up_to_the_limit(host: &HostProcess, path: &str) {
    let mut answers = Vec::new();
    while answers.len() < 20 && !answers.contains(&500) {
        answers.push(get_text(host, path).await.0);
    }
    assert_eq!(answers.last(), Some(&500), "{answers:?}");
    assert!(answers.len() > 2, "refused too soon: {answers:?}");
    assert!(
        host.log().contains("memory limit exceeded"),
        "{}",
        host.log()
    );
}

/// The compile cache shared by the tests, so a component is compiled once per suite run.
pub fn cache_dir() -> PathBuf {
    repo_root().join("target/test-cache")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind an ephemeral port");
    listener
        .local_addr()
        .expect("a bound socket has an address")
        .port()
}

/// An HTTP client for the tests: no proxy from the environment, no TLS.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        // The host closes a connection idle for its keep-alive (2 s by default); a client that
        // keeps it longer may reuse it just as it closes, the race of every HTTP/1.1 server.
        .pool_idle_timeout(Duration::from_secs(1))
        .build()
        .expect("cannot build the HTTP client")
}

/// `length` bytes that are the same for the same `seed`.
pub fn random_bytes(length: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut bytes = vec![0u8; length];
    rand::rngs::SmallRng::seed_from_u64(seed).fill(&mut bytes[..]);
    bytes
}

/// Calls `check` every `interval` until it returns `Some`, or `None` once `timeout` has passed.
pub fn poll_until<T>(
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(interval);
    }
}

/// Where a host listens, and so how to tell that it answers.
#[derive(Debug, Clone)]
pub enum Ready {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Ready {
    /// Whether process `pid` holds this listening socket: another test may have taken the
    /// port, and answer on it, while this host fails to bind it.
    fn held_by(&self, pid: u32) -> bool {
        let Ready::Tcp(addr) = self else {
            // A socket path is the test's own.
            return true;
        };
        let listening: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|table| fs::read_to_string(table).ok())
            .flat_map(|table| {
                table
                    .lines()
                    .skip(1)
                    .filter_map(|line| {
                        // sl local_address rem_address st … inode
                        let fields: Vec<&str> = line.split_whitespace().collect();
                        let (_, port) = fields.get(1)?.rsplit_once(':')?;
                        let listens = *fields.get(3)? == "0A"
                            && u16::from_str_radix(port, 16).ok()? == addr.port();
                        let inode = fields.get(9)?;
                        listens.then(|| format!("socket:[{inode}]"))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                fs::read_link(fd.path())
                    .is_ok_and(|target| listening.iter().any(|socket| target == Path::new(socket)))
            })
        })
    }
}

/// A host's own directory: its logs, and its data unless the test names another.
pub(crate) fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("host-test-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

/// A copy of `guests/<guest>.wasm` named `<app>.wasm`: the host names an app after its file, so
/// each test gets apps (schemas, objects, registry entries) of its own.
pub struct AppCopy {
    pub app: String,
    pub path: String,
    _dir: tempfile::TempDir,
}

impl AppCopy {
    pub fn new(guest_name: &str, app: &str) -> AppCopy {
        let dir = test_dir();
        let path = dir.path().join(format!("{app}.wasm"));
        fs::copy(guest(guest_name), &path).expect("cannot copy the guest");
        AppCopy {
            app: app.to_owned(),
            path: path.to_string_lossy().into_owned(),
            _dir: dir,
        }
    }
}

/// `prefix` and a random suffix, fit for an app name.
pub fn unique_name(prefix: &str) -> String {
    use rand::Rng;
    let suffix: u32 = rand::rng().random();
    format!("{prefix}_{suffix:08x}")
}

/// Every byte but the unreserved ones percent-encoded, so that a guest's query decoding gives
/// the text back exactly, whatever it holds.
pub fn query_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                (byte as char).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}
