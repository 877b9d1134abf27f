//! A guest's response body ends as a complete message only if the guest finished.
//!
//! wasmtime ends a response body normally when the guest's instance is dropped, whatever the
//! reason: a guest that traps, hits its memory limit or runs past its deadline after its
//! response has started would give the client a chunked body with its terminator, a short body
//! that looks whole. So the end of the guest's stream is passed on only once the guest has
//! returned without failing; otherwise the body ends with an error, on which hyper closes the
//! connection without the final chunk (or short of the declared `Content-Length`), and the
//! client sees a cut response.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::http::answers::ResponseBody;

/// Held by the task that runs the guest: says the guest finished. Dropped unsaid (the guest
/// failed, its task panicked or was dropped), the response is cut.
pub struct GuestOutcome(oneshot::Sender<()>);

/// The other end, which becomes the response body's ending.
pub struct GuestEnding(oneshot::Receiver<()>);

pub fn guest_outcome() -> (GuestOutcome, GuestEnding) {
    let (sender, receiver) = oneshot::channel();
    (GuestOutcome(sender), GuestEnding(receiver))
}

impl GuestOutcome {
    pub fn finished(self) {
        // The response may be gone already (the client left); nothing is waiting then.
        let _ = self.0.send(());
    }
}

impl GuestEnding {
    /// `body`, ended as the guest's outcome says.
    pub fn body(self, body: ResponseBody) -> ResponseBody {
        CompleteIfFinished {
            inner: body,
            ending: self.0,
            state: State::Streaming,
        }
        .boxed_unsync()
    }
}

struct CompleteIfFinished {
    inner: ResponseBody,
    ending: oneshot::Receiver<()>,
    state: State,
}

enum State {
    Streaming,
    /// The guest's stream has ended; its outcome decides how the message ends.
    WaitingForGuest,
    Done,
}

impl Body for CompleteIfFinished {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match this.state {
            State::Done => return Poll::Ready(None),
            State::Streaming => match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers come only from the guest's own `finish`: the message is whole.
                    if frame.is_trailers() {
                        this.state = State::Done;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Some(Err(error)) => {
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(error)));
                }
                None => this.state = State::WaitingForGuest,
            },
            State::WaitingForGuest => {}
        }
        let finished = ready!(Pin::new(&mut this.ending).poll(cx)).is_ok();
        this.state = State::Done;
        if finished {
            Poll::Ready(None)
        } else {
            Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseIncomplete)))
        }
    }

    fn is_end_stream(&self) -> bool {
        // Never known before the guest's outcome: hyper must not end the message early.
        false
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
