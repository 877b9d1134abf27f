//! One request's way through the host: limits → proxy headers → the app it is routed to → that
//! app's limits and admission → its guest → response.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HOST, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use tracing::Instrument;

use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use crate::http::answers::{self, ResponseBody};
use crate::http::drain::DrainedIfDropped;
use crate::http::forwarded::TrustedPeers;
use crate::http::forwarded::X_FORWARDED_PROTO;
use crate::http::limits::RequestLimits;
use crate::metrics::AppMetrics;
use crate::random::random_u64;
use crate::runtime::guest::Guest;
use crate::serving::access_log::AccessLog;
use crate::serving::admission::Admission;
use crate::serving::max_requests::MaxRequests;
use crate::serving::router::{self, Router};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The path prefix an app is mounted at, which the host took off the path it sees.
const X_FORWARDED_PREFIX: HeaderName =
    HeaderName::from_static(crate::http::forwarded::X_FORWARDED_PREFIX);

/// One app as a worker serves it.
pub struct ServedApp {
    pub name: String,
    pub guest: Arc<Guest>,
    pub admission: Admission,
    /// The app's own request limits (the host's are applied while parsing).
    pub limits: RequestLimits,
    pub body_limit: Option<u64>,
    pub metrics: AppMetrics,
}

pub struct RequestHandler {
    pub apps: Vec<ServedApp>,
    pub router: Router,
    pub trusted_peers: TrustedPeers,
    pub access_log: Option<Arc<AccessLog>>,
    pub recycle: Option<Arc<MaxRequests>>,
}

/// The two ends of a connection, as requests on it need them.
pub struct Peer {
    /// The client's address; `None` on a unix socket.
    pub ip: Option<IpAddr>,
    /// The address the client connected to, used as the authority of an HTTP/1.0 request
    /// that names none.
    pub local_authority: String,
    /// Whether the connection is HTTPS, served by the host itself (`--certfile`).
    pub tls: bool,
}

impl Peer {
    pub fn label(&self) -> String {
        self.ip
            .map_or_else(|| "unix".to_owned(), |ip| ip.to_string())
    }
}

impl RequestHandler {
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: Arc<Peer>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        if let Some(recycle) = &self.recycle {
            recycle.count_request();
        }
        let trusted = peer.ip.is_none_or(|ip| self.trusted_peers.trusts(ip));
        let request_id = request_id(request.headers(), trusted);
        let record = self
            .access_log
            .as_ref()
            .map(|log| log.record(&request, &peer.label()));
        let span =
            tracing::info_span!("request", request_id = %request_id, app = tracing::field::Empty);
        // From here on, a body left unread by an early answer is drained, not reset.
        let request = request.map(DrainedIfDropped::new);
        let mut response = self
            .respond(request, &peer, &request_id)
            .instrument(span)
            .await;
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(X_REQUEST_ID, value);
        }
        if let (Some(log), Some(record)) = (&self.access_log, record) {
            response = log.observe(record, response);
        }
        Ok(response)
    }

    async fn respond(
        &self,
        mut request: Request<DrainedIfDropped>,
        peer: &Peer,
        request_id: &str,
    ) -> Response<ResponseBody> {
        let no_host = request.uri().authority().is_none() && !request.headers().contains_key(HOST);
        if no_host && request.version() == Version::HTTP_11 {
            return answers::error(
                StatusCode::BAD_REQUEST,
                "bad request: HTTP/1.1 requires a Host header",
            );
        }
        // Routed and checked against the app's limits as the client sent it, before the host
        // adds headers of its own.
        let forwarded_host = self
            .trusted_peers
            .forwarded_host(peer.ip, request.headers());
        let host = forwarded_host.as_deref().or_else(|| {
            request
                .uri()
                .authority()
                .map(|authority| authority.as_str())
                .or_else(|| request.headers().get(HOST)?.to_str().ok())
        });
        let Some(route) = self.router.route(host, request.uri().path()) else {
            let message = format!(
                "not found: no app serves {}{}",
                host.unwrap_or(""),
                request.uri().path()
            );
            tracing::info!("{message}");
            return answers::error(StatusCode::NOT_FOUND, &message);
        };
        let app = &self.apps[route.app];
        if self.apps.len() > 1 {
            tracing::Span::current().record("app", app.name.as_str());
        }
        let started = std::time::Instant::now();
        if let Err(exceeded) = app.limits.check(
            request.method(),
            request.uri(),
            request.version(),
            request.headers(),
        ) {
            tracing::info!("refused: {}", exceeded.message);
            let response = answers::error(exceeded.status, &exceeded.message);
            app.metrics
                .request_finished(response.status().as_u16(), started.elapsed());
            return response;
        }
        if no_host && let Ok(host) = HeaderValue::from_str(&peer.local_authority) {
            request.headers_mut().insert(HOST, host);
        }
        let mut origin = self.trusted_peers.resolve(peer.ip, request.headers_mut());
        if peer.tls {
            // The host ended TLS itself: the guest sees what a proxy in front would have said.
            origin.https = true;
            request
                .headers_mut()
                .insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        }
        if let Ok(value) = HeaderValue::from_str(request_id) {
            request.headers_mut().insert(X_REQUEST_ID, value);
        }
        let response = self
            .respond_with(app, request, route.prefix, origin.https)
            .await;
        app.metrics
            .request_finished(response.status().as_u16(), started.elapsed());
        response
    }

    async fn respond_with(
        &self,
        app: &ServedApp,
        mut request: Request<DrainedIfDropped>,
        prefix: Option<&str>,
        https: bool,
    ) -> Response<ResponseBody> {
        if let Some(limit) = app.body_limit
            && let Some(length) = hyper::body::Body::size_hint(request.body()).exact()
            && length > limit
        {
            let message = format!(
                "content too large: the body is {length} bytes, the limit is {limit} (--limit-request-body)"
            );
            tracing::info!("refused: {message}");
            return answers::error(StatusCode::PAYLOAD_TOO_LARGE, &message);
        }
        request.body_mut().limit(app.body_limit);
        if let Some(prefix) = prefix {
            if let Some(uri) = router::strip_prefix(request.uri(), prefix) {
                *request.uri_mut() = uri;
            }
            if let Ok(value) = HeaderValue::from_str(prefix) {
                request.headers_mut().insert(X_FORWARDED_PREFIX, value);
            }
        }
        let permit = match app.admission.admit().await {
            Ok(permit) => permit,
            Err(busy) => {
                tracing::warn!("{busy}");
                return answers::busy(&busy.to_string());
            }
        };
        let scheme = if https { Scheme::Https } else { Scheme::Http };
        match app.guest.serve(request, scheme, permit).await {
            Ok(response) => response,
            Err(failure) => {
                tracing::error!("{failure}");
                answers::error(failure.status(), &failure.to_string())
            }
        }
    }
}

/// The id a request is known by in logs and in the `x-request-id` header: the one a trusted
/// proxy already gave it, or a new random one.
fn request_id(headers: &hyper::HeaderMap, trusted: bool) -> String {
    let given = headers
        .get(X_REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()));
    match given {
        Some(id) if trusted => id.to_owned(),
        _ => random_id(),
    }
}

fn random_id() -> String {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    STATE.with(|state| {
        // xorshift64: ids need to be unique, not secret.
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        format!("{x:016x}")
    })
}

/// xorshift's state must not be 0.
fn seed() -> u64 {
    random_u64() | 1
}
