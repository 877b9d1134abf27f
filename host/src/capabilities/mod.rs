//! Host capabilities offered to guests, one WIT interface each (in `wit/`), one module each.
//! Each app gets its own set, scoped to its name: its keys, registry entries, objects and
//! database are invisible to every other app.

pub(crate) mod chunk_pool;
pub mod crypto;
pub mod database;
pub mod expiry;
pub mod hmac_registry;
pub mod host_semaphores;
pub mod objects;
pub mod part_buffer;
pub mod sql;
pub mod status;
pub(crate) mod streams;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::time::Instant;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::DynInputStream;

use crate::capabilities::database::{Backend, BackendKind, HostDatabase};
use crate::settings::Settings;
use crate::settings::{App, Capability};
use host_semaphores::HostSemaphores;
use streams::{MAX_CAPABILITY_STREAMS, StreamCount, TooManyStreams};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "host:capabilities/capabilities",
    imports: { default: async | trappable },
    with: {
        "wasi:io": wasmtime_wasi::p2::bindings::io,
        "host:capabilities/hmac-registry.part-mac": hmac_registry::PartMac,
        "host:capabilities/sql.transaction": sql::OpenTransaction,
    },
});

/// What a capability call sees of the instance that makes it: the app's capabilities, the
/// instance's resource table and capability streams, and the request's bounds. The guest store
/// hands one out per call (`add_to_linker`'s `view`), so the capabilities know nothing of it.
pub struct CapabilityView<'a> {
    pub app: &'a AppCapabilities,
    pub table: &'a mut ResourceTable,
    pub streams: &'a mut StreamCount,
    pub request: RequestBounds,
}

/// The bounds of the request an instance serves, as a capability call sees them.
#[derive(Debug, Clone, Copy)]
pub struct RequestBounds {
    /// When the request must be done (`--timeout` after it started), if it has a deadline.
    pub deadline: Option<Instant>,
    /// The instance's `--memory-limit`.
    pub memory_limit: u64,
    /// The instance's linear memory in use when the call was made.
    pub instance_memory: usize,
    pub memory_budget: Option<u64>,
}

impl CapabilityView<'_> {
    /// Gives the guest a stream a capability made, counted against `MAX_CAPABILITY_STREAMS`;
    /// past that the instance is stopped (a 500 that says why), as for a full resource table.
    pub fn push_stream(
        &mut self,
        stream: DynInputStream,
    ) -> wasmtime::Result<Resource<DynInputStream>> {
        let counted = self
            .streams
            .count(stream, MAX_CAPABILITY_STREAMS)
            .ok_or_else(|| wasmtime::Error::new(TooManyStreams))?;
        Ok(self.table.push(counted)?)
    }
}

/// `CapabilityView` as the data the bindings' `add_to_linker` functions hand to the traits.
struct CapabilityData;

impl HasData for CapabilityData {
    type Data<'a> = CapabilityView<'a>;
}

/// Links the capability interfaces `granted` (the `wasi:io` they use is linked with WASI); each
/// call gets the `view` of the calling instance's state. A capability not granted is not
/// linked at all: a component importing it cannot be instantiated, which `check_grants`
/// reports by name before linking is tried.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    granted: &std::collections::BTreeSet<Capability>,
    view: fn(&mut T) -> CapabilityView<'_>,
) -> Result<()> {
    use host::capabilities::{crypto, hmac_registry, objects, sql, status};
    for capability in granted {
        match capability {
            Capability::Status => status::add_to_linker::<_, CapabilityData>(linker, view),
            Capability::Crypto => crypto::add_to_linker::<_, CapabilityData>(linker, view),
            Capability::HmacRegistry => {
                hmac_registry::add_to_linker::<_, CapabilityData>(linker, view)
            }
            Capability::Objects => objects::add_to_linker::<_, CapabilityData>(linker, view),
            Capability::Sql => sql::add_to_linker::<_, CapabilityData>(linker, view),
        }
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot link the {} capability", capability.name()))?;
    }
    Ok(())
}

/// Refuses a component that imports a capability its app is not granted, naming it.
pub fn check_grants(
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
    app: &App,
) -> Result<()> {
    for (import, _) in component.component_type().imports(engine) {
        if let Some(capability) = Capability::of_import(import)
            && !app.capabilities.contains(&capability)
        {
            anyhow::bail!(
                "app `{}` imports {import} but is not granted the `{}` capability (add it to the app's `capabilities` in the config file)",
                app.name,
                capability.name()
            );
        }
    }
    Ok(())
}

/// The directories the host writes half-done files in: part buffers' spill files
/// (`<data-dir>/tmp`) and each local store's `tmp/`. Each process writes in a subdirectory of
/// its own (`scratch_dir`), so what a worker killed mid-write leaves is found by its pid.
fn scratch_roots(settings: &Settings) -> Vec<PathBuf> {
    let mut roots = vec![part_buffer::spill_dir(&settings.data_dir)];
    for app in &settings.apps {
        if let objects::Storage::Local(root) = &app.settings.storage {
            let root = root
                .clone()
                .unwrap_or_else(|| settings.data_dir.join("apps"));
            roots.push(objects::LocalStore::tmp_dir(&root.join(&app.name)));
        }
    }
    roots
}

/// File work on a blocking thread, without the copies of `tokio::fs`: a slow or full disk holds
/// a blocking thread, not the ones serving requests.
pub(crate) async fn blocking<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<std::io::Error> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| {
            Err(E::from(std::io::Error::other(format!(
                "a file task was lost: {error}"
            ))))
        })
}

/// This process's own subdirectory of a scratch root.
pub fn scratch_dir(root: &Path) -> PathBuf {
    root.join(std::process::id().to_string())
}

/// Removes what a host that stopped (or crashed) left half-written, in every scratch root. Run
/// by the master before any worker starts. The directory of a process still alive is left: a
/// worker of a master that was killed finishes its requests before it leaves.
pub fn remove_leftovers(settings: &Settings) -> Result<()> {
    for root in scratch_roots(settings) {
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot list the leftovers in {}", root.display()));
            }
        };
        for entry in entries {
            let entry = entry
                .with_context(|| format!("cannot list the leftovers in {}", root.display()))?;
            let alive = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<i32>().ok())
                .is_some_and(process_is_alive);
            if alive {
                continue;
            }
            let path = entry.path();
            let removed = match entry.file_type() {
                Ok(kind) if kind.is_dir() => remove_dir(&path),
                _ => std::fs::remove_file(&path)
                    .or_else(|error| match error.kind() {
                        std::io::ErrorKind::NotFound => Ok(()),
                        _ => Err(error),
                    })
                    .with_context(|| format!("cannot remove the leftover {}", path.display())),
            };
            removed?;
        }
    }
    Ok(())
}

fn process_is_alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Removes what the worker `pid`, which has exited, left half-written (a part it was receiving
/// when it was killed, say), so such files do not wait for the next start of the host.
pub fn remove_leftovers_of(settings: &Settings, pid: u32) -> Result<()> {
    scratch_roots(settings)
        .iter()
        .try_for_each(|root| remove_dir(&root.join(pid.to_string())))
}

fn remove_dir(directory: &Path) -> Result<()> {
    match std::fs::remove_dir_all(directory) {
        Ok(()) => {
            tracing::debug!("removed the leftovers in {}", directory.display());
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error)
            .with_context(|| format!("cannot remove the leftovers in {}", directory.display())),
    }
}

/// An app's share, in a worker, of the host-wide part buffers: of the `--encrypt-concurrency`
/// memory buffers and of the MiB of `--spill-limit`, each divided evenly among the apps (at
/// least one buffer and one MiB each), so that one app holding all its share leaves every
/// other app its own.
pub fn part_buffer_shares(settings: &Settings) -> (u32, u32) {
    let apps = settings.apps.len().max(1) as u32;
    let spill_mib = (settings.spill_limit >> 20).min(u64::from(host_semaphores::MAX_UNITS)) as u32;
    (
        (settings.encrypt_concurrency / apps).max(1),
        (spill_mib / apps).max(1),
    )
}

/// A worker's pools of the host's own tables, one per database its apps use: apps on one
/// database share a pool, so a worker holds a few connections to it however many apps it serves.
#[derive(Default)]
pub struct HostDatabases(HashMap<BackendKind, Arc<HostDatabase>>);

impl HostDatabases {
    async fn of(&mut self, backend: &Backend) -> Result<Arc<HostDatabase>> {
        if let Some(database) = self.0.get(&backend.kind) {
            return Ok(Arc::clone(database));
        }
        let database = HostDatabase::new(backend).await?;
        self.0.insert(backend.kind.clone(), Arc::clone(&database));
        Ok(database)
    }
}

/// The capabilities of one app, shared by its instances in a worker.
pub struct AppCapabilities {
    pub crypto: Arc<crypto::Crypto>,
    pub registry: hmac_registry::Registry,
    pub objects: objects::ObjectStore,
    pub sql: sql::AppDatabase,
}

impl AppCapabilities {
    /// What a worker serves its app with. Databases and S3 are not contacted yet: they are
    /// connected on first use, so one that is down fails only the calls that need it.
    pub async fn for_app(
        settings: &Settings,
        master_key: &[u8; 32],
        semaphores: Option<HostSemaphores>,
        app: &App,
        host_databases: &mut HostDatabases,
    ) -> Result<Arc<AppCapabilities>> {
        let app_settings = app;
        let app = app.name.clone();
        let crypto = crypto::for_app(settings, master_key, semaphores, &app);
        let backend = Backend::of(settings, app_settings.settings.database_url.as_deref())?;
        let host_database = host_databases.of(&backend).await?;
        let spill_dir = scratch_dir(&part_buffer::spill_dir(&settings.data_dir));
        part_buffer::make_spill_dir(&spill_dir).await?;
        let (memory_share, spill_share_mib) = part_buffer_shares(settings);
        let buffers = part_buffer::PartBuffers::new(
            semaphores,
            settings.part_buffer,
            spill_dir,
            memory_share,
            spill_share_mib,
        );
        let registry = hmac_registry::Registry::new(
            Arc::clone(&host_database),
            &app,
            Arc::clone(&crypto),
            Arc::clone(&buffers),
        );
        let objects = objects::for_app(
            &app_settings.settings.storage,
            &app_settings.settings.s3,
            &settings.data_dir,
            &app,
            master_key,
            buffers,
        )
        .await
        .context("cannot set up the object store")?;
        let sql = sql::AppDatabase::new(
            &backend,
            &host_database,
            &app,
            master_key,
            sql::SqlLimits::of(settings, app_settings),
        )
        .await?;
        Ok(Arc::new(AppCapabilities {
            crypto,
            registry,
            objects,
            sql,
        }))
    }
}

#[cfg(test)]
mod host_databases_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::HostDatabases;
    use crate::capabilities::database::{Backend, BackendKind};

    #[tokio::test]
    async fn apps_on_one_database_share_the_host_tables_pool() {
        let backend = |url: &str| Backend {
            kind: BackendKind::Postgres(url.to_owned()),
            acquire_timeout: Duration::from_secs(1),
        };
        let mut databases = HostDatabases::default();
        let first = databases.of(&backend("postgres://a@db/one")).await.unwrap();
        let again = databases.of(&backend("postgres://a@db/one")).await.unwrap();
        let other = databases.of(&backend("postgres://a@db/two")).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!Arc::ptr_eq(&first, &other));
    }
}
