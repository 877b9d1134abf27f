//! A worker process: one tokio runtime and one wasmtime engine serving the listeners the master
//! passed down, stamping its heartbeat, until a signal or `--max-requests` says stop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::capabilities::host_semaphores::HostSemaphores;
use crate::capabilities::{AppCapabilities, HostDatabases, expiry};
use crate::http::limits::RequestLimits;
use crate::logging::LogFile;
use crate::metrics::{AppMetrics, WorkerMetrics};
use crate::proc_memory;
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
use crate::serving::quiet::Quiet;
use crate::serving::server::{self, ConnectionSettings, Listener, Shutdown};
use crate::settings::{Capability, Settings};

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
    let master = handoff.master_pid;
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
    let mut sweeps = Vec::new();
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
        let uploads_granted = [Capability::Objects, Capability::HmacRegistry]
            .iter()
            .any(|capability| app.capabilities.contains(capability));
        if let (Some(expiry), true) = (settings.upload_expiry, uploads_granted) {
            sweeps.push((app.name.clone(), Arc::clone(&capabilities), expiry));
        }
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
    let quiet = Arc::new(Quiet::default());
    runtime
        .block_on(async {
            engine::start_epoch_ticker(&engine)?;
            for (app, capabilities, expiry) in sweeps {
                expiry::sweep_abandoned_uploads(&settings.data_dir, &app, capabilities, expiry);
            }
            reopen_logs_on_usr1(error_log, access_log.clone())?;
            let heartbeat = Arc::new(heartbeat);
            keep_beating(Arc::clone(&heartbeat), settings.app.timeout);
            release_chunks_when_quiet(Arc::clone(&quiet));
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
                quiet: Arc::clone(&quiet),
            };
            let idle_recycle = idle_recycle_wait(settings).map(|wait| IdleRecycle {
                quiet,
                wait,
                baseline: proc_memory::private_resident_bytes(),
            });
            let stop = stop_signal(settings, master, recycle.clone(), idle_recycle, heartbeat)?;
            hooks::event("post_worker_init", &[("pid", pid.to_string())]);
            server::serve(listeners, handler, connections, stop).await
        })
        .map_err(StartError::Boot)?;
    hooks::event("worker_exit", &[("pid", pid.to_string())]);
    // A master that reaps this worker removes its scratch files; with the master gone, the
    // worker does, rather than leave them to the next start of the host.
    if !master_alive(master)
        && let Err(error) = crate::capabilities::remove_leftovers_of(settings, pid)
    {
        tracing::error!("{error:#}");
    }
    tracing::info!("Worker exiting (pid: {pid})");
    Ok(())
}

/// `--idle-recycle`: a worker quiet for `wait` that holds more private memory than when it
/// started serving, by more than `RECYCLE_GROWTH`, leaves for a fresh one. wasmtime keeps the
/// pool slots a burst used resident (`linear_memory_keep_resident`, so that a slot reused soon
/// costs no page faults) and has no call to give them back later; a new process gives back
/// those, the allocator's pages and any fragmentation at once, and costs nothing while the
/// worker is busy.
struct IdleRecycle {
    quiet: Arc<Quiet>,
    wait: Duration,
    /// The private memory when the worker started serving.
    baseline: u64,
}

/// Growth below this is not worth a new process: about what the first requests add.
const RECYCLE_GROWTH: u64 = 2 << 20;
/// How long a recycled worker keeps accepting once its replacement is asked for: the master
/// looks every 250 ms, and a worker starts in well under a second.
const HANDOVER: Duration = Duration::from_secs(1);

/// `--idle-recycle`, but never before the apps' kept instances have been idle long enough
/// to be dropped (`--instance-idle-timeout`): a recycle would drop what they chose to keep.
fn idle_recycle_wait(settings: &Settings) -> Option<Duration> {
    settings
        .apps
        .iter()
        .filter(|app| app.settings.reuse.keeps_instances())
        .try_fold(settings.idle_recycle?, |wait, app| {
            Some(wait.max(app.settings.reuse.idle_timeout?))
        })
}

impl IdleRecycle {
    /// Resolves once the worker is quiet and has grown.
    async fn grown(&self) {
        loop {
            self.quiet.lasted(self.wait).await;
            // What `release_chunks_when_quiet` gives back is no growth, even with a short wait.
            crate::capabilities::chunk_pool::release();
            let now = proc_memory::private_resident_bytes();
            if now > self.baseline + RECYCLE_GROWTH {
                tracing::info!(
                    "Recycling the worker: no connection for {} s and {:.1} MiB more private memory than when it started (--idle-recycle)",
                    self.wait.as_secs_f64(),
                    (now - self.baseline) as f64 / f64::from(1 << 20)
                );
                return;
            }
            self.quiet.busy().await;
        }
    }
}

/// Trims the capabilities' free chunks while the worker has connections, and gives them all
/// back once it has none, so a worker at rest holds what it did before its first burst (and
/// `--idle-recycle` does not count them as growth); an idle worker is not woken for it.
fn release_chunks_when_quiet(quiet: Arc<Quiet>) {
    use crate::capabilities::chunk_pool;
    tokio::spawn(async move {
        loop {
            quiet.busy().await;
            let mut every = tokio::time::interval(chunk_pool::STALE);
            loop {
                tokio::select! {
                    () = quiet.lasted(Duration::ZERO) => break,
                    _ = every.tick() => chunk_pool::trim(),
                }
            }
            chunk_pool::release();
        }
    });
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
    master: u32,
    recycle: Option<Arc<MaxRequests>>,
    idle_recycle: Option<IdleRecycle>,
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
        let mark_retiring = || {
            if let Err(error) = heartbeat.mark_retiring() {
                tracing::warn!("cannot tell the master this worker is retiring: {error}");
            }
        };
        let grown = async {
            match &idle_recycle {
                Some(idle) => {
                    idle.grown().await;
                    mark_retiring();
                    // The worker keeps accepting while its replacement starts, so that a
                    // client arriving now is not left waiting for one.
                    tokio::time::sleep(HANDOVER).await;
                }
                None => std::future::pending().await,
            }
        };
        let pid = std::process::id().to_string();
        tokio::select! {
            _ = term.recv() => Shutdown::Graceful(grace),
            () = parent_gone(master) => {
                tracing::info!("Parent changed, shutting down: worker {pid}");
                Shutdown::Graceful(grace)
            }
            () = recycled => {
                mark_retiring();
                Shutdown::Graceful(grace)
            }
            () = grown => Shutdown::Graceful(grace),
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

/// Resolves once the master is gone (the worker's parent is no longer `master`), as
/// gunicorn's workers check: a master killed outright leaves no one to stop its workers, and
/// they would hold its sockets and its data against the next one.
async fn parent_gone(master: u32) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticks.tick().await;
        if !master_alive(master) {
            return;
        }
    }
}

/// Whether this worker's parent is still the master that started it.
fn master_alive(master: u32) -> bool {
    // SAFETY: getppid has no preconditions.
    u32::try_from(unsafe { libc::getppid() }).is_ok_and(|parent| parent == master)
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
