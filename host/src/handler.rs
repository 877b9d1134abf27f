//! One request's way through the host: limits → proxy headers → admission → guest → response.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HOST, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use tracing::Instrument;

use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use crate::access_log::AccessLog;
use crate::admission::Admission;
use crate::guest::Guest;
use crate::http::answers::{self, ResponseBody};
use crate::http::forwarded::TrustedPeers;
use crate::http::limits::RequestLimits;
use crate::worker::Recycle;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub struct RequestHandler {
    pub guest: Arc<Guest>,
    pub admission: Admission,
    pub limits: RequestLimits,
    pub trusted_peers: TrustedPeers,
    pub access_log: Option<Arc<AccessLog>>,
    pub recycle: Option<Arc<Recycle>>,
}

/// The two ends of a connection, as requests on it need them.
pub struct Peer {
    /// The client's address; `None` on a unix socket.
    pub ip: Option<IpAddr>,
    /// The address the client connected to, used as the authority of an HTTP/1.0 request
    /// that names none.
    pub local_authority: String,
}

impl Peer {
    fn label(&self) -> String {
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
        let span = tracing::info_span!("request", request_id = %request_id);
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
        mut request: Request<Incoming>,
        peer: &Peer,
        request_id: &str,
    ) -> Response<ResponseBody> {
        if let Err(exceeded) = self.limits.check(
            request.method(),
            request.uri(),
            request.version(),
            request.headers(),
        ) {
            tracing::info!("refused: {}", exceeded.message);
            return answers::error(exceeded.status, &exceeded.message);
        }
        if request.uri().authority().is_none() && !request.headers().contains_key(HOST) {
            if request.version() == Version::HTTP_11 {
                return answers::error(
                    StatusCode::BAD_REQUEST,
                    "bad request: HTTP/1.1 requires a Host header",
                );
            }
            if let Ok(host) = HeaderValue::from_str(&peer.local_authority) {
                request.headers_mut().insert(HOST, host);
            }
        }
        let origin = self.trusted_peers.resolve(peer.ip, request.headers_mut());
        if let Ok(value) = HeaderValue::from_str(request_id) {
            request.headers_mut().insert(X_REQUEST_ID, value);
        }
        let slot = match self.admission.admit().await {
            Ok(slot) => slot,
            Err(busy) => {
                tracing::warn!("{busy}");
                return answers::busy(&busy.to_string());
            }
        };
        let scheme = if origin.https {
            Scheme::Https
        } else {
            Scheme::Http
        };
        match self.guest.serve(request, scheme, slot).await {
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

fn seed() -> u64 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id())) | 1
}
