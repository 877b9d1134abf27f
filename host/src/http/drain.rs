//! Request bodies an app did not read to the end.
//!
//! An app may answer before it has read the request's body (a 404 for an upload that is gone,
//! a 400 for a part of the wrong size). Closing the connection then resets it while the client
//! is still sending, and the client sees a broken connection instead of the answer. So a body
//! dropped unread is read to its end and thrown away in the background, within limits, as
//! nginx's lingering close does; a body larger than that is cut and the connection closed.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The most of an unread body that is read and thrown away.
const DRAIN_LIMIT: u64 = 64 << 20;
/// The longest a client gets to finish sending a body nobody reads.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// The request body as the app reads it: cut at the app's `--limit-request-body`, and drained
/// if the app leaves it unread.
pub struct DrainedIfDropped {
    inner: Option<Incoming>,
    ended: bool,
    limit: Option<u64>,
    read: u64,
}

impl DrainedIfDropped {
    pub fn new(inner: Incoming) -> DrainedIfDropped {
        DrainedIfDropped {
            inner: Some(inner),
            ended: false,
            limit: None,
            read: 0,
        }
    }

    /// A body with nothing in it.
    pub fn empty() -> DrainedIfDropped {
        DrainedIfDropped {
            inner: None,
            ended: true,
            limit: None,
            read: 0,
        }
    }

    /// Cuts the body after `limit` bytes (the app's `--limit-request-body`).
    pub fn limit(&mut self, limit: Option<u64>) {
        self.limit = limit;
    }
}

impl Body for DrainedIfDropped {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(context);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Ok(frame))) => {
                self.read += frame.data_ref().map_or(0, |data| data.len() as u64);
                if let Some(limit) = self.limit
                    && self.read > limit
                {
                    tracing::warn!(
                        "request body cut: more than the {limit} bytes of --limit-request-body"
                    );
                    // Not drained: the connection closes after the response.
                    self.inner = None;
                    return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpRequestBodySize(
                        Some(self.read),
                    ))));
                }
            }
            _ => {}
        }
        polled.map(|frame| frame.map(|frame| frame.map_err(wasmtime_wasi_http::Error::Hyper)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for DrainedIfDropped {
    fn drop(&mut self) {
        let Some(mut body) = self.inner.take() else {
            return;
        };
        if self.ended || body.is_end_stream() {
            return;
        }
        if body
            .size_hint()
            .upper()
            .is_some_and(|upper| upper > DRAIN_LIMIT)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let drain = async {
                let mut thrown = 0u64;
                while let Some(Ok(frame)) = body.frame().await {
                    thrown += frame.data_ref().map_or(0, |data| data.len() as u64);
                    if thrown > DRAIN_LIMIT {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        });
    }
}
