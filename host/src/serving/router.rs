//! Which app a request goes to: by its `Host`, then by the longest path prefix, else the
//! default app.

use hyper::Uri;

use crate::settings::App;
use crate::settings::app::{host_matches, split_port};

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
    pub fn new(apps: &[App]) -> Router {
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

    #[test]
    fn routes_by_host_then_longest_prefix_then_default() {
        let apps = [
            App::routed("site", &[], None, true),
            App::routed("api", &[], Some("/api"), false),
            App::routed("api-v2", &[], Some("/api/v2"), false),
            App::routed("files", &["files.example.com"], None, false),
            App::routed("tenants", &["*.tenants.example.com"], Some("/app"), false),
        ];
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
        let no_default = [App::routed("api", &[], Some("/api"), false)];
        assert!(Router::new(&no_default).route(None, "/other").is_none());
    }

    #[test]
    fn prefixes_come_off_the_path() {
        let uri: Uri = "/api/users?x=1".parse().unwrap();
        assert_eq!(strip_prefix(&uri, "/api").unwrap(), "/users?x=1");
        let uri: Uri = "/api?x=1".parse().unwrap();
        assert_eq!(strip_prefix(&uri, "/api").unwrap(), "/?x=1");
    }
}
