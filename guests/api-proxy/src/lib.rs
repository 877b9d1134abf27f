//! The API proxy: every request is forwarded to the upstream named by `UPSTREAM_URL` through
//! `wasi:http/outgoing-handler`, and the upstream's answer relayed back. Bodies are spliced
//! through inside the host both ways, never held whole, so a slow upstream (30–60 s) costs the
//! guest nothing but the wait. `GET /__proxy/target?url=…` sends a GET to that exact URL
//! instead, for the tests of the host's outbound allow-list.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingRequest, IncomingResponse, Method, OutgoingRequest,
    OutgoingResponse, ResponseOutparam, Scheme,
};
use web::{Request, respond, splice};

/// Where a request goes, in the parts `wasi:http` wants.
struct Target {
    scheme: Scheme,
    authority: String,
    path_with_query: String,
}

/// Why there is no upstream answer to relay: the status and text to answer with instead.
type Failure = (u16, String);

struct ApiProxy;

impl wasip2::exports::http::incoming_handler::Guest for ApiProxy {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let method = request.method();
        let path_with_query = request.path_with_query().unwrap_or_else(|| "/".to_owned());
        let path = path_with_query.split('?').next().unwrap_or_default();
        let answer = match (&method, path) {
            (Method::Get, "/__proxy/target") => to_target(&Request::new(request)),
            _ => to_upstream(request, method.clone(), &path_with_query),
        };
        match answer {
            Ok(response) => relay(response, matches!(method, Method::Head), out),
            Err((status, text)) => {
                respond(out, status, "text/plain", format!("{text}\n").as_bytes())
            }
        }
    }
}

/// Any request but the one below: to `UPSTREAM_URL`, its path and query after the upstream's.
fn to_upstream(
    request: IncomingRequest,
    method: Method,
    path_with_query: &str,
) -> Result<IncomingResponse, Failure> {
    let url = wasip2::cli::environment::get_environment()
        .into_iter()
        .find(|(name, _)| name == "UPSTREAM_URL")
        .map(|(_, value)| value)
        .ok_or_else(|| (500, "UPSTREAM_URL is not set".to_owned()))?;
    let invalid = || (500, format!("UPSTREAM_URL is not an http(s) URL: {url}"));
    let mut target = parse_url(&url)
        .filter(|target| !target.path_with_query.contains('?'))
        .ok_or_else(invalid)?;
    target.path_with_query = format!(
        "{}{path_with_query}",
        target.path_with_query.trim_end_matches('/')
    );
    let headers = request.headers();
    let outgoing = outgoing(&method, &target, end_to_end(&headers)).ok_or_else(invalid)?;

    // The host strips transfer-encoding, so a body is known by its length, or else by a method
    // that usually has one (the host's client sends GET and HEAD without a body anyway).
    let length = headers
        .get("content-length")
        .first()
        .and_then(|value| std::str::from_utf8(value).ok()?.trim().parse::<u64>().ok());
    let has_body = match length {
        Some(length) => length > 0,
        None => !matches!(method, Method::Get | Method::Head),
    };
    let body = has_body.then(|| request.consume().ok()).flatten();
    send(outgoing, body, &target.authority)
}

/// `GET /__proxy/target?url=…`: a GET to that exact URL, with none of the client's headers.
fn to_target(request: &Request) -> Result<IncomingResponse, Failure> {
    let url = request
        .param("url")
        .ok_or_else(|| (400, "the url parameter is required".to_owned()))?;
    let invalid = || (400, format!("not a valid http(s) URL: {url}"));
    let mut target = parse_url(url).ok_or_else(invalid)?;
    if !target.path_with_query.starts_with('/') {
        target.path_with_query.insert(0, '/');
    }
    let outgoing = outgoing(&Method::Get, &target, Fields::new()).ok_or_else(invalid)?;
    send(outgoing, None, &target.authority)
}

/// `scheme://authority[/path][?query]`, http or https; a fragment is dropped.
fn parse_url(url: &str) -> Option<Target> {
    let (scheme, rest) = url.trim().split_once("://")?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return None,
    };
    let rest = rest.split('#').next().unwrap_or_default();
    let (authority, path_with_query) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    (!authority.is_empty()).then(|| Target {
        scheme,
        authority: authority.to_owned(),
        path_with_query: path_with_query.to_owned(),
    })
}

/// The request to send, or `None` if the host finds a part of its address invalid.
fn outgoing(method: &Method, target: &Target, headers: Fields) -> Option<OutgoingRequest> {
    let request = OutgoingRequest::new(headers);
    request.set_method(method).ok()?;
    request.set_scheme(Some(&target.scheme)).ok()?;
    request.set_authority(Some(&target.authority)).ok()?;
    request
        .set_path_with_query(Some(&target.path_with_query))
        .ok()?;
    Some(request)
}

/// The headers minus the hop-by-hop ones, which concern one connection, not the message.
fn end_to_end(headers: &Fields) -> Fields {
    let copy = Fields::new();
    for (name, value) in headers.entries() {
        let lower = name.to_ascii_lowercase();
        let hop_by_hop = matches!(
            lower.as_str(),
            "connection"
                | "keep-alive"
                | "transfer-encoding"
                | "te"
                | "trailer"
                | "upgrade"
                | "host"
        ) || lower.starts_with("proxy-");
        // The host refuses a few names itself: such a header is left out, which is no failure.
        if !hop_by_hop {
            let _ = copy.append(&name, &value);
        }
    }
    copy
}

/// Sends the request, splices its body through, and waits for the upstream's answer.
fn send(
    request: OutgoingRequest,
    body: Option<IncomingBody>,
    authority: &str,
) -> Result<IncomingResponse, Failure> {
    let sink = body.as_ref().and_then(|_| request.body().ok());
    let declared = web::content_length(&request.headers());
    // The body is written after `handle`, once the host is sending it: written before, a large
    // one would fill the host's buffer with nobody reading it.
    let future =
        outgoing_handler::handle(request, None).map_err(|code| failure(&code, authority))?;
    if let (Some(body), Some(sink)) = (&body, sink) {
        let spliced = body
            .stream()
            .map_err(|()| "the request body has no stream".to_owned())
            .and_then(|source| splice(source, sink, declared));
        // Unfinished, the upstream request is cut, and the answer below says how it ended.
        if let Err(error) = spliced {
            eprintln!("the request body to {authority} was cut: {error}");
        }
    }
    future.subscribe().block();
    match future.get() {
        Some(Ok(Ok(response))) => Ok(response),
        Some(Ok(Err(code))) => Err(failure(&code, authority)),
        // Ready after `block`, and read once: neither happens.
        Some(Err(())) | None => Err((502, "upstream error: no response".to_owned())),
    }
}

/// The answer to a failed outgoing request.
fn failure(code: &ErrorCode, authority: &str) -> Failure {
    match code {
        ErrorCode::HttpRequestDenied => (
            403,
            format!("outbound request denied: {authority} is not among this app's allowed hosts"),
        ),
        ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::HttpResponseTimeout => (504, format!("upstream timeout: {code:?}")),
        _ => (502, format!("upstream error: {code:?}")),
    }
}

/// Answers with the upstream's status, headers and body, the body spliced through as it comes.
fn relay(response: IncomingResponse, head: bool, out: ResponseOutparam) {
    let status = response.status();
    let headers = response.headers();
    let declared = web::content_length(&headers);
    let answer = OutgoingResponse::new(end_to_end(&headers));
    if answer.set_status_code(status).is_err() {
        let text = format!("upstream error: status {status}\n");
        return respond(out, 502, "text/plain", text.as_bytes());
    }
    // These carry no body, whatever their content-length says.
    if head || matches!(status, 100..=199 | 204 | 304) {
        return ResponseOutparam::set(out, Ok(answer));
    }
    let (Ok(upstream), Ok(sink)) = (response.consume(), answer.body()) else {
        return respond(out, 502, "text/plain", b"upstream error: no body\n");
    };
    let Ok(source) = upstream.stream() else {
        return respond(out, 502, "text/plain", b"upstream error: no body stream\n");
    };
    ResponseOutparam::set(out, Ok(answer));
    if let Err(error) = splice(source, sink, declared) {
        eprintln!("the answer from upstream was cut: {error}");
    }
}

wasip2::http::proxy::export!(ApiProxy);
