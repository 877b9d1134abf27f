//! In-process tests of the capabilities: apps set up as a worker sets them up, over a temporary
//! data directory (SQLite files and the local object store, the defaults), and the bindings'
//! `Host` traits called directly on a `CapabilityView`, as a guest's calls reach them.
//!
//! Every app is made by `apps`, the one place that builds settings, so a change in how the
//! host is configured is made there only.

mod crypto;
mod database;
mod hmac_registry;
mod objects;
mod sql;
mod status;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::FromArgMatches;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::p2::DynInputStream;

use super::streams::{self, StreamCount};
use super::{AppCapabilities, CapabilityView, HostDatabases, RequestBounds};
use crate::settings::{ServeArgs, Settings};

/// The master key of every test host (64 hex digits, as `--master-key` takes it).
pub const MASTER_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// `MASTER_KEY` as the master hands it to workers.
fn master_key() -> [u8; 32] {
    let mut key = [0; 32];
    hex::decode_to_slice(MASTER_KEY, &mut key).expect("64 hex digits");
    key
}

/// The default `--memory-limit`, which the apps made here run with.
pub const MEMORY_LIMIT: u64 = 128 << 20;

/// One app of a test host, with the state of one of its instances.
pub struct Fixture {
    pub capabilities: Arc<AppCapabilities>,
    pub table: ResourceTable,
    pub streams: StreamCount,
    /// The bounds the next calls see; a test changes them (a deadline past, little memory).
    pub bounds: RequestBounds,
}

/// The apps `names` of one host whose data directory is `dir`: one database backend (SQLite
/// files under `dir`) and one local object store root, as the workers of a host share them.
pub async fn apps<const N: usize>(dir: &Path, names: [&str; N]) -> [Fixture; N] {
    let matches = ServeArgs::table()
        .try_get_matches_from([
            "app.wasm",
            "--data-dir",
            dir.to_str().expect("a UTF-8 temporary directory"),
            "--master-key",
            MASTER_KEY,
            "--storage",
            "local",
            "--memory-limit",
            "128MiB",
        ])
        .expect("the arguments parse");
    let args = ServeArgs::from_arg_matches(&matches).expect("serve arguments");
    let mut settings = Settings::from_args(args).expect("the settings are valid");
    // `DATABASE_URL` in the environment must not move the tests onto a server.
    settings.app.database_url = None;
    settings.apps = names
        .iter()
        .map(|name| {
            crate::config::apps::single(format!("{name}.wasm").into(), &settings)
                .with_context(|| format!("the app {name}"))
                .expect("a valid app name")
        })
        .collect();
    let mut host_databases = HostDatabases::default();
    let mut fixtures = Vec::with_capacity(N);
    for app in &settings.apps {
        // No host-wide semaphores: a test process has no master to make them.
        let capabilities =
            AppCapabilities::for_app(&settings, &master_key(), None, app, &mut host_databases)
                .await
                .expect("the app's capabilities are set up");
        fixtures.push(Fixture {
            capabilities,
            table: ResourceTable::new(),
            streams: StreamCount::default(),
            bounds: RequestBounds {
                deadline: None,
                memory_limit: app.settings.memory_limit,
                instance_memory: 1 << 20,
                memory_budget: settings.memory_budget,
            },
        });
    }
    fixtures
        .try_into()
        .unwrap_or_else(|_| unreachable!("one fixture per name"))
}

/// The one app `name` of a host whose data directory is `dir`.
pub async fn app(dir: &Path, name: &str) -> Fixture {
    let [fixture] = apps(dir, [name]).await;
    fixture
}

impl Fixture {
    /// What the capabilities see of a call made now.
    pub fn view(&mut self) -> CapabilityView<'_> {
        CapabilityView {
            app: &self.capabilities,
            table: &mut self.table,
            streams: &mut self.streams,
            request: self.bounds,
        }
    }

    /// An input stream of `bytes` in the instance's table, as a guest would hand one over.
    pub fn stream_of(&mut self, data: &[u8]) -> Resource<DynInputStream> {
        self.table
            .push(streams::from_bytes(bytes::Bytes::copy_from_slice(data)))
            .expect("room in the resource table")
    }

    /// Everything the stream `resource` gives, or the error it fails with.
    pub async fn read_stream(
        &mut self,
        resource: Resource<DynInputStream>,
    ) -> anyhow::Result<Vec<u8>> {
        let mut stream = self
            .table
            .delete(resource)
            .context("the stream is in the table")?;
        let mut read = Vec::new();
        while let Some(chunk) = streams::read_chunk(&mut stream, streams::CHUNK).await? {
            read.extend_from_slice(&chunk);
        }
        Ok(read)
    }
}

/// A temporary data directory, removed when dropped.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("capability-tests-")
        .tempdir()
        .expect("a temporary directory")
}

/// Bytes that are not all alike, so a misplaced byte shows.
pub fn pattern(length: usize) -> Vec<u8> {
    (0..length).map(|i| (i * 31 % 251) as u8).collect()
}
