//! The apps one host serves: each with its component, its routes, its own limits and queue, the
//! capabilities it is granted and its data. `host serve app.wasm` is one app that takes every
//! request; `[[app]]` entries in the config file declare several.
//!
//! An app's settings are the host's, overridden by its entry: the entry's keys are read through
//! the same table of settings as every other source, so they take the same forms and get the
//! same messages.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hyper::Uri;
use serde::{Deserialize, Serialize};

use crate::config::ConfigFile;
use crate::http::limits::RequestLimits;
use crate::settings::Settings;
use crate::storage::{S3Settings, Storage};

/// Keys of an `[[app]]` entry that are host settings an app may override.
pub const APP_SETTINGS: [&str; 18] = [
    "memory_limit",
    "timeout",
    "worker_class",
    "threads",
    "worker_connections",
    "limit_request_line",
    "limit_request_fields",
    "limit_request_field_size",
    "limit_request_body",
    "storage",
    "s3_endpoint",
    "s3_region",
    "s3_path_style",
    "database_url",
    "allow_outbound",
    "outbound_connect_timeout",
    "outbound_timeout",
    "outbound_connections",
];

/// Keys of an `[[app]]` entry that only apps have.
const APP_KEYS: [&str; 8] = [
    "name",
    "component",
    "hosts",
    "path",
    "default",
    "capabilities",
    "env",
    "secrets",
];

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
    fn parse(text: &str) -> Result<Capability> {
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

/// One app, as its workers serve it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppSettings {
    /// Scopes its data: keys, objects, registry entries, database.
    pub name: String,
    pub component: PathBuf,
    pub routes: Routes,
    /// Instances of this app running at once in one worker.
    pub concurrency: usize,
    /// Requests for this app that may wait for one of its instances, per worker.
    pub queue_limit: usize,
    pub timeout: Option<Duration>,
    pub memory_limit: u64,
    pub request_limits: RequestLimits,
    pub body_limit: Option<u64>,
    /// The environment the guest sees: the host's `-e` pairs, then the app's own.
    pub env: Vec<(String, String)>,
    /// Variable name → file whose contents become its value; read when a worker starts.
    pub secrets: Vec<(String, PathBuf)>,
    pub capabilities: BTreeSet<Capability>,
    pub storage: Storage,
    pub s3: S3Settings,
    pub database_url: Option<String>,
    pub outbound: Outbound,
}

impl AppSettings {
    /// The app of `host serve COMPONENT.wasm`: named after the file, granted every capability,
    /// taking every request.
    pub fn single(component: PathBuf, host: &Settings) -> Result<AppSettings> {
        let name = component.file_stem().map_or_else(
            || "app".to_owned(),
            |stem| stem.to_string_lossy().into_owned(),
        );
        validate_name(&name).with_context(|| {
            format!(
                "{}: the app is named after the file; rename it, or declare it as an [[app]] with a `name`",
                component.display()
            )
        })?;
        let mut app = AppSettings::from_settings(name, component, host);
        app.routes.default = true;
        Ok(app)
    }

    /// An app with every per-app value taken from `settings`.
    fn from_settings(name: String, component: PathBuf, settings: &Settings) -> AppSettings {
        AppSettings {
            name,
            component,
            routes: Routes::default(),
            concurrency: settings.concurrency,
            queue_limit: settings.queue_limit,
            timeout: settings.timeout,
            memory_limit: settings.memory_limit,
            request_limits: settings.request_limits,
            body_limit: settings.body_limit,
            env: settings.env.clone(),
            secrets: Vec::new(),
            capabilities: Capability::ALL.iter().copied().collect(),
            storage: settings.storage.clone(),
            s3: settings.s3.clone(),
            database_url: settings.database_url.clone(),
            outbound: settings.outbound.clone(),
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

/// The `[[app]]` entries of the config file, each an app's own keys and its overrides of the
/// host's settings as arguments of the settings table.
pub struct Declaration<'a> {
    /// Keys with `-` spelled `_`, as everywhere in the config file.
    table: toml::Table,
    config_file: &'a Path,
}

pub fn declarations(config: Option<&ConfigFile>) -> Result<Vec<Declaration<'_>>> {
    let Some(ConfigFile { path, document }) = config else {
        return Ok(Vec::new());
    };
    let Some(apps) = document.get("app") else {
        return Ok(Vec::new());
    };
    let apps = apps
        .as_array()
        .with_context(|| format!("{}: apps are declared as [[app]] tables", path.display()))?;
    apps.iter()
        .map(|app| {
            let table = app
                .as_table()
                .with_context(|| format!("{}: each [[app]] must be a table", path.display()))?;
            Ok(Declaration {
                table: table
                    .iter()
                    .map(|(key, value)| (key.replace('-', "_"), value.clone()))
                    .collect(),
                config_file: path,
            })
        })
        .collect()
}

impl Declaration<'_> {
    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(text)) => Ok(Some(text.clone())),
            Some(other) => bail!("`{key}` must be a string, got {other}"),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(text)) => Ok(Some(vec![text.clone()])),
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(str::to_owned)
                        .with_context(|| format!("`{key}` must be a list of strings"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => bail!("`{key}` must be a list of strings, got {other}"),
        }
    }

    /// The app's overrides as arguments of the settings table.
    pub fn override_arguments(&self) -> Result<Vec<OsString>> {
        let table = crate::config::settings_table();
        let mut arguments = Vec::new();
        for (key, value) in &self.table {
            // `allow_outbound` replaces the host's list rather than adding to it: see `resolve`.
            if APP_KEYS.contains(&key.as_str()) || key == "allow_outbound" {
                continue;
            }
            let values = APP_SETTINGS
                .contains(&key.as_str())
                .then(|| crate::config::setting_arguments(&table, key, value))
                .transpose()?
                .flatten()
                .with_context(|| {
                    format!(
                        "`{key}` cannot be set per app; an [[app]] takes {} and the host settings {}",
                        APP_KEYS.join(", "),
                        APP_SETTINGS.join(", ")
                    )
                })?;
            arguments.extend(values);
        }
        Ok(arguments)
    }

    /// The app, from the host's settings with its overrides applied (`overridden`).
    pub fn resolve(&self, overridden: &Settings) -> Result<AppSettings> {
        let name = self
            .string("name")?
            .context("every [[app]] needs a `name`")?;
        validate_name(&name)?;
        let component = self
            .string("component")?
            .with_context(|| format!("app `{name}` needs a `component`"))?;
        let component = self.relative_to_config(&component);
        let mut app = AppSettings::from_settings(name.clone(), component, overridden);
        app.routes = Routes {
            hosts: lowercase(self.strings("hosts")?.unwrap_or_default()),
            path: match self.string("path")? {
                Some(path) => Some(normalized_prefix(&path)?),
                None => None,
            },
            default: match self.table.get("default") {
                None => false,
                Some(toml::Value::Boolean(default)) => *default,
                Some(other) => bail!("`default` must be true or false, got {other}"),
            },
        };
        if let Some(capabilities) = self.strings("capabilities")? {
            app.capabilities = capabilities
                .iter()
                .map(|text| Capability::parse(text))
                .collect::<Result<_>>()?;
        }
        if let Some(pairs) = self.strings("env")? {
            for pair in pairs {
                let (key, value) = crate::settings::parse_env_pair(&pair)
                    .map_err(|error| anyhow::anyhow!("`env`: {error}"))?;
                app.env.retain(|(existing, _)| *existing != key);
                app.env.push((key, value));
            }
        }
        if let Some(secrets) = self.table.get("secrets") {
            let secrets = secrets
                .as_table()
                .context("`secrets` must be a table of NAME = \"file\"")?;
            for (variable, file) in secrets {
                let file = file
                    .as_str()
                    .with_context(|| format!("secret {variable} must name a file"))?;
                app.secrets
                    .push((variable.clone(), self.relative_to_config(file)));
            }
        }
        // A list replaces the host's list: an app is granted exactly the hosts its entry names.
        if let Some(hosts) = self.strings("allow_outbound")? {
            app.outbound.allowed_hosts = lowercase(hosts);
        }
        Ok(app)
    }

    fn relative_to_config(&self, path: &str) -> PathBuf {
        let path = PathBuf::from(path);
        match self.config_file.parent() {
            Some(dir) if path.is_relative() && !dir.as_os_str().is_empty() => {
                let beside = dir.join(&path);
                // A path that exists from the working directory is taken as it is.
                if path.exists() { path } else { beside }
            }
            _ => path,
        }
    }
}

/// An app's name scopes its data (a directory, a schema, metrics labels): 1 to 48 letters,
/// digits, `-`, `_` or `.`, not starting with a dot.
fn validate_name(name: &str) -> Result<()> {
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

/// Checks the apps together: unique names, one default at most, no two apps on the same route.
pub fn validate(apps: &[AppSettings]) -> Result<()> {
    let mut names = BTreeSet::new();
    for app in apps {
        if !names.insert(app.name.as_str()) {
            bail!("two apps are named `{}`; names must be unique", app.name);
        }
    }
    let defaults: Vec<&str> = apps
        .iter()
        .filter(|app| app.routes.default)
        .map(|app| app.name.as_str())
        .collect();
    if defaults.len() > 1 {
        bail!(
            "more than one default app ({}); at most one app takes the requests no route matches",
            defaults.join(", ")
        );
    }
    for (index, app) in apps.iter().enumerate() {
        for other in &apps[index + 1..] {
            let same_hosts = app.routes.hosts == other.routes.hosts
                || app
                    .routes
                    .hosts
                    .iter()
                    .any(|host| other.routes.hosts.contains(host));
            if same_hosts && app.routes.path == other.routes.path {
                bail!(
                    "apps `{}` and `{}` have the same route (hosts {:?}, path {:?})",
                    app.name,
                    other.name,
                    app.routes.hosts,
                    app.routes.path
                );
            }
        }
        if app.routes.hosts.is_empty() && app.routes.path.is_none() && !app.routes.default {
            bail!(
                "app `{}` has no route: give it `hosts`, a `path`, or make it the `default`",
                app.name
            );
        }
    }
    Ok(())
}

/// `--print-config`: each app with its effective settings, as `[[app]]` tables.
pub fn print(apps: &[AppSettings]) {
    let seconds = |timeout: Option<Duration>| timeout.map_or(0.0, |t| t.as_secs_f64());
    let list = |items: &[String]| {
        let quoted: Vec<String> = items.iter().map(|item| format!("{item:?}")).collect();
        format!("[{}]", quoted.join(", "))
    };
    for app in apps {
        let capabilities: Vec<String> = app
            .capabilities
            .iter()
            .map(|capability| capability.name().to_owned())
            .collect();
        let env: Vec<String> = app.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!();
        println!("[[app]]");
        println!("name = {:?}", app.name);
        println!("component = {:?}", app.component.display().to_string());
        println!("hosts = {}", list(&app.routes.hosts));
        if let Some(path) = &app.routes.path {
            println!("path = {path:?}");
        }
        println!("default = {}", app.routes.default);
        println!("capabilities = {}", list(&capabilities));
        println!(
            "# {} instances at once per worker, {} more waiting",
            app.concurrency, app.queue_limit
        );
        println!("timeout = {}", seconds(app.timeout));
        println!(
            "memory_limit = {:?}",
            crate::settings::human_size(app.memory_limit)
        );
        if let Some(limit) = app.body_limit {
            println!("limit_request_body = {limit}");
        }
        println!("env = {}", list(&env));
        for (name, file) in &app.secrets {
            println!("# secret {name} from {}", file.display());
        }
        if let Some(url) = &app.database_url {
            println!("database_url = {:?}", crate::settings::redacted_url(url));
        }
        println!("storage = {:?}", app.storage.describe());
        println!("allow_outbound = {}", list(&app.outbound.allowed_hosts));
        println!(
            "outbound_connect_timeout = {}",
            app.outbound.connect_timeout.as_secs_f64()
        );
        println!(
            "outbound_timeout = {}",
            seconds(app.outbound.first_byte_timeout)
        );
        println!("outbound_connections = {}", app.outbound.connections);
    }
}

/// `/api/` and `api` are both the prefix `/api`.
fn normalized_prefix(path: &str) -> Result<String> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        bail!("`path = {path:?}`: a prefix such as \"/api\"; for every path leave `path` out");
    }
    if trimmed.contains(['?', '#']) {
        bail!("`path = {path:?}`: a prefix is a path, without a query");
    }
    Ok(format!("/{trimmed}"))
}

fn split_port(authority: &str) -> (&str, Option<&str>) {
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

/// `*.example.com` matches `a.example.com` and `b.a.example.com`, not `example.com`.
/// Host names as they are compared: in lower case, once.
pub fn lowercase(hosts: Vec<String>) -> Vec<String> {
    hosts
        .into_iter()
        .map(|host| host.to_ascii_lowercase())
        .collect()
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => pattern == host,
    }
}

/// Picks the app for a request: among the apps whose hosts match its `Host` (or that take any
/// host), the one with the longest path prefix that matches; else the default app.
pub struct Router {
    /// (hosts, path prefix, index of the app); hosts-specific routes first.
    routes: Vec<(Vec<String>, Option<String>, usize)>,
    default: Option<usize>,
}

/// Where a request goes: the app, and the prefix to take off its path.
pub struct Route<'a> {
    pub app: usize,
    pub prefix: Option<&'a str>,
}

impl Router {
    pub fn new(apps: &[AppSettings]) -> Router {
        let mut routes: Vec<_> = apps
            .iter()
            .enumerate()
            .filter(|(_, app)| !app.routes.hosts.is_empty() || app.routes.path.is_some())
            .map(|(index, app)| (app.routes.hosts.clone(), app.routes.path.clone(), index))
            .collect();
        // Named hosts before any-host routes, then longer prefixes before shorter ones.
        routes.sort_by_key(|(hosts, path, _)| {
            (
                hosts.is_empty(),
                std::cmp::Reverse(path.as_ref().map_or(0, String::len)),
            )
        });
        Router {
            routes,
            default: apps.iter().position(|app| app.routes.default),
        }
    }

    pub fn route(&self, host: Option<&str>, path: &str) -> Option<Route<'_>> {
        let host = host.map(|host| split_port(host).0.to_ascii_lowercase());
        for (hosts, prefix, app) in &self.routes {
            let host_ok = hosts.is_empty()
                || host
                    .as_deref()
                    .is_some_and(|host| hosts.iter().any(|pattern| host_matches(pattern, host)));
            let path_ok = prefix.as_deref().is_none_or(|prefix| {
                path.strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            });
            if host_ok && path_ok {
                return Some(Route {
                    app: *app,
                    prefix: prefix.as_deref(),
                });
            }
        }
        self.default.map(|app| Route { app, prefix: None })
    }
}

/// The request's URI with `prefix` taken off its path (`/api/users?x` → `/users?x`).
pub fn strip_prefix(uri: &Uri, prefix: &str) -> Option<Uri> {
    let path_and_query = uri.path_and_query()?.as_str();
    let rest = path_and_query.strip_prefix(prefix)?;
    let rest = if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_owned()
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(rest.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The capabilities are the interfaces the capabilities world imports, no more, no fewer.
    #[test]
    fn the_capabilities_are_the_imports_of_the_wit_world() {
        let world = include_str!("../../wit/world.wit");
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

    fn app(name: &str, hosts: &[&str], path: Option<&str>, default: bool) -> AppSettings {
        let mut app = AppSettings {
            name: name.to_owned(),
            component: PathBuf::from(format!("{name}.wasm")),
            routes: Routes {
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                path: path.map(str::to_owned),
                default,
            },
            concurrency: 1,
            queue_limit: 1,
            timeout: None,
            memory_limit: 1 << 20,
            request_limits: RequestLimits::gunicorn(0, 0, 0),
            body_limit: None,
            env: Vec::new(),
            secrets: Vec::new(),
            capabilities: BTreeSet::new(),
            storage: Storage::Local(None),
            s3: S3Settings::default(),
            database_url: None,
            outbound: Outbound {
                allowed_hosts: Vec::new(),
                connect_timeout: Duration::from_secs(1),
                first_byte_timeout: None,
                connections: 1,
            },
        };
        app.routes.default = default;
        app
    }

    #[test]
    fn routes_by_host_then_longest_prefix_then_default() {
        let apps = [
            app("site", &[], None, true),
            app("api", &[], Some("/api"), false),
            app("api-v2", &[], Some("/api/v2"), false),
            app("files", &["files.example.com"], None, false),
            app("tenants", &["*.tenants.example.com"], Some("/app"), false),
        ];
        validate(&apps).unwrap();
        let router = Router::new(&apps);
        let name = |host: Option<&str>, path: &str| {
            router
                .route(host, path)
                .map(|route| apps[route.app].name.clone())
        };
        assert_eq!(name(Some("x.org"), "/"), Some("site".into()));
        assert_eq!(name(Some("x.org"), "/api"), Some("api".into()));
        assert_eq!(name(Some("x.org"), "/api/users"), Some("api".into()));
        assert_eq!(name(Some("x.org"), "/apiary"), Some("site".into()));
        assert_eq!(name(Some("x.org"), "/api/v2/users"), Some("api-v2".into()));
        assert_eq!(
            name(Some("Files.Example.com:8080"), "/api"),
            Some("files".into())
        );
        assert_eq!(
            name(Some("a.tenants.example.com"), "/app/x"),
            Some("tenants".into())
        );
        assert_eq!(
            name(Some("tenants.example.com"), "/app/x"),
            Some("site".into())
        );
        let no_default = [app("api", &[], Some("/api"), false)];
        assert!(Router::new(&no_default).route(None, "/other").is_none());
    }

    #[test]
    fn prefixes_come_off_the_path() {
        let uri: Uri = "/api/users?x=1".parse().unwrap();
        assert_eq!(strip_prefix(&uri, "/api").unwrap(), "/users?x=1");
        let uri: Uri = "/api?x=1".parse().unwrap();
        assert_eq!(strip_prefix(&uri, "/api").unwrap(), "/?x=1");
        assert_eq!(normalized_prefix("api/").unwrap(), "/api");
        assert!(normalized_prefix("/").is_err());
    }

    #[test]
    fn outbound_hosts_match_names_wildcards_and_ports() {
        let mut outbound = app("p", &[], None, true).outbound;
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

    #[test]
    fn route_conflicts_and_defaults_are_refused() {
        let two_defaults = [app("a", &[], None, true), app("b", &[], None, true)];
        assert!(validate(&two_defaults).is_err());
        let same = [
            app("a", &[], Some("/x"), false),
            app("b", &[], Some("/x"), false),
        ];
        assert!(validate(&same).is_err());
        let unroutable = [app("a", &[], None, false)];
        assert!(validate(&unroutable).is_err());
    }
}
