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
