//! A guest's stdout and stderr, as lines of the error log under the request's id, where an
//! operator looks for them (gunicorn leaves an app's prints on the worker's stdout, unattributed).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

use crate::lock::lock;

/// A partial line longer than this is logged as it is.
const LONGEST_LINE: usize = 8 * 1024;

#[derive(Clone)]
pub struct GuestOutput {
    stream: &'static str,
    span: OutputSpan,
}

/// The span an instance's output is logged in: the request it serves, set again as a kept
/// instance takes its next request.
#[derive(Clone)]
pub struct OutputSpan(Arc<Mutex<tracing::Span>>);

impl OutputSpan {
    /// Starts in the current span.
    pub fn current() -> OutputSpan {
        OutputSpan(Arc::new(Mutex::new(tracing::Span::current())))
    }

    /// From now on, the output goes under the current span (the request now served).
    pub fn follow_current(&self) {
        *lock(&self.0) = tracing::Span::current();
    }
}

impl GuestOutput {
    /// `stream` is `stdout` or `stderr`; lines are logged in `span`.
    pub fn new(stream: &'static str, span: OutputSpan) -> GuestOutput {
        GuestOutput { stream, span }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            output: self.clone(),
            pending: Vec::new(),
        })
    }
}

struct LineWriter {
    output: GuestOutput,
    pending: Vec<u8>,
}

impl LineWriter {
    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return;
        }
        let text = without_controls(text);
        let span = lock(&self.output.span.0).clone();
        let _entered = span.enter();
        match self.output.stream {
            "stderr" => tracing::warn!("app stderr: {text}"),
            _ => tracing::info!("app stdout: {text}"),
        }
    }

    fn emit_complete_lines(&mut self) {
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.emit(&line[..line.len() - 1]);
        }
        if self.pending.len() > LONGEST_LINE {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
    }
}

/// A guest's line with its control characters (a carriage return that would overwrite the
/// line on a terminal, escape sequences) written `\xNN`: the app, or a client whose input it
/// prints, cannot forge or hide lines of the error log. Tabs stay.
fn without_controls(text: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write;
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out.into()
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.pending.extend_from_slice(buf);
        this.emit_complete_lines();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.pending.is_empty() {
            let line = std::mem::take(&mut this.pending);
            this.emit(&line);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(without_controls("plain\ttext é"), "plain\ttext é");
        assert_eq!(
            without_controls("a\rforged\x1b[2Kb\u{85}"),
            "a\\x0dforged\\x1b[2Kb\\x85"
        );
    }
}
