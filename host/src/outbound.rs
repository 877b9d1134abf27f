//! Outbound HTTP (`wasi:http/outgoing-handler`) as an app is granted it: only to its allowed
//! hosts (any other is refused before a connection is made), with its connect and first-byte
//! timeouts, never past the request's own deadline, and at most `--outbound-connections`
//! connections open at once per app in a worker. Waiting on an upstream is a suspended task,
//! not a thread: a proxy whose upstream takes a minute holds its instance slot, not a CPU.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

use crate::apps::Outbound;
use crate::metrics::AppMetrics;

/// An app's outbound HTTP, shared by its instances in a worker.
pub struct OutboundClient {
    app: String,
    grant: Outbound,
    connections: Arc<Semaphore>,
    tls: Arc<rustls::ClientConfig>,
    metrics: AppMetrics,
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
            tracing::warn!(
                "outbound request to {authority} refused: app `{}` may call only {}",
                self.app,
                if self.grant.allowed_hosts.is_empty() {
                    "no host (--allow-outbound)".to_owned()
                } else {
                    self.grant.allowed_hosts.join(", ")
                }
            );
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
        let started = Instant::now();
        // Waiting for a free connection counts against the connect timeout.
        let permit = tokio::time::timeout(
            connect_timeout,
            Arc::clone(&self.connections).acquire_owned(),
        )
        .await
        .map_err(|_| {
            tracing::warn!(
                "outbound request to {authority}: all {} connections stayed busy for {}s (--outbound-connections)",
                self.grant.connections,
                connect_timeout.as_secs_f64()
            );
            Error::ConnectionLimitReached
        })?
        .map_err(|_| Error::ConnectionLimitReached)?;
        let https = request.uri().scheme() == Some(&http::uri::Scheme::HTTPS);
        let address = if request.uri().port().is_some() {
            authority.clone()
        } else {
            format!("{authority}:{}", if https { 443 } else { 80 })
        };
        let remaining = connect_timeout.saturating_sub(started.elapsed());
        let stream = tokio::time::timeout(remaining, self.connect(&address, https))
            .await
            .map_err(|_| Error::ConnectionTimeout)??;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(Error::Hyper)?;
        let first_byte_timeout = shortest(
            shortest(self.grant.first_byte_timeout, guest.first_byte_timeout),
            left(),
        );
        let mut request = request;
        // The request line carries only the path; the authority is in the Host header.
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |path| path.as_str())
            .parse()
            .map_err(|_| Error::HttpRequestUriInvalid)?;
        *request.uri_mut() = path;
        let mut connection = Box::pin(connection);
        let response = {
            let send = sender.send_request(request);
            tokio::pin!(send);
            let respond = async {
                tokio::select! {
                    response = &mut send => response.map_err(Error::Hyper),
                    result = &mut connection => match result {
                        Err(error) => Err(Error::Hyper(error)),
                        Ok(()) => (&mut send).await.map_err(Error::Hyper),
                    },
                }
            };
            match first_byte_timeout {
                Some(timeout) => tokio::time::timeout(timeout, respond)
                    .await
                    .map_err(|_| Error::ConnectionReadTimeout)??,
                None => respond.await?,
            }
        };
        let between_bytes = guest.between_bytes_timeout;
        let io = async move {
            let _permit = permit;
            connection.await.map_err(Error::Hyper)
        };
        Ok((
            response.map(|body| match between_bytes {
                Some(timeout) => BetweenBytes::new(body, timeout).boxed_unsync(),
                None => body.map_err(Error::Hyper).boxed_unsync(),
            }),
            Box::new(io),
        ))
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
