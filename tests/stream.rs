//! A 1 GiB body streams through `/echo` under a 16 MiB memory cap: neither the host nor the guest
//! holds it whole. The test does not hold it either: the body is generated from a seeded RNG and
//! hashed as it is sent and as it comes back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blackbox::{HostProcess, guest, http_client};
use bytes::Bytes;
use futures::StreamExt;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const TOTAL: u64 = 1 << 30;
const CHUNK: usize = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_echo_streams_under_a_16_mib_cap() {
    let host = HostProcess::start(
        &guest("faults"),
        &["--memory-limit", "16MiB", "--timeout", "300"],
    );

    let sent_hash = Arc::new(Mutex::new(None::<String>));
    let body = {
        let sent_hash = Arc::clone(&sent_hash);
        let mut rng = SmallRng::seed_from_u64(0x5eed);
        let mut hasher = Some(Sha256::new());
        let mut left = TOTAL;
        futures::stream::poll_fn(move |_| {
            if left == 0 {
                return std::task::Poll::Ready(None);
            }
            let size = CHUNK.min(left as usize);
            let mut chunk = vec![0u8; size];
            rng.fill_bytes(&mut chunk);
            hasher.as_mut().unwrap().update(&chunk);
            left -= size as u64;
            // The client stops polling once content-length bytes are out: finish the hash with
            // the last chunk rather than on a final poll that may never come.
            if left == 0 {
                let hasher = hasher.take().unwrap();
                *sent_hash.lock().unwrap() = Some(hex::encode(hasher.finalize()));
            }
            std::task::Poll::Ready(Some(Ok::<Bytes, std::io::Error>(Bytes::from(chunk))))
        })
    };

    let started = Instant::now();
    let response = http_client()
        .post(host.url("/echo"))
        .header("content-length", TOTAL.to_string())
        .body(reqwest::Body::wrap_stream(body))
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .expect("POST /echo failed");
    assert_eq!(response.status(), 200, "POST /echo");
    let mut received = 0u64;
    let mut hasher = Sha256::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .unwrap_or_else(|error| panic!("the echo broke off after {received} bytes: {error}"));
        received += chunk.len() as u64;
        hasher.update(&chunk);
    }
    let took = started.elapsed();
    let received_hash = hex::encode(hasher.finalize());
    assert_eq!(
        received, TOTAL,
        "the echo has a different length (after {took:?})"
    );
    let sent_hash = sent_hash
        .lock()
        .unwrap()
        .clone()
        .expect("the body was not sent to its end");
    println!(
        "echoed {} MiB in {took:?}: {:.1} MiB/s",
        TOTAL >> 20,
        (TOTAL >> 20) as f64 / took.as_secs_f64()
    );
    assert_eq!(received_hash, sent_hash, "the echo has different bytes");
}
