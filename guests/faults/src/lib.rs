//! A guest that misbehaves on request, for the host's tests: it traps, eats memory, hoards
//! host resources, spins, sleeps, echoes bodies of any size, reports what it was told about the
//! request and how many requests its instance has served, and reads the host's status
//! capability.

use std::hint::black_box;

use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam, Scheme,
};
use wasip2::io::streams::StreamError;
use web::{hex, respond, write_all};

/// The largest read from the request body: memory use stays flat whatever the body size.
const ECHO_CHUNK: u64 = 64 * 1024;
const MIB: usize = 1 << 20;

struct Faults;

/// Requests this instance has been given, this one included: what a guest sees of the host
/// keeping its instance between requests.
static SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl wasip2::exports::http::incoming_handler::Guest for Faults {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let served = SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let path_with_query = request.path_with_query().unwrap_or_default();
        let (path, query) = path_with_query
            .split_once('?')
            .unwrap_or((&path_with_query, ""));
        match path {
            "/" => respond(response_out, 200, "text/plain", b"ok\n"),
            "/trap" => panic!("the /trap route fails on purpose"),
            "/served" => respond(
                response_out,
                200,
                "text/plain",
                format!("{served}\n").as_bytes(),
            ),
            // As a runtime that ends with its first request: a second request traps.
            "/once" if served > 1 => panic!("this instance served a request already"),
            "/once" => respond(response_out, 200, "text/plain", b"once\n"),
            "/grow" => {
                let mb = param(query, "mb").and_then(|mb| mb.parse::<usize>().ok());
                let held = grow(mb.unwrap_or(usize::MAX));
                respond(
                    response_out,
                    200,
                    "text/plain",
                    format!("grew {held} MiB\n").as_bytes(),
                );
            }
            "/spin" => spin(),
            "/keep" => {
                // Memory the instance holds for good: what its next requests inherit.
                let mib = param(query, "mb").and_then(|mb| mb.parse::<usize>().ok());
                let mib = mib.unwrap_or(1);
                for _ in 0..mib {
                    let mut chunk = vec![0u8; MIB];
                    for page in chunk.iter_mut().step_by(4096) {
                        *page = 1;
                    }
                    Box::leak(black_box(chunk).into_boxed_slice());
                }
                respond(
                    response_out,
                    200,
                    "text/plain",
                    format!("keeping {mib} MiB more\n").as_bytes(),
                );
            }
            "/hoard" => {
                // Host resources held and never dropped: empty header maps, each a handle here
                // and an entry in the host's resource table.
                let count = param(query, "count")
                    .and_then(|count| count.parse::<usize>().ok())
                    .unwrap_or(usize::MAX);
                let mut held = Vec::new();
                while held.len() < count {
                    held.push(Fields::new());
                }
                respond(
                    response_out,
                    200,
                    "text/plain",
                    format!("held {} header maps\n", held.len()).as_bytes(),
                );
            }
            "/sleep" => {
                let ms = param(query, "ms")
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .unwrap_or(1000);
                wasip2::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
                respond(
                    response_out,
                    200,
                    "text/plain",
                    format!("slept {ms} ms\n").as_bytes(),
                );
            }
            "/echo" => echo(request, response_out),
            "/partial" => partial(response_out, query),
            "/crypto" => crypto_parts(request, response_out, param(query, "parts").unwrap_or("")),
            "/crypto/apply" => crypto_apply(request, response_out, query),
            "/crypto/burn" => {
                let mb = param(query, "mb")
                    .and_then(|mb| mb.parse::<usize>().ok())
                    .unwrap_or(1);
                let key = capabilities::crypto::generate_key();
                let sealed = capabilities::crypto::encrypt(&key, &[0; 16], 0, &vec![0; mb * MIB])
                    .expect("a fresh key works");
                respond(
                    response_out,
                    200,
                    "text/plain",
                    format!("encrypted {} bytes\n", sealed.len()).as_bytes(),
                );
            }
            "/crypto/echo" => {
                // The body, encrypted inside the host and spliced to the client: a failing
                // request body makes the capability's stream fail midway.
                let key = capabilities::crypto::generate_key();
                let body = request.consume().expect("the body is consumed once");
                let source = body.stream().expect("a fresh body has a stream");
                let sealed = capabilities::crypto::encrypt_stream(&key, &[0; 16], 0, source)
                    .expect("a fresh key works");
                let headers = [("content-type", "application/octet-stream".to_owned())];
                if let Err(error) = web::respond_stream(response_out, 200, &headers, sealed) {
                    eprintln!("the encrypted echo was cut: {error}");
                }
            }
            "/crypto/stream" => {
                // The body, encrypted inside the host as it is read.
                let key = capabilities::crypto::generate_key();
                let body = request.consume().expect("the body is consumed once");
                let source = body.stream().expect("a fresh body has a stream");
                let sealed = capabilities::crypto::encrypt_stream(&key, &[0; 16], 0, source)
                    .expect("a fresh key works");
                let mut total = 0;
                let outcome = loop {
                    match sealed.blocking_read(ECHO_CHUNK) {
                        Ok(chunk) => total += chunk.len(),
                        Err(StreamError::Closed) => break Ok(total),
                        Err(StreamError::LastOperationFailed(error)) => {
                            break Err(error.to_debug_string());
                        }
                    }
                };
                match outcome {
                    Ok(total) => respond(
                        response_out,
                        200,
                        "text/plain",
                        format!("encrypted {total} bytes\n").as_bytes(),
                    ),
                    Err(error) => respond(
                        response_out,
                        500,
                        "text/plain",
                        format!("the encrypted stream failed after {total} bytes: {error}\n")
                            .as_bytes(),
                    ),
                }
            }
            "/status" => {
                let mb = param(query, "grow")
                    .and_then(|mb| mb.parse::<usize>().ok())
                    .unwrap_or(0);
                let held = grow(mb);
                let figures = capabilities::status::memory();
                let body = format!(
                    "{{\"held_mib\":{held},\"host_resident\":{},\"host_budget\":{},\"worker_resident\":{},\"instance_used\":{},\"instance_limit\":{}}}\n",
                    figures.host_resident,
                    figures
                        .host_budget
                        .map_or("null".to_owned(), |budget| budget.to_string()),
                    figures.worker_resident,
                    figures.instance_used,
                    figures.instance_limit
                );
                respond(response_out, 200, "application/json", body.as_bytes());
            }
            "/info" => {
                let info = info(&request, &path_with_query);
                respond(response_out, 200, "application/json", info.as_bytes());
            }
            _ => respond(response_out, 404, "text/plain", b"not found\n"),
        }
    }
}

wasip2::http::proxy::export!(Faults);

fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Allocates and touches memory a MiB at a time; without a bound it goes on until the host
/// refuses to grow memory, and the allocation failure aborts the guest.
fn grow(mib: usize) -> usize {
    let mut held: Vec<Vec<u8>> = Vec::new();
    while held.len() < mib {
        let mut chunk = vec![0u8; MIB];
        for page in chunk.iter_mut().step_by(4096) {
            *page = 1;
        }
        held.push(black_box(chunk));
    }
    black_box(&held).len()
}

fn spin() -> ! {
    let mut counter: u64 = 0;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Streams the request body back in bounded chunks.
fn echo(request: IncomingRequest, out: ResponseOutparam) {
    let length = request.headers().get("content-length").into_iter().next();
    let mut headers = vec![(
        "content-type".to_owned(),
        b"application/octet-stream".to_vec(),
    )];
    if let Some(length) = length {
        headers.push(("content-length".to_owned(), length));
    }
    let response = OutgoingResponse::new(Fields::from_list(&headers).expect("valid headers"));
    let outgoing = response.body().expect("a fresh response has a body");
    let incoming = request.consume().expect("the body is consumed once");
    ResponseOutparam::set(out, Ok(response));

    let input = incoming.stream().expect("a fresh body has a stream");
    let output = outgoing.write().expect("a fresh body has a stream");
    loop {
        match input.blocking_read(ECHO_CHUNK) {
            Ok(chunk) => write_all(&output, &chunk).expect("client went away"),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(error)) => {
                panic!("reading the body failed: {}", error.to_debug_string())
            }
        }
    }
    output.blocking_flush().expect("client went away");
    drop(output);
    drop(input);
    OutgoingBody::finish(outgoing, None).expect("body complete");
}

/// Starts a 200, streams `mb` MiB of it, then fails as `then` says: `trap`, `grow` (memory
/// until refused), `spin` (past the deadline in a loop), `sleep` (past the deadline waiting),
/// `drop` (returns without finishing the body), or `finish` (the body ends whole) and
/// `finish-sleep` (the body ends whole, then the guest sleeps past its deadline). With
/// `length=1` the response declares one MiB more than it streams before failing.
fn partial(out: ResponseOutparam, query: &str) {
    let mib = param(query, "mb")
        .and_then(|mb| mb.parse::<usize>().ok())
        .unwrap_or(1);
    let mut headers = vec![(
        "content-type".to_owned(),
        b"application/octet-stream".to_vec(),
    )];
    if param(query, "length") == Some("1") {
        headers.push((
            "content-length".to_owned(),
            ((mib + 1) * MIB).to_string().into_bytes(),
        ));
    }
    let response = OutgoingResponse::new(Fields::from_list(&headers).expect("valid headers"));
    let body = response.body().expect("a fresh response has a body");
    ResponseOutparam::set(out, Ok(response));
    let stream = body.write().expect("a fresh body has a stream");
    let chunk = vec![b'x'; MIB];
    for _ in 0..mib {
        write_all(&stream, &chunk).expect("client went away");
    }
    stream.blocking_flush().expect("client went away");
    match param(query, "then").unwrap_or("trap") {
        "grow" => {
            grow(usize::MAX);
        }
        "spin" => spin(),
        "sleep" => {
            wasip2::clocks::monotonic_clock::subscribe_duration(3_600 * 1_000_000_000).block()
        }
        "drop" => return,
        "finish" | "finish-sleep" => {
            drop(stream);
            OutgoingBody::finish(body, None).expect("body complete");
            if param(query, "then") == Some("finish-sleep") {
                wasip2::clocks::monotonic_clock::subscribe_duration(3_600 * 1_000_000_000).block();
            }
            return;
        }
        _ => {}
    }
    panic!("the /partial route fails on purpose after {mib} MiB");
}

fn info(request: &IncomingRequest, path_with_query: &str) -> String {
    let method = match request.method() {
        Method::Get => "GET".to_owned(),
        Method::Head => "HEAD".to_owned(),
        Method::Post => "POST".to_owned(),
        Method::Put => "PUT".to_owned(),
        Method::Delete => "DELETE".to_owned(),
        Method::Connect => "CONNECT".to_owned(),
        Method::Options => "OPTIONS".to_owned(),
        Method::Trace => "TRACE".to_owned(),
        Method::Patch => "PATCH".to_owned(),
        Method::Other(other) => other,
    };
    let scheme = match request.scheme() {
        Some(Scheme::Http) => "http".to_owned(),
        Some(Scheme::Https) => "https".to_owned(),
        Some(Scheme::Other(other)) => other,
        None => String::new(),
    };
    let headers = request
        .headers()
        .entries()
        .into_iter()
        .map(|(name, value)| {
            format!(
                "[{},{}]",
                json(&name),
                json(&String::from_utf8_lossy(&value))
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "{{\"method\":{},\"scheme\":{},\"authority\":{},\"path_with_query\":{},\"headers\":[{}]}}\n",
        json(&method),
        json(&scheme),
        json(&request.authority().unwrap_or_default()),
        json(path_with_query),
        headers
    )
}

fn json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn read_body(request: IncomingRequest) -> Vec<u8> {
    let body = request.consume().expect("the body is consumed once");
    let stream = body.stream().expect("a fresh body has a stream");
    let mut bytes = Vec::new();
    while let Ok(chunk) = stream.blocking_read(ECHO_CHUNK) {
        bytes.extend(chunk);
    }
    bytes
}

/// Encrypts the body in parts of the given sizes (the rest in one last part), each on its own at
/// its offset, checks that decrypting gives the body back, and returns the key id, IV and
/// ciphertext.
fn crypto_parts(request: IncomingRequest, out: ResponseOutparam, sizes: &str) {
    let plaintext = read_body(request);
    let key = capabilities::crypto::generate_key();
    let iv = wasip2::random::random::get_random_bytes(16);
    let mut ciphertext = Vec::with_capacity(plaintext.len());
    let mut offset: usize = 0;
    let mut bounds: Vec<usize> = sizes.split(',').filter_map(|s| s.parse().ok()).collect();
    bounds.push(usize::MAX);
    for size in bounds {
        let end = offset.saturating_add(size).min(plaintext.len());
        let part = capabilities::crypto::encrypt(&key, &iv, offset as u64, &plaintext[offset..end])
            .expect("a fresh key works");
        ciphertext.extend(part);
        offset = end;
    }
    let decrypted =
        capabilities::crypto::decrypt(&key, &iv, 0, &ciphertext).expect("a fresh key works");
    assert_eq!(decrypted, plaintext, "decrypting gave something else back");
    let body = format!(
        "{{\"key_id\":{},\"iv\":{},\"ciphertext\":{}}}\n",
        json(&key),
        json(&hex(&iv)),
        json(&hex(&ciphertext))
    );
    respond(out, 200, "application/json", body.as_bytes());
}

/// Decrypts the body with the key id and IV given: 403 when the host refuses the key.
fn crypto_apply(request: IncomingRequest, out: ResponseOutparam, query: &str) {
    let key = param(query, "key").unwrap_or_default().to_owned();
    let iv = web::unhex(param(query, "iv").unwrap_or_default()).unwrap_or_default();
    let offset = param(query, "offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    let data = read_body(request);
    match capabilities::crypto::decrypt(&key, &iv, offset, &data) {
        Ok(plaintext) => respond(out, 200, "application/octet-stream", &plaintext),
        Err(error) => respond(out, 403, "text/plain", format!("{error:?}\n").as_bytes()),
    }
}
