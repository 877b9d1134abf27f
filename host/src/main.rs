//! `host`: serves WebAssembly HTTP components (`wasi:http/proxy`) the way gunicorn serves WSGI
//! apps, with a memory cap, a deadline and a sandbox around every request.

mod allocator;
mod capabilities;
mod clock;
mod config;
mod http;
#[cfg(test)]
mod layers;
mod lock;
mod logging;
mod metrics;
mod private_fs;
mod proc_memory;
mod process;
mod random;
mod run_dir;
mod runtime;
mod serving;
mod settings;

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::logging::LogFile;
use crate::process::handoff::{EXIT_APP_LOAD_ERROR, EXIT_BOOT_ERROR, PrepareReport, WorkerHandoff};
use crate::process::worker::StartError;
use crate::process::{arbiter, handoff, heartbeat, hooks, worker};
use crate::serving::server::Listener;
use crate::settings::{ServeArgs, Settings};

#[derive(Parser)]
#[command(name = "host", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a wasi:http component, with gunicorn's flags.
    Serve(Box<ServeArgs>),
    /// A worker process, started by the master of `host serve`.
    #[command(hide = true)]
    Worker,
    /// Compiles the component into the cache for the master of `host serve`.
    #[command(hide = true)]
    Prepare,
}

fn main() -> ExitCode {
    quiet_library_backtraces();
    // As with gunicorn's argparse, a setting given twice takes the later value.
    let command = Cli::command().mut_subcommand("serve", |serve| serve.args_override_self(true));
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|error| error.exit());
    match cli.command {
        Command::Serve(_) => serve(),
        Command::Worker => worker(),
        Command::Prepare => prepare(),
    }
}

/// Errors are logged on one line, without a Rust backtrace, yet with `RUST_BACKTRACE=1` in the
/// environment the standard library captures one for every error made: the engine makes one
/// each time it drops a WASIp3 instance whose guest still has a task waiting, which is most
/// fresh p3 requests. Panics keep their backtraces (`RUST_BACKTRACE`); a `RUST_LIB_BACKTRACE`
/// the user set is kept.
fn quiet_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

/// An error that ends a command with `code`, printed as gunicorn prints its own: `Error: …`.
struct Exit {
    error: anyhow::Error,
    code: ExitCode,
}

trait OrExit<T> {
    /// The error, to end the command with `code`.
    fn or_exit(self, code: ExitCode) -> Result<T, Exit>;
}

impl<T> OrExit<T> for Result<T> {
    fn or_exit(self, code: ExitCode) -> Result<T, Exit> {
        self.map_err(|error| Exit { error, code })
    }
}

/// Runs a command, printing the error it ends with, if any.
fn exit_code(command: impl FnOnce() -> Result<ExitCode, Exit>) -> ExitCode {
    command().unwrap_or_else(|exit| {
        eprintln!("Error: {:#}", exit.error);
        exit.code
    })
}

fn serve() -> ExitCode {
    // The master is long-lived and idle most of the time, as the workers are.
    allocator::apply_here();
    exit_code(|| {
        let command_line: Vec<OsString> = std::env::args_os().skip(2).collect();
        let layered = config::load(&command_line).or_exit(ExitCode::FAILURE)?;
        if layered.args.print_config {
            config::print(&layered);
            let declares_apps = layered
                .config
                .as_ref()
                .is_some_and(|config| config.document.contains_key("app"));
            if declares_apps {
                // The apps as they will run: the host's settings with each entry's overrides.
                let settings = config::settings(&layered).or_exit(ExitCode::FAILURE)?;
                config::apps::print(&layered, &settings).or_exit(ExitCode::FAILURE)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        let check_only = layered.args.check_config;
        let settings = config::settings(&layered).or_exit(ExitCode::FAILURE)?;
        for (key, value) in &settings.env {
            // SAFETY: no other thread exists yet.
            unsafe { std::env::set_var(key, value) };
        }
        let error_log = start_logging(&settings).or_exit(ExitCode::FAILURE)?;
        hooks::install(settings.hooks.clone());
        let from_gunicorn = config::from_gunicorn(&layered);
        if !from_gunicorn.is_empty() {
            tracing::info!(
                "{} supplied {} (HOST_* settings and the command line override it)",
                config::GUNICORN_CMD_ARGS,
                from_gunicorn.join(" ")
            );
        }
        if check_only {
            return check(&settings);
        }
        tracing::info!("Starting host {}", env!("CARGO_PKG_VERSION"));
        Ok(
            match arbiter::run(settings.clone(), error_log, reload_settings) {
                Ok(code) => ExitCode::from(code),
                Err(error) => {
                    report(&settings, &error);
                    match error.downcast_ref::<arbiter::Refusal>() {
                        Some(arbiter::Refusal::Budget(_)) => ExitCode::FAILURE,
                        Some(arbiter::Refusal::AppLoad(_)) => ExitCode::from(EXIT_APP_LOAD_ERROR),
                        None => ExitCode::from(EXIT_BOOT_ERROR),
                    }
                }
            },
        )
    })
}

/// `--check-config`: a budget that does not fit is a settings error (1); a component the host
/// cannot load is gunicorn's app-load error (4).
fn check(settings: &Settings) -> Result<ExitCode, Exit> {
    match arbiter::check(settings) {
        Ok(()) => {
            for app in &settings.apps {
                println!(
                    "configuration OK: {} is a wasi:http component this host can serve (app `{}`)",
                    app.component.display(),
                    app.name
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            let code = match error.downcast_ref::<arbiter::Refusal>() {
                Some(arbiter::Refusal::Budget(_)) => ExitCode::FAILURE,
                _ => ExitCode::from(EXIT_APP_LOAD_ERROR),
            };
            Err(Exit { error, code })
        }
    }
}

/// On HUP the settings are read again from every source, as at start.
fn reload_settings() -> Result<Settings> {
    let command_line: Vec<OsString> = std::env::args_os().skip(2).collect();
    config::settings(&config::load(&command_line)?)
}

fn worker() -> ExitCode {
    exit_code(run_worker)
}

fn run_worker() -> Result<ExitCode, Exit> {
    let boot_error = || ExitCode::from(EXIT_BOOT_ERROR);
    let handed: WorkerHandoff = handoff::read_inherited().or_exit(boot_error())?;
    let settings = &handed.settings;
    let error_log = start_logging(settings).or_exit(boot_error())?;
    // The worker's own events (post_worker_init, worker_int, worker_abort, worker_exit) run
    // their commands here.
    hooks::install(settings.hooks.clone());
    let heartbeat_fd = handoff::heartbeat_fd(settings.binds.len());
    // A hook command this worker runs must not hold its listeners or its heartbeat open.
    for fd in handoff::FIRST_LISTENER_FD..=heartbeat_fd {
        // SAFETY: fcntl on descriptors the master placed; a closed one only fails the call.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let inherited = settings
        .binds
        .iter()
        .enumerate()
        // SAFETY: the master placed one listening socket per bind, in order, from fd 4 on.
        .map(|(index, bind)| unsafe {
            Listener::inherit(bind, handoff::FIRST_LISTENER_FD + index as i32)
        })
        .collect::<Result<Vec<_>>>();
    let listeners = match inherited {
        Ok(listeners) => listeners,
        Err(error) => {
            report(settings, &error);
            return Ok(boot_error());
        }
    };
    // SAFETY: the master placed the heartbeat file right after the listeners.
    let heartbeat = heartbeat::Heartbeat::from_fd(unsafe { heartbeat::owned_fd(heartbeat_fd) });
    Ok(
        match worker::run(&handed, error_log, listeners, heartbeat) {
            Ok(()) => ExitCode::SUCCESS,
            Err(StartError::App(error)) => {
                report(settings, &error);
                ExitCode::from(EXIT_APP_LOAD_ERROR)
            }
            Err(StartError::Boot(error)) => {
                report(settings, &error);
                boot_error()
            }
        },
    )
}

fn prepare() -> ExitCode {
    let settings: Settings = match handoff::read_inherited() {
        Ok(settings) => settings,
        Err(error) => {
            PrepareReport::Failed(format!("{error:#}")).print();
            return ExitCode::from(EXIT_APP_LOAD_ERROR);
        }
    };
    if let Err(error) = start_logging(&settings) {
        eprintln!("Error: {error:#}");
        return ExitCode::from(EXIT_BOOT_ERROR);
    }
    match arbiter::prepare(&settings) {
        Ok((baseline, false)) => {
            PrepareReport::Prepared(baseline.to_string()).print();
            ExitCode::SUCCESS
        }
        Ok((baseline, true)) => {
            PrepareReport::Compiled(baseline.to_string()).print();
            ExitCode::SUCCESS
        }
        Err(error) => {
            PrepareReport::Failed(format!("{error:#}")).print();
            ExitCode::from(EXIT_APP_LOAD_ERROR)
        }
    }
}

fn start_logging(settings: &Settings) -> Result<LogFile> {
    LogFile::open(&settings.error_logfile, false)
        .and_then(|log| logging::init(settings.log_level, log.clone()).map(|()| log))
}

/// A fatal error goes to the error log, and to the terminal too when the log is a file.
fn report(settings: &Settings, error: &anyhow::Error) {
    tracing::error!("{error:#}");
    if settings.error_logfile != "-" {
        eprintln!("Error: {error:#}");
    }
}
