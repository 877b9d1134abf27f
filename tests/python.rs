//! A Python guest (componentize-py, `guests/python/hello`) on the host: it answers, each bound
//! holds for it, and with kept instances it keeps its interpreter between requests, as it
//! observes itself.

use blackbox::{HostProcess, get_text, python_guest, served_at};

#[tokio::test]
async fn a_python_app_answers_on_fresh_instances_by_default() {
    let host = HostProcess::start(&python_guest("hello"), &["--memory-limit", "64MiB"]);
    assert_eq!(
        get_text(&host, "/").await,
        (200, "Hello from Python\n".to_owned())
    );
    for _ in 0..3 {
        assert_eq!(served_at(&host, "/served").await, 1);
    }
}

/// An interpreter writes pages all over its initial memory; once the host has learned which, it
/// copies them for each fresh instance before it runs (`runtime::warm_pages`). What is copied must
/// be the component's initial memory, never what an earlier instance wrote there: instances that
/// count their requests and hold memory, one after another and eight at once, each start clean.
#[tokio::test]
async fn fresh_python_instances_start_clean_once_their_pages_are_copied_ahead() {
    let host = HostProcess::start(
        &python_guest("hello"),
        &[
            "--memory-limit",
            "64MiB",
            "--threads",
            "8",
            "--log-level",
            "debug",
        ],
    );
    for _ in 0..12 {
        assert_eq!(served_at(&host, "/served").await, 1);
        assert_eq!(
            get_text(&host, "/keep").await,
            (200, "keeping 4 MiB\n".to_owned())
        );
    }
    assert!(
        host.log().contains("copied before it runs"),
        "the pages were never learned: {}",
        host.log()
    );
    for _ in 0..4 {
        let counts = futures::future::join_all((0..8).map(|_| get_text(&host, "/served"))).await;
        let kept = futures::future::join_all((0..8).map(|_| get_text(&host, "/keep"))).await;
        assert!(
            counts
                .iter()
                .all(|answer| *answer == (200, "1\n".to_owned())),
            "{counts:?}"
        );
        assert!(
            kept.iter()
                .all(|answer| *answer == (200, "keeping 4 MiB\n".to_owned())),
            "{kept:?}"
        );
    }
}

#[tokio::test]
async fn a_kept_python_instance_keeps_its_interpreter_within_every_bound() {
    let host = HostProcess::start(
        &python_guest("hello"),
        &[
            "--memory-limit",
            "64MiB",
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
    // A refused grow the app handles leaves the instance serving; a later exception is told
    // as what it is, not as that old refusal, and retires the instance.
    let (status, body) = get_text(&host, "/try-grow").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "refused, and carried on\n"),
        "{}",
        host.log()
    );
    let (status, body) = get_text(&host, "/raise").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("trapped"), "{body}");
    assert_eq!(served_at(&host, "/served").await, 1);
    // So does a loop past the deadline.
    let (status, body) = get_text(&host, "/spin").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(served_at(&host, "/served").await, 1);
    // Memory the instance holds adds up over its requests, up to the limit.
    blackbox::assert_memory_adds_up_to_the_limit(&host, "/keep").await;
    assert_eq!(served_at(&host, "/served").await, 1);
}

#[tokio::test]
async fn a_python_app_streams_5_mb_back_and_a_failure_mid_body_looks_cut() {
    let host = HostProcess::start(
        &python_guest("hello"),
        &["--memory-limit", "64MiB", "--instance-max-requests", "0"],
    );
    blackbox::assert_echoes_5_mib(&host, "/echo").await;

    // An exception after the response began: the client sees a cut body, never a whole one.
    let response = blackbox::http_client()
        .get(host.url("/raise-mid-response"))
        .send()
        .await
        .expect("the head arrives");
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.bytes().await.is_err(),
        "a body cut by an exception read as complete"
    );
    // And the instance went with it.
    assert_eq!(served_at(&host, "/served").await, 1);
}

/// The memory budget counts what a worker holds once it has loaded the component, also on the
/// start that compiles it: the compiler's heap (about 110 MiB for a 30 MB Flask component) is
/// not the workers' baseline (about 4 MiB). A budget that fits with the true baseline (the
/// worst case is 220 MiB) and not with the compiler's is accepted from an empty cache, as
/// from a full one.
#[tokio::test]
async fn a_cold_cache_does_not_inflate_the_memory_budget() {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_string_lossy().into_owned();
    let args = [
        "--memory-limit",
        "64MiB",
        "--memory-budget",
        "260MiB",
        "--cache-dir",
        cache_dir.as_str(),
    ];
    for (start, said) in [("cold", "and cached at"), ("warm", "from cache")] {
        let host = HostProcess::start(&python_guest("wsgi-flask"), &args);
        assert_eq!(get_text(&host, "/").await.0, 200, "{start} cache");
        assert!(host.log().contains(said), "{start} cache: {}", host.log());
    }
}
