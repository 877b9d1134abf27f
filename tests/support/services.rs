//! A host on chosen backends (SQLite or PostgreSQL, local or S3 storage) with the services
//! behind it.

use super::*;

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
