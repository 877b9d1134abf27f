//! Host capabilities offered to guests, one WIT interface each (in `wit/`), one module each.
//! Each app gets its own set, scoped to its name: its keys, registry entries, objects and
//! database are invisible to every other app.

pub mod crypto;
pub mod hmac_registry;
pub mod objects;
mod part_buffer;
pub mod slots;
pub mod sql;
pub mod status;
mod streams;

use std::sync::Arc;

use anyhow::{Context, Result};
use wasmtime::component::{HasSelf, Linker};

use crate::database::{Backend, HostDatabase};
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

/// Links every capability interface (the `wasi:io` they use is linked with WASI).
pub fn add_to_linker(linker: &mut Linker<GuestState>) -> Result<()> {
    use host::capabilities::{crypto, hmac_registry, objects, sql, status};
    fn get(state: &mut GuestState) -> &mut GuestState {
        state
    }
    status::add_to_linker::<_, HasSelf<GuestState>>(linker, get)
        .and_then(|()| crypto::add_to_linker::<_, HasSelf<GuestState>>(linker, get))
        .and_then(|()| hmac_registry::add_to_linker::<_, HasSelf<GuestState>>(linker, get))
        .and_then(|()| objects::add_to_linker::<_, HasSelf<GuestState>>(linker, get))
        .and_then(|()| sql::add_to_linker::<_, HasSelf<GuestState>>(linker, get))
        .map_err(anyhow::Error::from)
        .context("cannot link the host capabilities")
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
    pub async fn for_app(settings: &Settings) -> Result<Arc<AppCapabilities>> {
        let app = settings.app_name();
        let key = crypto::master_key(
            settings.master_key.as_deref(),
            settings.master_key_file.as_deref(),
            &settings.data_dir,
        )?;
        let slots = settings.host_slots.map(slots::HostWideSlots::open);
        let crypto = Arc::new(crypto::Crypto::new(&key, &app, slots));
        let backend = Backend::of(settings)?;
        let host_database = HostDatabase::new(&backend)?;
        let registry = hmac_registry::Registry::new(
            Arc::clone(&host_database),
            &app,
            Arc::clone(&crypto),
            slots,
            settings.part_buffer,
            settings.data_dir.join("tmp"),
        );
        let objects = objects::for_app(
            &settings.storage,
            &settings.s3,
            &settings.data_dir,
            &app,
            &key,
            slots,
            settings.part_buffer,
        )
        .await
        .context("cannot set up the object store")?;
        let sql = sql::AppDatabase::new(
            &backend,
            &host_database,
            &app,
            &key,
            settings.concurrency as u32,
        )?;
        Ok(Arc::new(AppCapabilities {
            crypto,
            registry: Some(registry),
            objects: Some(objects),
            sql: Some(sql),
        }))
    }

    /// Only what linking needs (the compile step instantiates nothing).
    pub fn for_linking(settings: &Settings) -> Result<Arc<AppCapabilities>> {
        Ok(Arc::new(AppCapabilities {
            crypto: crypto::for_app(settings)?,
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
