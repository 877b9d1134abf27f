//! `host`: serves WebAssembly HTTP components (`wasi:http/proxy`) the way gunicorn serves WSGI
//! apps, with a memory cap, a deadline and a sandbox around every request.

mod access_log;
mod admission;
mod compile_cache;
mod engine;
mod guest;
mod handler;
mod http;
mod limits;
mod logging;
mod server;
mod settings;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::logging::LogFile;
use crate::settings::{ServeArgs, Settings};
use crate::worker::StartError;

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
}

/// gunicorn's exit codes for a worker that cannot boot and an app that cannot load.
const EXIT_BOOT_ERROR: u8 = 3;
const EXIT_APP_LOAD_ERROR: u8 = 4;

fn main() -> ExitCode {
    let Command::Serve(args) = Cli::parse().command;
    let settings = match Settings::from_args(*args) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("Error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let error_log = match LogFile::open(&settings.error_logfile, false)
        .and_then(|log| logging::init(settings.log_level, log.clone()).map(|()| log))
    {
        Ok(log) => log,
        Err(error) => {
            eprintln!("Error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!("Starting host {}", env!("CARGO_PKG_VERSION"));
    match worker::run(&settings, error_log) {
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

/// A fatal error goes to the error log, and to the terminal too when the log is a file.
fn report(settings: &Settings, error: &anyhow::Error) {
    tracing::error!("{error:#}");
    if settings.error_logfile != "-" {
        eprintln!("Error: {error:#}");
    }
}
