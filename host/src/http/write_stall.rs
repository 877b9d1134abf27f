//! A connection on which the client reads nothing of a response for the app's `--timeout` is
//! closed. The guest's own deadline covers a response it is still writing; this covers what is
//! left once it has finished (the tail hyper and the socket buffers hold), which would otherwise
//! keep a place under `--max-connections` for as long as the client likes. gunicorn's arbiter
//! kills a sync worker blocked on such a send after `--timeout` too.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::time::{Instant, Sleep};

pub struct WriteStallTimeout<I> {
    inner: I,
    timeout: Duration,
    /// Armed while a write waits on the client; disarmed by any progress.
    stalled_since: Option<Pin<Box<Sleep>>>,
}

impl<I> WriteStallTimeout<I> {
    pub fn new(inner: I, timeout: Duration) -> WriteStallTimeout<I> {
        WriteStallTimeout {
            inner,
            timeout,
            stalled_since: None,
        }
    }

    /// Passes a write's outcome on; a pending one arms the timer, which fails it once run out.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        outcome: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if outcome.is_ready() {
            self.stalled_since = None;
            return outcome;
        }
        let timeout = self.timeout;
        let timer = self
            .stalled_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client read nothing of the response for {} s (--timeout)",
                timeout.as_secs_f64()
            ),
        )))
    }
}

impl<I: Read + Unpin> Read for WriteStallTimeout<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: Write + Unpin> Write for WriteStallTimeout<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, outcome)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, outcome)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, outcome)
    }
}
