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
//!
//! A failure is passed to hyper one turn after it is known: hyper drops what it has buffered
//! and not yet written (the head, and the bytes the guest wrote before it failed) when a body
//! fails, and it writes its buffer out only when the body has nothing ready. Without that
//! turn, a guest that writes and fails at once would give its client nothing but a closed
//! connection, not the head and the bytes it wrote, cut.

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
            failure: None,
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
    /// The failure to pass on at the next poll, once hyper has written out what it holds.
    failure: Option<wasmtime_wasi_http::Error>,
}

impl CompleteIfFinished {
    fn fail(
        &mut self,
        error: wasmtime_wasi_http::Error,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>> {
        // Never whole now, whatever its length.
        self.delivered = None;
        self.failure = Some(error);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
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
        if let Some(failure) = this.failure.take() {
            return Poll::Ready(Some(Err(failure)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match frame {
            Some(Ok(data)) => {
                this.sent += data.data_ref().map_or(0, |data| data.len() as u64);
                return Poll::Ready(Some(Ok(data)));
            }
            Some(Err(error)) => {
                this.ended = true;
                return this.fail(error, cx);
            }
            None => {}
        }
        this.ended = true;
        match this.ending.try_recv() {
            // Settled as failed before the instance went: its stream ended because it was dropped.
            Err(TryRecvError::Closed) => {
                this.fail(wasmtime_wasi_http::Error::HttpResponseIncomplete, cx)
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::StreamBody;
    use hyper::Response;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// What a client reads of one response whose body is `body`, served by hyper on a real
    /// socket: everything until the server closes the connection.
    async fn served(body: ResponseBody) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let body = Mutex::new(Some(body));
        let server = async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let service = service_fn(move |_request| {
                let body = body.lock().expect("lock").take().expect("one request");
                async move { Ok::<_, std::convert::Infallible>(Response::new(body)) }
            });
            // The body fails, so the connection does: that is what is tested.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        };
        let client = async move {
            let mut socket = TcpStream::connect(address).await.expect("connect");
            socket
                .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                .await
                .expect("send the request");
            let mut read = Vec::new();
            let _ = socket.read_to_end(&mut read).await;
            String::from_utf8_lossy(&read).into_owned()
        };
        tokio::join!(server, client).1
    }

    /// A body of `text` and its end, both ready at once, of no declared length (chunked).
    fn written(text: &'static str) -> ResponseBody {
        let frame = Ok(Frame::data(Bytes::from_static(text.as_bytes())));
        StreamBody::new(futures::stream::iter([frame])).boxed_unsync()
    }

    #[tokio::test]
    async fn a_guest_that_writes_then_fails_at_once_gives_its_head_and_bytes_then_a_cut() {
        let (outcome, ending, delivered) = guest_outcome();
        // Settled as failed before the body is polled: its bytes and its end are both ready
        // at the first poll, as when a guest writes and traps at once.
        drop(outcome);
        let read = served(ending.body(written("written, "), None)).await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read:?}");
        assert!(read.contains("written, "), "{read:?}");
        assert!(
            !read.ends_with("0\r\n\r\n"),
            "the cut body read as whole: {read:?}"
        );
        assert!(delivered.await.is_err());
    }

    #[tokio::test]
    async fn a_guest_that_succeeded_gives_a_whole_body() {
        let (outcome, ending, delivered) = guest_outcome();
        outcome.settle(true);
        let read = served(ending.body(written("whole"), None)).await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read:?}");
        assert!(read.ends_with("whole\r\n0\r\n\r\n"), "{read:?}");
        assert!(delivered.await.is_ok());
    }
}
