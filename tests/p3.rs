//! A WASIp3 guest (`wasi:http/service`, built with the `wasip3` crate: `guests/hello-p3`) on
//! the host beside p2 ones: it answers, each bound holds for it on fresh and kept instances,
//! and it counts the requests its instance was given, as it observes itself.

use std::time::{Duration, Instant};

use blackbox::{HostProcess, get_text, guest, http_client, served_at};

#[tokio::test]
async fn a_p3_app_answers_on_fresh_instances_by_default() {
    let host = HostProcess::start(&guest("hello-p3"), &["--threads", "4", "--timeout", "2"]);
    assert_eq!(
        get_text(&host, "/").await,
        (200, "Hello, world!\n".to_owned())
    );
    for _ in 0..3 {
        assert_eq!(served_at(&host, "/served").await, 1);
    }

    // A guest looping past its deadline is stopped; a neighbour request is answered
    // meanwhile, at once.
    let spin = get_text(&host, "/spin");
    let neighbour = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let answer = get_text(&host, "/").await;
        (answer, started.elapsed())
    };
    let ((status, body), ((neighbour_status, _), neighbour_took)) = tokio::join!(spin, neighbour);
    assert_eq!(status, 504, "{body}");
    assert_eq!(neighbour_status, 200);
    assert!(
        neighbour_took < Duration::from_millis(500),
        "a neighbour waited {neighbour_took:?} behind a spinning p3 guest"
    );
}

#[tokio::test]
async fn a_kept_p3_instance_counts_its_requests_within_every_bound() {
    let host = HostProcess::start(
        &guest("hello-p3"),
        &[
            "--memory-limit",
            "32MiB",
            "--instance-max-requests",
            "0",
            "--timeout",
            "2",
        ],
    );
    let first = served_at(&host, "/served").await;
    for next in first + 1..first + 5 {
        assert_eq!(served_at(&host, "/served").await, next);
    }

    // A loop past the deadline is stopped, and its instance goes.
    let (status, body) = get_text(&host, "/spin").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("--timeout"), "{body}");
    assert_eq!(served_at(&host, "/served").await, 1);

    // So is a guest waiting past the deadline.
    let started = Instant::now();
    let (status, body) = get_text(&host, "/sleep?ms=10000").await;
    assert_eq!(status, 504, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(served_at(&host, "/served").await, 1);

    // Memory the instance holds adds up over its requests, up to the limit, which retires it.
    let mut answers = Vec::new();
    while answers.len() < 20 && !answers.contains(&500) {
        answers.push(get_text(&host, "/grow?mb=4").await.0);
    }
    assert_eq!(answers.last(), Some(&500), "{answers:?}");
    assert!(answers.len() > 2, "refused too soon: {answers:?}");
    assert!(
        host.log().contains("memory limit exceeded"),
        "{}",
        host.log()
    );
    assert_eq!(served_at(&host, "/served").await, 1);
}

#[tokio::test]
async fn a_p3_app_streams_5_mb_back_and_a_trap_mid_body_looks_cut() {
    let host = HostProcess::start(&guest("hello-p3"), &["--instance-max-requests", "0"]);
    let body = blackbox::random_bytes(5 << 20, 11);
    let response = http_client()
        .post(host.url("/echo"))
        .body(body.clone())
        .send()
        .await
        .expect("the host answers");
    assert_eq!(response.status().as_u16(), 200);
    let echoed = response.bytes().await.expect("the whole body");
    assert!(
        echoed == body,
        "{} bytes came back, not the 5 MiB sent",
        echoed.len()
    );
    let served = served_at(&host, "/served").await;
    assert!(served > 1, "the instance that echoed was not kept");

    // A trap after the response began: the client sees a cut response (the head may not have
    // gone out yet), never a whole one, and the log says so.
    let cut = match http_client()
        .get(host.url("/trap-mid-response"))
        .send()
        .await
    {
        Ok(response) => {
            assert_eq!(response.status().as_u16(), 200);
            response.bytes().await.is_err()
        }
        Err(error) => error.is_request(),
    };
    assert!(cut, "a body cut by a trap read as complete");
    assert!(host.log().contains("cut short"), "{}", host.log());
    // And the instance went with it.
    assert_eq!(served_at(&host, "/served").await, 1);
}
