//! How many guests run at once, and what happens to the rest: the worker class sets the first,
//! `--worker-connections` bounds the queue, and past it the answer is 503 with `Retry-After`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use blackbox::{
    HostProcess, RawResponse, get_request, guest, http_client, read_response,
    wait_until_server_read,
};

/// Sends `GET <target>` on a new connection and returns the connection, the response unread.
fn send(addr: SocketAddr, target: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr)
        .unwrap_or_else(|error| panic!("cannot connect to {addr}: {error}"));
    stream
        .write_all(&get_request(
            target,
            &addr.to_string(),
            &["Connection: close".into()],
        ))
        .expect("cannot send the request");
    stream
}

fn receive(mut stream: TcpStream, timeout: Duration) -> std::io::Result<RawResponse> {
    stream.set_read_timeout(Some(timeout))?;
    read_response(&mut stream)
}

/// What one try of the full-queue scenario saw.
enum Scenario {
    /// The fifth request was refused: the answer, and the four slow requests' answers.
    Refused(RawResponse, Vec<RawResponse>),
    /// The harness lost a race it cannot see: a fifth request got into the queue before the
    /// host had admitted the last slow request, which was then (rightly) refused instead.
    LostRace,
}

fn full_queue_scenario(addr: SocketAddr) -> Scenario {
    // Four slow requests, each on its own connection. Once the host has read all four, two run
    // and two wait: the queue is full.
    let slow: Vec<TcpStream> = (0..4).map(|_| send(addr, "/sleep?ms=3000")).collect();
    for stream in &slow {
        assert!(
            wait_until_server_read(stream, Duration::from_secs(10)),
            "the host did not read a /sleep request within 10 s"
        );
    }
    let started = Instant::now();
    let readers: Vec<_> = slow
        .into_iter()
        .map(|stream| std::thread::spawn(move || receive(stream, Duration::from_secs(30))))
        .collect();
    let collect =
        |readers: Vec<std::thread::JoinHandle<std::io::Result<RawResponse>>>| -> Vec<RawResponse> {
            readers
                .into_iter()
                .enumerate()
                .map(|(i, reader)| {
                    reader
                        .join()
                        .expect("reader thread panicked")
                        .unwrap_or_else(|error| panic!("slow request {i} got no answer: {error}"))
                })
                .collect()
        };

    // A fifth request must be turned away. It is retried (a request that found a slot free
    // answers at once), but it must be refused within 2 s.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut tries = Vec::new();
    loop {
        let mut probe = send(addr, "/sleep?ms=1");
        probe
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        match read_response(&mut probe) {
            Ok(response) if response.status == 503 => {
                println!(
                    "fifth request refused after {:?} (earlier tries: {tries:?})",
                    started.elapsed()
                );
                let slow = collect(readers);
                println!("the four slow requests took {:?}", started.elapsed());
                return Scenario::Refused(response, slow);
            }
            Ok(response) => {
                tries.push(response.status);
                assert!(
                    Instant::now() < deadline,
                    "no 503 within 2 s while 2 requests run and 2 wait; the fifth got {tries:?}"
                );
            }
            Err(error) => {
                // The fifth request is waiting in the queue. That is only right if one of the slow
                // ones was refused in its place.
                let slow = collect(readers);
                let statuses: Vec<u16> = slow.iter().map(|response| response.status).collect();
                assert!(
                    statuses.contains(&503),
                    "a fifth request got no answer within 2 s ({error}): it was queued although 2 requests \
                     ran and 2 waited (--worker-connections 2); the slow ones got {statuses:?}"
                );
                let _ = receive(probe, Duration::from_secs(30));
                return Scenario::LostRace;
            }
        }
    }
}

#[test]
fn full_queue_answers_503_busy() {
    // Two run at once (gthread, 2 threads), two more may wait (--worker-connections 2).
    let host = HostProcess::start(
        &guest("faults"),
        &[
            "-k",
            "gthread",
            "--threads",
            "2",
            "--worker-connections",
            "2",
            "--timeout",
            "5",
        ],
    );
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        let (refused, slow) = match full_queue_scenario(host.addr()) {
            Scenario::Refused(refused, slow) => (refused, slow),
            Scenario::LostRace => {
                println!("attempt {attempt}: the fifth request overtook a slow one; trying again");
                continue;
            }
        };
        assert!(
            refused.header("retry-after").is_some(),
            "the 503 has no Retry-After header: {:?}",
            refused.headers
        );
        assert!(
            refused.body_text().contains("busy"),
            "the 503 body should say `busy`: {:?}",
            refused.body_text()
        );
        assert!(
            refused.says_connection_close(),
            "the 503 has no `Connection: close`: {:?}",
            refused.headers
        );
        for (i, response) in slow.iter().enumerate() {
            assert_eq!(
                response.status,
                200,
                "slow request {i} should succeed (run or wait its turn): {} {:?}",
                response.status,
                response.body_text()
            );
            assert_eq!(response.body_text(), "slept 3000 ms\n");
        }
        return;
    }
    panic!("in {ATTEMPTS} attempts the fifth request always overtook a slow one");
}

/// Sends two `/sleep?ms=500` at once and returns how long both took.
async fn two_sleeps(host: &HostProcess) -> Duration {
    let client = http_client();
    let url = host.url("/sleep?ms=500");
    // The first request of a host (first instantiation) is not measured.
    let warm = client.get(host.url("/")).send().await.unwrap();
    assert_eq!(warm.status(), 200);
    let started = Instant::now();
    let (a, b) = tokio::join!(client.get(&url).send(), client.get(&url).send());
    for response in [a, b] {
        let response = response.expect("GET /sleep?ms=500 failed");
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "slept 500 ms\n");
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_runs_one_request_at_a_time() {
    let host = HostProcess::start(&guest("faults"), &["-k", "sync"]);
    let took = two_sleeps(&host).await;
    println!("sync: two concurrent 500 ms sleeps took {took:?}");
    assert!(
        took >= Duration::from_secs(1),
        "with -k sync two 500 ms sleeps overlapped: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gthread_with_two_threads_runs_two_at_once() {
    let host = HostProcess::start(&guest("faults"), &["-k", "gthread", "--threads", "2"]);
    let took = two_sleeps(&host).await;
    println!("gthread --threads 2: two concurrent 500 ms sleeps took {took:?}");
    assert!(
        took < Duration::from_millis(950),
        "with -k gthread --threads 2 two 500 ms sleeps should overlap, took {took:?}"
    );
}
