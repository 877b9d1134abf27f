//! The logs, as gunicorn writes them: the access log in its default format, the error log to a
//! file, and `--log-level` filtering. What a client sends cannot add lines to either log.

use std::time::Duration;

use base64::Engine;
use blackbox::{HostProcess, guest, http_client, poll_until, raw_answer};

const USER_AGENT: &str = "blackbox-logging-test/1.0 (access log)";
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Checks `dd/Mon/yyyy:HH:MM:SS +0000`.
fn check_time(time: &str) -> Result<(), String> {
    let bytes = time.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range.clone())
            .is_some_and(|b| b.iter().all(u8::is_ascii_digit))
    };
    let ok = time.len() == 26
        && digits(0..2)
        && &time[2..3] == "/"
        && MONTHS.contains(&&time[3..6])
        && &time[6..7] == "/"
        && digits(7..11)
        && &time[11..12] == ":"
        && digits(12..14)
        && &time[14..15] == ":"
        && digits(15..17)
        && &time[17..18] == ":"
        && digits(18..20)
        && &time[20..] == " +0000";
    if ok {
        Ok(())
    } else {
        Err(format!("time {time:?} is not dd/Mon/yyyy:HH:MM:SS +0000"))
    }
}

/// Checks `127.0.0.1 - - [time] "GET / HTTP/1.1" 200 14 "-" "<user agent>"`.
fn check_access_line(line: &str) -> Result<(), String> {
    let rest = line
        .strip_prefix("127.0.0.1 - - [")
        .ok_or("the line does not start with `127.0.0.1 - - [`")?;
    let (time, rest) = rest.split_once("] ").ok_or("no `] ` after the time")?;
    check_time(time)?;
    let expected = format!("\"GET / HTTP/1.1\" 200 14 \"-\" \"{USER_AGENT}\"");
    if rest != expected {
        return Err(format!("after the time: {rest:?}, expected {expected:?}"));
    }
    Ok(())
}

#[test]
fn access_line_parser_accepts_gunicorns_format() {
    let line = format!(
        "127.0.0.1 - - [24/Nov/2026:03:24:47 +0000] \"GET / HTTP/1.1\" 200 14 \"-\" \"{USER_AGENT}\""
    );
    assert_eq!(check_access_line(&line), Ok(()));
    assert!(check_access_line(&line.replace("Nov", "Nop")).is_err());
    assert!(check_access_line(&line.replace(" 14 ", " 15 ")).is_err());
}

#[tokio::test]
async fn access_log_has_gunicorns_default_format() {
    let dir = tempfile::tempdir().unwrap();
    let access_log = dir.path().join("access.log");
    let access_log_arg = access_log.to_string_lossy().into_owned();
    let host = HostProcess::start(&guest("hello"), &["--access-logfile", &access_log_arg]);
    let response = http_client()
        .get(host.url("/"))
        .header("user-agent", USER_AGENT)
        .send()
        .await
        .expect("GET / failed");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "Hello, world!\n");

    // The line is written once the response is sent: poll for it.
    let line = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        std::fs::read_to_string(&access_log)
            .ok()?
            .lines()
            .find(|line| line.contains(USER_AGENT))
            .map(str::to_owned)
    });
    let contents = std::fs::read_to_string(&access_log).unwrap_or_default();
    let line =
        line.unwrap_or_else(|| panic!("no access log line with our user agent in:\n{contents}"));
    println!("access log line: {line}");
    if let Err(why) = check_access_line(&line) {
        panic!("the access log line is not in gunicorn's default format: {why}\n{line}");
    }
}

#[test]
fn error_logfile_gets_the_listening_line() {
    let dir = tempfile::tempdir().unwrap();
    let error_log = dir.path().join("error.log");
    let error_log_arg = error_log.to_string_lossy().into_owned();
    let host = HostProcess::start(&guest("hello"), &["--error-logfile", &error_log_arg]);
    let wanted = format!("Listening at: http://{} ({})", host.addr(), host.pid());
    let found = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        std::fs::read_to_string(&error_log)
            .ok()?
            .contains(&wanted)
            .then_some(())
    });
    assert!(
        found.is_some(),
        "--error-logfile {} has no `{wanted}`:\n{}",
        error_log.display(),
        std::fs::read_to_string(&error_log).unwrap_or_default()
    );
}

#[tokio::test]
async fn log_level_warning_hides_info_lines() {
    let mut host = HostProcess::start(&guest("faults"), &["--log-level", "warning"]);
    let client = http_client();
    let ok = client
        .get(host.url("/"))
        .send()
        .await
        .expect("GET / failed");
    assert_eq!(ok.status(), 200);
    // A trap is logged as an error, which `warning` keeps.
    let trap = client
        .get(host.url("/trap"))
        .send()
        .await
        .expect("GET /trap failed");
    assert_eq!(trap.status(), 500);
    host.signal(libc::SIGTERM);
    let status = host.wait_exit(Duration::from_secs(30));
    assert!(status.is_some(), "the host did not exit after SIGTERM");
    let log = host.log();
    let info: Vec<&str> = log.lines().filter(|line| line.contains("[INFO]")).collect();
    assert!(
        info.is_empty(),
        "--log-level warning still logs info lines:\n{}",
        info.join("\n")
    );
    assert!(
        !log.contains("Listening at:"),
        "--log-level warning still logs `Listening at:`:\n{log}"
    );
    assert!(
        log.lines().any(|line| line.contains("[ERROR]")),
        "--log-level warning should keep the error about the trap:\n{log}"
    );
}

#[tokio::test]
async fn guest_output_is_logged_under_the_request_id() {
    let host = HostProcess::start(&guest("faults"), &[]);
    let response = http_client().get(host.url("/trap")).send().await.unwrap();
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let expected = format!("request_id={request_id} app stderr: the /trap route fails on purpose");
    let logged = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        host.log().contains(&expected).then_some(())
    });
    assert!(
        logged.is_some(),
        "no line {expected:?} in the log:\n{}",
        host.log()
    );
}

#[test]
fn client_values_cannot_forge_access_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let access_log = dir.path().join("access.log");
    let access_log_arg = access_log.to_string_lossy().into_owned();
    let host = HostProcess::start(&guest("hello"), &["--access-logfile", &access_log_arg]);
    let addr = host.addr();

    // A Basic-auth user with a line break and a forged line after it (without a colon, which
    // would end the user name).
    let forged = "127.0.0.1 - admin [-] \"GET /admin HTTP/1.1\" 200 1";
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("eve\n{forged}:secret"));
    let mut first =
        format!("GET /user HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {credentials}\r\n\r\n")
            .into_bytes();
    // A user agent with a tab, quotes (which would end the quoted field) and bytes beyond ASCII.
    let mut second =
        format!("GET /agent HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: a\t\"b\" ").into_bytes();
    second.extend_from_slice(b"\xff\x85c\r\n\r\n");
    for request in [&mut first, &mut second] {
        let response = raw_answer(addr, request);
        assert_eq!(response.status, 200, "{response:?}");
    }

    // Every line but the start check's `GET /`.
    let ours = |contents: &str| -> Vec<String> {
        contents
            .lines()
            .filter(|line| !line.contains("\"GET / HTTP/1.1\""))
            .map(str::to_owned)
            .collect()
    };
    let lines = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        let contents = std::fs::read_to_string(&access_log).ok()?;
        let lines = ours(&contents);
        (lines.len() >= 2 && lines.iter().any(|line| line.contains("/agent"))).then_some(lines)
    })
    .unwrap_or_else(|| {
        panic!(
            "the access log has not got two lines for the two requests:\n{}",
            std::fs::read_to_string(&access_log).unwrap_or_default()
        )
    });
    assert_eq!(
        lines.len(),
        2,
        "two requests wrote {} lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
    let user = lines.iter().find(|line| line.contains("/user")).unwrap();
    assert!(
        user.starts_with(
            r#"127.0.0.1 - eve\x0a127.0.0.1 - admin [-] \"GET /admin HTTP/1.1\" 200 1 ["#
        ),
        "the user is not escaped onto the request's line: {user}"
    );
    let agent = lines.iter().find(|line| line.contains("/agent")).unwrap();
    assert!(
        agent.ends_with(r#" "a\x09\"b\" \xff\x85c""#),
        "the user agent is not escaped inside its quotes: {agent}"
    );
}
