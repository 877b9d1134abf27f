//! SIGTERM: the host stops taking connections, lets the request in flight finish, and exits 0.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use blackbox::{HostProcess, get_request, guest, poll_until, read_response, send_in_flight};

/// Whether a new connection is refused, or accepted but never answered.
fn new_connection_not_served(addr: std::net::SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return true;
    };
    if stream
        .write_all(&get_request(
            "/",
            &addr.to_string(),
            &["Connection: close".into()],
        ))
        .is_err()
    {
        return true;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut head = [0u8; 5];
    !matches!(stream.read_exact(&mut head), Ok(()) if &head == b"HTTP/")
}

#[test]
fn sigterm_finishes_in_flight_requests_and_exits_0() {
    // Two slots: a probe made before the signal is handled is answered at once rather than
    // queued behind the sleep, so "not answered" can only mean the host stopped serving.
    let mut host = HostProcess::start(&guest("faults"), &["-k", "gthread", "--threads", "2"]);
    let addr = host.addr();
    let mut stream = send_in_flight(addr, "/sleep?ms=1500");
    let reader = std::thread::spawn(move || {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        read_response(&mut stream)
    });

    let signalled = Instant::now();
    host.signal(libc::SIGTERM);

    // No new connection is served from now on (the signal takes a moment to be handled).
    let refused = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        new_connection_not_served(addr).then_some(())
    });
    assert!(
        refused.is_some(),
        "5 s after SIGTERM the host still serves new connections"
    );

    let response = reader
        .join()
        .expect("reader thread panicked")
        .unwrap_or_else(|error| {
            panic!("the in-flight request got no answer after SIGTERM: {error}")
        });
    assert_eq!(response.status, 200, "the in-flight request: {response:?}");
    assert_eq!(response.body_text(), "slept 1500 ms\n");

    let status = host.wait_exit(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| {
        panic!("the host had not exited 10 s after the in-flight request finished")
    });
    println!(
        "exited with {status} {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(0),
        "the host exited with {status} after SIGTERM"
    );
}

/// A client sending request after request on one kept-alive connection while the host stops
/// gracefully: no request it sends is cut by the connection closing under it, the first one
/// answered after the signal says `Connection: close`, and the client cannot hold the worker
/// past that: the host exits within moments, far inside `--graceful-timeout`.
#[test]
fn a_busy_kept_alive_connection_is_answered_then_closed_on_sigterm() {
    let mut host = HostProcess::start(&guest("hello"), &["--graceful-timeout", "30"]);
    let addr = host.addr();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = get_request("/", &addr.to_string(), &[]);
    let mut exchange = || {
        stream
            .write_all(&request)
            .and_then(|()| read_response(&mut stream))
    };
    let before = exchange().expect("a request before the signal is answered");
    assert_eq!(before.status, 200);
    assert_ne!(before.header("connection"), Some("close"));

    let signalled = Instant::now();
    host.signal(libc::SIGTERM);
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let response = exchange().unwrap_or_else(|error| {
            panic!(
                "a request sent {:?} after SIGTERM was cut: {error}",
                signalled.elapsed()
            )
        });
        assert_eq!(response.status, 200, "{response:?}");
        if response.header("connection") == Some("close") {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "the connection was still kept alive 10 s after SIGTERM"
        );
    }
    let status = host
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the host had not exited 5 s after closing the connection"));
    assert_eq!(status.code(), Some(0), "{status}");
}
