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
    blackbox::assert_memory_adds_up_to_the_limit(&host, "/grow?mb=4").await;
    assert_eq!(served_at(&host, "/served").await, 1);
}

#[tokio::test]
async fn a_kept_p3_instance_idle_past_its_timeout_is_dropped_and_one_in_use_is_not() {
    let host = HostProcess::start(
        &guest("hello-p3"),
        &[
            "--instance-max-requests",
            "0",
            "--instance-idle-timeout",
            "1",
        ],
    );
    let first = served_at(&host, "/served").await;
    // Requests 300 ms apart, over more than one timeout: never idle for 1 s, the instance stays.
    for next in first + 1..first + 6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(served_at(&host, "/served").await, next);
    }
    // One request that outlasts the timeout does not make its instance idle either.
    let (status, _) = get_text(&host, "/sleep?ms=1500").await;
    assert_eq!(status, 200);
    assert_eq!(served_at(&host, "/served").await, first + 7);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(served_at(&host, "/served").await, 1);
    assert_eq!(served_at(&host, "/served").await, 2);
}

#[tokio::test]
async fn a_p3_app_streams_5_mb_back_and_a_trap_mid_body_looks_cut() {
    let host = HostProcess::start(&guest("hello-p3"), &["--instance-max-requests", "0"]);
    blackbox::assert_echoes_5_mib(&host, "/echo").await;
    let served = served_at(&host, "/served").await;
    assert!(served > 1, "the instance that echoed was not kept");

    // A trap after the response began: the client sees a cut response (the head may not have
    // gone out yet), never a whole one, and the log says so.
    let (cut, request_id) = match http_client()
        .get(host.url("/trap-mid-response"))
        .send()
        .await
    {
        Ok(response) => {
            assert_eq!(response.status().as_u16(), 200);
            let request_id = response.headers()["x-request-id"]
                .to_str()
                .map(str::to_owned)
                .ok();
            (response.bytes().await.is_err(), request_id)
        }
        Err(error) => (error.is_request(), None),
    };
    assert!(cut, "a body cut by a trap read as complete");
    let log = host.log();
    let cut_short = log.lines().find(|line| line.contains("cut short"));
    assert!(cut_short.is_some(), "{log}");
    // Under the request's id, when the client got as far as the head that carries it.
    if let (Some(line), Some(id)) = (cut_short, request_id) {
        assert!(line.contains(&format!("request_id={id}")), "{line}");
    }
    // And the instance went with it.
    assert_eq!(served_at(&host, "/served").await, 1);
}

/// A host whose p3 instances serve up to 4 requests at once, kept for good; its metrics on
/// `metrics_bind`.
fn shared_host_with_metrics(timeout: &str, metrics_bind: &str) -> HostProcess {
    HostProcess::start(
        &guest("hello-p3"),
        &[
            "--metrics-bind",
            metrics_bind,
            "--instance-max-requests",
            "0",
            "--instance-concurrency",
            "4",
            "--threads",
            "8",
            "--memory-limit",
            "32MiB",
            "--timeout",
            timeout,
        ],
    )
}

fn shared_host(timeout: &str) -> HostProcess {
    shared_host_with_metrics(timeout, &format!("127.0.0.1:{}", blackbox::free_port()))
}

/// Sends `path` after `delay`.
async fn get_after(host: &HostProcess, delay_ms: u64, path: &str) -> (u16, String) {
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    get_text(host, path).await
}

#[tokio::test]
async fn a_shared_p3_instance_serves_requests_at_once_within_its_memory_cap() {
    let metrics_port = blackbox::free_port();
    let host = shared_host_with_metrics("5", &format!("127.0.0.1:{metrics_port}"));
    let first = served_at(&host, "/served").await;
    let created = "host_instances_created_total{app=\"hello-p3\"}";
    let reused = "host_instances_reused_total{app=\"hello-p3\"}";
    let before = [
        blackbox::metric(metrics_port, created).await,
        blackbox::metric(metrics_port, reused).await,
    ];
    // One request waits; three more join it on the same instance while it does.
    let started = Instant::now();
    let (a, b, c, d) = tokio::join!(
        get_text(&host, "/together?ms=1000"),
        get_after(&host, 200, "/together?ms=600"),
        get_after(&host, 200, "/together?ms=600"),
        get_after(&host, 200, "/together?ms=600"),
    );
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "served one after another: {:?}",
        started.elapsed()
    );
    for (status, body) in [&a, &b, &c, &d] {
        assert_eq!(*status, 200, "{body}");
    }
    assert_eq!(a.1.trim(), "4", "the instance never served 4 at once");
    assert_eq!(served_at(&host, "/served").await, first + 5);
    // The metrics say the same: no instance made, five requests given to the kept one.
    let after = [
        blackbox::metric(metrics_port, created).await,
        blackbox::metric(metrics_port, reused).await,
    ];
    assert_eq!([after[0] - before[0], after[1] - before[1]], [0, 5]);

    // The memory cap covers the instance, whatever the requests it serves at once hold.
    blackbox::assert_memory_adds_up_to_the_limit(&host, "/grow?mb=4").await;
    assert_eq!(served_at(&host, "/served").await, 1);
}

#[tokio::test]
async fn a_trap_on_a_shared_p3_instance_fails_the_requests_beside_it_clearly() {
    let host = shared_host("5");
    let (waiting, beside, trap) = tokio::join!(
        get_text(&host, "/together?ms=2000"),
        get_after(&host, 200, "/together?ms=2000"),
        get_after(&host, 400, "/trap"),
    );
    // Which of them trapped the instance cannot be told: each is told that the app failed
    // while its instance served it and others.
    for (status, body) in [waiting, beside, trap] {
        assert_eq!(status, 500, "{body}");
        assert!(body.contains("trapped"), "{body}");
        assert!(body.contains("others at once"), "{body}");
    }
    // The next request gets a new instance.
    assert_eq!(served_at(&host, "/served").await, 1);
}

#[tokio::test]
async fn a_deadline_on_a_shared_p3_instance_retires_it_and_tells_the_requests_beside_it() {
    let host = shared_host("1");
    // A request computing past its deadline holds the whole instance: it is stopped, and the
    // one given to the instance meanwhile is told why.
    let (spin, beside) = tokio::join!(
        get_text(&host, "/spin"),
        get_after(&host, 200, "/together?ms=300"),
    );
    assert_eq!(spin.0, 504, "{}", spin.1);
    assert_eq!(beside.0, 503, "{}", beside.1);
    assert!(
        beside.1.contains("ran past the 1s --timeout"),
        "{}",
        beside.1
    );

    // A request waiting past its deadline is answered 504 at its deadline; the one beside it
    // finishes, and the instance takes no more.
    let first = served_at(&host, "/served").await;
    let (waiting, beside) = tokio::join!(
        get_text(&host, "/sleep?ms=10000"),
        get_after(&host, 100, "/together?ms=1400"),
    );
    assert_eq!(waiting.0, 504, "{}", waiting.1);
    assert_eq!(beside.0, 504, "{}", beside.1);
    let (waiting, beside) = tokio::join!(
        get_text(&host, "/sleep?ms=10000"),
        get_after(&host, 100, "/together?ms=500"),
    );
    assert_eq!(waiting.0, 504, "{}", waiting.1);
    assert_eq!(beside.0, 200, "{}", beside.1);
    assert_eq!(served_at(&host, "/served").await, 1, "first was {first}");

    // What a guest goes on running for a request that expired while it waited is stopped once
    // the instance serves no request: it burns no CPU after the deadline.
    let (status, body) = get_text(&host, "/sleep-then-spin?ms=1500").await;
    assert_eq!(status, 504, "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = host.cpu_time();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let burnt = host.cpu_time() - before;
    assert!(
        burnt < Duration::from_millis(300),
        "{burnt:?} of CPU burnt in 1 s after the deadline"
    );
    assert_eq!(served_at(&host, "/served").await, 1);
}

#[tokio::test]
async fn p2_and_p3_apps_are_served_side_by_side_each_with_its_own_reuse() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "threads = 4\n\
             [[app]]\nname = \"p2\"\ncomponent = \"{}\"\npath = \"/p2\"\n\
             [[app]]\nname = \"p3\"\ncomponent = \"{}\"\ndefault = true\ninstance_max_requests = 0\n",
            guest("faults"),
            guest("hello-p3"),
        ),
    )
    .expect("write the config");
    let host = HostProcess::start_with_config(&config, &[]);
    let first = served_at(&host, "/served").await;
    assert_eq!(served_at(&host, "/served").await, first + 1);
    // The p2 app keeps fresh instances, the default.
    for _ in 0..2 {
        assert_eq!(served_at(&host, "/p2/served").await, 1);
    }
}
