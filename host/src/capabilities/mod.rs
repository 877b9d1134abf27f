//! Host capabilities offered to guests, one WIT interface each (in `wit/`), one module each.
//! Each app gets its own set, scoped to its name: its keys, registry entries, objects and
//! database are invisible to every other app.

pub mod crypto;
pub mod hmac_registry;
pub mod objects;
pub mod part_buffer;
pub mod slots;
pub mod sql;
pub mod status;
pub(crate) mod streams;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use wasmtime::component::{HasSelf, Linker};

use crate::apps::{AppSettings, Capability};
use crate::database::{Backend, BackendKind, HostDatabase};
use crate::guest::GuestState;
use crate::settings::Settings;

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

/// Links the capability interfaces `granted` (the `wasi:io` they use is linked with WASI). A
/// capability not granted is not linked at all: a component importing it cannot be
/// instantiated, which `check_grants` reports by name before linking is tried.
pub fn add_to_linker(
    linker: &mut Linker<GuestState>,
    granted: &std::collections::BTreeSet<Capability>,
) -> Result<()> {
    use host::capabilities::{crypto, hmac_registry, objects, sql, status};
    fn get(state: &mut GuestState) -> &mut GuestState {
        state
    }
    for capability in granted {
        match capability {
            Capability::Status => status::add_to_linker::<_, HasSelf<GuestState>>(linker, get),
            Capability::Crypto => crypto::add_to_linker::<_, HasSelf<GuestState>>(linker, get),
            Capability::HmacRegistry => {
                hmac_registry::add_to_linker::<_, HasSelf<GuestState>>(linker, get)
            }
            Capability::Objects => objects::add_to_linker::<_, HasSelf<GuestState>>(linker, get),
            Capability::Sql => sql::add_to_linker::<_, HasSelf<GuestState>>(linker, get),
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
    app: &AppSettings,
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

/// Removes what a host that stopped (or crashed) left half-written: part buffers' spill files
/// (`<data-dir>/tmp`) and each local store's `tmp/`. Run by the master before any worker
/// starts, so no file of this host is in use; the directories are made again by the workers.
pub fn remove_leftovers(settings: &Settings) -> Result<()> {
    let mut directories = vec![part_buffer::spill_dir(&settings.data_dir)];
    for app in &settings.apps {
        if let objects::Storage::Local(root) = &app.storage {
            let root = root
                .clone()
                .unwrap_or_else(|| settings.data_dir.join("apps"));
            directories.push(objects::LocalStore::tmp_dir(&root.join(&app.name)));
        }
    }
    for directory in directories {
        match std::fs::remove_dir_all(&directory) {
            Ok(()) => tracing::debug!("removed the leftovers in {}", directory.display()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| {
                    format!("cannot remove the leftovers in {}", directory.display())
                });
            }
        }
    }
    Ok(())
}

/// An app's share, in a worker, of the host-wide part buffers: of the `--encrypt-concurrency`
/// memory buffers and of the MiB of `--spill-limit`, each divided evenly among the apps (at
/// least one buffer and one MiB each), so that one app holding all its share leaves every
/// other app its own.
pub fn part_buffer_shares(settings: &Settings) -> (u32, u32) {
    let apps = settings.apps.len().max(1) as u32;
    let spill_mib = (settings.spill_limit >> 20).min(u64::from(slots::MAX_UNITS)) as u32;
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
    fn of(&mut self, backend: &Backend) -> Result<Arc<HostDatabase>> {
        if let Some(database) = self.0.get(&backend.kind) {
            return Ok(Arc::clone(database));
        }
        let database = HostDatabase::new(backend)?;
        self.0.insert(backend.kind.clone(), Arc::clone(&database));
        Ok(database)
    }
}

/// The capabilities of one app, shared by its instances in a worker.
pub struct AppCapabilities {
    pub crypto: Arc<crypto::Crypto>,
    registry: Option<hmac_registry::Registry>,
    objects: Option<objects::ObjectStore>,
    sql: Option<sql::AppDatabase>,
}

impl AppCapabilities {
    /// What a worker serves its app with. Databases and S3 are not contacted yet: they are
    /// connected on first use, so one that is down fails only the calls that need it.
    pub async fn for_app(
        settings: &Settings,
        app: &AppSettings,
        host_databases: &mut HostDatabases,
    ) -> Result<Arc<AppCapabilities>> {
        let app_settings = app;
        let app = app.name.clone();
        let (crypto, key) = crypto::for_app(settings, &app)?;
        let slots = crypto.slots();
        let backend = Backend::of(settings, app_settings.database_url.as_deref())?;
        let host_database = host_databases.of(&backend)?;
        let spill_dir = part_buffer::spill_dir(&settings.data_dir);
        part_buffer::make_spill_dir(&spill_dir).await?;
        let (memory_share, spill_share_mib) = part_buffer_shares(settings);
        let buffers = part_buffer::PartBuffers::new(
            slots,
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
            &app_settings.storage,
            &app_settings.s3,
            &settings.data_dir,
            &app,
            &key,
            buffers,
        )
        .await
        .context("cannot set up the object store")?;
        let sql = sql::AppDatabase::new(
            &backend,
            &host_database,
            &app,
            &key,
            sql::SqlLimits::of(settings, app_settings),
        )?;
        Ok(Arc::new(AppCapabilities {
            crypto,
            registry: Some(registry),
            objects: Some(objects),
            sql: Some(sql),
        }))
    }

    /// Only what linking needs (the compile step instantiates nothing).
    pub fn for_linking(settings: &Settings, app: &AppSettings) -> Result<Arc<AppCapabilities>> {
        Ok(Arc::new(AppCapabilities {
            crypto: crypto::for_app(settings, &app.name)?.0,
            registry: None,
            objects: None,
            sql: None,
        }))
    }

    pub fn registry(&self) -> wasmtime::Result<&hmac_registry::Registry> {
        self.registry
            .as_ref()
            .ok_or_else(|| wasmtime::format_err!("the HMAC registry is not available here"))
    }

    pub fn objects(&self) -> wasmtime::Result<&objects::ObjectStore> {
        self.objects
            .as_ref()
            .ok_or_else(|| wasmtime::format_err!("the object store is not available here"))
    }

    pub fn sql(&self) -> wasmtime::Result<&sql::AppDatabase> {
        self.sql
            .as_ref()
            .ok_or_else(|| wasmtime::format_err!("SQL is not available here"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::HostDatabases;
    use crate::database::{Backend, BackendKind};

    #[tokio::test]
    async fn apps_on_one_database_share_the_host_tables_pool() {
        let backend = |url: &str| Backend {
            kind: BackendKind::Postgres(url.to_owned()),
            acquire_timeout: Duration::from_secs(1),
        };
        let mut databases = HostDatabases::default();
        let first = databases.of(&backend("postgres://a@db/one")).unwrap();
        let again = databases.of(&backend("postgres://a@db/one")).unwrap();
        let other = databases.of(&backend("postgres://a@db/two")).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!Arc::ptr_eq(&first, &other));
    }
}
