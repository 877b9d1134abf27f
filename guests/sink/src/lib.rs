//! The ceiling of `tests/bench/lenzeye`: Lenzeye's routes with the same JSON shapes, and no
//! work behind them. Part bodies are skipped inside the host, nothing is stored, and
//! `GET /files/{id}` streams as many zeros as the file was declared to hold (the size is
//! carried in the ids, so there is no state). Keys are not checked. What a client reaches
//! against it is what the client and the loopback allow.

use serde_json::json;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasip2::io::streams::StreamError;
use web::{Request, respond_empty, respond_json};

const PART_SIZE: u64 = 10 * 1024 * 1024;

struct Sink;

impl wasip2::exports::http::incoming_handler::Guest for Sink {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let request = Request::new(request);
        let path = request.path.clone();
        match (&request.method, path.as_str()) {
            (Method::Post, "/users") => respond_json(
                out,
                201,
                &json!({"user_id": random_hex(16), "api_key": format!("lz_{}", random_hex(32))}),
            ),
            (Method::Post, "/upload/initiate") => {
                let declared = request
                    .body(64 * 1024)
                    .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
                    .and_then(|body| body["size"].as_u64())
                    .filter(|size| *size >= 1);
                match declared {
                    Some(size) => {
                        let id = format!("{size}-{}", random_hex(16));
                        let parts = size.div_ceil(PART_SIZE);
                        respond_json(
                            out,
                            201,
                            &json!({"upload_id": id, "file_id": id, "part_size": PART_SIZE, "parts": parts}),
                        )
                    }
                    None => respond_json(out, 400, &json!({"error": "size must be at least 1"})),
                }
            }
            (Method::Put, "/upload/part") => {
                let number: u64 = request
                    .param("part_number")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let size = skip_body(&request);
                respond_json(out, 200, &json!({"part_number": number, "size": size}));
            }
            (Method::Post, "/upload/complete") => {
                let id = request.param("upload_id").unwrap_or_default().to_owned();
                respond_json(
                    out,
                    200,
                    &json!({"file_id": id, "size": declared_size(&id), "hmac": "0".repeat(64)}),
                )
            }
            (Method::Post, "/upload/abort") => respond_empty(out, 204),
            (Method::Get, "/files") => respond_json(out, 200, &json!({"files": []})),
            (Method::Get, "/upload/ram-status") => respond_json(
                out,
                200,
                &json!({"ram_used_mb": 0.0, "ram_limit_mb": 0.0, "ram_free_mb": 0.0}),
            ),
            (Method::Delete, path) if path.starts_with("/files/") => respond_empty(out, 204),
            (Method::Get, path) if path.starts_with("/files/") => {
                zeros(out, declared_size(&path["/files/".len()..]))
            }
            _ => respond_json(out, 404, &json!({"error": format!("no route {path}")})),
        }
    }
}

wasip2::http::proxy::export!(Sink);

/// The size an id carries: `<size>-<random>`.
fn declared_size(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|size| size.parse().ok())
        .unwrap_or(0)
}

/// Skips the whole body inside the host (its bytes never enter the guest); says how many.
fn skip_body(request: &Request) -> u64 {
    let Some((_body, stream)) = request.body_stream() else {
        return 0;
    };
    let mut skipped = 0;
    while let Ok(n) = stream.blocking_skip(web::CHUNK) {
        skipped += n;
    }
    skipped
}

/// `size` zeros, written by the host (`write-zeroes`), as fast as the client takes them.
fn zeros(out: ResponseOutparam, size: u64) {
    let headers = Fields::from_list(&[
        (
            "content-type".to_owned(),
            b"application/octet-stream".to_vec(),
        ),
        ("content-length".to_owned(), size.to_string().into_bytes()),
    ])
    .expect("valid headers");
    let response = OutgoingResponse::new(headers);
    let body = response.body().expect("a fresh response has a body");
    ResponseOutparam::set(out, Ok(response));
    let stream = body.write().expect("a fresh body has a stream");
    let mut left = size;
    while left > 0 {
        match stream.check_write() {
            Ok(0) => stream.subscribe().block(),
            Ok(permitted) => {
                let now = permitted.min(left);
                if stream.write_zeroes(now).is_err() {
                    return;
                }
                left -= now;
            }
            // The client went away: nothing to fail over.
            Err(StreamError::Closed | StreamError::LastOperationFailed(_)) => return,
        }
    }
    let _ = stream.blocking_flush();
    drop(stream);
    let _ = OutgoingBody::finish(body, None);
}

fn random_hex(bytes: u64) -> String {
    web::hex(&wasip2::random::random::get_random_bytes(bytes))
}
