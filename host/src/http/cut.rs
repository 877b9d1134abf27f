//! A guest's response body ends as a complete message only if the guest ended it.
//!
//! wasmtime ends a response body normally when the guest's instance is dropped, whatever the
//! reason: a guest that traps, hits its memory limit or runs past its deadline after its
//! response has started would give the client a chunked body with its terminator, a short body
//! that looks whole. The body's stream cannot tell that end from the guest's own `finish`, but
//! the order of events can: a guest finishes its body while it runs, and its instance is dropped
//! only after its outcome is settled. So a stream that ends once a failure is settled ends with
//! an error instead, on which hyper closes the connection without the final chunk (or short of
//! the declared `Content-Length`), and the client sees a cut response. A body the guest
//! finished goes out whole at once while the guest goes on working; only if it then fails
//! before the client has taken the body's end is that end cut too.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot::{self, error::TryRecvError};

use crate::http::answers::ResponseBody;

/// Held by the task that runs the guest, and settled before the guest's instance is dropped.
pub struct GuestOutcome(oneshot::Sender<()>);

/// The other end, which becomes the response body's ending.
pub struct GuestEnding {
    outcome: oneshot::Receiver<()>,
    delivered: oneshot::Sender<()>,
}

/// Resolves once the response body has gone out whole; fails if it was cut or dropped (the
/// client left, or the response never started).
pub type BodyDelivered = oneshot::Receiver<()>;

pub fn guest_outcome() -> (GuestOutcome, GuestEnding, BodyDelivered) {
    let (sender, receiver) = oneshot::channel();
    let (delivered, body_delivered) = oneshot::channel();
    let ending = GuestEnding {
        outcome: receiver,
        delivered,
    };
    (GuestOutcome(sender), ending, body_delivered)
}

impl GuestOutcome {
    /// Whether the guest returned without failing. Must be called while the instance, and so
    /// the response body's sending end, is still alive.
    pub fn settle(self, succeeded: bool) {
        if succeeded {
            // The response may be gone already (the client left); nothing is waiting then.
            let _ = self.0.send(());
        }
        // Dropped unsent: the guest failed.
    }
}

impl GuestEnding {
    /// `body`, ended as the guest's outcome says; `declared` is its `Content-Length`.
    pub fn body(self, body: ResponseBody, declared: Option<u64>) -> ResponseBody {
        CompleteIfFinished {
            announced: declared,
            inner: body,
            ending: self.outcome,
            delivered: Some(self.delivered),
            sent: 0,
            ended: false,
        }
        .boxed_unsync()
    }
}

struct CompleteIfFinished {
    inner: ResponseBody,
    ending: oneshot::Receiver<()>,
    /// Told when the body has ended whole.
    delivered: Option<oneshot::Sender<()>>,
    /// The length the response declared, if it did, and the bytes passed on so far: hyper
    /// stops reading a body of declared length once it has that many bytes.
    announced: Option<u64>,
    sent: u64,
    ended: bool,
}

impl Drop for CompleteIfFinished {
    fn drop(&mut self) {
        if self.announced == Some(self.sent)
            && let Some(delivered) = self.delivered.take()
        {
            let _ = delivered.send(());
        }
    }
}

impl Body for CompleteIfFinished {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(data)) => {
                this.sent += data.data_ref().map_or(0, |data| data.len() as u64);
                return Poll::Ready(frame);
            }
            Some(Err(_)) => {
                // Never whole now, whatever its length.
                this.delivered = None;
                return Poll::Ready(frame);
            }
            None => {}
        }
        this.ended = true;
        match this.ending.try_recv() {
            // Settled as failed before the instance went: its stream ended because it was dropped.
            Err(TryRecvError::Closed) => {
                this.delivered = None;
                Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseIncomplete)))
            }
            // Still running (it finished the body itself), or returned without failing.
            Ok(()) | Err(TryRecvError::Empty) => {
                if let Some(delivered) = this.delivered.take() {
                    let _ = delivered.send(());
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Never known before the stream's own end: hyper must not end the message early.
        false
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
