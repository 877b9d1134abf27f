//! Helpers shared by the black-box tests of `host`: where the binary and the guests are, a host
//! process that is started, awaited (by polling its socket, never by sleeping) and stopped, raw
//! HTTP/1.1 exchanges for requests a normal client will not send, and a look at loopback sockets
//! in /proc/net/tcp to know when the host has read a request.

pub mod fuzzing;

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

/// A running `host serve`. Dropping it stops it: SIGTERM, up to 5 s, then SIGKILL.
pub struct HostProcess {
    child: Child,
    ready: Ready,
    log_path: PathBuf,
    stdout_path: PathBuf,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

/// A host's own directory: its logs, and its data unless the test names another.
fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("host-test-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

/// Why a host did not come up.
struct StartFailure {
    exited: Option<ExitStatus>,
    log: String,
}

impl HostProcess {
    /// `host serve <component> --bind 127.0.0.1:<free port> --cache-dir <shared cache> <extra_args>`,
    /// awaited until `GET /` answers. `extra_args` may carry its own `--cache-dir`, and more
    /// `--bind`s (the first bind is the one `addr()` and `base_url()` name).
    pub fn start(component: &str, extra_args: &[&str]) -> HostProcess {
        HostProcess::start_with_env(component, extra_args, &[])
    }

    /// `start`, with `env` added to the host's environment.
    pub fn start_with_env(
        component: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> HostProcess {
        HostProcess::start_serving(&[component], extra_args, env)
    }

    /// `start` for the apps of a config file: `host serve -c <config> …`.
    pub fn start_with_config(config: &Path, extra_args: &[&str]) -> HostProcess {
        HostProcess::start_with_config_and_env(config, extra_args, &[])
    }

    /// `start_with_config`, with `env` added to the host's environment.
    pub fn start_with_config_and_env(
        config: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> HostProcess {
        let config = config.to_string_lossy();
        HostProcess::start_serving(&["-c", &config], extra_args, env)
    }

    /// `host serve <what> --bind 127.0.0.1:<free port> …`, with another port when another test
    /// took the free one first.
    fn start_serving(what: &[&str], extra_args: &[&str], env: &[(&str, &str)]) -> HostProcess {
        const ATTEMPTS: usize = 3;
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut args: Vec<String> = vec!["serve".into()];
            args.extend(what.iter().map(|arg| arg.to_string()));
            args.extend(["--bind".into(), addr.to_string()]);
            if !extra_args.contains(&"--cache-dir") {
                args.push("--cache-dir".into());
                args.push(cache_dir().to_string_lossy().into_owned());
            }
            let dir = test_dir();
            // Each host keeps its data (master key, databases, objects) to itself.
            if !extra_args.contains(&"--data-dir") {
                args.push("--data-dir".into());
                args.push(dir.path().join("data").to_string_lossy().into_owned());
            }
            args.extend(extra_args.iter().map(|arg| arg.to_string()));
            match HostProcess::try_spawn(&args, env, Ready::Tcp(addr), dir) {
                Ok(host) => return host,
                // Another test took the port between free_port() and the bind: try another.
                Err(failure) if failure.exited.is_some() && failure.log.contains("cannot bind") => {
                    last = failure.log;
                }
                Err(failure) => panic!("{}", failure.describe(&args)),
            }
        }
        panic!("host could not bind a free port in {ATTEMPTS} attempts; last log:\n{last}");
    }

    /// `host <args>` with `env` added to the environment, awaited until `GET /` answers on `ready`.
    pub fn spawn(args: &[String], env: &[(&str, &str)], ready: Ready) -> HostProcess {
        match HostProcess::try_spawn(args, env, ready, test_dir()) {
            Ok(host) => host,
            Err(failure) => panic!("{}", failure.describe(args)),
        }
    }

    fn try_spawn(
        args: &[String],
        env: &[(&str, &str)],
        ready: Ready,
        dir: tempfile::TempDir,
    ) -> Result<HostProcess, StartFailure> {
        let log_path = dir.path().join("stderr.log");
        let stdout_path = dir.path().join("stdout.log");
        let stderr = fs::File::create(&log_path).expect("cannot create the log file");
        let stdout = fs::File::create(&stdout_path).expect("cannot create the stdout file");
        let mut command = Command::new(host_bin());
        command
            .args(args)
            // No ./host.toml from wherever the tests run is picked up.
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // Only the test's arguments configure the host: drop the environment variables it reads
        // settings from (HOST_*, and gunicorn's PORT, WEB_CONCURRENCY, FORWARDED_ALLOW_IPS).
        for (name, _) in std::env::vars_os() {
            let name_text = name.to_string_lossy();
            if name_text.starts_with("HOST_")
                || [
                    "PORT",
                    "WEB_CONCURRENCY",
                    "FORWARDED_ALLOW_IPS",
                    "DATABASE_URL",
                ]
                .contains(&name_text.as_ref())
            {
                command.env_remove(&name);
            }
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().expect("cannot start the host binary");
        let mut host = HostProcess {
            child,
            ready,
            log_path,
            stdout_path,
            data_dir: args
                .iter()
                .rposition(|arg| arg == "--data-dir")
                .and_then(|index| args.get(index + 1))
                .map_or_else(|| dir.path().join("data"), PathBuf::from),
            _dir: dir,
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(Some(status)) = host.child.try_wait() {
                return Err(StartFailure {
                    exited: Some(status),
                    log: host.log(),
                });
            }
            if host.answers() && host.ready.held_by(host.child.id()) {
                return Ok(host);
            }
            if Instant::now() >= deadline {
                return Err(StartFailure {
                    exited: None,
                    log: host.log(),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Whether `GET /` gets any HTTP response right now.
    fn answers(&self) -> bool {
        let request =
            |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let first_bytes = |stream: &mut dyn ReadWrite, request: String| -> bool {
            if stream.write_all(request.as_bytes()).is_err() {
                return false;
            }
            let mut head = [0u8; 8];
            stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
        };
        match &self.ready {
            Ready::Tcp(addr) => match TcpStream::connect_timeout(addr, Duration::from_secs(1)) {
                Ok(mut stream) => {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    first_bytes(&mut stream, request(&addr.to_string()))
                }
                Err(_) => false,
            },
            Ready::Unix(path) => match UnixStream::connect(path) {
                Ok(mut stream) => {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    first_bytes(&mut stream, request("localhost"))
                }
                Err(_) => false,
            },
        }
    }

    /// Where the host keeps its data: its last `--data-dir`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// The first bind's address (TCP hosts only).
    pub fn addr(&self) -> SocketAddr {
        match &self.ready {
            Ready::Tcp(addr) => *addr,
            Ready::Unix(path) => panic!(
                "this host listens on unix:{}, it has no TCP address",
                path.display()
            ),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `base_url()` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the host wrote to stderr so far (its error log unless `--error-logfile` says otherwise).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Everything the host wrote to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stdout_path).unwrap_or_default()).into_owned()
    }

    /// Sends a signal (`libc::SIGTERM`, …) to the host.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid this test started and has not reaped yet.
        let result = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(
            result,
            0,
            "kill({}, {signal}) failed: {}",
            self.child.id(),
            io::Error::last_os_error()
        );
    }

    /// The exit status, if the host exits within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                Ok(None) => return None,
                Err(error) => panic!("cannot wait for the host: {error}"),
            }
        }
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The CPU time (user and system) the host and the processes it started have used: utime
    /// and stime in /proc/<pid>/stat, which count the threads that have exited too.
    pub fn cpu_time(&self) -> Duration {
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let ticks: u64 = process_tree(self.pid())
            .iter()
            .filter_map(|pid| {
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (_, after_comm) = stat.rsplit_once(')')?;
                let fields: Vec<&str> = after_comm.split_whitespace().collect();
                // After the command: state (field 3) … utime (14), stime (15).
                Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
            })
            .sum();
        Duration::from_millis(ticks * 1000 / ticks_per_second)
    }

    /// The host's resident set size in KiB: VmRSS in /proc/<pid>/status, summed over the host
    /// process and any processes it started (worker processes, if the host forks them).
    pub fn rss_kib(&self) -> u64 {
        let own = vm_rss_kib(self.pid()).expect("no VmRSS for the host: has it exited?");
        let descendants: u64 = process_tree(self.pid())[1..]
            .iter()
            .filter_map(|pid| vm_rss_kib(*pid))
            .sum();
        own + descendants
    }

    /// The peak resident set size (VmHWM) in KiB of the host process and of each process it
    /// started, summed: what the processes held at their highest, however briefly.
    pub fn peak_rss_kib(&self) -> u64 {
        process_tree(self.pid())
            .iter()
            .filter_map(|pid| proc_status_kib(*pid, "VmHWM:"))
            .sum()
    }
}

impl HostProcess {
    /// The descriptors open in the host's processes (the master and its workers): listening
    /// sockets, connections, files.
    pub fn open_files(&self) -> usize {
        process_tree(self.pid())
            .iter()
            .filter_map(|pid| fs::read_dir(format!("/proc/{pid}/fd")).ok())
            .map(|fds| fds.count())
            .sum()
    }
}

/// `pid` and all its descendants, from the parent pids in /proc/*/stat.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            // `pid (comm) state ppid …`; comm may contain spaces and parentheses.
            let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            let Some((_, after_comm)) = stat.rsplit_once(')') else {
                continue;
            };
            if let Some(parent) = after_comm
                .split_whitespace()
                .nth(1)
                .and_then(|ppid| ppid.parse::<u32>().ok())
            {
                parents.push((child, parent));
            }
        }
    }
    let mut tree = vec![pid];
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(child, _)| *child),
        );
        next += 1;
    }
    tree
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// A `kB` figure of /proc/<pid>/status, by its label.
fn proc_status_kib(pid: u32, label: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

impl StartFailure {
    fn describe(&self, args: &[String]) -> String {
        let what = match self.exited {
            Some(status) => format!("exited with {status} before it answered"),
            None => format!("did not answer GET / within {}s", START_DEADLINE.as_secs()),
        };
        format!("host {} {what}; its log:\n{}", args.join(" "), self.log)
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if self.is_alive() {
            // SAFETY: as in `signal`; the child has not been reaped.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- log of host pid {} ----\n{}---- end of log ----",
                self.child.id(),
                self.log()
            );
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A stream a raw exchange can run over.
pub trait RawStream: Read + Write {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()>;
}

impl RawStream for TcpStream {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

impl RawStream for UnixStream {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

/// One HTTP response as read off the socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The server closed the connection (EOF or reset) within 5 s after the response.
    pub closed_by_server: bool,
}

impl RawResponse {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether a `Connection` header says `close`.
    pub fn says_connection_close(&self) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .any(|(_, v)| {
                v.split(',')
                    .any(|token| token.trim().eq_ignore_ascii_case("close"))
            })
    }
}

/// Connects to `addr`, sends `bytes`, reads one response, then waits up to 5 s for the server to
/// close the connection.
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect_timeout(&addr, RAW_READ_TIMEOUT)
        .unwrap_or_else(|error| panic!("cannot connect to {addr}: {error}"));
    raw_exchange(&mut stream, bytes)
}

/// Like `raw_request`, without waiting for the server to close the connection afterwards
/// (`closed_by_server` stays false): for requests expected to succeed on a keep-alive connection.
pub fn raw_answer(addr: SocketAddr, bytes: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect_timeout(&addr, RAW_READ_TIMEOUT)
        .unwrap_or_else(|error| panic!("cannot connect to {addr}: {error}"));
    stream
        .set_timeout(RAW_READ_TIMEOUT)
        .expect("cannot set a read timeout");
    let written = stream.write_all(bytes).and_then(|()| stream.flush());
    read_response(&mut stream).unwrap_or_else(|error| {
        panic!("no HTTP response to a raw request (write: {written:?}): {error}")
    })
}

/// `raw_request` over a unix socket.
pub fn raw_request_unix(path: &Path, bytes: &[u8]) -> RawResponse {
    let mut stream = UnixStream::connect(path)
        .unwrap_or_else(|error| panic!("cannot connect to unix:{}: {error}", path.display()));
    raw_exchange(&mut stream, bytes)
}

/// Sends `bytes`, reads one response, then waits up to 5 s for the server to close the connection.
pub fn raw_exchange<S: RawStream>(stream: &mut S, bytes: &[u8]) -> RawResponse {
    stream
        .set_timeout(RAW_READ_TIMEOUT)
        .expect("cannot set a read timeout");
    // A server may answer and close before reading everything (an oversized request); the
    // answer is what matters, so a failed write is not an error by itself.
    let written = stream.write_all(bytes).and_then(|()| stream.flush());
    let mut response = match read_response(stream) {
        Ok(response) => response,
        Err(error) => panic!("no HTTP response to a raw request (write: {written:?}): {error}"),
    };
    response.closed_by_server = wait_closed(stream, RAW_CLOSE_TIMEOUT);
    response
}

/// Whether the peer closes the stream (EOF or reset) within `timeout`; bytes that arrive in the
/// meantime are read and dropped.
pub fn wait_closed<S: RawStream>(stream: &mut S, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        if stream.set_timeout(left).is_err() {
            return false;
        }
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error) => match error.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => {
                    return true;
                }
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => continue,
                _ => return true,
            },
        }
    }
}

/// Reads one HTTP/1.x response (content-length, chunked, or until EOF), leaving
/// `closed_by_server` false.
pub fn read_response<R: Read>(stream: &mut R) -> io::Result<RawResponse> {
    let mut reader = BufferedReader {
        inner: stream,
        buffer: Vec::new(),
        position: 0,
    };
    let status_line = reader.read_line()?;
    let status_line = String::from_utf8_lossy(&status_line).into_owned();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP/1 status line: {status_line:?}"),
        ));
    }
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        let line = reader.read_line()?;
        if line.is_empty() {
            break;
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        let (name, value) = line.split_once(':').ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad header line {line:?}"),
            )
        })?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        Vec::new()
    } else if header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let line = String::from_utf8_lossy(&reader.read_line()?).into_owned();
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if size == 0 {
                while !reader.read_line()?.is_empty() {}
                break;
            }
            body.extend_from_slice(&reader.read_exact(size)?);
            reader.read_line()?;
        }
        body
    } else if let Some(length) = header("content-length") {
        let length: usize = length.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad content-length {length:?}"),
            )
        })?;
        reader.read_exact(length)?
    } else {
        reader.read_to_end()?
    };
    Ok(RawResponse {
        status,
        headers,
        body,
        closed_by_server: false,
    })
}

struct BufferedReader<'a, R> {
    inner: &'a mut R,
    buffer: Vec<u8>,
    position: usize,
}

impl<R: Read> BufferedReader<'_, R> {
    /// Reads more bytes into the buffer; false at EOF.
    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.inner.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buffer.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// One line without its CRLF.
    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(end) = self.buffer[self.position..]
                .windows(2)
                .position(|w| w == b"\r\n")
            {
                let line = self.buffer[self.position..self.position + end].to_vec();
                self.position += end + 2;
                return Ok(line);
            }
            if !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-line",
                ));
            }
        }
    }

    fn read_exact(&mut self, length: usize) -> io::Result<Vec<u8>> {
        while self.buffer.len() - self.position < length {
            if !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} of {length} body bytes",
                        self.buffer.len() - self.position
                    ),
                ));
            }
        }
        let bytes = self.buffer[self.position..self.position + length].to_vec();
        self.position += length;
        Ok(bytes)
    }

    fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        loop {
            match self.fill() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => break,
                Err(error) => return Err(error),
            }
        }
        let bytes = self.buffer[self.position..].to_vec();
        self.position = self.buffer.len();
        Ok(bytes)
    }
}

/// `GET <target> HTTP/1.1` with a Host header and `extra_headers` (each `Name: value`), as bytes.
pub fn get_request(target: &str, host: &str, extra_headers: &[String]) -> Vec<u8> {
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n");
    for header in extra_headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// The send and receive queues of one loopback TCP socket, from /proc/net/tcp.
fn tcp_queues(local_port: u16, remote_port: u16) -> Option<(u64, u64)> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |field: &str| {
        field
            .rsplit_once(':')
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 || port(fields[1])? != local_port || port(fields[2])? != remote_port {
            return None;
        }
        let (tx, rx) = fields[4].split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

/// Waits until the server end of a loopback connection has read everything sent on `client`:
/// the client socket has nothing unacknowledged and the server socket nothing unread. This is how
/// a test knows a request is in the host's hands (in flight or queued) without sleeping.
pub fn wait_until_server_read(client: &TcpStream, timeout: Duration) -> bool {
    let local = client
        .local_addr()
        .expect("a connected socket has a local address")
        .port();
    let remote = client
        .peer_addr()
        .expect("a connected socket has a peer")
        .port();
    poll_until(timeout, Duration::from_millis(5), || {
        let (client_unacked, _) = tcp_queues(local, remote)?;
        let (_, server_unread) = tcp_queues(remote, local)?;
        (client_unacked == 0 && server_unread == 0).then_some(())
    })
    .is_some()
}

/// Sends `GET target` on a new connection and returns once the host has read it (the request is
/// in flight or queued); the response can then be read from the stream.
pub fn send_in_flight(addr: SocketAddr, target: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("cannot connect");
    stream
        .write_all(&get_request(target, &addr.to_string(), &[]))
        .expect("cannot send the request");
    assert!(
        wait_until_server_read(&stream, Duration::from_secs(10)),
        "the host did not read {target} within 10 s"
    );
    stream
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

/// The PostgreSQL server of the tests: `$BLACKBOX_DATABASE_URL` (tests/run sets it).
pub fn database_url() -> String {
    std::env::var("BLACKBOX_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Runs SQL on the tests' PostgreSQL as its administrator, with psql; returns the output rows.
pub fn psql(sql: &str) -> String {
    let output = Command::new("psql")
        .args([
            &database_url(),
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .output()
        .expect("psql is needed to look into the tests' PostgreSQL");
    assert!(
        output.status.success(),
        "psql failed on {sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Removes what the host made on PostgreSQL for `app`: its schema, its roles, its registry rows.
pub fn drop_postgres_app(app: &str) {
    let app = app.to_ascii_lowercase();
    psql(&format!(
        "DROP SCHEMA IF EXISTS app_{app} CASCADE;
         DO $$ DECLARE r record; BEGIN
            FOR r IN SELECT rolname FROM pg_roles WHERE rolname LIKE 'host\\_app\\_{app}\\_%' LOOP
                -- What the role owns outside its schema (large objects) goes with it.
                EXECUTE 'DROP OWNED BY ' || quote_ident(r.rolname);
                EXECUTE 'DROP ROLE ' || quote_ident(r.rolname);
            END LOOP;
         END $$;
         DO $$ BEGIN
            IF to_regclass('host_state.hmac_parts') IS NOT NULL THEN
                DELETE FROM host_state.hmac_parts WHERE app = '{app}';
                DELETE FROM host_state.hmac_entries WHERE app = '{app}';
            END IF;
         END $$;"
    ));
}

/// Which database and storage a host runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backends {
    /// The embedded defaults: SQLite files and a local directory.
    SqliteLocal,
    /// The machine's PostgreSQL and a real S3 API server.
    PostgresS3,
}

/// The services behind a host on `Backends`: an S3 server when needed, and the clean-up of
/// what the app left in PostgreSQL.
pub struct Services {
    pub backends: Backends,
    pub s3: Option<S3Server>,
    apps: Vec<String>,
}

pub const TEST_BUCKET: &str = "host-tests";

impl Services {
    pub fn start(backends: Backends) -> Services {
        let s3 = (backends == Backends::PostgresS3).then(|| S3Server::start(TEST_BUCKET));
        Services {
            backends,
            s3,
            apps: Vec::new(),
        }
    }

    /// The host's arguments for these backends, for an app whose PostgreSQL leftovers are
    /// removed when the services are dropped.
    pub fn host_args(&mut self, app: &str) -> Vec<String> {
        match &self.s3 {
            None => Vec::new(),
            Some(s3) => {
                // Leftovers of an earlier run go, but not the data of a host serving the app
                // again within this test.
                if !self.apps.iter().any(|known| known == app) {
                    self.apps.push(app.to_owned());
                    drop_postgres_app(app);
                }
                let mut args = vec!["--database-url".to_owned(), database_url()];
                args.extend(s3.host_args(TEST_BUCKET, "tests"));
                args
            }
        }
    }
}

/// The credentials the tests' S3 server takes (it takes any).
pub const S3_CREDENTIALS: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "blackbox"),
    ("AWS_SECRET_ACCESS_KEY", "blackbox"),
];

/// The master key of the tests' hosts, so a test can unwrap the key ids a guest was given.
pub const MASTER_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// The data key behind a key id, unwrapped as the README documents:
/// base64url(nonce[12] || AES-256-GCM(master key, data key)) with AAD `host:crypto:v1:<app>`.
pub fn unwrap_key_id(key_id: &str, app: &str) -> Vec<u8> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(key_id)
        .expect("a key id is base64url");
    let (nonce, wrapped) = bytes.split_at(12);
    let master: [u8; 32] = hex::decode(MASTER_KEY).unwrap().try_into().unwrap();
    let nonce: [u8; 12] = nonce.try_into().unwrap();
    let aad = format!("host:crypto:v1:{app}");
    aes_gcm::Aes256Gcm::new(&master.into())
        .decrypt(
            &aes_gcm::Nonce::from(nonce),
            Payload {
                msg: wrapped,
                aad: aad.as_bytes(),
            },
        )
        .expect("the key id does not unwrap as documented")
}

/// `openssl enc -aes-256-ctr` of `plaintext`: the independent AES-CTR the tests compare with.
pub fn openssl_ctr(key: &[u8], iv_hex: &str, plaintext: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args([
            "enc",
            "-aes-256-ctr",
            "-nosalt",
            "-K",
            &hex::encode(key),
            "-iv",
            iv_hex,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the openssl command is needed as the independent AES-CTR");
    let mut stdin = child.stdin.take().expect("a piped stdin");
    let input = plaintext.to_vec();
    // Written from another thread, so a large input cannot fill both pipes.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().expect("openssl ran");
    writer
        .join()
        .expect("the writer thread")
        .expect("openssl took the input");
    output.stdout
}

/// A host serving a copy of a guest (the probe guest puts every capability behind a route) on
/// `Backends`, with the tests' master key.
pub struct AppHost {
    pub host: HostProcess,
    pub app: AppCopy,
    pub client: reqwest::Client,
    _key_dir: tempfile::TempDir,
}

impl AppHost {
    /// Serves a new copy of `guests/<guest>.wasm`, named after `app_prefix`.
    pub fn start(
        services: &mut Services,
        guest: &str,
        app_prefix: &str,
        extra_args: &[&str],
    ) -> AppHost {
        let app = AppCopy::new(guest, &unique_name(app_prefix));
        AppHost::serve(services, app, extra_args)
    }

    /// Serves `app` (which may be an app an earlier host served: its data stays).
    pub fn serve(services: &mut Services, app: AppCopy, extra_args: &[&str]) -> AppHost {
        let key_dir = test_dir();
        let key_file = key_dir.path().join("master.key");
        fs::write(&key_file, MASTER_KEY).expect("cannot write the master key");
        let mut args: Vec<String> = services.host_args(&app.app);
        args.extend([
            "--master-key-file".to_owned(),
            key_file.to_string_lossy().into_owned(),
            "--database-timeout".to_owned(),
            "5".to_owned(),
        ]);
        args.extend(extra_args.iter().map(|arg| arg.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let host = HostProcess::start_with_env(&app.path, &args, &S3_CREDENTIALS);
        AppHost {
            host,
            app,
            client: http_client(),
            _key_dir: key_dir,
        }
    }

    /// Stops this host and serves its app again: the same data, a new process.
    pub fn restart(self, services: &mut Services, extra_args: &[&str]) -> AppHost {
        let AppHost { host, app, .. } = self;
        drop(host);
        AppHost::serve(services, app, extra_args)
    }

    /// The host's `--data-dir`.
    pub fn host_data_dir(&self) -> PathBuf {
        self.host.data_dir()
    }

    /// `method path` with `body`: the status and the JSON answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, serde_json::Value) {
        let (status, bytes) = self.bytes(method, path, body).await;
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        });
        (status, json)
    }

    /// A statement through the probe guest's `/sql/<route>` (`query`, `execute`, …).
    pub async fn sql(
        &self,
        route: &str,
        statement: &str,
        params: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let body = serde_json::json!({"statement": statement, "params": params}).to_string();
        self.call("POST", &format!("/sql/{route}"), body).await
    }

    /// `method path` with `body`: the status and the raw answer.
    pub async fn bytes(
        &self,
        method: &str,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Vec<u8>) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a valid method");
        let response = self
            .client
            .request(method.clone(), self.host.url(path))
            .body(body)
            .send()
            .await
            .unwrap_or_else(|error| panic!("{method} {path} failed: {error}"));
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .unwrap_or_else(|error| panic!("{method} {path}: the body failed: {error}"));
        (status, bytes.to_vec())
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for app in &self.apps {
            drop_postgres_app(app);
        }
    }
}

/// A real S3 API server (moto's server mode) on a free loopback port, with one bucket. Stopped
/// when dropped; `stop` and `restart` make outages (moto keeps its data in memory: a restarted
/// server is empty but for the bucket).
pub struct S3Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    bucket: String,
    log: tempfile::NamedTempFile,
}

impl S3Server {
    pub fn start(bucket: &str) -> S3Server {
        let mut server = S3Server {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            bucket: bucket.to_owned(),
            log: tempfile::NamedTempFile::new().expect("cannot create the S3 server's log"),
        };
        server.restart();
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `--storage s3://<bucket>/<prefix> --s3-endpoint … --s3-path-style`, and the credentials
    /// are the environment's (see `credentials`).
    pub fn host_args(&self, bucket: &str, prefix: &str) -> Vec<String> {
        vec![
            "--storage".into(),
            format!("s3://{bucket}/{prefix}"),
            "--s3-endpoint".into(),
            self.endpoint(),
            "--s3-path-style".into(),
            "--s3-region".into(),
            "us-east-1".into(),
        ]
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again), waits until it answers, and makes the bucket.
    pub fn restart(&mut self) {
        self.stop();
        let program = std::env::var("BLACKBOX_S3_SERVER").unwrap_or_else(|_| {
            repo_root()
                .join("target/s3-server/bin/moto_server")
                .to_string_lossy()
                .into_owned()
        });
        let log = self.log.reopen().expect("cannot open the S3 server's log");
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cannot share the S3 server's log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start the S3 API server {program} ({error}): run tests/run, which installs it")
            });
        self.child = Some(child);
        let answers = poll_until(START_DEADLINE, POLL_INTERVAL, || {
            TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        });
        assert!(
            answers.is_some(),
            "the S3 API server did not start: {}",
            self.log_text()
        );
        let created = self.request("PUT", &format!("/{}", self.bucket));
        assert_eq!(
            created.status,
            200,
            "cannot create the bucket: {}",
            created.body_text()
        );
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn request(&self, method: &str, target: &str) -> RawResponse {
        raw_request(
            self.addr,
            format!(
                "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.addr
            )
            .as_bytes(),
        )
    }

    /// Every key in the bucket.
    pub fn keys(&self) -> Vec<String> {
        let listing = self.request("GET", &format!("/{}?list-type=2", self.bucket));
        xml_values(&listing.body_text(), "Key")
    }

    /// The keys of the multipart uploads in progress in the bucket.
    pub fn uploads(&self) -> Vec<String> {
        let listing = self.request("GET", &format!("/{}?uploads", self.bucket));
        xml_values(&listing.body_text(), "Key")
    }

    /// The bytes of an object.
    pub fn object(&self, key: &str) -> Vec<u8> {
        let response = self.request("GET", &format!("/{}/{key}", self.bucket));
        assert_eq!(response.status, 200, "{key}: {}", response.body_text());
        response.body
    }

    /// The ETags (without quotes) of the parts stored for the uploads in progress of `key`.
    pub fn part_etags(&self, key: &str) -> Vec<String> {
        let uploads = self.request("GET", &format!("/{}?uploads&prefix={key}", self.bucket));
        xml_values(&uploads.body_text(), "UploadId")
            .iter()
            .flat_map(|upload_id| {
                let parts = self.request(
                    "GET",
                    &format!("/{}/{key}?uploadId={upload_id}", self.bucket),
                );
                xml_values(&parts.body_text(), "ETag")
            })
            .map(|etag| {
                etag.replace("&quot;", "")
                    .replace("&#34;", "")
                    .replace('"', "")
            })
            .collect()
    }

    /// The parts stored for an upload (empty when the upload is gone).
    pub fn parts(&self, key: &str, upload_id: &str) -> Vec<String> {
        let listing = self.request(
            "GET",
            &format!("/{}/{key}?uploadId={upload_id}", self.bucket),
        );
        xml_values(&listing.body_text(), "PartNumber")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn xml_values(xml: &str, element: &str) -> Vec<String> {
    let open = format!("<{element}>");
    let close = format!("</{element}>");
    xml.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close).map(|(value, _)| value.to_owned()))
        .collect()
}

/// What a `Relay` does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// Passes bytes both ways to the target.
    Forward,
    /// Accepts and closes at once: a server that dies on every request.
    Drop,
}

/// A TCP relay on a loopback port in front of a real server, to make outages: `cut` closes
/// every connection and refuses new ones until `resume`.
pub struct Relay {
    pub addr: SocketAddr,
    target: SocketAddr,
    state: std::sync::Arc<RelayState>,
}

struct RelayState {
    mode: std::sync::Mutex<RelayMode>,
    up: std::sync::atomic::AtomicBool,
    accepted: std::sync::atomic::AtomicUsize,
    open: std::sync::Mutex<Vec<TcpStream>>,
}

impl Relay {
    pub fn start(target: SocketAddr, mode: RelayMode) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind the relay");
        let relay = Relay {
            addr: listener
                .local_addr()
                .expect("a bound socket has an address"),
            target,
            state: std::sync::Arc::new(RelayState {
                mode: std::sync::Mutex::new(mode),
                up: std::sync::atomic::AtomicBool::new(true),
                accepted: std::sync::atomic::AtomicUsize::new(0),
                open: std::sync::Mutex::new(Vec::new()),
            }),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&self, listener: TcpListener) {
        use std::sync::atomic::Ordering;
        let state = std::sync::Arc::clone(&self.state);
        let target = self.target;
        listener
            .set_nonblocking(true)
            .expect("cannot make the relay's listener non-blocking");
        std::thread::spawn(move || {
            while state.up.load(Ordering::Acquire) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => break,
                };
                state.accepted.fetch_add(1, Ordering::AcqRel);
                let _ = client.set_nonblocking(false);
                if *state.mode.lock().unwrap() == RelayMode::Drop {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                for stream in [&client, &server] {
                    if let Ok(copy) = stream.try_clone() {
                        state.open.lock().unwrap().push(copy);
                    }
                }
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
    }

    pub fn set_mode(&self, mode: RelayMode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Closes every connection and the listener: the server is unreachable.
    pub fn cut(&self) {
        self.state
            .up
            .store(false, std::sync::atomic::Ordering::Release);
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        // The accept loop notices within a few milliseconds and drops the listener.
        let closed = poll_until(Duration::from_secs(5), POLL_INTERVAL, || {
            TcpStream::connect_timeout(&self.addr, Duration::from_millis(100))
                .is_err()
                .then_some(())
        });
        assert!(closed.is_some(), "the relay did not close its port");
    }

    /// Listens again on the same port.
    pub fn resume(&self) {
        let listener =
            TcpListener::bind(self.addr).expect("cannot listen on the relay's port again");
        self.state
            .up
            .store(true, std::sync::atomic::Ordering::Release);
        self.serve(listener);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state
            .up
            .store(false, std::sync::atomic::Ordering::Release);
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The `host:port` of the tests' PostgreSQL URL.
fn database_authority() -> String {
    let url = database_url();
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let after_user = after_scheme
        .split_once('@')
        .map_or(after_scheme, |(_, rest)| rest);
    after_user.split('/').next().unwrap_or_default().to_owned()
}

/// The tests' PostgreSQL address.
pub fn database_addr() -> SocketAddr {
    use std::net::ToSocketAddrs;
    let authority = database_authority();
    authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("cannot resolve PostgreSQL's address {authority}"))
}

/// The tests' PostgreSQL URL, reached through `addr` instead.
pub fn database_url_via(addr: SocketAddr) -> String {
    database_url().replacen(&database_authority(), &addr.to_string(), 1)
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
