//! The settings of `host serve`, with gunicorn's names, defaults and rules: declared once, as
//! clap arguments, in two groups: the host's own (`ServeArgs`) and those an app may override
//! (`app::AppArgs`, flattened into the host's). Every source of settings (command line,
//! environment, config file, `[[app]]` entries) is read through this one table.
//!
//! `Settings` is the validated, derived form the rest of the host works from (clamped limits,
//! the concurrency a worker class implies, …).

pub mod app;
pub mod storage;
mod values;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

pub use app::{App, AppArgs, AppSettings, Capability, ComponentVersion, Outbound};
pub use values::{MAX_SEMAPHORE_UNITS, human_size, parse_env_pair, redacted_url};

use crate::http::forwarded::TrustedPeers;
use values::{check_count, parse_seconds, parse_size, seconds_or_off};

/// gunicorn's default access log format.
pub const DEFAULT_ACCESS_LOG_FORMAT: &str =
    r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s""#;

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

    /// A worker whose private memory grew during a burst is replaced by a fresh one once it has
    /// had no connection open for this many seconds, which gives back all it took (0 = never).
    #[arg(long = "idle-recycle", default_value = "5", value_name = "SECONDS", value_parser = parse_seconds)]
    pub idle_recycle: f64,

    /// Where the workers' heartbeat files live. Default: /dev/shm if it is a tmpfs, else the temp dir.
    #[arg(long = "worker-tmp-dir", value_name = "DIR")]
    pub worker_tmp_dir: Option<PathBuf>,

    /// Compile the component in the master; workers map the compiled artifact. Always done;
    /// accepted for gunicorn compatibility.
    #[arg(long = "preload")]
    pub preload: bool,

    /// Watch each app's component, the config file and every `--reload-extra-file`; when one
    /// changes, load the new version and, if it loads, roll the workers as HUP does (a version
    /// that does not load leaves the old workers serving).
    #[arg(long = "reload")]
    pub reload: bool,

    /// Serve HTTPS on every TCP listener with this certificate (PEM, the chain after it).
    #[arg(long = "certfile", value_name = "FILE")]
    pub certfile: Option<PathBuf>,

    /// The certificate's private key (PEM). Default: the key in `--certfile`.
    #[arg(long = "keyfile", value_name = "FILE", requires = "certfile")]
    pub keyfile: Option<PathBuf>,

    /// The CA certificates (PEM) client certificates are checked against.
    #[arg(long = "ca-certs", value_name = "FILE", requires = "certfile")]
    pub ca_certs: Option<PathBuf>,

    /// Client certificates, as gunicorn's `ssl.CERT_*`: 0 not asked for, 1 checked if given,
    /// 2 required. 1 and 2 need `--ca-certs`.
    #[arg(long = "cert-reqs", default_value_t = 0, value_name = "INT",
          value_parser = clap::value_parser!(u8).range(0..=2))]
    pub cert_reqs: u8,

    /// Another file whose change reloads, with `--reload`. Repeatable.
    #[arg(long = "reload-extra-file", value_name = "FILE")]
    pub reload_extra_files: Vec<PathBuf>,

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

    /// Connections a worker holds open at once, across its apps and listeners; further clients
    /// wait in the listen backlog until one closes.
    #[arg(long = "max-connections", default_value_t = 1000, value_name = "INT")]
    pub max_connections: usize,

    /// Seconds in-flight requests get to finish after a stop signal.
    #[arg(long = "graceful-timeout", default_value = "30", value_name = "SECONDS", value_parser = parse_seconds)]
    pub graceful_timeout: f64,

    /// Seconds an idle keep-alive connection is kept open. 0 = close after every response.
    #[arg(long = "keep-alive", default_value = "2", value_name = "SECONDS", value_parser = parse_seconds)]
    pub keep_alive: f64,

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

    /// Seconds a request waits for a database connection before it gets an `unavailable` error
    /// (sqlx's acquire timeout; it also bounds a connection attempt).
    #[arg(long = "database-timeout", default_value = "30", value_name = "SECONDS", value_parser = parse_seconds)]
    pub database_timeout: f64,

    /// A part held whole (checked before a download passes it on, or kept for an S3 retry) stays
    /// in memory up to this size, in a temporary file beyond it. At most
    /// --encrypt-concurrency parts are held in memory at once across the host.
    #[arg(long = "part-buffer", default_value = "16MiB", value_name = "SIZE", value_parser = parse_size)]
    pub part_buffer: u64,

    /// The most disk the part buffers' temporary files (under <data-dir>/tmp) take at once,
    /// across the host (at most 32767MiB); a part that finds no room is refused, not queued.
    #[arg(long = "spill-limit", default_value = "1GiB", value_name = "SIZE", value_parser = parse_size)]
    pub spill_limit: u64,

    /// An upload no part has reached for this many seconds is aborted, its stored parts and its
    /// registry entry removed, as an S3 lifecycle rule does (for the local store too); 0 = never.
    #[arg(long = "upload-expiry", default_value = "86400", value_name = "SECONDS", value_parser = parse_seconds)]
    pub upload_expiry: f64,

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

    /// The settings an app may override in its `[[app]]` entry.
    #[command(flatten)]
    pub app: AppArgs,
}

impl ServeArgs {
    /// The table of settings: every source of settings is read as arguments of it.
    pub fn table() -> clap::Command {
        use clap::Args;
        ServeArgs::augment_args(clap::Command::new("serve"))
            .no_binary_name(true)
            .args_override_self(true)
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
    Critical,
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
    /// entries of the config file.
    pub apps: Vec<App>,
    /// Every app's settings but for what its `[[app]]` entry overrides.
    pub app: AppSettings,
    pub workers: usize,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// `--idle-recycle`: how long a grown worker waits without connections before it is replaced.
    pub idle_recycle: Option<Duration>,
    pub worker_tmp_dir: PathBuf,
    pub pidfile: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// HTTPS on the TCP listeners.
    pub tls: Option<TlsFiles>,
    /// `--reload`: the files whose change reloads, when it is on.
    pub reload: bool,
    pub reload_extra_files: Vec<PathBuf>,
    /// The config file the settings were read from, watched by `--reload`.
    pub config_file: Option<PathBuf>,
    /// Hook event → shell command, from the config file.
    pub hooks: std::collections::BTreeMap<String, String>,
    pub binds: Vec<BindAddress>,
    pub backlog: u32,
    pub reuse_port: bool,
    /// Connections one worker holds open at once.
    pub max_connections: usize,
    pub graceful_timeout: Duration,
    pub keep_alive: Option<Duration>,
    pub metrics_bind: Option<SocketAddr>,
    pub trusted_peers: TrustedPeers,
    pub memory_budget: Option<u64>,
    pub encrypt_concurrency: u32,
    pub data_dir: PathBuf,
    pub master_key_file: Option<PathBuf>,
    /// The master key as given (hex); the master settles the key workers use (`WorkerHandoff`).
    pub master_key: Option<String>,
    pub database_timeout: Duration,
    pub part_buffer: u64,
    pub spill_limit: u64,
    /// Abandoned uploads are removed after this long (`None`: never).
    pub upload_expiry: Option<Duration>,
    pub log_level: LogLevel,
    pub error_logfile: String,
    pub access_logfile: Option<String>,
    pub access_logformat: String,
    pub cache_dir: PathBuf,
}

/// The files of `--certfile`, `--keyfile` and `--ca-certs`, read by each worker as it starts
/// (so a HUP or a reload picks up renewed ones).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsFiles {
    pub certfile: PathBuf,
    pub keyfile: PathBuf,
    pub ca_certs: Option<PathBuf>,
    pub client_certs: ClientCerts,
}

/// `--cert-reqs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientCerts {
    None,
    Optional,
    Required,
}

impl TlsFiles {
    fn from_args(
        certfile: Option<PathBuf>,
        keyfile: Option<PathBuf>,
        ca_certs: Option<PathBuf>,
        cert_reqs: u8,
    ) -> Result<Option<TlsFiles>> {
        let client_certs = match cert_reqs {
            0 => ClientCerts::None,
            1 => ClientCerts::Optional,
            _ => ClientCerts::Required,
        };
        let Some(certfile) = certfile else {
            if client_certs != ClientCerts::None {
                bail!("--cert-reqs {cert_reqs} asks for client certificates: it needs --certfile");
            }
            return Ok(None);
        };
        if client_certs != ClientCerts::None && ca_certs.is_none() {
            bail!(
                "--cert-reqs {cert_reqs} needs --ca-certs, the CAs client certificates are checked against"
            );
        }
        Ok(Some(TlsFiles {
            keyfile: keyfile.unwrap_or_else(|| certfile.clone()),
            certfile,
            ca_certs,
            client_certs,
        }))
    }

    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.certfile, &self.keyfile]
            .into_iter()
            .chain(self.ca_certs.as_ref())
    }
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
            ("--max-connections", args.max_connections),
            ("--encrypt-concurrency", args.encrypt_concurrency as usize),
        ] {
            check_count(flag, count)?;
        }
        if args.encrypt_concurrency > MAX_SEMAPHORE_UNITS {
            bail!(
                "--encrypt-concurrency {} is more than the host-wide semaphore counts ({MAX_SEMAPHORE_UNITS})",
                args.encrypt_concurrency
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
            app: AppSettings::from_args(args.app)?,
            workers: args.workers,
            max_requests: args.max_requests,
            max_requests_jitter: args.max_requests_jitter,
            idle_recycle: seconds_or_off(args.idle_recycle),
            worker_tmp_dir: args.worker_tmp_dir.unwrap_or_else(default_worker_tmp_dir),
            pidfile: args.pidfile,
            env: args.env,
            tls: TlsFiles::from_args(args.certfile, args.keyfile, args.ca_certs, args.cert_reqs)?,
            reload: args.reload,
            reload_extra_files: args.reload_extra_files,
            config_file: None,
            hooks: Default::default(),
            binds,
            backlog: args.backlog,
            reuse_port: args.reuse_port,
            max_connections: args.max_connections,
            graceful_timeout: Duration::from_secs_f64(args.graceful_timeout),
            keep_alive: seconds_or_off(args.keep_alive),
            metrics_bind,
            trusted_peers: TrustedPeers::parse(&args.forwarded_allow_ips)
                .context("invalid --forwarded-allow-ips")?,
            memory_budget: args.memory_budget,
            encrypt_concurrency: args.encrypt_concurrency,
            data_dir: match args.data_dir {
                Some(dir) => dir,
                None => default_data_dir()?,
            },
            master_key_file: args.master_key_file,
            master_key: args.master_key,
            database_timeout: Duration::from_secs_f64(args.database_timeout.max(0.1)),
            part_buffer: args.part_buffer,
            spill_limit: args.spill_limit,
            upload_expiry: seconds_or_off(args.upload_expiry),
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

/// `--spill-limit` is counted in MiB by a System V semaphore.
const MAX_SPILL_MIB: u32 = MAX_SEMAPHORE_UNITS;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// `Settings::from_args` of `host serve x.wasm` with `extra`: the refusal, if any.
    fn refusal(extra: &[&str]) -> Option<String> {
        use clap::FromArgMatches;
        let matches = ServeArgs::table()
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

    /// The README's flag tables and its list of app settings follow the table of settings, so
    /// a setting added here fails this test until the README says what it is.
    #[test]
    fn the_readme_lists_every_setting_with_its_default() {
        let readme = include_str!("../../../README.md");
        let rows: Vec<&str> = readme
            .lines()
            .filter(|line| line.starts_with("| `"))
            .collect();
        for arg in ServeArgs::table().get_arguments() {
            let Some(long) = arg.get_long().filter(|_| !arg.is_hide_set()) else {
                continue;
            };
            let flag = format!("--{long}");
            let row = rows
                .iter()
                .find(|row| {
                    let first = row.split(" | ").next().unwrap_or_default();
                    first.contains(&format!("{flag} ")) || first.contains(&format!("{flag}`"))
                })
                .unwrap_or_else(|| panic!("the README's flag tables have no row for {flag}"));
            let takes_values = arg.get_action().takes_values();
            for default in arg.get_default_values().iter().filter(|_| takes_values) {
                let default = default.to_string_lossy();
                assert!(
                    long == "access-logformat" || row.contains(default.as_ref()),
                    "the README's row for {flag} does not give its default {default:?}: {row}"
                );
            }
        }
        // The list is the start of a paragraph, wrapped, up to its first sentence's end.
        let paragraph = readme
            .split("\n\n")
            .find_map(|text| text.strip_prefix("The settings an `[[app]]` entry may override: "))
            .expect("the README lists the app settings")
            .replace('\n', " ");
        let listed: Vec<String> = paragraph
            .split_once(". ")
            .map_or(paragraph.as_str(), |(list, _)| list)
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        assert_eq!(
            listed,
            AppArgs::names(),
            "the README's list of app settings differs from AppArgs"
        );
    }
}
