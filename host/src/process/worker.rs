//! A worker process: one tokio runtime and one wasmtime engine serving the listeners the master
//! passed down, stamping its heartbeat, until a signal or `--max-requests` says stop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::capabilities::host_semaphores::HostSemaphores;
use crate::capabilities::{AppCapabilities, HostDatabases};
use crate::http::limits::RequestLimits;
use crate::logging::LogFile;
use crate::metrics::{AppMetrics, WorkerMetrics};
use crate::process::handoff::WorkerHandoff;
use crate::process::heartbeat::Heartbeat;
use crate::process::hooks;
use crate::runtime::compile_cache;
use crate::runtime::engine::{self, EngineSizing};
use crate::runtime::guest::Guest;
use crate::serving::access_log::AccessLog;
use crate::serving::admission::Admission;
use crate::serving::handler::{RequestHandler, ServedApp};
use crate::serving::max_requests::MaxRequests;
use crate::serving::server::{self, ConnectionSettings, Listener, Shutdown};
use crate::settings::Settings;

/// Why a worker could not start; gunicorn's exit codes tell the master which.
pub enum StartError {
    /// The component could not be loaded (gunicorn's APP_LOAD_ERROR, exit 4).
    App(anyhow::Error),
    /// Anything else about starting (gunicorn's WORKER_BOOT_ERROR, exit 3).
    Boot(anyhow::Error),
}

pub fn run(
    handoff: &WorkerHandoff,
    error_log: LogFile,
    listeners: Vec<Listener>,
    heartbeat: Heartbeat,
) -> Result<(), StartError> {
    let settings = &handoff.settings;
    let pid = std::process::id();
    tracing::info!("Booting worker with pid: {pid}");
    let engine = engine::build(EngineSizing::for_apps(&settings.apps)).map_err(StartError::Boot)?;
    let instances: usize = settings
        .apps
        .iter()
        .map(|app| app.settings.concurrency)
        .sum();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("worker")
        // File work and SQLite run on blocking threads; tokio's default of 512 lets a busy
        // worker grow hundreds of threads, each keeping its own allocator pages.
        .max_blocking_threads(2 * instances.min(64) + 4)
        .build()
        .context("cannot start the async runtime")
        .map_err(StartError::Boot)?;
    let names: Vec<String> = settings.apps.iter().map(|app| app.name.clone()).collect();
    // Counters for the master's metrics endpoint, in a file it maps; none without one.
    let worker_metrics = match settings.metrics_bind {
        Some(_) => Some(
            WorkerMetrics::create(&settings.worker_tmp_dir, pid, &names)
                .map_err(StartError::Boot)?,
        ),
        None => None,
    };
    let mut apps = Vec::new();
    let mut host_databases = HostDatabases::default();
    for (index, app) in settings.apps.iter().enumerate() {
        let metrics = worker_metrics
            .as_ref()
            .map_or_else(AppMetrics::detached, |metrics| metrics.app(index));
        let capabilities = runtime
            .block_on(AppCapabilities::for_app(
                settings,
                &handoff.master_key,
                Some(HostSemaphores::open(handoff.host_semaphores)),
                app,
                &mut host_databases,
            ))
            .with_context(|| format!("cannot set up the host capabilities of app `{}`", app.name))
            .map_err(StartError::Boot)?;
        let guest = compile_cache::load_component(
            &engine,
            &app.component,
            &settings.cache_dir,
            app.version.as_ref().map(|version| version.digest.as_str()),
        )
        .and_then(|component| {
            Guest::new(
                &engine,
                &component,
                settings,
                app,
                capabilities,
                metrics.clone(),
            )
        })
        .with_context(|| format!("cannot load {}", app.component.display()))
        .map_err(StartError::App)?;
        apps.push(ServedApp {
            name: app.name.clone(),
            guest: Arc::new(guest),
            admission: Admission::new(
                app.settings.concurrency,
                app.settings.queue_limit,
                app.settings.timeout,
                metrics.clone(),
            ),
            limits: app.settings.request_limits,
            body_limit: app.settings.body_limit,
            metrics,
        });
    }
    let access_log = match &settings.access_logfile {
        Some(spec) => Some(Arc::new(AccessLog::new(
            &settings.access_logformat,
            LogFile::open(spec, true).map_err(StartError::Boot)?,
        ))),
        None => None,
    };
    // Read as the worker starts, so a HUP or a reload serves renewed certificates.
    let tls = match &settings.tls {
        Some(files) => Some(crate::serving::tls::server_config(files).map_err(StartError::Boot)?),
        None => None,
    };
    let recycle =
        MaxRequests::new(settings.max_requests, settings.max_requests_jitter).map(Arc::new);
    runtime
        .block_on(async {
            engine::start_epoch_ticker(&engine)?;
            reopen_logs_on_usr1(error_log, access_log.clone())?;
            let heartbeat = Arc::new(heartbeat);
            keep_beating(Arc::clone(&heartbeat), settings.app.timeout);
            let handler = Arc::new(RequestHandler {
                router: crate::serving::router::Router::new(&settings.apps),
                apps,
                trusted_peers: settings.trusted_peers.clone(),
                access_log,
                recycle: recycle.clone(),
            });
            let connections = ConnectionSettings {
                keep_alive: settings.keep_alive,
                max_connections: settings.max_connections,
                limits: RequestLimits::loosest(
                    settings.apps.iter().map(|app| app.settings.request_limits),
                ),
                // An app without a deadline lets its clients take their time too.
                write_stall_timeout: settings
                    .apps
                    .iter()
                    .map(|app| app.settings.timeout)
                    .reduce(|a, b| a.zip(b).map(|(a, b)| a.max(b)))
                    .flatten(),
                tls,
            };
            let stop = stop_signal(settings, recycle.clone(), heartbeat)?;
            hooks::event("post_worker_init", &[("pid", pid.to_string())]);
            server::serve(listeners, handler, connections, stop).await
        })
        .map_err(StartError::Boot)?;
    hooks::event("worker_exit", &[("pid", pid.to_string())]);
    tracing::info!("Worker exiting (pid: {pid})");
    Ok(())
}

/// Stamps the heartbeat from the event loop: if the loop stalls, so does the heartbeat.
fn keep_beating(heartbeat: Arc<Heartbeat>, timeout: Option<Duration>) {
    let every = timeout.map_or(Duration::from_secs(1), |timeout| {
        (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    });
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            ticks.tick().await;
            if let Err(error) = heartbeat.beat() {
                tracing::warn!("cannot stamp the heartbeat file: {error}");
            }
        }
    });
}

/// TERM (and `--max-requests`) stop gracefully; INT and QUIT at once (`worker_int`); ABRT, sent
/// by the master to a silent worker, logs `worker_abort` and exits 1. The handlers are installed
/// before the worker serves, so no early signal finds the default disposition.
fn stop_signal(
    settings: &Settings,
    recycle: Option<Arc<MaxRequests>>,
    heartbeat: Arc<Heartbeat>,
) -> Result<impl Future<Output = Shutdown> + use<>> {
    let grace = settings.graceful_timeout;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut quit = signal(SignalKind::quit()).context("cannot handle SIGQUIT")?;
    let mut abort = signal(SignalKind::from_raw(libc::SIGABRT)).context("cannot handle SIGABRT")?;
    Ok(async move {
        let recycled = async {
            match &recycle {
                Some(recycle) => recycle.reached().await,
                None => std::future::pending().await,
            }
        };
        let pid = std::process::id().to_string();
        tokio::select! {
            _ = term.recv() => Shutdown::Graceful(grace),
            () = recycled => {
                if let Err(error) = heartbeat.mark_retiring() {
                    tracing::warn!("cannot tell the master this worker is retiring: {error}");
                }
                Shutdown::Graceful(grace)
            }
            _ = int.recv() => {
                hooks::event("worker_int", &[("pid", pid)]);
                Shutdown::Quick
            }
            _ = quit.recv() => {
                hooks::event("worker_int", &[("pid", pid)]);
                Shutdown::Quick
            }
            _ = abort.recv() => {
                hooks::event("worker_abort", &[("pid", pid)]);
                std::process::exit(1);
            }
        }
    })
}

fn reopen_logs_on_usr1(error_log: LogFile, access_log: Option<Arc<AccessLog>>) -> Result<()> {
    let mut usr1 = signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
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
