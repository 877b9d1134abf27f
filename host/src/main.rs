//! `host`: serves WebAssembly HTTP components (`wasi:http/proxy`) the way gunicorn serves WSGI
//! apps, with a memory cap, a deadline and a sandbox around every request.

mod access_log;
mod admission;
mod arbiter;
mod compile_cache;
mod engine;
mod guest;
mod handler;
mod heartbeat;
mod hooks;
mod http;
mod limits;
mod logging;
mod server;
mod settings;
mod worker;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::logging::LogFile;
use crate::server::Listener;
use crate::settings::{ServeArgs, Settings};
use crate::worker::{EXIT_APP_LOAD_ERROR, EXIT_BOOT_ERROR, StartError};

/// Many small allocations per request (headers, resources, futures) from several threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(*args),
        Command::Worker => worker(),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let settings = match Settings::from_args(args) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("Error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    for (key, value) in &settings.env {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var(key, value) };
    }
    let Some(error_log) = start_logging(&settings) else {
        return ExitCode::FAILURE;
    };
    tracing::info!("Starting host {}", env!("CARGO_PKG_VERSION"));
    match arbiter::run(settings.clone(), error_log, reload_settings) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            report(&settings, &error);
            if error.downcast_ref::<arbiter::AppLoadError>().is_some() {
                ExitCode::from(EXIT_APP_LOAD_ERROR)
            } else {
                ExitCode::from(EXIT_BOOT_ERROR)
            }
        }
    }
}

/// On HUP the settings are read again from the same command line and environment.
fn reload_settings() -> Result<Settings> {
    let cli = Cli::try_parse_from(std::env::args_os()).context("the command line no longer parses")?;
    match cli.command {
        Command::Serve(args) => Settings::from_args(*args),
        Command::Worker => anyhow::bail!("a worker does not reload"),
    }
}

fn worker() -> ExitCode {
    let settings = match worker_settings() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("Error: {error:#}");
            return ExitCode::from(EXIT_BOOT_ERROR);
        }
    };
    let Some(error_log) = start_logging(&settings) else {
        return ExitCode::from(EXIT_BOOT_ERROR);
    };
    let inherited = settings
        .binds
        .iter()
        .enumerate()
        // SAFETY: the master placed one listening socket per bind, in order, from fd 3 on.
        .map(|(index, bind)| unsafe { Listener::inherit(bind, arbiter::FIRST_INHERITED_FD + index as i32) })
        .collect::<Result<Vec<_>>>();
    let listeners = match inherited {
        Ok(listeners) => listeners,
        Err(error) => {
            report(&settings, &error);
            return ExitCode::from(EXIT_BOOT_ERROR);
        }
    };
    // SAFETY: the master placed the heartbeat file right after the listeners.
    let heartbeat = heartbeat::Heartbeat::from_fd(unsafe {
        heartbeat::owned_fd(arbiter::FIRST_INHERITED_FD + settings.binds.len() as i32)
    });
    match worker::run(&settings, error_log, listeners, heartbeat) {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::App(error)) => {
            report(&settings, &error);
            ExitCode::from(EXIT_APP_LOAD_ERROR)
        }
        Err(StartError::Boot(error)) => {
            report(&settings, &error);
            ExitCode::from(EXIT_BOOT_ERROR)
        }
    }
}

fn worker_settings() -> Result<Settings> {
    let json = std::env::var(arbiter::WORKER_SETTINGS_ENV)
        .context("`host worker` is started by `host serve`, not by hand")?;
    serde_json::from_str(&json).context("the master passed unreadable settings")
}

fn start_logging(settings: &Settings) -> Option<LogFile> {
    match LogFile::open(&settings.error_logfile, false)
        .and_then(|log| logging::init(settings.log_level, log.clone()).map(|()| log))
    {
        Ok(log) => Some(log),
        Err(error) => {
            eprintln!("Error: {error:#}");
            None
        }
    }
}

/// A fatal error goes to the error log, and to the terminal too when the log is a file.
fn report(settings: &Settings, error: &anyhow::Error) {
    tracing::error!("{error:#}");
    if settings.error_logfile != "-" {
        eprintln!("Error: {error:#}");
    }
}
