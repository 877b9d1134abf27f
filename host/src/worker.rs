//! A worker: one tokio runtime and one wasmtime engine serving the listeners it is given until a
//! signal says stop. `host serve` runs one in its own process.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::access_log::AccessLog;
use crate::admission::Admission;
use crate::compile_cache;
use crate::engine::{self, EngineSizing};
use crate::guest::Guest;
use crate::handler::RequestHandler;
use crate::logging::LogFile;
use crate::server::{self, ConnectionSettings, Listener, Shutdown};
use crate::settings::Settings;

/// Why a worker could not start; gunicorn's exit codes tell them apart.
pub enum StartError {
    /// The component could not be loaded (gunicorn's APP_LOAD_ERROR, exit 4).
    App(anyhow::Error),
    /// Anything else about starting (gunicorn's WORKER_BOOT_ERROR, exit 3).
    Boot(anyhow::Error),
}

pub fn run(settings: &Settings, error_log: LogFile) -> Result<(), StartError> {
    let engine = engine::build(EngineSizing {
        instances: settings.concurrency,
        memory_limit: settings.memory_limit,
    })
    .map_err(StartError::Boot)?;
    let guest = compile_cache::load_component(&engine, &settings.component, &settings.cache_dir)
        .and_then(|component| Guest::new(&engine, &component, settings.memory_limit, settings.timeout))
        .with_context(|| format!("cannot load {}", settings.component.display()))
        .map_err(StartError::App)?;
    let access_log = match &settings.access_logfile {
        Some(spec) => Some(Arc::new(AccessLog::new(
            &settings.access_logformat,
            LogFile::open(spec, true).map_err(StartError::Boot)?,
        ))),
        None => None,
    };
    let listeners = settings
        .binds
        .iter()
        .map(|bind| Listener::bind(bind, settings.backlog, settings.reuse_port))
        .collect::<Result<Vec<_>>>()
        .map_err(StartError::Boot)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("worker")
        .build()
        .context("cannot start the async runtime")
        .map_err(StartError::Boot)?;
    runtime
        .block_on(async {
            engine::start_epoch_ticker(&engine)?;
            let stop = stop_signal(settings)?;
            reopen_logs_on_usr1(error_log, access_log.clone())?;
            for listener in &listeners {
                tracing::info!("Listening at: {} ({})", listener.describe(), std::process::id());
            }
            let handler = Arc::new(RequestHandler {
                guest: Arc::new(guest),
                admission: Admission::new(settings.concurrency, settings.queue_limit, settings.timeout),
                limits: settings.request_limits,
                trusted_peers: settings.trusted_peers.clone(),
                access_log,
            });
            let connections = ConnectionSettings {
                keep_alive: settings.keep_alive,
                limits: settings.request_limits,
            };
            server::serve(listeners, handler, connections, stop).await
        })
        .map_err(StartError::Boot)?;
    tracing::info!("Shutting down: Master");
    Ok(())
}

/// TERM stops gracefully; INT and QUIT stop at once, as in gunicorn. The handlers are installed
/// before the host says it is listening, so no early signal finds the default disposition.
fn stop_signal(settings: &Settings) -> Result<impl Future<Output = Shutdown> + use<>> {
    let grace = settings.graceful_timeout;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut quit = signal(SignalKind::quit()).context("cannot handle SIGQUIT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("Handling signal: term");
                Shutdown::Graceful(grace)
            }
            _ = int.recv() => {
                tracing::info!("Handling signal: int");
                Shutdown::Quick
            }
            _ = quit.recv() => {
                tracing::info!("Handling signal: quit");
                Shutdown::Quick
            }
        }
    })
}

fn reopen_logs_on_usr1(error_log: LogFile, access_log: Option<Arc<AccessLog>>) -> Result<()> {
    let mut usr1 = signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            tracing::info!("Handling signal: usr1");
            let reopened = error_log
                .reopen()
                .and_then(|()| access_log.as_ref().map_or(Ok(()), |log| log.reopen()));
            if let Err(error) = reopened {
                tracing::error!("cannot reopen the log files: {error:#}");
            }
        }
    });
    Ok(())
}
