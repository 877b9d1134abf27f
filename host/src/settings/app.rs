//! The settings of one app: the group of flags an `[[app]]` entry may override (`AppArgs`,
//! flattened into `host serve`'s arguments), their validated form (`AppSettings`, the host's
//! defaults and each app's own), and the app itself (`App`: its name, routes, grants and
//! environment beside its settings).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::storage::{S3Settings, Storage};
use super::values::{check_count, human_size, parse_seconds, parse_size, seconds_or_off};
use crate::http::limits::RequestLimits;

/// The default cap on one guest instance's linear memory.
pub const DEFAULT_MEMORY_LIMIT: &str = "128MiB";

/// A 32-bit WebAssembly memory holds at most 65,536 pages of 64 KiB.
const MAX_MEMORY_LIMIT: u64 = 4 << 30;

/// The settings an app may override: each one here is a flag of `host serve`, a `HOST_*`
/// variable, a config file key and an `[[app]]` key.
#[derive(clap::Args, Debug, Clone)]
pub struct AppArgs {
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

    /// Seconds a request's guest may run before it is stopped and the client gets 504. 0 = no limit.
    #[arg(short = 't', long, default_value = "30", value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: f64,

    /// Cap on one guest instance's linear memory (all its memories together), e.g. `16MiB`, `1GiB`.
    #[arg(long = "memory-limit", default_value = DEFAULT_MEMORY_LIMIT, value_name = "SIZE", value_parser = parse_size)]
    pub memory_limit: u64,

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

    /// The PostgreSQL database (`postgres://…`) that holds the host's state and its apps' SQL,

    /// a schema and a role per app. Default: `$DATABASE_URL`, else SQLite files under --data-dir.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,

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

    /// Requests one guest instance serves, one after another, before it is dropped: 1 = a fresh
    /// instance for every request (the strongest isolation), 0 = no limit. gunicorn's
    /// --max-requests, for instances.
    #[arg(
        long = "instance-max-requests",
        default_value_t = 1,
        value_name = "INT"
    )]
    pub instance_max_requests: u64,

    /// Adds a random 0..=N to --instance-max-requests per instance, so that instances are not
    /// all replaced at once.
    #[arg(
        long = "instance-max-requests-jitter",
        default_value_t = 0,
        value_name = "INT"
    )]
    pub instance_max_requests_jitter: u64,

    /// Seconds a kept instance waits for its next request before it is dropped. 0 = no limit.
    #[arg(long = "instance-idle-timeout", default_value = "60", value_name = "SECONDS", value_parser = parse_seconds)]
    pub instance_idle_timeout: f64,

    /// Requests a kept WASIp3 instance serves at once (a p2 instance serves one at a time).
    #[arg(long = "instance-concurrency", default_value_t = 1, value_name = "INT")]
    pub instance_concurrency: usize,
}

impl AppArgs {
    /// The names of these settings, as config file keys.
    pub fn names() -> Vec<String> {
        use clap::Args;
        AppArgs::augment_args(clap::Command::new("app"))
            .get_arguments()
            .map(|arg| arg.get_id().as_str().to_owned())
            .collect()
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerClass {
    Sync,
    Gthread,
    Gevent,
    Eventlet,
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

/// The validated settings of one app, as its workers run it; the host's are every app's
/// defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppSettings {
    pub worker_class: WorkerClass,
    /// Instances of the app running at once in one worker.
    pub concurrency: usize,
    /// Requests for the app that may wait for one of its instances, per worker.
    pub queue_limit: usize,
    pub timeout: Option<Duration>,
    pub memory_limit: u64,
    pub request_limits: RequestLimits,
    pub body_limit: Option<u64>,
    pub storage: Storage,
    pub s3: S3Settings,
    pub database_url: Option<String>,
    pub outbound: Outbound,
    pub reuse: InstanceReuse,
}

/// How an app's instances are kept between requests.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct InstanceReuse {
    /// Requests an instance serves before it is dropped; `None` = no limit.
    pub max_requests: Option<u64>,
    pub max_requests_jitter: u64,
    pub idle_timeout: Option<Duration>,
    /// Requests a p3 instance serves at once.
    pub concurrency: usize,
}

impl InstanceReuse {
    /// Whether an instance ever serves a second request.
    pub fn keeps_instances(&self) -> bool {
        self.max_requests != Some(1) || self.max_requests_jitter > 0
    }
}

impl AppSettings {
    pub fn from_args(args: AppArgs) -> Result<AppSettings> {
        for (flag, count) in [
            ("--threads", args.threads),
            ("--worker-connections", args.worker_connections),
            ("--outbound-connections", args.outbound_connections),
            ("--instance-concurrency", args.instance_concurrency),
        ] {
            check_count(flag, count)?;
        }
        // gunicorn: the sync class with more than one thread is the gthread class.
        let worker_class = match args.worker_class {
            WorkerClass::Sync if args.threads > 1 => WorkerClass::Gthread,
            class => class,
        };
        let concurrency = match worker_class {
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
        if memory_limit > MAX_MEMORY_LIMIT {
            bail!(
                "--memory-limit {} is more than a WebAssembly memory can hold (4GiB)",
                human_size(memory_limit)
            );
        }
        Ok(AppSettings {
            worker_class,
            concurrency,
            queue_limit: args.worker_connections,
            timeout: seconds_or_off(args.timeout),
            memory_limit,
            request_limits: RequestLimits::gunicorn(
                args.limit_request_line,
                args.limit_request_fields,
                args.limit_request_field_size,
            ),
            body_limit: (args.limit_request_body > 0).then_some(args.limit_request_body),
            storage: Storage::parse(&args.storage)?,
            s3: S3Settings {
                endpoint: args.s3_endpoint,
                region: args.s3_region,
                path_style: args.s3_path_style,
            },
            database_url: args.database_url.filter(|url| !url.is_empty()),
            outbound: Outbound {
                allowed_hosts: lowercase(args.allow_outbound),
                connect_timeout: Duration::from_secs_f64(args.outbound_connect_timeout.max(0.001)),
                first_byte_timeout: seconds_or_off(args.outbound_timeout),
                connections: args.outbound_connections,
            },
            reuse: InstanceReuse {
                max_requests: (args.instance_max_requests > 0)
                    .then_some(args.instance_max_requests),
                max_requests_jitter: args.instance_max_requests_jitter,
                idle_timeout: seconds_or_off(args.instance_idle_timeout),
                concurrency: args.instance_concurrency,
            },
        })
    }
}

/// Declares the capabilities once: the enum, `ALL` and each one's name come from one list, so a
/// capability added here is grantable at once, and the linker's exhaustive match in
/// `capabilities::add_to_linker` fails to compile until it is linked.
macro_rules! capabilities {
    ($($variant:ident => $name:literal,)*) => {
        /// The host capabilities an app can be granted, by their WIT interface names.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum Capability {
            $($variant,)*
        }

        impl Capability {
            pub const ALL: &[Capability] = &[$(Capability::$variant,)*];

            /// The name in the config file, which is the interface's name in `wit/`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Capability::$variant => $name,)*
                }
            }
        }
    };
}

capabilities! {
    Crypto => "crypto",
    HmacRegistry => "hmac-registry",
    Objects => "objects",
    Sql => "sql",
    Status => "status",
}

impl Capability {
    pub fn parse(text: &str) -> Result<Capability> {
        Capability::ALL
            .iter()
            .copied()
            .find(|capability| capability.name() == text)
            .with_context(|| {
                let names: Vec<&str> = Capability::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown capability `{text}`; the capabilities are: {}",
                    names.join(", ")
                )
            })
    }

    /// The capability a component import (`host:capabilities/sql@0.1.0`) names, if any.
    pub fn of_import(import: &str) -> Option<Capability> {
        let interface = import.strip_prefix("host:capabilities/")?;
        let interface = interface.split('@').next()?;
        Capability::ALL
            .iter()
            .copied()
            .find(|capability| capability.name() == interface)
    }
}

/// Which requests an app takes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Routes {
    /// `Host` names (`api.example.com`, `*.example.com`); empty = any host.
    pub hosts: Vec<String>,
    /// A path prefix (`/api`), taken off the path the app sees; `None` = every path.
    pub path: Option<String>,
    /// Takes the requests no other app's routes match.
    pub default: bool,
}

/// Outbound HTTP as granted to an app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outbound {
    pub allowed_hosts: Vec<String>,
    pub connect_timeout: Duration,
    /// How long the upstream may take to begin its response; `None` = the request's deadline.
    pub first_byte_timeout: Option<Duration>,
    pub connections: usize,
}

impl Outbound {
    /// Whether `authority` (`host` or `host:port`) is among the allowed hosts. An allowed host
    /// without a port allows any port.
    pub fn allows(&self, authority: &str) -> bool {
        let authority = authority.to_ascii_lowercase();
        let (host, port) = split_port(&authority);
        self.allowed_hosts.iter().any(|allowed| {
            let (allowed_host, allowed_port) = split_port(allowed);
            host_matches(allowed_host, host) && (allowed_port.is_none() || allowed_port == port)
        })
    }
}

/// What the master read of a component when it checked it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComponentVersion {
    /// SHA-256 of the file, hex: the name of its compiled artifact in the cache.
    pub digest: String,
    /// Whether it is a WASIp3 component, which the engine is configured for.
    pub serves_p3: bool,
    /// Bytes of linear memory it starts with (`engine::initial_memory`).
    pub initial_memory: u64,
}

/// One app, as its workers serve it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct App {
    /// Scopes its data: keys, objects, registry entries, database.
    pub name: String,
    pub component: PathBuf,
    /// The version of the component the master checked: workers load it even if the file has
    /// changed since (a new version is served only once a reload has checked it).
    pub version: Option<ComponentVersion>,
    pub routes: Routes,
    /// The environment the guest sees: the host's `-e` pairs, then the app's own.
    pub env: Vec<(String, String)>,
    /// Variable name → file whose contents become its value; read when a worker starts.
    pub secrets: Vec<(String, PathBuf)>,
    pub capabilities: BTreeSet<Capability>,
    pub settings: AppSettings,
}

impl App {
    /// An app granted every capability, with the host's environment and `settings`, and no
    /// route yet.
    pub fn new(
        name: String,
        component: PathBuf,
        env: Vec<(String, String)>,
        settings: AppSettings,
    ) -> App {
        App {
            name,
            component,
            version: None,
            routes: Routes::default(),
            env,
            secrets: Vec::new(),
            capabilities: Capability::ALL.iter().copied().collect(),
            settings,
        }
    }

    /// Reads the secret files into the guest's environment.
    pub fn guest_env(&self) -> Result<Vec<(String, String)>> {
        let mut env = self.env.clone();
        for (name, path) in &self.secrets {
            let value = std::fs::read_to_string(path).with_context(|| {
                format!(
                    "app `{}`: cannot read the secret {name} from {}",
                    self.name,
                    path.display()
                )
            })?;
            env.push((
                name.clone(),
                value.trim_end_matches(['\r', '\n']).to_owned(),
            ));
        }
        Ok(env)
    }
}

pub(crate) fn split_port(authority: &str) -> (&str, Option<&str>) {
    match authority.rsplit_once(':') {
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']')) =>
        {
            (host, Some(port))
        }
        _ => (authority, None),
    }
}

/// Host names as they are compared: in lower case, once.
pub fn lowercase(hosts: Vec<String>) -> Vec<String> {
    hosts
        .into_iter()
        .map(|host| host.to_ascii_lowercase())
        .collect()
}

/// `*.example.com` matches `a.example.com` and `b.a.example.com`, not `example.com`.
pub(crate) fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => pattern == host,
    }
}

/// An app's name scopes its data (a directory, a schema, metrics labels): 1 to 48 letters,
/// digits, `-`, `_` or `.`, not starting with a dot.
pub fn validate_name(name: &str) -> Result<()> {
    let fits = (1..=48).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !fits {
        bail!(
            "app name {name:?}: use 1 to 48 letters, digits, `-`, `_` or `.`, not starting with a dot (it names the app's data)"
        );
    }
    Ok(())
}

#[cfg(test)]
impl App {
    /// An app on the default settings with the given route.
    pub fn routed(name: &str, hosts: &[&str], path: Option<&str>, default: bool) -> App {
        use clap::FromArgMatches;
        let matches = super::ServeArgs::table()
            .try_get_matches_from(["x.wasm"])
            .expect("the defaults parse");
        let args = AppArgs::from_arg_matches(&matches).expect("app arguments");
        let settings = AppSettings::from_args(args).expect("the defaults are valid");
        let mut app = App::new(
            name.to_owned(),
            format!("{name}.wasm").into(),
            Vec::new(),
            settings,
        );
        app.routes = Routes {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            path: path.map(str::to_owned),
            default,
        };
        app
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The capabilities are the interfaces the capabilities world imports, no more, no fewer.
    #[test]
    fn the_capabilities_are_the_imports_of_the_wit_world() {
        let world = include_str!("../../../wit/world.wit");
        let mut imported: Vec<&str> = world
            .lines()
            .filter_map(|line| line.trim().strip_prefix("import "))
            .map(|name| name.trim_end_matches(';'))
            .collect();
        let mut names: Vec<&str> = Capability::ALL.iter().map(|c| c.name()).collect();
        imported.sort_unstable();
        names.sort_unstable();
        assert_eq!(names, imported);
    }

    #[test]
    fn outbound_hosts_match_names_wildcards_and_ports() {
        let mut outbound = App::routed("p", &[], None, true).settings.outbound;
        outbound.allowed_hosts = vec![
            "api.example.com".into(),
            "*.internal".into(),
            "127.0.0.1:9000".into(),
        ];
        assert!(outbound.allows("api.example.com"));
        assert!(outbound.allows("API.example.com:443"));
        assert!(outbound.allows("db.internal:8080"));
        assert!(outbound.allows("127.0.0.1:9000"));
        assert!(!outbound.allows("127.0.0.1:9001"));
        assert!(!outbound.allows("internal"));
        assert!(!outbound.allows("api.example.com.evil.org"));
    }
}
