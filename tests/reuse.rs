//! Instances kept between requests (`--instance-max-requests`): what the guest itself observes
//! of its instance (the faults guest counts the requests its instance was given), what a
//! failure does to the instance, and an app whose instances cannot serve twice.

use std::time::Duration;

use blackbox::{HostProcess, free_port, get_text, guest, metric, served_at};

#[tokio::test]
async fn an_instance_serves_its_share_of_requests_then_a_fresh_one_takes_over() {
    let metrics_port = free_port();
    let metrics_bind = format!("127.0.0.1:{metrics_port}");
    let host = HostProcess::start(
        &guest("faults"),
        &[
            "--instance-max-requests",
            "3",
            "--metrics-bind",
            &metrics_bind,
        ],
    );
    let created = "host_instances_created_total{app=\"faults\"}";
    let reused = "host_instances_reused_total{app=\"faults\"}";
    let served_out = "host_instances_retired_total{app=\"faults\",reason=\"served\"}";
    // The start-up probes (`GET /`) were served already: start from where the instance is.
    let before = [
        metric(metrics_port, created).await,
        metric(metrics_port, reused).await,
        metric(metrics_port, served_out).await,
    ];
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(served_at(&host, "/served").await);
    }
    let expected: Vec<u64> = std::iter::successors(Some(seen[0]), |n| Some(n % 3 + 1))
        .take(7)
        .collect();
    assert_eq!(seen, expected);
    let fresh_ones = expected.iter().filter(|&&n| n == 1).count() as u64;
    let after = [
        metric(metrics_port, created).await,
        metric(metrics_port, reused).await,
        metric(metrics_port, served_out).await,
    ];
    assert_eq!(after[0] - before[0], fresh_ones, "instances created");
    assert_eq!(
        after[1] - before[1],
        7 - fresh_ones,
        "requests on kept instances"
    );
    assert_eq!(
        after[2] - before[2],
        fresh_ones,
        "instances that served their share"
    );
    let kept = "host_instances_kept{app=\"faults\"}";
    assert_eq!(metric(metrics_port, kept).await, 1);

    // The default is a fresh instance for every request.
    let fresh = HostProcess::start(&guest("faults"), &[]);
    for _ in 0..3 {
        assert_eq!(served_at(&fresh, "/served").await, 1);
    }
}

#[tokio::test]
async fn a_failed_request_retires_its_instance() {
    let host = HostProcess::start(
        &guest("faults"),
        &[
            "--instance-max-requests",
            "0",
            "--timeout",
            "1",
            "--memory-limit",
            "32MiB",
        ],
    );
    // The start-up probes were served by this instance already.
    let first = served_at(&host, "/served").await;
    assert!(
        first > 1,
        "the instance served the start-up probes: {first}"
    );
    assert_eq!(served_at(&host, "/served").await, first + 1);
    // A trap, the deadline and the memory limit each leave the next request a fresh instance
    // (and the instance has served two requests, so none of them is blamed on reuse).
    for (path, status) in [
        ("/trap", 500),
        ("/spin", 504),
        ("/sleep?ms=3000", 504),
        ("/grow", 500),
    ] {
        let (answered, body) = get_text(&host, path).await;
        assert_eq!(answered, status, "{path}: {body}");
        assert_eq!(served_at(&host, "/served").await, 1, "after {path}");
        assert_eq!(served_at(&host, "/served").await, 2, "after {path}");
    }
    assert!(
        !host.log().contains("cannot serve a second request"),
        "{}",
        host.log()
    );
}

#[tokio::test]
async fn an_idle_instance_is_dropped_after_the_idle_timeout() {
    let host = HostProcess::start(
        &guest("faults"),
        &[
            "--instance-max-requests",
            "0",
            "--instance-idle-timeout",
            "0.5",
        ],
    );
    let first = served_at(&host, "/served").await;
    assert_eq!(served_at(&host, "/served").await, first + 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(served_at(&host, "/served").await, 1);
    assert_eq!(served_at(&host, "/served").await, 2);
}

#[tokio::test]
async fn an_app_whose_instances_cannot_serve_twice_loses_no_request() {
    // The app under test gets no start-up probe (`GET /` goes to the default app): its first
    // request is the first its instances see.
    let (host, _dir) = two_apps("instance_max_requests = 100", "");
    // `/once` traps on any instance that served a request before, as a runtime that ends with
    // its first request: every request is still answered, by a fresh instance.
    for attempt in 0..10 {
        let (status, body) = get_text(&host, "/kept/once").await;
        assert_eq!(
            (status, body.as_str()),
            (200, "once\n"),
            "request {attempt}"
        );
    }
    let log = host.log();
    assert_eq!(
        log.matches("cannot serve a second request").count(),
        1,
        "one line says why the app's instances are no longer kept:\n{log}"
    );
    assert!(!log.contains("[ERROR]"), "no request failed:\n{log}");
    assert_eq!(get_text(&host, "/kept/served").await.1.trim(), "1");
    assert_eq!(get_text(&host, "/kept/served").await.1.trim(), "1");
}

/// A host with the faults guest twice: `kept` on `/kept` with `kept_settings`, and the
/// default app with `default_settings`.
fn two_apps(kept_settings: &str, default_settings: &str) -> (HostProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[app]]
name = "kept"
component = "{faults}"
path = "/kept"
{kept_settings}

[[app]]
name = "fresh"
component = "{faults}"
default = true
{default_settings}
"#,
            faults = guest("faults"),
        ),
    )
    .expect("the config is written");
    (HostProcess::start_with_config(&config, &[]), dir)
}

#[tokio::test]
async fn instance_reuse_is_an_app_setting() {
    let (host, _dir) = two_apps("instance_max_requests = 0", "");
    for expected in 1..=3 {
        assert_eq!(
            get_text(&host, "/kept/served").await.1.trim(),
            expected.to_string()
        );
        assert_eq!(get_text(&host, "/served").await.1.trim(), "1");
    }
}

#[tokio::test]
async fn the_memory_limit_covers_an_instance_over_all_its_requests() {
    let (host, _dir) = two_apps("instance_max_requests = 0\nmemory_limit = \"24MiB\"", "");
    // Each request keeps 6 MiB for good: the instance's memory adds up across its requests,
    // and the one that takes it past 24 MiB is refused.
    let mut answers = Vec::new();
    while answers.len() < 5 && !answers.contains(&500) {
        answers.push(get_text(&host, "/kept/keep?mb=6").await.0);
    }
    let refused = answers
        .iter()
        .position(|&status| status == 500)
        .unwrap_or_else(|| panic!("no request was refused: {answers:?}"));
    assert!(
        (2..=4).contains(&refused),
        "the instance was refused only at request {refused}: {answers:?}"
    );
    assert!(
        host.log().contains("memory limit exceeded"),
        "{}",
        host.log()
    );
    // The refusal retired the instance: the next request starts afresh.
    assert_eq!(get_text(&host, "/kept/served").await.1.trim(), "1");
    assert_eq!(get_text(&host, "/kept/keep?mb=6").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kept_instances_never_outnumber_the_apps_permits() {
    let metrics_port = free_port();
    let metrics_bind = format!("127.0.0.1:{metrics_port}");
    let host = HostProcess::start(
        &guest("faults"),
        &[
            "--instance-max-requests",
            "0",
            "--threads",
            "3",
            "--metrics-bind",
            &metrics_bind,
        ],
    );
    let host = std::sync::Arc::new(host);
    let mut clients = Vec::new();
    for _ in 0..32 {
        let host = std::sync::Arc::clone(&host);
        clients.push(tokio::spawn(async move {
            for _ in 0..10 {
                assert_eq!(get_text(&host, "/sleep?ms=2").await.0, 200);
            }
        }));
    }
    for client in clients {
        client.await.expect("a client");
    }
    let created = metric(metrics_port, "host_instances_created_total{app=\"faults\"}").await;
    let kept = metric(metrics_port, "host_instances_kept{app=\"faults\"}").await;
    assert!(
        created <= 3 && kept <= 3,
        "{created} instances created and {kept} kept for 3 threads"
    );
}

#[tokio::test]
async fn the_jitter_spreads_each_instances_share_within_its_bounds() {
    // Shares of 2 + randint(0, 3) requests: from 2 to 5.
    let (host, _dir) = two_apps(
        "instance_max_requests = 2\ninstance_max_requests_jitter = 3",
        "",
    );
    let mut shares = Vec::new();
    let mut last = 0;
    for _ in 0..80 {
        let count = served_at(&host, "/kept/served").await;
        if count == 1 && last > 0 {
            shares.push(last);
        }
        last = count;
    }
    assert!(shares.len() >= 10, "{shares:?}");
    assert!(
        shares.iter().all(|share| (2..=5).contains(share)),
        "an instance served outside 2..=5: {shares:?}"
    );
    // With 4 equally likely shares, the chance that all instances drew the same is negligible.
    assert!(
        shares.iter().any(|&share| share != shares[0]),
        "every instance drew the same share: {shares:?}"
    );
}
