//! The error log: gunicorn's line shape (`[time] [pid] [LEVEL] message`), `tracing` underneath,
//! with the request id of the span a line belongs to. It goes to stderr or to a file that can be
//! reopened (for log rotation).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::settings::LogLevel;

/// A log destination: stderr/stdout (`-`) or an append-only file that can be reopened.
#[derive(Clone)]
pub struct LogFile {
    target: Arc<Mutex<Target>>,
}

enum Target {
    Stderr,
    Stdout,
    File { path: PathBuf, file: File },
}

impl LogFile {
    /// `-` means the standard stream given; anything else is a path.
    pub fn open(spec: &str, dash_is_stdout: bool) -> Result<LogFile> {
        let target = match spec {
            "-" if dash_is_stdout => Target::Stdout,
            "-" => Target::Stderr,
            path => {
                let path = PathBuf::from(path);
                let file = open_append(&path)?;
                Target::File { path, file }
            }
        };
        Ok(LogFile {
            target: Arc::new(Mutex::new(target)),
        })
    }

    /// Reopens a file target under its path, so a rotated file is let go.
    pub fn reopen(&self) -> Result<()> {
        let mut target = crate::lock::lock(&self.target);
        if let Target::File { path, file } = &mut *target {
            *file = open_append(path)?;
        }
        Ok(())
    }

    /// Writes one whole line at once, so lines from concurrent requests never interleave.
    pub fn write_line(&self, line: &[u8]) {
        let mut target = crate::lock::lock(&self.target);
        // A log that cannot be written must not fail the request; nothing better can be done.
        let _ = match &mut *target {
            Target::Stderr => io::stderr().lock().write_all(line),
            Target::Stdout => io::stdout().lock().write_all(line),
            Target::File { file, .. } => file.write_all(line),
        };
    }
}

fn open_append(path: &PathBuf) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))
}

/// Collects one event's text and hands it to the `LogFile` in one write.
pub struct LineWriter {
    log: LogFile,
    line: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.log.write_line(&self.line);
    }
}

impl<'a> MakeWriter<'a> for LogFile {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            log: self.clone(),
            line: Vec::with_capacity(256),
        }
    }
}

/// gunicorn's error log line.
struct GunicornFormat {
    pid: u32,
}

impl<S, N> FormatEvent<S, N> for GunicornFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG | Level::TRACE => "DEBUG",
        };
        write!(writer, "[{}] [{}] [{level}] ", timestamp(), self.pid)?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{fields} ")?;
                }
            }
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    let mut text = String::with_capacity(26);
    let _ = write!(
        text,
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} +0000",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    text
}

/// Installs the error log as the process's `tracing` subscriber.
pub fn init(level: LogLevel, error_log: LogFile) -> Result<()> {
    let level = match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warning => "warn",
        LogLevel::Error | LogLevel::Critical => "error",
    };
    // `wasmtime_wasi_http` logs each failed outbound call as a warning of its own; the host
    // reports what matters about a request itself.
    let filter =
        tracing_subscriber::EnvFilter::try_new(format!("{level},wasmtime_wasi_http=error"))
            .context("invalid log filter")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(error_log)
        .with_ansi(false)
        .event_format(GunicornFormat {
            pid: std::process::id(),
        })
        .try_init()
        .map_err(|error| anyhow::anyhow!("cannot install the logger: {error}"))
}
