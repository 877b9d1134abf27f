//! The settings of `host serve`, with gunicorn's names, defaults and rules.
//!
//! `ServeArgs` is what the command line says; `Settings` is the validated, derived form the
//! rest of the host works from (clamped limits, the concurrency a worker class implies, …).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::http::forwarded::TrustedPeers;
use crate::http::limits::RequestLimits;
use crate::storage::{S3Settings, Storage};

/// gunicorn's default access log format.
pub const DEFAULT_ACCESS_LOG_FORMAT: &str =
    r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s""#;

/// The default cap on one guest instance's linear memory.
pub const DEFAULT_MEMORY_LIMIT: &str = "128MiB";

/// The most workers, threads, connections or slots any count setting may ask for: far past
/// what a machine serves, and within what the host's semaphores and pools can count.
const MAX_COUNT: usize = 1_000_000;

/// A 32-bit WebAssembly memory holds at most 65,536 pages of 64 KiB.
const MAX_MEMORY_LIMIT: u64 = 4 << 30;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// The wasi:http component to serve (a `.wasm` file of the `wasi:http/proxy` world).
    #[arg(value_name = "COMPONENT.wasm")]
    pub component: Option<PathBuf>,

    /// The TOML config file. Default: `./host.toml` if it exists.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print every effective setting, and where it came from, as a config file; then exit.
    #[arg(long = "print-config")]
    pub print_config: bool,

    /// Validate the settings and the component, then exit.
    #[arg(long = "check-config")]
    pub check_config: bool,

    /// Worker processes. Default: `$WEB_CONCURRENCY`, else 1.
    #[arg(
        short = 'w',
        long,
        env = "WEB_CONCURRENCY",
        default_value_t = 1,
        value_name = "INT"
    )]
    pub workers: usize,

    /// Requests a worker serves before it is replaced (0 = never).
    #[arg(long = "max-requests", default_value_t = 0, value_name = "INT")]
    pub max_requests: u64,

    /// Adds a random 0..=N to `--max-requests` per worker, so workers do not restart together.
    #[arg(long = "max-requests-jitter", default_value_t = 0, value_name = "INT")]
    pub max_requests_jitter: u64,

    /// Where the workers' heartbeat files live. Default: /dev/shm if it is a tmpfs, else the temp dir.
    #[arg(long = "worker-tmp-dir", value_name = "DIR")]
    pub worker_tmp_dir: Option<PathBuf>,

    /// Compile the component in the master; workers map the compiled artifact. Always done;
    /// accepted for gunicorn compatibility.
    #[arg(long = "preload")]
    pub preload: bool,

    /// A file to write the master's pid to.
    #[arg(short = 'p', long = "pid", value_name = "FILE")]
    pub pidfile: Option<PathBuf>,

    /// `KEY=VALUE` set in the environment of the master and the workers. Repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,

    /// The socket to bind: `HOST:PORT`, `[IPV6]:PORT` or `unix:PATH`. Repeatable.
    /// Default: `0.0.0.0:$PORT` if PORT is set, else `127.0.0.1:8000`.
    #[arg(short = 'b', long = "bind", value_name = "ADDRESS")]
    pub bind: Vec<String>,

    /// The maximum number of pending connections (the `listen()` backlog).
    #[arg(long, default_value_t = 2048, value_name = "INT")]
    pub backlog: u32,

    /// Set SO_REUSEPORT on the listening sockets.
    #[arg(long = "reuse-port")]
    pub reuse_port: bool,

    /// How requests are run: `sync` (one at a time), `gthread` (`--threads` at once),
    /// `gevent`/`eventlet` (`--worker-connections` at once).
    #[arg(
        short = 'k',
        long = "worker-class",
        default_value = "sync",
        value_name = "CLASS"
    )]
    pub worker_class: WorkerClass,

    /// Guest instances running at once with the gthread class (`sync` with threads > 1 becomes gthread).
    #[arg(long, default_value_t = 1, value_name = "INT")]
    pub threads: usize,

    /// Requests a worker holds at once (running with the async classes, waiting with the others).
    #[arg(
        long = "worker-connections",
        default_value_t = 1000,
        value_name = "INT"
    )]
    pub worker_connections: usize,

    /// Connections a worker holds open at once, across its apps and listeners; further clients
    /// wait in the listen backlog until one closes.
    #[arg(long = "max-connections", default_value_t = 1000, value_name = "INT")]
    pub max_connections: usize,

    /// Seconds a request's guest may run before it is stopped and the client gets 504. 0 = no limit.
    #[arg(short = 't', long, default_value = "30", value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: f64,

    /// Seconds in-flight requests get to finish after a stop signal.
    #[arg(long = "graceful-timeout", default_value = "30", value_name = "SECONDS", value_parser = parse_seconds)]
    pub graceful_timeout: f64,

    /// Seconds an idle keep-alive connection is kept open. 0 = close after every response.
    #[arg(long = "keep-alive", default_value = "2", value_name = "SECONDS", value_parser = parse_seconds)]
    pub keep_alive: f64,

    /// Maximum length of the request line in bytes (0 = unlimited; above 8190 means 8190). Longer: 400.
    #[arg(
        long = "limit-request-line",
        default_value_t = 4094,
        value_name = "INT",
        allow_negative_numbers = true
    )]
    pub limit_request_line: i64,

    /// Maximum number of header fields in a request (0 or above 32768 means 32768). More: 431.
    #[arg(
        long = "limit-request-fields",
        default_value_t = 100,
        value_name = "INT",
        allow_negative_numbers = true
    )]
    pub limit_request_fields: i64,

    /// Maximum size of one header line, `name: value`, in bytes (0 = unlimited). Larger: 431.
    #[arg(
        long = "limit-request-field_size",
        alias = "limit-request-field-size",
        default_value_t = 8190,
        value_name = "INT",
        allow_negative_numbers = true
    )]
    pub limit_request_field_size: i64,

    /// Largest request body an app is given, e.g. `100MiB` (0 = unlimited). A larger declared
    /// body is answered 413; a chunked one is cut at the limit.
    #[arg(long = "limit-request-body", default_value = "0", value_name = "SIZE", value_parser = parse_size)]
    pub limit_request_body: u64,

    /// A host the app may call over HTTP (`wasi:http/outgoing-handler`): `api.example.com`,
    /// `*.example.com`, or with a port, `127.0.0.1:9000`. Repeatable; none by default, and a
    /// call elsewhere is refused before any connection is made.
    #[arg(long = "allow-outbound", value_name = "HOST")]
    pub allow_outbound: Vec<String>,

    /// Seconds an outbound request may take to connect (and to wait for a free connection).
    #[arg(long = "outbound-connect-timeout", default_value = "10", value_name = "SECONDS", value_parser = parse_seconds)]
    pub outbound_connect_timeout: f64,

    /// Seconds an outbound request may wait for the upstream's response to begin.
    /// 0 = until the request's --timeout.
    #[arg(long = "outbound-timeout", default_value = "0", value_name = "SECONDS", value_parser = parse_seconds)]
    pub outbound_timeout: f64,

    /// Outbound connections open at once per app in a worker; further calls wait.
    #[arg(
        long = "outbound-connections",
        default_value_t = 50,
        value_name = "INT"
    )]
    pub outbound_connections: usize,

    /// Where the Prometheus metrics (`/metrics`) and `/healthz` are served, e.g. `127.0.0.1:9100`.
    /// Off unless set.
    #[arg(long = "metrics-bind", value_name = "ADDRESS")]
    pub metrics_bind: Option<String>,

    /// Peers trusted to set X-Forwarded-Proto/-Host/-For: comma-separated IPs or CIDR networks, `*` for all.
    #[arg(
        long = "forwarded-allow-ips",
        env = "FORWARDED_ALLOW_IPS",
        default_value = "127.0.0.1,::1",
        value_name = "LIST"
    )]
    pub forwarded_allow_ips: String,

    /// Cap on one guest instance's linear memory (all its memories together), e.g. `16MiB`, `1GiB`.
    #[arg(long = "memory-limit", default_value = DEFAULT_MEMORY_LIMIT, value_name = "SIZE", value_parser = parse_size)]
    pub memory_limit: u64,

    /// The most memory the whole host may use: a configuration whose worst case exceeds it is
    /// refused at start with the arithmetic (e.g. `512MiB`).
    #[arg(long = "memory-budget", value_name = "SIZE", value_parser = parse_size)]
    pub memory_budget: Option<u64>,

    /// Encryptions running at once across all workers; further calls wait (the seed's
    /// `BoundedSemaphore(4)`, host-wide).
    #[arg(long = "encrypt-concurrency", default_value_t = 4, value_name = "INT")]
    pub encrypt_concurrency: u32,

    /// Where the host keeps its data (the generated master key, …).
    /// Default: `$XDG_DATA_HOME/host` or `~/.local/share/host`.
    #[arg(long = "data-dir", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// A file holding the 32-byte master key that wraps data keys (raw, or 64 hex digits).
    /// Default: `<data-dir>/master.key`, generated with mode 0600 on first use.
    #[arg(long = "master-key-file", value_name = "FILE")]
    pub master_key_file: Option<PathBuf>,

    /// The master key as 64 hex digits: meant for `HOST_MASTER_KEY`; never printed.
    #[arg(long = "master-key", hide = true, value_name = "HEX")]
    pub master_key: Option<String>,

    /// The PostgreSQL database (`postgres://…`) that holds the host's state and its apps' SQL,
    /// a schema and a role per app. Default: `$DATABASE_URL`, else SQLite files under --data-dir.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,

    /// Seconds a request waits for a database connection before it gets an `unavailable` error
    /// (sqlx's acquire timeout; it also bounds a connection attempt).
    #[arg(long = "database-timeout", default_value = "30", value_name = "SECONDS", value_parser = parse_seconds)]
    pub database_timeout: f64,

    /// Where apps' objects are stored: `local` (under --data-dir), a directory, or
    /// `s3://BUCKET[/PREFIX]` (credentials from the AWS environment variables or profile).
    #[arg(long, default_value = "local", value_name = "LOCATION")]
    pub storage: String,

    /// The S3 API's endpoint, for S3-compatible services (Wasabi, R2, MinIO, …).
    #[arg(long = "s3-endpoint", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// The S3 region. Default: `$AWS_REGION`, else us-east-1.
    #[arg(long = "s3-region", value_name = "REGION")]
    pub s3_region: Option<String>,

    /// Address buckets by path (`endpoint/bucket/key`) rather than by host name.
    #[arg(long = "s3-path-style")]
    pub s3_path_style: bool,

    /// A part held whole (checked before a download passes it on, or kept for an S3 retry) stays
    /// in memory up to this size, in a temporary file beyond it. At most
    /// --encrypt-concurrency parts are held in memory at once across the host.
    #[arg(long = "part-buffer", default_value = "16MiB", value_name = "SIZE", value_parser = parse_size)]
    pub part_buffer: u64,

    /// The most disk the part buffers' temporary files (under <data-dir>/tmp) take at once,
    /// across the host (at most 32767MiB); a part that finds no room is refused, not queued.
    #[arg(long = "spill-limit", default_value = "1GiB", value_name = "SIZE", value_parser = parse_size)]
    pub spill_limit: u64,

    /// debug, info, warning, error or critical.
    #[arg(long = "log-level", default_value = "info", value_name = "LEVEL")]
    pub log_level: LogLevel,

    /// Where the error log goes: a file path, or `-` for stderr.
    #[arg(
        long = "error-logfile",
        alias = "log-file",
        default_value = "-",
        value_name = "FILE"
    )]
    pub error_logfile: String,

    /// Where the access log goes: a file path, or `-` for stdout. Off unless set.
    #[arg(long = "access-logfile", value_name = "FILE")]
    pub access_logfile: Option<String>,

    /// The access log format, with gunicorn's `%(x)s` atoms.
    #[arg(long = "access-logformat", default_value = DEFAULT_ACCESS_LOG_FORMAT, value_name = "FORMAT")]
    pub access_logformat: String,

    /// Where compiled components are cached. Default: `$XDG_CACHE_HOME/host` or `~/.cache/host`.
    #[arg(long = "cache-dir", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerClass {
    Sync,
    Gthread,
    Gevent,
    Eventlet,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
    Critical,
}

impl WorkerClass {
    pub fn name(self) -> &'static str {
        match self {
            WorkerClass::Sync => "sync",
            WorkerClass::Gthread => "gthread",
            WorkerClass::Gevent => "gevent",
            WorkerClass::Eventlet => "eventlet",
        }
    }
}

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BindAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for BindAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindAddress::Tcp(addr) => write!(f, "http://{addr}"),
            BindAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The validated settings the master and its workers run with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// The apps served: the one component of `host serve COMPONENT.wasm`, or the `[[app]]`
    /// entries of the config file. The per-app fields below are their defaults.
    pub apps: Vec<crate::apps::AppSettings>,
    pub workers: usize,
    pub worker_class: WorkerClass,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub worker_tmp_dir: PathBuf,
    pub pidfile: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// Hook event → shell command, from the config file.
    pub hooks: std::collections::BTreeMap<String, String>,
    pub binds: Vec<BindAddress>,
    pub backlog: u32,
    pub reuse_port: bool,
    /// Guest instances running at once in one worker.
    pub concurrency: usize,
    /// Requests that may wait for a free instance slot in one worker.
    pub queue_limit: usize,
    /// Connections one worker holds open at once.
    pub max_connections: usize,
    pub timeout: Option<Duration>,
    pub graceful_timeout: Duration,
    pub keep_alive: Option<Duration>,
    pub request_limits: RequestLimits,
    pub body_limit: Option<u64>,
    pub outbound: crate::apps::Outbound,
    pub metrics_bind: Option<SocketAddr>,
    pub trusted_peers: TrustedPeers,
    pub memory_limit: u64,
    pub memory_budget: Option<u64>,
    pub encrypt_concurrency: u32,
    pub data_dir: PathBuf,
    pub master_key_file: Option<PathBuf>,
    /// The master key (hex): given, or resolved by the master before it starts workers.
    pub master_key: Option<String>,
    /// The System V semaphores of the host-wide bounds, made by the master.
    pub host_slots: Option<i32>,
    pub database_url: Option<String>,
    pub database_timeout: Duration,
    pub storage: Storage,
    pub s3: S3Settings,
    pub part_buffer: u64,
    pub spill_limit: u64,
    pub log_level: LogLevel,
    pub error_logfile: String,
    pub access_logfile: Option<String>,
    pub access_logformat: String,
    pub cache_dir: PathBuf,
}

impl Settings {
    pub fn from_args(args: ServeArgs) -> Result<Settings> {
        let binds = if args.bind.is_empty() {
            vec![default_bind()?]
        } else {
            args.bind
                .iter()
                .map(|b| parse_bind(b))
                .collect::<Result<Vec<_>>>()?
        };
        for (flag, count) in [
            ("--workers", args.workers),
            ("--threads", args.threads),
            ("--worker-connections", args.worker_connections),
            ("--max-connections", args.max_connections),
            ("--outbound-connections", args.outbound_connections),
            ("--encrypt-concurrency", args.encrypt_concurrency as usize),
        ] {
            if count == 0 {
                bail!("{flag} must be at least 1");
            }
            if count > MAX_COUNT {
                bail!("{flag} {count} is more than the {MAX_COUNT} a host can hold");
            }
        }
        // gunicorn: the sync class with more than one thread is the gthread class.
        let worker_class = match args.worker_class {
            WorkerClass::Sync if args.threads > 1 => WorkerClass::Gthread,
            class => class,
        };
        let concurrency = match args.worker_class {
            WorkerClass::Sync if args.threads > 1 => args.threads,
            WorkerClass::Sync => 1,
            WorkerClass::Gthread => args.threads,
            WorkerClass::Gevent | WorkerClass::Eventlet => args.worker_connections,
        };
        let memory_limit = args.memory_limit;
        if memory_limit < 64 * 1024 {
            bail!(
                "--memory-limit must be at least 64KiB (one WebAssembly page), got {memory_limit} bytes"
            );
        }
        if args.encrypt_concurrency > MAX_SEMAPHORE_UNITS {
            bail!(
                "--encrypt-concurrency {} is more than the host-wide semaphore counts ({MAX_SEMAPHORE_UNITS})",
                args.encrypt_concurrency
            );
        }
        if memory_limit > MAX_MEMORY_LIMIT {
            bail!(
                "--memory-limit {} is more than a WebAssembly memory can hold (4GiB)",
                human_size(memory_limit)
            );
        }
        if args.spill_limit < 1 << 20 || args.spill_limit > u64::from(MAX_SPILL_MIB) << 20 {
            bail!(
                "--spill-limit must be from 1MiB to {MAX_SPILL_MIB}MiB, got {} bytes",
                args.spill_limit
            );
        }
        if let Some(key) = &args.master_key {
            let key = key.trim();
            if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!(
                    "--master-key (HOST_MASTER_KEY) must be 64 hex digits (32 bytes), got {} characters",
                    key.chars().count()
                );
            }
        }
        let metrics_bind = match &args.metrics_bind {
            Some(text) => match parse_bind(text).context("invalid --metrics-bind")? {
                BindAddress::Tcp(addr) => Some(addr),
                BindAddress::Unix(_) => bail!("--metrics-bind takes HOST:PORT, not a unix socket"),
            },
            None => None,
        };
        Ok(Settings {
            apps: Vec::new(),
            workers: args.workers,
            worker_class,
            max_requests: args.max_requests,
            max_requests_jitter: args.max_requests_jitter,
            worker_tmp_dir: args.worker_tmp_dir.unwrap_or_else(default_worker_tmp_dir),
            pidfile: args.pidfile,
            env: args.env,
            hooks: Default::default(),
            binds,
            backlog: args.backlog,
            reuse_port: args.reuse_port,
            concurrency,
            queue_limit: args.worker_connections,
            max_connections: args.max_connections,
            timeout: seconds_or_off(args.timeout),
            graceful_timeout: Duration::from_secs_f64(args.graceful_timeout),
            keep_alive: seconds_or_off(args.keep_alive),
            request_limits: RequestLimits::gunicorn(
                args.limit_request_line,
                args.limit_request_fields,
                args.limit_request_field_size,
            ),
            body_limit: (args.limit_request_body > 0).then_some(args.limit_request_body),
            outbound: crate::apps::Outbound {
                allowed_hosts: crate::apps::lowercase(args.allow_outbound),
                connect_timeout: Duration::from_secs_f64(args.outbound_connect_timeout.max(0.001)),
                first_byte_timeout: seconds_or_off(args.outbound_timeout),
                connections: args.outbound_connections,
            },
            metrics_bind,
            trusted_peers: TrustedPeers::parse(&args.forwarded_allow_ips)
                .context("invalid --forwarded-allow-ips")?,
            memory_limit,
            memory_budget: args.memory_budget,
            encrypt_concurrency: args.encrypt_concurrency,
            data_dir: match args.data_dir {
                Some(dir) => dir,
                None => default_data_dir()?,
            },
            master_key_file: args.master_key_file,
            master_key: args.master_key,
            host_slots: None,
            database_url: args.database_url.filter(|url| !url.is_empty()),
            database_timeout: Duration::from_secs_f64(args.database_timeout.max(0.1)),
            storage: Storage::parse(&args.storage)?,
            s3: S3Settings {
                endpoint: args.s3_endpoint,
                region: args.s3_region,
                path_style: args.s3_path_style,
            },
            part_buffer: args.part_buffer,
            spill_limit: args.spill_limit,
            log_level: args.log_level,
            error_logfile: args.error_logfile,
            access_logfile: args.access_logfile,
            access_logformat: args.access_logformat,
            cache_dir: match args.cache_dir {
                Some(dir) => dir,
                None => default_cache_dir()?,
            },
        })
    }
}

/// The most a System V semaphore counts (`SEMVMX`): the host-wide slots and the MiB of
/// `--spill-limit` are counted by them.
pub const MAX_SEMAPHORE_UNITS: u32 = 32767;

/// `--spill-limit` is counted in MiB by a System V semaphore.
const MAX_SPILL_MIB: u32 = MAX_SEMAPHORE_UNITS;

fn seconds_or_off(seconds: f64) -> Option<Duration> {
    (seconds > 0.0).then(|| Duration::from_secs_f64(seconds))
}

fn default_bind() -> Result<BindAddress> {
    match std::env::var("PORT") {
        Ok(port) => {
            let port: u16 = port
                .trim()
                .parse()
                .with_context(|| format!("PORT must be a port number, got {port:?}"))?;
            Ok(BindAddress::Tcp(SocketAddr::from(([0, 0, 0, 0], port))))
        }
        Err(_) => Ok(BindAddress::Tcp(SocketAddr::from(([127, 0, 0, 1], 8000)))),
    }
}

pub fn parse_bind(text: &str) -> Result<BindAddress> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            bail!("--bind {text:?}: a unix socket needs a path, as in unix:/run/host.sock");
        }
        return Ok(BindAddress::Unix(PathBuf::from(path)));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(BindAddress::Tcp(addr));
    }
    // gunicorn accepts a bare host (port 8000) and names such as localhost.
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => (host, port),
        _ => (text, "8000"),
    };
    let port: u16 = port.parse().with_context(|| {
        format!("--bind {text:?}: expected HOST:PORT, [IPV6]:PORT or unix:PATH")
    })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("--bind {text:?}: cannot resolve {host:?}"))?
        .next()
        .map(BindAddress::Tcp)
        .with_context(|| format!("--bind {text:?}: {host:?} has no address"))
}

/// gunicorn advises a tmpfs for heartbeat files, so a heartbeat never waits on a disk.
fn default_worker_tmp_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    let is_tmpfs = std::fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            line.split_whitespace().nth(1) == Some("/dev/shm") && line.contains("tmpfs")
        })
    });
    if is_tmpfs { shm } else { std::env::temp_dir() }
}

pub(crate) fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

fn default_data_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("host"));
    }
    let home =
        std::env::var_os("HOME").context("neither --data-dir, XDG_DATA_HOME nor HOME is set")?;
    Ok(PathBuf::from(home)
        .join(".local")
        .join("share")
        .join("host"))
}

fn default_cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("host"));
    }
    let home =
        std::env::var_os("HOME").context("neither --cache-dir, XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("host"))
}

/// The longest duration a setting takes: about 31 years, so that a deadline computed from it
/// (`now + timeout`) never overflows, which would panic where it is computed.
const MAX_SECONDS: f64 = 1e9;

fn parse_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of seconds such as 30 or 0.5, got {text:?}"))?;
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!(
            "expected a non-negative number of seconds, got {text:?}"
        ));
    }
    if seconds > MAX_SECONDS {
        return Err(format!(
            "expected at most {MAX_SECONDS} seconds (about 31 years; 0 is off), got {text:?}"
        ));
    }
    Ok(seconds)
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let size = text
        .trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| format!("expected a size such as 16MiB, 512MB or 1GiB, got {text:?}"))?;
    // bytesize saturates a size past u64 at its largest value, which would be read as a
    // limit of 16 EiB.
    if size == u64::MAX {
        return Err(format!("{text:?} is past the largest size, 16 EiB"));
    }
    Ok(size)
}

/// A size as people write it: `16 MiB` when it is a whole number of MiB.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) && (unit > 1 << 10 || bytes < 1 << 20) {
            return format!("{} {name}", bytes / unit);
        }
    }
    for (unit, name) in UNITS {
        if bytes >= unit {
            return format!("{:.1} {name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes} bytes")
}

/// A database URL fit for a log line: the password replaced.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_and_print_as_people_write_them() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64MB"), Ok(64_000_000));
        assert!(parse_size("lots").is_err());
        // Past u64 bytesize saturates; that must not read as a 16 EiB limit.
        assert!(parse_size("99999999EiB").is_err());
        assert_eq!(human_size(16 << 20), "16 MiB");
        assert_eq!(human_size(3 << 29), "1536 MiB");
        assert_eq!(human_size(16512 << 10), "16.1 MiB");
        assert_eq!(human_size(18812 << 10), "18.4 MiB");
        assert_eq!(human_size(512 << 10), "512 KiB");
    }

    #[test]
    fn seconds_past_31_years_are_refused_rather_than_overflowing_a_deadline() {
        assert_eq!(parse_seconds("1e9"), Ok(1e9));
        assert!(parse_seconds("1e19").is_err());
        assert!(parse_seconds("1e20").is_err());
        assert!(parse_seconds("inf").is_err());
    }

    /// `Settings::from_args` of `host serve x.wasm` with `extra`: the refusal, if any.
    fn refusal(extra: &[&str]) -> Option<String> {
        use clap::FromArgMatches;
        let matches = crate::config::settings_table()
            .try_get_matches_from(["x.wasm"].iter().chain(extra))
            .expect("the arguments parse");
        let args = ServeArgs::from_arg_matches(&matches).expect("serve arguments");
        Settings::from_args(args)
            .err()
            .map(|error| error.to_string())
    }

    #[test]
    fn counts_and_limits_past_what_the_host_can_hold_are_refused() {
        assert_eq!(refusal(&[]), None);
        let refused = refusal(&["--outbound-connections", "2305843009213693952"]);
        assert!(refused.is_some_and(|r| r.contains("--outbound-connections")));
        assert!(refusal(&["--threads", "0"]).is_some_and(|r| r.contains("at least 1")));
        let refused = refusal(&["--encrypt-concurrency", "40000"]);
        assert!(refused.is_some_and(|r| r.contains("semaphore")));
        assert_eq!(refusal(&["--encrypt-concurrency", "32767"]), None);
        let refused = refusal(&["--memory-limit", "5GiB"]);
        assert!(refused.is_some_and(|r| r.contains("4GiB")));
        let refused = refusal(&["--master-key", "sync"]);
        assert!(refused.is_some_and(|r| r.contains("--master-key")));
    }

    #[test]
    fn binds_take_gunicorn_forms() {
        assert_eq!(
            parse_bind("127.0.0.1:9000").unwrap(),
            BindAddress::Tcp("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(
            parse_bind("[::1]:9000").unwrap(),
            BindAddress::Tcp("[::1]:9000".parse().unwrap())
        );
        assert_eq!(
            parse_bind("unix:/tmp/x.sock").unwrap(),
            BindAddress::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            parse_bind("127.0.0.1").unwrap(),
            BindAddress::Tcp("127.0.0.1:8000".parse().unwrap())
        );
        assert!(parse_bind("unix:").is_err());
    }
}
