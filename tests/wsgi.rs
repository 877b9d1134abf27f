//! A Flask app served through the WSGI bridge (`guests/python/wsgi-flask`, built by
//! `guests/python/build app:app -r requirements.txt` with Flask 3.1.2 from PyPI): what a client
//! and an operator see of each part of PEP 3333, and what the build refuses (a requirement that
//! needs a C extension, a capability called as the app is imported) and warms up.

use std::time::Duration;

use blackbox::{
    HostProcess, get_text, http_client, poll_until, python_guest, random_bytes, repo_root,
};
use serde_json::Value;

/// Comfortably above the 24.8 MiB the app starts with, with room for a few MiB of responses
/// (componentize-py 0.25.1 keeps every byte the app writes until its instance ends).
const MEMORY_LIMIT: &str = "32MiB";

fn flask() -> String {
    python_guest("wsgi-flask")
}

/// The Flask app on fresh instances, under `MEMORY_LIMIT`.
fn start_flask() -> HostProcess {
    HostProcess::start(&flask(), &["--memory-limit", MEMORY_LIMIT])
}

/// `GET path`: its response (its head read) and its request id.
async fn get(host: &HostProcess, path: &str) -> (reqwest::Response, String) {
    let response = http_client()
        .get(host.url(path))
        .send()
        .await
        .unwrap_or_else(|error| panic!("GET {path}: {error}"));
    let id = request_id(&response);
    (response, id)
}

/// `guests/python/build app:app ARGS -o app.wasm` of `source` as app.py, in `dir`.
fn build_app(dir: &tempfile::TempDir, source: &str, args: &[&str]) -> std::process::Output {
    std::fs::write(dir.path().join("app.py"), source).unwrap();
    std::process::Command::new(repo_root().join("guests/python/build"))
        .arg("app:app")
        .args(args)
        .args(["-o", "app.wasm"])
        .current_dir(dir.path())
        .output()
        .expect("run guests/python/build")
}

/// The build failed, saying each of `expected` on stderr, and left no component.
fn assert_build_failed(dir: &tempfile::TempDir, output: &std::process::Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    for text in expected {
        assert!(stderr.contains(text), "no {text:?} in:\n{stderr}");
    }
    assert!(!dir.path().join("app.wasm").exists());
}

/// The traceback of `route`'s own exception, logged under the request `id`.
fn assert_traceback_logged(host: &HostProcess, id: &str, route: &str) {
    let raised = format!("RuntimeError: the {route} route fails on purpose");
    assert_logged_under(host, id, &["Traceback (most recent call last):", &raised]);
}

fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .expect("an ASCII request id")
        .to_owned()
}

/// Waits (at most 5 s) for the log to hold every line in `lines`, each logged under the
/// request `id` as the guest's stderr.
fn assert_logged_under(host: &HostProcess, id: &str, lines: &[&str]) {
    let expected: Vec<String> = lines
        .iter()
        .map(|line| format!("request_id={id} app stderr: {line}"))
        .collect();
    let logged = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let log = host.log();
        expected
            .iter()
            .all(|line| log.contains(line.as_str()))
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "not all of {expected:#?} in the log:\n{}",
        host.log()
    );
}

async fn environ(host: &HostProcess, request: reqwest::RequestBuilder) -> Value {
    let response = request.send().await.expect("the host answers");
    assert_eq!(response.status().as_u16(), 200, "{}", host.log());
    let text = response.text().await.expect("a body");
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

#[tokio::test]
async fn a_flask_app_answers_within_32_mib() {
    let host = start_flask();
    let response = http_client().get(host.url("/")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/html; charset=utf-8"
    );
    assert_eq!(response.text().await.unwrap(), "Hello from Flask\n");
    // A HEAD answer has the head and no body.
    let response = http_client().head(host.url("/")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200, "{}", host.log());
    assert_eq!(response.bytes().await.unwrap().len(), 0);
    assert!(!host.log().contains("cut short"), "{}", host.log());
}

#[tokio::test]
async fn the_environ_says_what_the_request_and_the_proxy_rules_say() {
    let host = start_flask();
    let odd = reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap();
    let seen = environ(
        &host,
        http_client()
            // `%69` is `i`: PATH_INFO is decoded, so Flask routes it to /environ.
            .post(host.url("/env%69ron?x=%2F&y=1"))
            .header("Content-Type", "text/plain")
            .header("X-Custom", "a")
            .header("X-Custom", "b")
            .header("X_Custom", "underscored")
            .header("X-Odd", odd)
            // Loopback is a trusted proxy by default.
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-For", "203.0.113.7")
            .body("line one\nline two\nlast"),
    )
    .await;
    let port = host.addr().port().to_string();
    let expected = [
        ("REQUEST_METHOD", Value::from("POST")),
        ("SCRIPT_NAME", Value::from("")),
        ("PATH_INFO", Value::from("/environ")),
        ("QUERY_STRING", Value::from("x=%2F&y=1")),
        ("CONTENT_LENGTH", Value::from("22")),
        ("CONTENT_TYPE", Value::from("text/plain")),
        // The peer: the last address of X-Forwarded-For, which the host appends.
        ("REMOTE_ADDR", Value::from("127.0.0.1")),
        ("SERVER_NAME", Value::from("127.0.0.1")),
        ("SERVER_PORT", Value::from(port.as_str())),
        ("wsgi.url_scheme", Value::from("https")),
        ("wsgi.multithread", Value::from(false)),
        ("wsgi.multiprocess", Value::from(true)),
        ("wsgi.run_once", Value::from(false)),
        ("wsgi.input_terminated", Value::from(true)),
        // Both lines of X-Custom, and not X_Custom: a header whose name holds an underscore
        // is dropped, as gunicorn does, since it would read as the same variable.
        ("HTTP_X_CUSTOM", Value::from("a,b")),
        ("HTTP_X_ODD", Value::from("café")),
        (
            "HTTP_X_FORWARDED_FOR",
            Value::from("203.0.113.7, 127.0.0.1"),
        ),
        (
            "lines",
            serde_json::json!(["line one\n", "line two\n", "last"]),
        ),
    ];
    for (key, value) in expected {
        assert_eq!(seen[key], value, "{key} in {seen:#}");
    }
    let url = seen["url"].as_str().unwrap_or_default();
    assert!(
        url.starts_with(&format!("https://127.0.0.1:{port}/environ?")),
        "{url}"
    );

    // From an untrusted peer the proxy's word is gone: the scheme is the connection's.
    let host = HostProcess::start(
        &flask(),
        &[
            "--memory-limit",
            MEMORY_LIMIT,
            "--forwarded-allow-ips",
            "10.1.2.3",
        ],
    );
    let seen = environ(
        &host,
        http_client()
            .get(host.url("/environ"))
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-For", "203.0.113.7"),
    )
    .await;
    assert_eq!(seen["wsgi.url_scheme"], "http", "{seen:#}");
    assert_eq!(seen["REMOTE_ADDR"], "127.0.0.1", "{seen:#}");
    assert_eq!(seen["HTTP_X_FORWARDED_FOR"], "127.0.0.1", "{seen:#}");
    assert_eq!(seen["CONTENT_LENGTH"], Value::Null, "{seen:#}");
}

#[tokio::test]
async fn script_name_is_the_path_prefix_the_app_is_mounted_at() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "memory_limit = \"{MEMORY_LIMIT}\"\n\
             [[app]]\nname = \"shop\"\ncomponent = \"{}\"\npath = \"/shop\"\n",
            flask()
        ),
    )
    .expect("write the config");
    let host = HostProcess::start_with_config(&config, &[]);
    let seen = environ(&host, http_client().get(host.url("/shop/environ?a=b"))).await;
    assert_eq!(seen["SCRIPT_NAME"], "/shop", "{seen:#}");
    assert_eq!(seen["PATH_INFO"], "/environ", "{seen:#}");
    // So the URLs the app makes are the client's.
    assert_eq!(
        seen["url"],
        format!("http://127.0.0.1:{}/shop/environ?a=b", host.addr().port())
    );
}

#[tokio::test]
async fn wsgi_input_reads_a_chunked_body_to_its_end_and_echo_streams_5_mib_back() {
    let host = HostProcess::start(&flask(), &["--memory-limit", "48MiB"]);
    let chunks: Vec<Result<&'static [u8], std::io::Error>> =
        vec![Ok(b"first\nsec"), Ok(b"ond\n"), Ok(b"third")];
    let seen = environ(
        &host,
        http_client()
            .post(host.url("/environ"))
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks))),
    )
    .await;
    assert_eq!(seen["CONTENT_LENGTH"], Value::Null, "{seen:#}");
    assert_eq!(
        seen["lines"],
        serde_json::json!(["first\n", "second\n", "third"])
    );
    blackbox::assert_echoes_5_mib(&host, "/echo").await;
}

#[tokio::test]
async fn a_64_mib_download_arrives_whole() {
    // The limit holds the app (24.8 MiB) and the 64 MiB componentize-py 0.25.1 keeps of what
    // it writes, not a second copy of the body: the app holds one 64 KiB chunk at a time.
    let host = HostProcess::start(&flask(), &["--memory-limit", "112MiB"]);
    assert_downloads_64_mib(&host).await;
}

#[tokio::test]
#[ignore = "componentize-py 0.25.1 never frees a byte string passed to a wasi:io write \
            (its runtime's maybe_pop_list), so a response costs its size in guest memory"]
async fn a_64_mib_download_streams_within_a_32_mib_memory_limit() {
    let host = start_flask();
    assert_downloads_64_mib(&host).await;
}

async fn assert_downloads_64_mib(host: &HostProcess) {
    let response = http_client()
        .get(host.url("/stream?mib=64"))
        .send()
        .await
        .expect("the head arrives");
    assert_eq!(response.status().as_u16(), 200);
    let body = response
        .bytes()
        .await
        .unwrap_or_else(|error| panic!("the download was cut ({error}):\n{}", host.log()));
    assert_eq!(body.len(), 64 << 20);
    assert!(body.iter().all(|byte| *byte == b'x'));
}

#[tokio::test]
async fn an_exception_in_a_view_is_flasks_500_with_the_traceback_under_the_request_id() {
    let host = start_flask();
    let (response, id) = get(&host, "/fail").await;
    assert_eq!(response.status().as_u16(), 500);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("<h1>Internal Server Error</h1>")
    );
    // Flask logs it to wsgi.errors.
    assert_traceback_logged(&host, &id, "/fail");
}

#[tokio::test]
async fn an_exception_out_of_the_app_is_the_hosts_500_with_the_traceback_under_the_request_id() {
    let host = start_flask();
    // The streamed body fails before its first chunk, outside Flask's error handling.
    let (response, id) = get(&host, "/fail-before-body").await;
    assert_eq!(response.status().as_u16(), 500);
    let body = response.text().await.unwrap();
    assert!(body.starts_with("the app failed"), "{body}");
    assert_traceback_logged(&host, &id, "/fail-before-body");
}

#[tokio::test]
async fn an_exception_midway_through_the_body_cuts_the_response() {
    let host = start_flask();
    let (response, id) = get(&host, "/fail-midway").await;
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.bytes().await.is_err(),
        "a body cut by an exception read as complete"
    );
    assert_logged_under(
        &host,
        &id,
        &["RuntimeError: the /fail-midway route fails on purpose"],
    );
}

#[tokio::test]
async fn close_is_called_on_the_response_iterable() {
    // A kept instance, so that the next request sees what the last one recorded.
    let host = HostProcess::start(
        &flask(),
        &[
            "--memory-limit",
            MEMORY_LIMIT,
            "--instance-max-requests",
            "0",
        ],
    );
    assert_eq!(
        get_text(&host, "/close?check").await,
        (200, "closed 0\n".to_owned())
    );
    assert_eq!(
        get_text(&host, "/close").await,
        (200, "closing\n".to_owned())
    );
    assert_eq!(
        get_text(&host, "/close?check").await,
        (200, "closed 1\n".to_owned())
    );
}

#[tokio::test]
async fn start_response_takes_exc_info_until_the_body_begins_and_write_sends_at_once() {
    let host = start_flask();
    assert_eq!(
        get_text(&host, "/raw/write").await,
        (200, "written, then returned\n".to_owned())
    );
    // Called again with exc_info before any of the body: the new head replaces the first.
    assert_eq!(
        get_text(&host, "/raw/replaced").await,
        (503, "replaced\n".to_owned())
    );
    // After the body began it raises the error again, and the response is cut.
    let response = http_client()
        .get(host.url("/raw/late"))
        .send()
        .await
        .expect("the head arrives");
    let id = request_id(&response);
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.bytes().await.is_err(),
        "a body cut by an exception read as complete"
    );
    assert_logged_under(&host, &id, &["ValueError: too late on purpose"]);
}

#[tokio::test]
async fn wsgi_errors_is_logged_under_the_request_id() {
    // On a kept instance too: each request's lines under its own id, not the first one's.
    let host = HostProcess::start(
        &flask(),
        &[
            "--memory-limit",
            MEMORY_LIMIT,
            "--instance-max-requests",
            "0",
        ],
    );
    for _ in 0..3 {
        let (response, id) = get(&host, "/errors").await;
        assert_eq!(response.text().await.unwrap(), "written\n");
        assert_logged_under(&host, &id, &["a line for wsgi.errors from /errors"]);
    }
}

#[test]
fn the_build_refuses_a_requirement_with_a_c_extension_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("requirements.txt"), "ujson==6.1.0\n").unwrap();
    let output = build_app(
        &dir,
        "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n",
        &["-r", "requirements.txt"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_build_failed(&dir, &output, &["need C extensions", "ujson 6.1.0: ujson."]);
}

#[tokio::test]
async fn a_large_upload_is_read_as_a_stream() {
    // 20 MiB in, its length back: what the app reads is never held whole.
    let host = start_flask();
    let body = random_bytes(20 << 20, 3);
    let response = http_client()
        .post(host.url("/count"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{}", host.log());
    assert_eq!(response.text().await.unwrap(), format!("{}\n", 20 << 20));
}

#[test]
fn a_memory_limit_below_the_apps_start_is_refused_before_compiling_in_mib() {
    let output = std::process::Command::new(blackbox::host_bin())
        .args([
            "serve",
            &flask(),
            "--memory-limit",
            "16MiB",
            "--check-config",
        ])
        .arg("--cache-dir")
        .arg(blackbox::cache_dir())
        .output()
        .expect("run the host");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("of linear memory, more than its --memory-limit of 16 MiB")
            && stderr.contains("give it at least --memory-limit 25MiB"),
        "{stderr}"
    );
    // Refused from the component's own sections: nothing compiled, no pooling message in hex.
    assert!(
        !stderr.contains("0x") && !stderr.contains("compiled"),
        "{stderr}"
    );
}

// -- host_capabilities, the capabilities' Python API -------------------------------------------

/// The Flask app with its data under a directory of the test's own, so its SQLite file,
/// objects and registry entries start empty.
fn start_flask_with_data(
    data: &tempfile::TempDir,
    memory_limit: &str,
    extra: &[&str],
) -> HostProcess {
    let data_dir = data.path().to_string_lossy().into_owned();
    let mut args = vec!["--memory-limit", memory_limit, "--data-dir", &data_dir];
    args.extend_from_slice(extra);
    HostProcess::start(&flask(), &args)
}

#[tokio::test]
async fn a_wit_error_is_a_typed_exception_with_its_fields() {
    let data = tempfile::tempdir().expect("temp dir");
    let host = start_flask_with_data(&data, MEMORY_LIMIT, &[]);
    let (status, body) = get_text(&host, "/capabilities/errors").await;
    assert_eq!(status, 200, "{body}\n{}", host.log());
    let seen: Value = serde_json::from_str(&body).expect("JSON");
    // A unique constraint: sql.DatabaseError(code, message, constraint), SQLite's extended
    // code 2067 (SQLITE_CONSTRAINT_UNIQUE).
    let duplicate = &seen["duplicate"];
    assert_eq!(
        duplicate["class"], "host_capabilities.sql.DatabaseError",
        "{seen:#}"
    );
    assert_eq!(duplicate["capability_error"], true, "{seen:#}");
    assert_eq!(duplicate["fields"]["code"], "2067", "{seen:#}");
    assert!(
        duplicate["fields"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("UNIQUE")),
        "{seen:#}"
    );
    assert_eq!(
        seen["syntax"]["class"], "host_capabilities.sql.DatabaseError",
        "{seen:#}"
    );
    // Cases without fields, one of each other capability.
    for (call, class) in [
        ("missing_object", "host_capabilities.objects.NotFound"),
        (
            "unknown_entry",
            "host_capabilities.hmac_registry.UnknownEntry",
        ),
        ("bad_key", "host_capabilities.crypto.InvalidKey"),
    ] {
        assert_eq!(seen[call]["class"], class, "{call}: {seen:#}");
        assert_eq!(seen[call]["capability_error"], true, "{call}: {seen:#}");
        assert_eq!(
            seen[call]["fields"],
            serde_json::json!({}),
            "{call}: {seen:#}"
        );
    }
    // `with sql.transaction()` rolled back the row of the block that raised.
    assert_eq!(
        seen["after_rollback"],
        serde_json::json!(["taken"]),
        "{seen:#}"
    );
}

/// 1 GiB of request body, `chunks` MiB made from seeds as they are sent, and its SHA-256.
fn gigabyte_body() -> (reqwest::Body, [u8; 32]) {
    use sha2::Digest;
    const CHUNKS: u64 = 1024;
    let mut expected = sha2::Sha256::new();
    for seed in 0..CHUNKS {
        expected.update(random_bytes(1 << 20, seed));
    }
    let chunks = futures::stream::iter(
        (0..CHUNKS).map(|seed| Ok::<_, std::io::Error>(random_bytes(1 << 20, seed))),
    );
    (
        reqwest::Body::wrap_stream(chunks),
        expected.finalize().into(),
    )
}

#[tokio::test]
async fn a_gigabyte_goes_through_the_capabilities_and_file_wrapper_under_32_mib() {
    use futures::StreamExt;
    use sha2::Digest;
    let data = tempfile::tempdir().expect("temp dir");
    // The part is checked whole before a download passes it on: 1 GiB spills to disk.
    let host = start_flask_with_data(
        &data,
        MEMORY_LIMIT,
        &["--timeout", "300", "--spill-limit", "2GiB"],
    );
    let (body, expected) = gigabyte_body();
    // request body → crypto.encrypt_stream → hmac_registry.tap → objects.upload_part, in
    // the host: 1 GiB through an instance capped at 32 MiB.
    let response = http_client()
        .put(host.url("/capabilities/upload"))
        .header("content-length", (1u64 << 30).to_string())
        .body(body)
        .send()
        .await
        .expect("the host answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, 200, "{text}\n{}", host.log());
    let stored: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(stored["size"], 1u64 << 30, "{stored}");
    assert_eq!(stored["hmac"].as_str().map(str::len), Some(64), "{stored}");

    // objects.get → hmac_registry.verify_stream → crypto.decrypt_stream → wsgi.file_wrapper,
    // spliced into the response in the host.
    let response = http_client()
        .get(host.url("/capabilities/download"))
        .send()
        .await
        .expect("the host answers");
    assert_eq!(response.status().as_u16(), 200, "{}", host.log());
    let mut received = sha2::Sha256::new();
    let mut length = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.unwrap_or_else(|error| panic!("the download was cut ({error}):\n{}", host.log()));
        length += chunk.len() as u64;
        received.update(&chunk);
    }
    assert_eq!(length, 1 << 30);
    assert!(
        <[u8; 32]>::from(received.finalize()) == expected,
        "the gigabyte came back different"
    );
}

#[tokio::test]
async fn file_wrapper_reads_any_other_file_in_chunks() {
    let host = start_flask();
    let (status, body) = get_text(&host, "/capabilities/wrapped-bytes").await;
    assert_eq!(status, 200, "{}", host.log());
    assert_eq!(body, "0123456789".repeat(100_000));
}

#[test]
fn an_app_importing_a_capability_not_built_in_fails_the_build_naming_the_option() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = build_app(
        &dir,
        "from host_capabilities import crypto\n\n\
         def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n",
        &["--capabilities", "sql,objects"],
    );
    assert_build_failed(
        &dir,
        &output,
        &["built without the crypto capability", "--capabilities"],
    );
}

// -- the build's warm-up -----------------------------------------------------------------------

#[tokio::test]
async fn the_app_is_warmed_up_at_build_where_a_capability_raises_instead_of_trapping() {
    // Every request records what it was told by the capability; those the build served are in
    // the component's initial memory, so each fresh instance reports them.
    let dir = tempfile::tempdir().expect("temp dir");
    let output = build_app(
        &dir,
        "from host_capabilities import CalledWhileBuilding, sql\n\n\
         REFUSALS = []\n\n\
         def app(environ, start_response):\n\
         \x20   try:\n\
         \x20       rows = sql.query('SELECT 41 + 1 AS answer', [])\n\
         \x20   except CalledWhileBuilding as refusal:\n\
         \x20       REFUSALS.append(f\"{environ['PATH_INFO']}: {refusal}\")\n\
         \x20       raise\n\
         \x20   start_response('200 OK', [('Content-Type', 'text/plain')])\n\
         \x20   return [f\"{rows[0]['answer']}; {len(REFUSALS)} at build, the first {REFUSALS[0]}\".encode()]\n",
        &["--warm-up", "/warm"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let host = HostProcess::start(
        dir.path().join("app.wasm").to_str().unwrap(),
        &["--memory-limit", MEMORY_LIMIT],
    );
    for _ in 0..2 {
        let (status, body) = get_text(&host, "/").await;
        assert_eq!(status, 200, "{body}\n{}", host.log());
        assert_eq!(
            body,
            "42; 8 at build, the first /warm: host:capabilities/sql query was called while the \
             component was being built (the app is imported and warmed up then, with no host to \
             answer): call capabilities while serving a request"
        );
    }
}

#[test]
fn an_app_calling_a_capability_as_it_is_imported_fails_the_build_saying_when_to_call() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = build_app(
        &dir,
        "from host_capabilities import sql\n\n\
         sql.execute('CREATE TABLE IF NOT EXISTS seen (id INTEGER)', [])\n\n\
         def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n",
        &[],
    );
    assert_build_failed(
        &dir,
        &output,
        &[
            "CalledWhileBuilding: host:capabilities/sql execute was called while the component \
             was being built",
            "call capabilities while serving a request",
        ],
    );
}
