//! Outbound HTTP (`wasi:http/outgoing-handler`) as an app is granted it: only to its allowed
//! hosts (any other is refused before a connection is made), with its connect and first-byte
//! timeouts, never past the request's own deadline, and at most `--outbound-connections`
//! connections open at once per app in a worker. A connection whose response was read to the
//! end is kept for the next request to the same origin, briefly (`IDLE_TIMEOUT`). Waiting on an
//! upstream is a suspended task, not a thread: a proxy whose upstream takes a minute holds its
//! instance slot, not a CPU.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

use crate::metrics::AppMetrics;
use crate::settings::Outbound;

/// An app's outbound HTTP, shared by its instances in a worker.
pub struct OutboundClient {
    app: String,
    grant: Outbound,
    /// One permit per open connection, held by the task that drives it, so a connection
    /// counts until it is really closed, idle or not.
    connections: Arc<Semaphore>,
    idle: Arc<IdleConnections>,
    tls: Arc<rustls::ClientConfig>,
    metrics: AppMetrics,
}

/// How long a connection is kept for reuse after its response. Shorter than the shortest
/// keep-alive of common servers (gunicorn's 2 s), so that an upstream does not close a
/// connection just as it is reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a connection goes: the scheme and `host:port`.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Origin {
    https: bool,
    address: String,
}

/// What `send_request` hands back to wasmtime-wasi-http: the response, and a task that drives
/// the connection until the body is read.
pub type Sent = (
    http::Response<WasiBody>,
    Box<dyn Future<Output = Result<(), Error>> + Send>,
);

impl OutboundClient {
    pub fn new(app: &str, grant: &Outbound, metrics: AppMetrics) -> anyhow::Result<OutboundClient> {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|error| anyhow::anyhow!("cannot set up TLS for outbound HTTP: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(OutboundClient {
            app: app.to_owned(),
            grant: grant.clone(),
            connections: Arc::new(Semaphore::new(grant.connections)),
            idle: Arc::default(),
            tls: Arc::new(tls),
            metrics,
        })
    }

    /// Sends `request` for a guest whose request must be done by `deadline`.
    pub async fn send(
        self: Arc<Self>,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        deadline: Option<Instant>,
    ) -> Result<Sent, Error> {
        let authority = request
            .uri()
            .authority()
            .map(|authority| authority.as_str().to_owned())
            .ok_or(Error::HttpRequestUriInvalid)?;
        if !self.grant.allows(&authority) {
            self.metrics.outbound(true);
            if self.grant.allowed_hosts.is_empty() {
                tracing::warn!(
                    "outbound request to {authority} refused: app `{}` may call no host (grant some with --allow-outbound)",
                    self.app
                );
            } else {
                tracing::warn!(
                    "outbound request to {authority} refused: app `{}` may call only {}",
                    self.app,
                    self.grant.allowed_hosts.join(", ")
                );
            }
            return Err(Error::HttpRequestDenied);
        }
        self.metrics.outbound(false);
        let left = || deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
        let shortest = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let guest = options.unwrap_or_default();
        let connect_timeout = shortest(
            shortest(Some(self.grant.connect_timeout), guest.connect_timeout),
            left(),
        )
        .unwrap_or(self.grant.connect_timeout);
        let https = request.uri().scheme() == Some(&http::uri::Scheme::HTTPS);
        let origin = Origin {
            https,
            address: if request.uri().port().is_some() {
                authority.clone()
            } else {
                format!("{authority}:{}", if https { 443 } else { 80 })
            },
        };
        // The request line carries only the path; the authority is in the Host header.
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |path| path.as_str())
            .parse()
            .map_err(|_| Error::HttpRequestUriInvalid)?;
        let mut request = request;
        *request.uri_mut() = path;
        let connect_by = Instant::now() + connect_timeout;
        let (response, sender) = loop {
            let (mut sender, reused) = self
                .connection(&origin, connect_by, connect_timeout)
                .await?;
            let first_byte_timeout = shortest(
                shortest(self.grant.first_byte_timeout, guest.first_byte_timeout),
                left(),
            );
            let respond = sender.try_send_request(request);
            let answer = match first_byte_timeout {
                Some(timeout) => tokio::time::timeout(timeout, respond)
                    .await
                    .map_err(|_| Error::ConnectionReadTimeout)?,
                None => respond.await,
            };
            match answer {
                Ok(response) => break (response, sender),
                Err(mut error) => match error.take_message() {
                    // A kept connection the upstream closed before the request went out: the
                    // request comes back untouched and goes on another connection.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(Error::Hyper(error.into_error())),
                },
            }
        };
        let (head, body) = response.into_parts();
        let body = ReturnsConnection {
            body: match guest.between_bytes_timeout {
                Some(timeout) => BetweenBytes::new(body, timeout).boxed_unsync(),
                None => body.map_err(Error::Hyper).boxed_unsync(),
            },
            kept: Some((sender, origin, Arc::clone(&self.idle))),
        };
        let response = http::Response::from_parts(head, body.boxed_unsync());
        // The connection is driven by a task of its own, so it outlives this response.
        Ok((response, Box::new(async { Ok(()) })))
    }

    /// A connection to `origin`: a kept one if there is one, else a new one once fewer than
    /// `--outbound-connections` are open, all by `connect_by` (`connect_timeout` after the
    /// request started). Says whether it was kept.
    async fn connection(
        &self,
        origin: &Origin,
        connect_by: Instant,
        connect_timeout: Duration,
    ) -> Result<(SendRequest<WasiBody>, bool), Error> {
        let permit = loop {
            let returned = self.idle.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(mut sender) = self.idle.take(origin) {
                // A kept connection that closed meanwhile is dropped, and the next one tried.
                if tokio::time::timeout_at(connect_by, sender.ready())
                    .await
                    .is_ok_and(|ready| ready.is_ok())
                {
                    return Ok((sender, true));
                }
                continue;
            }
            if let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() {
                break permit;
            }
            // All connections are open: close an idle one to another origin, whose permit
            // comes back once its task has closed it, or wait for one to be returned.
            self.idle.close_oldest();
            let acquire = Arc::clone(&self.connections).acquire_owned();
            match tokio::time::timeout_at(connect_by, async {
                tokio::select! {
                    permit = acquire => permit.ok(),
                    () = &mut returned => None,
                }
            })
            .await
            {
                Ok(Some(permit)) => break permit,
                Ok(None) => continue,
                Err(_) => {
                    tracing::warn!(
                        "outbound request to {}: all {} connections stayed busy for {}s (--outbound-connections)",
                        origin.address,
                        self.grant.connections,
                        connect_timeout.as_secs_f64()
                    );
                    return Err(Error::ConnectionLimitReached);
                }
            }
        };
        let sender = tokio::time::timeout_at(connect_by, self.open(origin, permit))
            .await
            .map_err(|_| Error::ConnectionTimeout)??;
        Ok((sender, false))
    }

    /// Opens a connection to `origin`, driven by a task that holds `permit` until it closes.
    async fn open(
        &self,
        origin: &Origin,
        permit: OwnedSemaphorePermit,
    ) -> Result<SendRequest<WasiBody>, Error> {
        let stream = self.connect(&origin.address, origin.https).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(Error::Hyper)?;
        let address = origin.address.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = connection.await {
                tracing::debug!("outbound connection to {address} ended: {error}");
            }
        });
        Ok(sender)
    }

    async fn connect(&self, address: &str, https: bool) -> Result<Box<dyn Stream>, Error> {
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|error| match error.kind() {
                std::io::ErrorKind::ConnectionRefused => Error::ConnectionRefused,
                _ => Error::Connect(error),
            })?;
        let _ = tcp.set_nodelay(true);
        if !https {
            return Ok(Box::new(tcp));
        }
        let host = address
            .rsplit_once(':')
            .map_or(address, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let name = rustls::pki_types::ServerName::try_from(host)
            .map_err(|_| Error::HttpRequestUriInvalid)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .map_err(Error::Tls)?;
        Ok(Box::new(tls))
    }
}

/// Kept connections to one origin, each with the time it was kept, newest last.
type Kept = Vec<(SendRequest<WasiBody>, Instant)>;

/// The connections kept for reuse.
#[derive(Default)]
struct IdleConnections {
    by_origin: Mutex<HashMap<Origin, Kept>>,
    /// Wakes the requests waiting for a connection when one is kept.
    returned: Notify,
    /// Whether a task is closing the stale connections: one at a time, while any are kept.
    closing_stale: AtomicBool,
}

impl IdleConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Origin, Kept>> {
        crate::lock::lock(&self.by_origin)
    }

    /// Keeps `sender` for the next request to `origin`; unless it is taken, it is closed
    /// within two `IDLE_TIMEOUT`s. Dropping a sender lets its connection's task close it.
    fn keep(self: Arc<Self>, origin: Origin, sender: SendRequest<WasiBody>) {
        // Without a runtime (a worker shutting down) there is nothing to reuse it for.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        self.lock()
            .entry(origin)
            .or_default()
            .push((sender, Instant::now()));
        self.returned.notify_waiters();
        if !self.closing_stale.swap(true, Ordering::SeqCst) {
            runtime.spawn(self.close_stale());
        }
    }

    /// Every `IDLE_TIMEOUT`, closes the connections kept longer, until none is kept.
    async fn close_stale(self: Arc<Self>) {
        loop {
            tokio::time::sleep(IDLE_TIMEOUT).await;
            let mut by_origin = self.lock();
            by_origin.retain(|_, kept| {
                kept.retain(|(sender, since)| {
                    !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT
                });
                !kept.is_empty()
            });
            if by_origin.is_empty() {
                // Under the lock, so a connection kept from now on finds the flag clear and
                // starts another task.
                self.closing_stale.store(false, Ordering::SeqCst);
                return;
            }
        }
    }

    /// The newest kept connection to `origin` that is still open and not stale.
    fn take(&self, origin: &Origin) -> Option<SendRequest<WasiBody>> {
        let mut by_origin = self.lock();
        let kept = by_origin.get_mut(origin)?;
        let mut taken = None;
        while let Some((sender, since)) = kept.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT {
                taken = Some(sender);
                break;
            }
        }
        if kept.is_empty() {
            by_origin.remove(origin);
        }
        taken
    }

    /// Closes the longest-kept connection, whatever its origin.
    fn close_oldest(&self) {
        let mut by_origin = self.lock();
        let oldest = by_origin
            .iter()
            .filter_map(|(origin, kept)| kept.first().map(|(_, since)| (origin.clone(), *since)))
            .min_by_key(|(_, since)| *since);
        if let Some((origin, _)) = oldest
            && let Some(kept) = by_origin.get_mut(&origin)
        {
            kept.remove(0);
            if kept.is_empty() {
                by_origin.remove(&origin);
            }
        }
    }
}

/// A response body that hands its connection back for reuse once it has been read to the end.
/// A body dropped before its end takes its connection with it: the rest of it is still on the
/// wire.
struct ReturnsConnection {
    body: WasiBody,
    kept: Option<(SendRequest<WasiBody>, Origin, Arc<IdleConnections>)>,
}

impl ReturnsConnection {
    fn give_back(&mut self) {
        if let Some((sender, origin, idle)) = self.kept.take() {
            idle.keep(origin, sender);
        }
    }
}

impl hyper::body::Body for ReturnsConnection {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(context);
        match &frame {
            Poll::Ready(None) => self.give_back(),
            // A failed body leaves the connection in no state to reuse.
            Poll::Ready(Some(Err(_))) => self.kept = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

impl Drop for ReturnsConnection {
    fn drop(&mut self) {
        if hyper::body::Body::is_end_stream(&self.body) {
            self.give_back();
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A response body that fails when the upstream goes quiet for longer than the guest allows.
struct BetweenBytes {
    inner: hyper::body::Incoming,
    timeout: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl BetweenBytes {
    fn new(inner: hyper::body::Incoming, timeout: Duration) -> BetweenBytes {
        BetweenBytes {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl hyper::body::Body for BetweenBytes {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Error>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(context) {
            Poll::Ready(frame) => {
                let deadline = Instant::now() + self.timeout;
                self.sleep.as_mut().reset(deadline);
                Poll::Ready(frame.map(|frame| frame.map_err(Error::Hyper)))
            }
            Poll::Pending => match self.sleep.as_mut().poll(context) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Error::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}
