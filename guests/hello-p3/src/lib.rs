//! A WASIp3 guest (`wasi:http/service`, from the `wasip3` crate as its `http-proxy` example
//! builds one): the benchmark's p3 hello, and the faults the tests try on p3 instances.
//!
//! - `/` answers `Hello, world!`.
//! - `/served` answers how many requests this instance has served, this one included.
//! - `/echo` streams the request body back.
//! - `/trap-mid-response` declares 1 MiB, sends 64 KiB and traps.
//! - `/grow?mb=N` holds N MiB more for the instance's life, and answers its total.
//! - `/spin` never returns; `/sleep?ms=N` waits N ms before it answers; `/trap` traps.
//! - `/together?ms=N` waits N ms and answers the most requests its instance has served at once.
//! - `/sleep-then-spin?ms=N` waits N ms, then loops for good.

use std::sync::atomic::{AtomicU64, Ordering};

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_bindgen, wit_future, wit_stream};

wasip3::http::service::export!(HelloP3);

struct HelloP3;

static SERVED: AtomicU64 = AtomicU64::new(0);
static IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static HELD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

const CHUNK: usize = 64 * 1024;

impl wasip3::exports::http::handler::Guest for HelloP3 {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let served = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
        let target = request.get_path_with_query().unwrap_or_default();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let number = |key: &str| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
                .and_then(|value| value.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match path {
            "/" => Ok(answer(b"Hello, world!\n".to_vec())),
            "/served" => Ok(answer(format!("{served}\n").into_bytes())),
            "/echo" => Ok(echo(request)),
            "/trap-mid-response" => Ok(trap_mid_response()),
            "/grow" => {
                let mut held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                // Touched, so the pages are really the instance's.
                held.push(vec![1; number("mb") as usize * 1024 * 1024]);
                let total: usize = held.iter().map(Vec::len).sum();
                Ok(answer(format!("{total}\n").into_bytes()))
            }
            "/spin" => loop {
                std::hint::spin_loop();
            },
            "/trap" => panic!("trapped on purpose"),
            "/sleep-then-spin" => {
                wasip3::clocks::monotonic_clock::wait_for(number("ms") * 1_000_000).await;
                loop {
                    std::hint::spin_loop();
                }
            }
            "/together" => {
                let now = IN_FLIGHT.fetch_add(1, Ordering::Relaxed) + 1;
                PEAK.fetch_max(now, Ordering::Relaxed);
                wasip3::clocks::monotonic_clock::wait_for(number("ms") * 1_000_000).await;
                IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
                let peak = PEAK.load(Ordering::Relaxed);
                Ok(answer(format!("{peak}\n").into_bytes()))
            }
            "/sleep" => {
                wasip3::clocks::monotonic_clock::wait_for(number("ms") * 1_000_000).await;
                Ok(answer(b"slept\n".to_vec()))
            }
            _ => Ok(answer(b"not found\n".to_vec())),
        }
    }
}

/// A response whose body is `bytes`, with its length declared.
fn answer(bytes: Vec<u8>) -> Response {
    let headers = Fields::from_list(&[
        ("content-type".to_owned(), b"text/plain".to_vec()),
        (
            "content-length".to_owned(),
            bytes.len().to_string().into_bytes(),
        ),
    ])
    .expect("valid headers");
    streamed(headers, move |mut body| async move {
        body.write_all(bytes).await;
    })
}

/// A response whose body `write` streams from a task of its own, after the head has gone.
fn streamed<F, W>(headers: Fields, write: W) -> Response
where
    W: FnOnce(wit_bindgen::StreamWriter<u8>) -> F + 'static,
    F: Future<Output = ()> + 'static,
{
    let (body_tx, body_rx) = wit_stream::new();
    let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    drop(trailers_tx);
    let (response, _sent) = Response::new(headers, Some(body_rx), trailers_rx);
    wit_bindgen::spawn_local(write(body_tx));
    response
}

fn echo(request: Request) -> Response {
    let (_, done_rx) = wit_future::new(|| Ok(()));
    let (mut contents, _trailers) = Request::consume_body(request, done_rx);
    streamed(Fields::new(), move |mut body| async move {
        loop {
            let (status, chunk) = contents.read(Vec::with_capacity(CHUNK)).await;
            if !chunk.is_empty() && !body.write_all(chunk).await.is_empty() {
                return;
            }
            if matches!(status, wit_bindgen::StreamResult::Dropped) {
                return;
            }
        }
    })
}

fn trap_mid_response() -> Response {
    let headers = Fields::from_list(&[(
        "content-length".to_owned(),
        (1024 * 1024).to_string().into_bytes(),
    )])
    .expect("valid headers");
    streamed(headers, |mut body| async move {
        body.write_all(vec![b'x'; CHUNK]).await;
        panic!("trapped mid-response on purpose");
    })
}
