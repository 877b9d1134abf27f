//! A JavaScript guest (componentize-js, `guests/js/hello`) on the host. Its runtime ends with
//! its first request, so an instance of it cannot serve a second: kept instances find that out
//! without losing a request, and fall back to fresh ones.

use blackbox::{HostProcess, get_text, js_guest};

#[tokio::test]
async fn a_javascript_app_answers_on_fresh_instances() {
    let host = HostProcess::start(&js_guest("hello"), &["--memory-limit", "64MiB"]);
    assert_eq!(
        get_text(&host, "/").await,
        (200, "Hello from JavaScript\n".to_owned())
    );
    assert_eq!(get_text(&host, "/served").await, (200, "1\n".to_owned()));
}

#[tokio::test]
async fn a_javascript_app_that_cannot_be_kept_loses_no_request() {
    let host = HostProcess::start(
        &js_guest("hello"),
        &["--memory-limit", "64MiB", "--instance-max-requests", "100"],
    );
    for attempt in 0..10 {
        assert_eq!(
            get_text(&host, "/served").await,
            (200, "1\n".to_owned()),
            "request {attempt}"
        );
    }
    let log = host.log();
    assert!(!log.contains("[ERROR]"), "no request failed:\n{log}");
    assert_eq!(
        log.matches("cannot serve a second request").count(),
        1,
        "one line says why the app's instances are no longer kept:\n{log}"
    );
}

#[tokio::test]
async fn a_javascript_app_streams_5_mb_back_and_a_failure_mid_body_looks_cut() {
    let host = HostProcess::start(&js_guest("hello"), &["--memory-limit", "64MiB"]);
    blackbox::assert_echoes_5_mib(&host, "/echo").await;

    // An exception after the response began: the client sees a cut response, never a whole one.
    let cut = match blackbox::http_client()
        .get(host.url("/throw-mid-response"))
        .send()
        .await
    {
        Ok(response) => response.bytes().await.is_err(),
        Err(error) => error.is_request(),
    };
    assert!(cut, "a body cut by an exception read as complete");
}

#[tokio::test]
async fn a_javascript_app_is_held_to_its_memory_cap_and_its_deadline() {
    let host = HostProcess::start(
        &js_guest("hello"),
        &["--memory-limit", "64MiB", "--timeout", "1"],
    );
    // The runtime turns the refused grow into an exception, and answers 500 itself.
    let (status, body) = get_text(&host, "/grow").await;
    assert_eq!(status, 500, "{body}");
    assert!(host.log().contains("out of memory"), "{}", host.log());
    let started = std::time::Instant::now();
    let (status, body) = get_text(&host, "/spin").await;
    assert_eq!(status, 504, "{body}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        get_text(&host, "/").await,
        (200, "Hello from JavaScript\n".to_owned())
    );
}
