//! The master process, gunicorn's arbiter: binds the listeners, compiles the component once,
//! runs `--workers` worker processes (re-executions of this binary that inherit the listening
//! sockets), watches their heartbeats, replaces the ones that die, and answers the signals.

use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use crate::capabilities::crypto;
use crate::capabilities::host_semaphores::HostSemaphores;
use crate::lock::lock;
use crate::logging::LogFile;
use crate::metrics::MetricsCollector;
use crate::private_fs;
use crate::process::budget::{Baseline, Plan};
use crate::process::handoff::{self, HandoffFile, PrepareReport, WorkerHandoff};
use crate::process::heartbeat::Heartbeat;
use crate::process::hooks;
use crate::process::reloader::Reloader;
use crate::run_dir::RunDir;
use crate::runtime::compile_cache;
use crate::runtime::engine::{self, EngineSizing};
use crate::serving::server::Listener;
use crate::settings::{BindAddress, Settings, human_size};

/// How often the master looks at its workers: gunicorn's "at least once a second".
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Between SIGABRT and SIGKILL for a silent worker.
const ABORT_GRACE: Duration = Duration::from_secs(1);

struct WorkerProcess {
    pid: u32,
    heartbeat: Heartbeat,
    aborted_at: Option<Instant>,
    retiring_since: Option<Instant>,
    killed_by_master: bool,
}

struct Master {
    settings: Settings,
    /// Handed to every worker (`WorkerHandoff`).
    master_key: [u8; 32],
    host_semaphores: i32,
    listeners: Vec<(BindAddress, Listener)>,
    /// The private directory of the workers' heartbeat and metrics files.
    run_dir: RunDir,
    /// Workers by age: the oldest first.
    workers: BTreeMap<u64, WorkerProcess>,
    next_age: u64,
    target: usize,
    exits: mpsc::UnboundedSender<(u64, ExitStatus)>,
    error_log: LogFile,
    /// Resident memory of a loaded worker, for `--memory-budget`.
    baseline: Baseline,
    /// The workers' counters, for `--metrics-bind`.
    metrics: Option<Arc<Mutex<MetricsCollector>>>,
}

/// How the master ended: the process's exit code.
pub type ExitCode = u8;

/// Runs the master until it is stopped; `reload` re-reads the settings on HUP.
pub fn run(
    settings: Settings,
    error_log: LogFile,
    reload: impl Fn() -> Result<Settings>,
) -> Result<ExitCode> {
    hooks::event("on_starting", &[("pid", std::process::id().to_string())]);
    prepare_directories(&settings)?;
    let master_key = settle_master_key(&settings)?;
    crate::capabilities::remove_leftovers(&settings)?;
    let semaphores = HostSemaphores::create(
        settings.encrypt_concurrency,
        (settings.spill_limit >> 20) as u32,
    )?;
    let outcome = run_with(settings, master_key, semaphores.id(), error_log, reload);
    semaphores.remove();
    outcome
}

/// The data directory is the host's alone (0700, made so if it was not), and the compile cache
/// must be: whoever can write there can make the workers run their machine code.
fn prepare_directories(settings: &Settings) -> Result<()> {
    private_fs::create_dir_all(&settings.data_dir).context("the data directory (--data-dir)")?;
    compile_cache::prepare_dir(&settings.cache_dir)
}

/// Every worker must wrap keys under the same master key: the master settles it (generating it
/// on first use) before any worker starts.
fn settle_master_key(settings: &Settings) -> Result<[u8; 32]> {
    crypto::master_key(
        settings.master_key.as_deref(),
        settings.master_key_file.as_deref(),
        &settings.data_dir,
    )
}

fn run_with(
    mut settings: Settings,
    master_key: [u8; 32],
    host_semaphores: i32,
    error_log: LogFile,
    reload: impl Fn() -> Result<Settings>,
) -> Result<ExitCode> {
    let run_dir = RunDir::create(&settings.worker_tmp_dir)?;
    // Workers make their files in the private directory: to them it is --worker-tmp-dir.
    settings.worker_tmp_dir = run_dir.path().to_owned();
    let baseline = precompile(&mut settings)?;
    check_budget(&settings, settings.workers, baseline)?;
    let listeners = bind_all_at_start(&settings)?;
    if let Some(pidfile) = &settings.pidfile {
        std::fs::write(pidfile, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write the pid file {}", pidfile.display()))?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the master's runtime")?;
    let metrics = match settings.metrics_bind {
        Some(address) => Some(runtime.block_on(serve_metrics(address, &settings))?),
        None => None,
    };
    let (exits, exited) = mpsc::unbounded_channel();
    let mut master = Master {
        metrics,
        target: settings.workers,
        settings,
        master_key,
        host_semaphores,
        listeners,
        run_dir,
        workers: BTreeMap::new(),
        next_age: 0,
        exits,
        error_log,
        baseline,
    };
    let code = runtime.block_on(master.supervise(exited, reload));
    master.cleanup();
    code
}

/// Binds `--metrics-bind` and serves the workers' counters there, summed per app.
async fn serve_metrics(
    address: std::net::SocketAddr,
    settings: &Settings,
) -> Result<Arc<Mutex<MetricsCollector>>> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot bind --metrics-bind {address}"))?;
    let collector = MetricsCollector::new(settings.worker_tmp_dir.clone());
    let collector = Arc::new(Mutex::new(collector));
    tracing::info!("Metrics at: http://{address}/metrics");
    let render = {
        let collector = Arc::clone(&collector);
        move || lock(&collector).render()
    };
    tokio::spawn(async move {
        if let Err(error) = crate::metrics::serve_metrics(listener, render).await {
            tracing::error!("the metrics endpoint stopped: {error:#}");
        }
    });
    Ok(collector)
}

/// Why the master refused to start; `main` turns it into the exit code.
#[derive(Debug)]
pub enum Refusal {
    /// The component cannot be loaded: gunicorn's APP_LOAD_ERROR (4).
    AppLoad(String),
    /// The configuration does not fit `--memory-budget`: a configuration error (1).
    Budget(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::AppLoad(reason) | Refusal::Budget(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for Refusal {}

/// `--check-config`: the settings are valid, the component loads, the budget holds.
pub fn check(settings: &Settings) -> Result<()> {
    compile_cache::prepare_dir(&settings.cache_dir)?;
    let baseline = precompile(&mut settings.clone())?;
    check_budget(settings, settings.workers, baseline)
}

fn check_budget(settings: &Settings, workers: usize, baseline: Baseline) -> Result<()> {
    let Some(budget) = settings.memory_budget else {
        return Ok(());
    };
    let plan = Plan::of(settings, workers, baseline);
    plan.check(budget)
        .map_err(|error| anyhow::anyhow!(Refusal::Budget(error.to_string())))?;
    tracing::info!(
        "memory budget: worst case {} of {} ({} shared + {} workers × ({} baseline + {}) + {} part buffers × {})",
        human_size(plan.worst_case()),
        human_size(budget),
        human_size(plan.shared),
        plan.workers,
        human_size(plan.baseline),
        plan.instances_arithmetic(),
        plan.buffers,
        human_size(plan.part_buffer)
    );
    Ok(())
}

/// Notes the version of each app's component the master checks, so that workers started later
/// (recycled, replaced, added) serve that version even if the file changes in between.
fn pin_components(settings: &mut Settings) -> Result<()> {
    for app in &mut settings.apps {
        let version = compile_cache::version_of(&app.component)
            .map_err(|error| anyhow::anyhow!(Refusal::AppLoad(format!("{error:#}"))))?;
        // Told before anything is compiled, in the flag's terms (the engine would refuse it
        // later, in bytes of hex, per memory).
        let limit = app.settings.memory_limit;
        if version.initial_memory > limit {
            return Err(anyhow::anyhow!(Refusal::AppLoad(format!(
                "app `{}`: {} starts with {} of linear memory, more than its --memory-limit of {}: give it at least --memory-limit {}MiB",
                app.name,
                app.component.display(),
                human_size(version.initial_memory),
                human_size(limit),
                version.initial_memory.div_ceil(1 << 20)
            ))));
        }
        app.version = Some(version);
    }
    Ok(())
}

/// Compiles the component into the cache, so workers only map it (gunicorn's `--preload`), and
/// returns the resident memory of a process that has loaded it as a worker does. The work is
/// done by a short-lived child (`host prepare`), so the compiler's memory never stays in the
/// long-lived master.
fn precompile(settings: &mut Settings) -> Result<Baseline> {
    // The certificate is checked here too, so a reload with a bad one keeps the old workers.
    if let Some(files) = &settings.tls {
        crate::serving::tls::server_config(files)?;
    }
    pin_components(settings)?;
    // Reading and checking the components took their size, which the master, idle once its
    // workers run, would otherwise keep.
    crate::allocator::give_back_freed();
    match prepare_in_child(settings)? {
        // Measured again without the compiler's leftovers (a cold cache made the first figure
        // of a 31 MB Python component 115 MiB, of which a worker takes 4).
        (_, true) => Ok(prepare_in_child(settings)?.0),
        (baseline, false) => Ok(baseline),
    }
}

/// Runs `host prepare`: the baseline it measured, and whether it compiled a component first.
fn prepare_in_child(settings: &Settings) -> Result<(Baseline, bool)> {
    let handed = HandoffFile::new(settings)?;
    let inherited = [handed.as_raw_fd()];
    let mut command = host_command();
    handoff::without_secrets(&mut command)
        .arg("prepare")
        .envs(crate::allocator::for_children())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl and
    // dup2, which are async-signal-safe.
    unsafe {
        command.pre_exec(move || handoff::place_inherited_fds(&inherited));
    }
    let output = command.output().context("cannot run the compile step")?;
    drop(handed);
    let baseline = |figures: String| -> Result<Baseline> {
        figures
            .parse()
            .context("the compile step reported no baseline")
    };
    match PrepareReport::read(&String::from_utf8_lossy(&output.stdout)) {
        Some(PrepareReport::Prepared(figures)) => Ok((baseline(figures)?, false)),
        Some(PrepareReport::Compiled(figures)) => Ok((baseline(figures)?, true)),
        Some(PrepareReport::Failed(reason)) => Err(anyhow::anyhow!(Refusal::AppLoad(reason))),
        None => Err(anyhow::anyhow!(Refusal::AppLoad(format!(
            "the compile step failed ({})",
            output.status
        )))),
    }
}

/// `host prepare`: loads the components as a worker would and reports the resident memory,
/// and whether it compiled any of them first.
pub fn prepare(settings: &Settings) -> Result<(Baseline, bool)> {
    let engine = engine::build(EngineSizing::for_apps(&settings.apps))?;
    let mut guests = Vec::new();
    let mut compiled_any = false;
    for app in &settings.apps {
        let (component, compiled) = compile_cache::load_or_compile(
            &engine,
            &app.component,
            &settings.cache_dir,
            app.version.as_ref().map(|version| version.digest.as_str()),
        )
        .with_context(|| format!("app `{}`", app.name))?;
        compiled_any |= compiled;
        let linked = crate::runtime::guest::link(&engine, &component, app)
            .with_context(|| format!("cannot load {}", app.component.display()))?;
        guests.push(linked);
    }
    Ok((Baseline::measure(), compiled_any))
}

/// Binds every address at start, retrying an address in use five times a second apart, as
/// gunicorn does: the workers of a master that was killed leave within a second of it (they
/// watch their parent), and a supervisor restarting the host at once must not lose to them.
fn bind_all_at_start(settings: &Settings) -> Result<Vec<(BindAddress, Listener)>> {
    const ATTEMPTS: u32 = 5;
    for attempt in 1.. {
        match bind_all(settings, &[]) {
            Err(error) if attempt < ATTEMPTS && address_in_use(&error) => {
                tracing::error!("{error:#}");
                tracing::error!("Retrying in 1 second.");
                std::thread::sleep(Duration::from_secs(1));
            }
            bound => return bound,
        }
    }
    unreachable!("the loop returns by its last attempt")
}

fn address_in_use(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    })
}

/// Binds every address of `settings`, reusing the listeners of `keep` that are still wanted.
fn bind_all(
    settings: &Settings,
    keep: &[(BindAddress, Listener)],
) -> Result<Vec<(BindAddress, Listener)>> {
    let mut listeners = Vec::new();
    for address in &settings.binds {
        let listener = match keep.iter().find(|(kept, _)| kept == address) {
            Some((_, listener)) => listener.try_clone()?,
            None => Listener::bind(address, settings.backlog, settings.reuse_port)?,
        };
        tracing::info!(
            "Listening at: {} ({})",
            listener.describe(settings.tls.is_some()),
            std::process::id()
        );
        listeners.push((address.clone(), listener));
    }
    Ok(listeners)
}

/// The next change `--reload` saw; never, without it.
async fn next_change(reloader: &mut Option<Reloader>) -> Vec<std::path::PathBuf> {
    match reloader {
        Some(reloader) => reloader.changed().await,
        None => std::future::pending().await,
    }
}

struct MasterSignals {
    term: Signal,
    int: Signal,
    quit: Signal,
    hup: Signal,
    ttin: Signal,
    ttou: Signal,
    usr1: Signal,
}

impl MasterSignals {
    fn install() -> Result<MasterSignals> {
        let on = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot handle {name}"))
        };
        Ok(MasterSignals {
            term: on(SignalKind::terminate(), "SIGTERM")?,
            int: on(SignalKind::interrupt(), "SIGINT")?,
            quit: on(SignalKind::quit(), "SIGQUIT")?,
            hup: on(SignalKind::hangup(), "SIGHUP")?,
            ttin: on(SignalKind::from_raw(libc::SIGTTIN), "SIGTTIN")?,
            ttou: on(SignalKind::from_raw(libc::SIGTTOU), "SIGTTOU")?,
            usr1: on(SignalKind::user_defined1(), "SIGUSR1")?,
        })
    }
}

enum Stop {
    Graceful,
    Quick,
    Halt(ExitCode),
}

impl Master {
    async fn supervise(
        &mut self,
        mut exited: mpsc::UnboundedReceiver<(u64, ExitStatus)>,
        reload: impl Fn() -> Result<Settings>,
    ) -> Result<ExitCode> {
        let mut signals = MasterSignals::install()?;
        tracing::info!("Using worker: {}", self.settings.app.worker_class.name());
        hooks::event("when_ready", &[("pid", std::process::id().to_string())]);
        let mut checks = tokio::time::interval(CHECK_EVERY);
        let mut reloader = Reloader::watch(&self.settings)?;
        let stop = loop {
            self.manage_workers();
            tokio::select! {
                _ = signals.term.recv() => {
                    tracing::info!("Handling signal: term");
                    break Stop::Graceful;
                }
                _ = signals.int.recv() => {
                    tracing::info!("Handling signal: int");
                    break Stop::Quick;
                }
                _ = signals.quit.recv() => {
                    tracing::info!("Handling signal: quit");
                    break Stop::Quick;
                }
                _ = signals.hup.recv() => {
                    tracing::info!("Handling signal: hup");
                    self.reload(&reload);
                    self.watch_again(&mut reloader);
                }
                changed = next_change(&mut reloader) => {
                    let names: Vec<String> =
                        changed.iter().map(|file| file.display().to_string()).collect();
                    tracing::info!("reload: {} changed", names.join(", "));
                    self.reload(&reload);
                    self.watch_again(&mut reloader);
                }
                _ = signals.ttin.recv() => {
                    tracing::info!("Handling signal: ttin");
                    match check_budget(&self.settings, self.target + 1, self.baseline) {
                        Ok(()) => {
                            self.target += 1;
                            hooks::event("nworkers_changed", &[("workers", self.target.to_string())]);
                        }
                        Err(error) => tracing::error!("TTIN refused: {error:#}"),
                    }
                }
                _ = signals.ttou.recv() => {
                    tracing::info!("Handling signal: ttou");
                    if self.target > 1 {
                        self.target -= 1;
                        hooks::event("nworkers_changed", &[("workers", self.target.to_string())]);
                    }
                }
                _ = signals.usr1.recv() => {
                    tracing::info!("Handling signal: usr1");
                    match self.error_log.reopen() {
                        Ok(()) => tracing::info!("Reopened the log files"),
                        Err(error) => tracing::error!("cannot reopen the error log: {error:#}"),
                    }
                    self.signal_all(libc::SIGUSR1);
                }
                Some((age, status)) = exited.recv() => {
                    if let Some(code) = self.reap(age, status) {
                        break Stop::Halt(code);
                    }
                }
                _ = checks.tick() => self.check_workers(),
            }
        };
        self.stop(stop, &mut exited).await
    }

    /// Starts workers up to the target and retires the oldest beyond it.
    fn manage_workers(&mut self) {
        let active = |workers: &BTreeMap<u64, WorkerProcess>| {
            workers
                .values()
                .filter(|w| w.retiring_since.is_none())
                .count()
        };
        while active(&self.workers) < self.target {
            if let Err(error) = self.spawn_worker() {
                tracing::error!("cannot start a worker: {error:#}");
                break;
            }
        }
        while active(&self.workers) > self.target {
            let Some(oldest) = self
                .workers
                .values_mut()
                .find(|w| w.retiring_since.is_none())
            else {
                break;
            };
            retire(oldest);
        }
    }

    fn spawn_worker(&mut self) -> Result<()> {
        let heartbeat = Heartbeat::create(self.run_dir.path())?;
        let age = self.next_age;
        self.next_age += 1;
        hooks::event("pre_fork", &[("age", age.to_string())]);
        let handoff = WorkerHandoff {
            settings: self.settings.clone(),
            master_key: self.master_key,
            host_semaphores: self.host_semaphores,
            master_pid: std::process::id(),
        };
        let handed = HandoffFile::new(&handoff).context("cannot pass the settings to a worker")?;
        let mut inherited = vec![handed.as_raw_fd()];
        inherited.extend(
            self.listeners
                .iter()
                .map(|(_, listener)| listener.as_raw_fd()),
        );
        inherited.push(heartbeat.as_raw_fd());
        let mut command = tokio::process::Command::from(host_command());
        handoff::without_secrets(command.as_std_mut());
        command
            .arg("worker")
            .envs(crate::allocator::for_children())
            .stdin(std::process::Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and only calls fcntl and
        // dup2, which are async-signal-safe.
        unsafe {
            command.pre_exec(move || handoff::place_inherited_fds(&inherited));
        }
        let mut child = command.spawn().context("cannot start a worker process")?;
        drop(handed);
        let pid = child.id().context("the worker exited at once")?;
        let exits = self.exits.clone();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let _ = exits.send((age, status));
            }
        });
        hooks::event("post_fork", &[("pid", pid.to_string())]);
        if let Some(metrics) = &self.metrics {
            lock(metrics).worker_started(pid);
        }
        self.workers.insert(
            age,
            WorkerProcess {
                pid,
                heartbeat,
                aborted_at: None,
                retiring_since: None,
                killed_by_master: false,
            },
        );
        Ok(())
    }

    /// Logs a worker's end; `Some(code)` when the master must halt (a worker that cannot boot
    /// would fail the same way again: no restart loop).
    fn reap(&mut self, age: u64, status: ExitStatus) -> Option<ExitCode> {
        let worker = self.workers.remove(&age)?;
        let pid = worker.pid;
        if let Err(error) = crate::capabilities::remove_leftovers_of(&self.settings, pid) {
            tracing::warn!("{error:#}");
        }
        if let Some(metrics) = &self.metrics {
            lock(metrics).worker_exited(pid);
        }
        match (status.code(), status.signal()) {
            (Some(0), _) => {}
            (Some(code), _)
                if worker.retiring_since.is_none()
                    && code == i32::from(handoff::EXIT_BOOT_ERROR) =>
            {
                tracing::error!("Worker (pid:{pid}) failed to boot; shutting down");
                return Some(handoff::EXIT_BOOT_ERROR);
            }
            (Some(code), _)
                if worker.retiring_since.is_none()
                    && code == i32::from(handoff::EXIT_APP_LOAD_ERROR) =>
            {
                tracing::error!("Worker (pid:{pid}) failed to load the app; shutting down");
                return Some(handoff::EXIT_APP_LOAD_ERROR);
            }
            (Some(code), _) => tracing::error!("Worker (pid:{pid}) exited with code {code}"),
            (None, Some(libc::SIGKILL)) if worker.killed_by_master => {
                tracing::error!("Worker (pid:{pid}) was sent SIGKILL by the master")
            }
            (None, Some(libc::SIGKILL)) => {
                tracing::error!("Worker (pid:{pid}) was sent SIGKILL! Perhaps out of memory?")
            }
            (None, Some(signal)) => {
                tracing::error!("Worker (pid:{pid}) was sent {}!", signal_name(signal))
            }
            (None, None) => tracing::error!("Worker (pid:{pid}) ended"),
        }
        hooks::event("child_exit", &[("pid", pid.to_string())]);
        None
    }

    /// The heartbeat check: a worker silent for more than `--timeout` gets SIGABRT, then
    /// SIGKILL; a retiring worker past `--graceful-timeout` gets SIGKILL.
    fn check_workers(&mut self) {
        let now = Instant::now();
        for worker in self.workers.values_mut() {
            if let Some(since) = worker.retiring_since {
                if now.duration_since(since) > self.settings.graceful_timeout
                    && !worker.killed_by_master
                {
                    tracing::warn!(
                        "Worker (pid:{}) did not finish within the graceful timeout",
                        worker.pid
                    );
                    kill(worker, libc::SIGKILL);
                }
                continue;
            }
            if worker.heartbeat.is_retiring() {
                tracing::info!(
                    "Worker (pid:{}) is retiring (--max-requests or --idle-recycle); starting its replacement",
                    worker.pid
                );
                worker.retiring_since = Some(now);
                continue;
            }
            let Some(timeout) = self.settings.app.timeout else {
                continue;
            };
            let silent = worker.heartbeat.silence().unwrap_or_default();
            match worker.aborted_at {
                None if silent > timeout => {
                    tracing::error!("WORKER TIMEOUT (pid:{})", worker.pid);
                    worker.aborted_at = Some(now);
                    send(worker.pid, libc::SIGABRT);
                }
                Some(aborted)
                    if now.duration_since(aborted) >= ABORT_GRACE && !worker.killed_by_master =>
                {
                    kill(worker, libc::SIGKILL);
                }
                _ => {}
            }
        }
    }

    /// The files to watch for `--reload` may have changed with the settings.
    fn watch_again(&self, reloader: &mut Option<Reloader>) {
        match Reloader::watch(&self.settings) {
            Ok(watching) => *reloader = watching,
            Err(error) => tracing::error!("{error:#}; the old watch stays"),
        }
    }

    fn reload(&mut self, reload: &impl Fn() -> Result<Settings>) {
        hooks::event("on_reload", &[("pid", std::process::id().to_string())]);
        let reloaded = reload().and_then(|mut settings| {
            prepare_directories(&settings)?;
            let master_key = settle_master_key(&settings)?;
            if settings.encrypt_concurrency != self.settings.encrypt_concurrency {
                tracing::warn!(
                    "--encrypt-concurrency changes only on a restart; keeping {}",
                    self.settings.encrypt_concurrency
                );
                settings.encrypt_concurrency = self.settings.encrypt_concurrency;
            }
            if settings.metrics_bind != self.settings.metrics_bind {
                tracing::warn!("--metrics-bind changes only on a restart; keeping the old address");
                settings.metrics_bind = self.settings.metrics_bind;
            }
            if settings.worker_tmp_dir != self.run_dir.parent() {
                tracing::warn!(
                    "--worker-tmp-dir changes only on a restart; keeping {}",
                    self.run_dir.parent().display()
                );
            }
            // The heartbeats and metrics files of old and new workers stay in one place.
            settings.worker_tmp_dir = self.run_dir.path().to_owned();
            let baseline = precompile(&mut settings)?;
            check_budget(&settings, settings.workers, baseline)?;
            Ok((settings, master_key, baseline))
        });
        let (settings, master_key, baseline) = match reloaded {
            Ok(reloaded) => reloaded,
            Err(error) => {
                tracing::error!("reload refused, the workers keep the old settings: {error:#}");
                return;
            }
        };
        let listeners = match bind_all(&settings, &self.listeners) {
            Ok(listeners) => listeners,
            Err(error) => {
                tracing::error!("reload refused, cannot bind: {error:#}");
                return;
            }
        };
        remove_unix_sockets(
            self.listeners
                .iter()
                .filter(|(old, _)| !settings.binds.contains(old)),
        );
        self.listeners = listeners;
        self.target = settings.workers;
        self.settings = settings;
        self.master_key = master_key;
        self.baseline = baseline;
        // New workers first, then the old ones finish what they have and leave.
        for worker in self.workers.values_mut() {
            if worker.retiring_since.is_none() {
                retire(worker);
            }
        }
    }

    fn signal_all(&self, signal: i32) {
        for worker in self.workers.values() {
            send(worker.pid, signal);
        }
    }

    async fn stop(
        &mut self,
        stop: Stop,
        exited: &mut mpsc::UnboundedReceiver<(u64, ExitStatus)>,
    ) -> Result<ExitCode> {
        // The master's copies of the listeners go first; the workers close theirs as they stop.
        remove_unix_sockets(self.listeners.iter());
        self.listeners.clear();
        let (signal, code) = match stop {
            Stop::Graceful => (libc::SIGTERM, 0),
            Stop::Quick => (libc::SIGQUIT, 0),
            Stop::Halt(code) => (libc::SIGTERM, code),
        };
        self.signal_all(signal);
        let deadline = tokio::time::Instant::now() + self.settings.graceful_timeout;
        while !self.workers.is_empty() {
            match tokio::time::timeout_at(deadline, exited.recv()).await {
                Ok(Some((age, status))) => {
                    self.reap(age, status);
                }
                Ok(None) => break,
                Err(_) => {
                    for worker in self.workers.values_mut() {
                        kill(worker, libc::SIGKILL);
                    }
                    while let Some((age, status)) = exited.recv().await {
                        self.reap(age, status);
                        if self.workers.is_empty() {
                            break;
                        }
                    }
                }
            }
        }
        hooks::event("on_exit", &[("pid", std::process::id().to_string())]);
        tracing::info!("Shutting down: Master");
        Ok(code)
    }

    fn cleanup(&mut self) {
        if let Some(pidfile) = &self.settings.pidfile {
            let _ = std::fs::remove_file(pidfile);
        }
    }
}

/// A command running the binary this master runs, for its workers and its compile step:
/// `/proc/self/exe`, which stays this very binary when the file is replaced or removed on disk
/// (an upgrade in place), where its path would then name a new binary or nothing, and no worker
/// could start again. The processes show the name the master was started with.
fn host_command() -> std::process::Command {
    let mut command = std::process::Command::new("/proc/self/exe");
    if let Some(name) = std::env::args_os().next() {
        command.arg0(name);
    }
    command
}

fn retire(worker: &mut WorkerProcess) {
    worker.retiring_since = Some(Instant::now());
    send(worker.pid, libc::SIGTERM);
}

fn kill(worker: &mut WorkerProcess, signal: i32) {
    worker.killed_by_master = true;
    send(worker.pid, signal);
}

fn send(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is a child not yet reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

fn remove_unix_sockets<'a>(listeners: impl Iterator<Item = &'a (BindAddress, Listener)>) {
    for (address, _) in listeners {
        if let BindAddress::Unix(path) = address {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGILL => "SIGILL".into(),
        other => format!("signal {other}"),
    }
}
