//! The object store through a real guest, on the local directory and on a real S3 API server:
//! multipart uploads out of order with a re-sent part, ranged reads, S3's part rules with the
//! same answers on both, a stream of the wrong length storing nothing, aborts leaving nothing.

use blackbox::{AppHost, Backends, Services, random_bytes};
use serde_json::Value;

const MIB: usize = 1 << 20;

async fn create(probe: &AppHost, key: &str) -> String {
    let (status, answer) = probe
        .call("POST", &format!("/objects/multipart?key={key}"), "")
        .await;
    assert_eq!(status, 200, "{answer}");
    answer["upload_id"].as_str().unwrap().to_owned()
}

async fn multipart_round_trip(backends: Backends) {
    let mut services = Services::start(backends);
    let probe = AppHost::start(
        &mut services,
        "probe",
        "objects",
        &["--workers", "2", "-k", "gthread", "--threads", "4"],
    );
    let key = "files/2024/report%20final.bin";
    let upload = create(&probe, key).await;
    // Parts 3, 1 and 2 (5 MiB, 5 MiB, 1 MiB + 7), sent out of order and at once.
    let parts = [
        random_bytes(5 * MIB, 1),
        random_bytes(5 * MIB, 2),
        random_bytes(MIB + 7, 3),
    ];
    let sends = [3usize, 1, 2].map(|number| {
        let body = parts[number - 1].clone();
        let path = format!("/objects/part?key={key}&upload_id={upload}&part={number}");
        let probe = &probe;
        async move { probe.call("PUT", &path, body).await }
    });
    for (status, answer) in futures::future::join_all(sends).await {
        assert_eq!(status, 200, "{answer}");
    }
    // Part 2 sent again with other bytes replaces the first.
    let replacement = random_bytes(5 * MIB, 4);
    let (status, answer) = probe
        .call(
            "PUT",
            &format!("/objects/part?key={key}&upload_id={upload}&part=2"),
            replacement.clone(),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (_, listed) = probe
        .call(
            "GET",
            &format!("/objects/parts?key={key}&upload_id={upload}"),
            "",
        )
        .await;
    let numbers: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 3], "{listed}");
    let (status, info) = probe
        .call(
            "POST",
            &format!("/objects/complete?key={key}&upload_id={upload}"),
            "",
        )
        .await;
    assert_eq!(status, 200, "{info}");
    let whole: Vec<u8> = [&parts[0][..], &replacement, &parts[2]].concat();
    assert_eq!(info["size"].as_u64(), Some(whole.len() as u64));

    let (status, read) = probe
        .bytes("GET", &format!("/objects/get?key={key}"), "")
        .await;
    assert_eq!(status, 200);
    assert!(
        read == whole,
        "the object read back differs from what was uploaded"
    );
    let (status, range) = probe
        .bytes(
            "GET",
            &format!("/objects/get?key={key}&start={}&length=1000", 5 * MIB - 10),
            "",
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        range == whole[5 * MIB - 10..5 * MIB + 990],
        "the range differs"
    );
    let (status, tail) = probe
        .bytes(
            "GET",
            &format!("/objects/get?key={key}&start={}", whole.len()),
            "",
        )
        .await;
    assert_eq!(
        (status, tail.len()),
        (200, 0),
        "a range from the end is empty"
    );
    let (status, answer) = probe
        .call(
            "GET",
            &format!("/objects/get?key={key}&start={}", whole.len() + 1),
            "",
        )
        .await;
    assert_eq!(status, 416, "a range beyond the end: {answer}");

    // Listing by prefix, deleting, and a missing object.
    let (_, small) = probe
        .call("PUT", "/objects/put?key=files/2025/note", "hello")
        .await;
    assert_eq!(small["size"], 5, "{small}");
    let (_, listed) = probe
        .call("GET", "/objects/list?prefix=files/2024/", "")
        .await;
    let keys: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["files/2024/report final.bin"], "{listed}");
    let (_, listed) = probe.call("GET", "/objects/list?prefix=files/", "").await;
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let (status, _) = probe
        .call("DELETE", &format!("/objects/delete?key={key}"), "")
        .await;
    assert_eq!(status, 200);
    let (status, _) = probe
        .call("GET", &format!("/objects/get?key={key}"), "")
        .await;
    assert_eq!(status, 404);
    let (status, head) = probe
        .call("GET", "/objects/head?key=files/2025/note", "")
        .await;
    assert_eq!((status, head["size"].as_u64()), (200, Some(5)));
}

#[tokio::test]
async fn multipart_uploads_round_trip_on_the_local_store() {
    multipart_round_trip(Backends::SqliteLocal).await;
}

#[tokio::test]
async fn multipart_uploads_round_trip_on_s3() {
    multipart_round_trip(Backends::PostgresS3).await;
}

async fn rules_and_refusals(backends: Backends) {
    let mut services = Services::start(backends);
    let probe = AppHost::start(&mut services, "probe", "rules", &[]);
    let upload = create(&probe, "k").await;
    let part = |number: u32, body: Vec<u8>| {
        let path = format!("/objects/part?key=k&upload_id={upload}&part={number}");
        let probe = &probe;
        async move { probe.call("PUT", &path, body).await }
    };
    // Part numbers outside 1..=10000.
    for number in [0, 10_001] {
        let (status, answer) = part(number, b"x".to_vec()).await;
        assert_eq!(status, 400, "part {number}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("1 to 10000"),
            "{answer}"
        );
    }
    // A small part that is not the last cannot be completed: S3's 5 MiB rule, same words on both.
    assert_eq!(part(1, vec![1; 1000]).await.0, 200);
    assert_eq!(part(2, vec![2; 1000]).await.0, 200);
    let (status, answer) = probe
        .call(
            "POST",
            &format!("/objects/complete?key=k&upload_id={upload}"),
            "",
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("at least 5 MiB"),
        "{answer}"
    );
    // A stream shorter or longer than declared stores nothing.
    for declared in [2000, 10] {
        let (status, answer) = probe
            .call(
                "PUT",
                &format!("/objects/part?key=k&upload_id={upload}&part=3&length={declared}"),
                vec![3; 1000],
            )
            .await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("LengthMismatch"),
            "{answer}"
        );
    }
    let (_, listed) = probe
        .call(
            "GET",
            &format!("/objects/parts?key=k&upload_id={upload}"),
            "",
        )
        .await;
    assert_eq!(
        listed.as_array().unwrap().len(),
        2,
        "a refused part was stored: {listed}"
    );
    // Keys that could leave the app's place, and an upload id that is not this key's.
    for key in ["../other/x", "a//b", "/abs", "a/./b"] {
        let (status, answer) = probe
            .call("POST", &format!("/objects/multipart?key={key}"), "")
            .await;
        assert_eq!(status, 400, "{key}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("InvalidKey"),
            "{answer}"
        );
    }
    let (status, _) = probe
        .call(
            "GET",
            &format!("/objects/parts?key=other&upload_id={upload}"),
            "",
        )
        .await;
    assert_eq!(status, 404);
    // An abort leaves nothing behind.
    let (status, answer) = probe
        .call(
            "POST",
            &format!("/objects/abort?key=k&upload_id={upload}"),
            "",
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) = probe
        .call(
            "GET",
            &format!("/objects/parts?key=k&upload_id={upload}"),
            "",
        )
        .await;
    assert_eq!(status, 404, "the aborted upload is still listed");
    match &services.s3 {
        Some(s3) => {
            assert!(
                s3.uploads().is_empty(),
                "S3 still has uploads: {:?}",
                s3.uploads()
            );
            let s3_upload_id = upload.rsplit_once('.').unwrap().0;
            assert!(
                s3.parts(&format!("tests/{}/k", probe.app.app), s3_upload_id)
                    .is_empty()
            );
        }
        None => {
            let uploads = probe
                .host_data_dir()
                .join("apps")
                .join(&probe.app.app)
                .join("uploads");
            let left: Vec<_> = std::fs::read_dir(&uploads).unwrap().collect();
            assert!(left.is_empty(), "the local store kept {left:?}");
        }
    }
    let (status, answer): (u16, Value) = probe.call("GET", "/", "").await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn rules_and_refusals_on_the_local_store() {
    rules_and_refusals(Backends::SqliteLocal).await;
}

#[tokio::test]
async fn rules_and_refusals_on_s3() {
    rules_and_refusals(Backends::PostgresS3).await;
}

/// A body sent in two halves, with `between` run once the host has read the first.
async fn send_in_halves(
    probe: &AppHost,
    path: &str,
    body: Vec<u8>,
    between: impl FnOnce(),
) -> (u16, Value) {
    use std::io::Write;
    let addr = probe.host.addr();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let half = body.len() / 2;
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body[..half]).unwrap();
    assert!(
        blackbox::wait_until_server_read(&stream, std::time::Duration::from_secs(10)),
        "the host did not take in the first half"
    );
    between();
    // The host may answer and close before it has the rest.
    let _ = stream.write_all(&body[half..]);
    let response = blackbox::read_response(&mut stream).unwrap();
    (
        response.status,
        serde_json::from_slice(&response.body).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn an_s3_outage_mid_part_fails_that_part_and_the_host_goes_on() {
    let mut services = Services::start(Backends::PostgresS3);
    let probe = AppHost::start(&mut services, "probe", "s3down", &[]);
    let upload = create(&probe, "big").await;
    let mut s3 = services.s3.take().unwrap();
    let started = std::time::Instant::now();
    let (status, answer) = send_in_halves(
        &probe,
        &format!("/objects/part?key=big&upload_id={upload}&part=1"),
        random_bytes(6 * MIB, 9),
        || s3.stop(),
    )
    .await;
    assert_eq!(status, 503, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("S3 upload part failed after 3 attempts"),
        "{answer}"
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "the retries took {:?}",
        started.elapsed()
    );
    // The host goes on, and works again once S3 is back (moto comes back empty).
    let (status, _) = probe.call("GET", "/", "").await;
    assert_eq!(status, 200);
    s3.restart();
    let upload = create(&probe, "again").await;
    let (status, answer) = probe
        .call(
            "PUT",
            &format!("/objects/part?key=again&upload_id={upload}&part=1"),
            vec![1u8; 1000],
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    services.s3 = Some(s3);
}

#[tokio::test]
async fn s3_requests_are_tried_three_times_then_answered() {
    let mut services = Services::start(Backends::PostgresS3);
    let s3_addr = services.s3.as_ref().unwrap().addr;
    let relay = blackbox::Relay::start(s3_addr, blackbox::RelayMode::Forward);
    let endpoint = format!("http://{}", relay.addr);
    let probe = AppHost::start(
        &mut services,
        "probe",
        "retries",
        &["--s3-endpoint", &endpoint],
    );
    let upload = create(&probe, "k").await;
    // From now on S3 drops every connection: each attempt is one connection.
    relay.set_mode(blackbox::RelayMode::Drop);
    let before = relay.accepted();
    let (status, answer) = probe
        .call(
            "PUT",
            &format!("/objects/part?key=k&upload_id={upload}&part=1"),
            vec![0u8; 1000],
        )
        .await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(relay.accepted() - before, 3, "attempts at S3: {answer}");
}

/// A hostile guest opens a 2 MiB object again and again, each read encrypted by a stage that
/// runs ahead of it, and keeps them all: it is stopped at the instance's cap on capability
/// streams with an answer that says so, the worker's peak memory hardly moves, and the next
/// request is served.
async fn hoarded_streams_are_capped(backends: Backends) {
    let mut services = Services::start(backends);
    let probe = AppHost::start(&mut services, "probe", "hoard", &[]);
    let (status, answer) = probe
        .call("POST", "/objects/put?key=big", random_bytes(2 * MIB, 5))
        .await;
    assert_eq!(status, 200, "{answer}");
    let (_, key) = probe.call("GET", "/crypto/key", "").await;
    let enc = key["key_id"].as_str().unwrap().to_owned();
    let hoard = |count: usize| format!("/objects/hoard?key=big&enc={enc}&count={count}");
    let (status, answer) = probe.call("POST", &hoard(2), "").await;
    assert_eq!(
        (status, &answer["held"]),
        (200, &Value::from(2)),
        "{answer}"
    );
    let before = probe.host.peak_rss_kib();

    let (status, answer) = probe.call("POST", &hoard(300), "").await;
    assert_eq!(status, 500, "{answer}");
    let text = answer.as_str().unwrap_or_default();
    assert!(
        text.contains("host resources exhausted") && text.contains("8 streams"),
        "{answer}"
    );
    let grown_mib = probe.host.peak_rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "the hoarding guest grew the host's peak memory by {grown_mib} MiB"
    );
    let (status, answer) = probe.call("POST", &hoard(3), "").await;
    assert_eq!(status, 200, "the worker did not go on: {answer}");
}

#[tokio::test]
async fn hoarded_streams_are_capped_sqlite_local() {
    hoarded_streams_are_capped(Backends::SqliteLocal).await;
}

#[tokio::test]
async fn hoarded_streams_are_capped_postgres_s3() {
    hoarded_streams_are_capped(Backends::PostgresS3).await;
}

/// A listing is gathered in host memory before the guest gets it: past 1,000 objects (S3's
/// page) it is refused with an error that says so, and a longer prefix lists.
async fn listings_are_capped(backends: Backends) {
    use futures::StreamExt;
    let mut services = Services::start(backends);
    let probe = AppHost::start(&mut services, "probe", "listing", &[]);
    let puts = futures::stream::iter(0..1001).map(|i| {
        let probe = &probe;
        async move {
            probe
                .call("POST", &format!("/objects/put?key=many/{i:04}"), "x")
                .await
        }
    });
    for (status, answer) in puts.buffer_unordered(16).collect::<Vec<_>>().await {
        assert_eq!(status, 200, "{answer}");
    }
    let (status, answer) = probe.call("GET", "/objects/list?prefix=many/", "").await;
    assert_eq!(status, 400, "{answer}");
    let text = answer["error"].as_str().unwrap_or_default();
    assert!(
        text.contains("more than 1000 objects") && text.contains("longer prefixes"),
        "{answer}"
    );
    let (status, answer) = probe.call("GET", "/objects/list?prefix=many/00", "").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer.as_array().map(Vec::len), Some(100), "{answer}");
}

#[tokio::test]
async fn listings_are_capped_sqlite_local() {
    listings_are_capped(Backends::SqliteLocal).await;
}

#[tokio::test]
async fn listings_are_capped_postgres_s3() {
    listings_are_capped(Backends::PostgresS3).await;
}

/// What a host that stopped left half-written, a part buffer's spill file and a file of the
/// local store's `tmp/`, is removed by the next host's master before its workers start.
#[tokio::test]
async fn leftovers_of_a_stopped_host_are_removed_at_start() {
    let mut services = Services::start(Backends::SqliteLocal);
    let data = tempfile::tempdir().unwrap();
    let app = blackbox::AppCopy::new("probe", &blackbox::unique_name("leftovers"));
    let leftovers = [
        data.path().join("tmp/part-left"),
        data.path().join(format!("apps/{}/tmp/.tmp-left", app.app)),
    ];
    for leftover in &leftovers {
        std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
        std::fs::write(leftover, random_bytes(MIB, 6)).unwrap();
    }
    let data_dir = data.path().to_string_lossy().into_owned();
    let probe = AppHost::serve(&mut services, app, &["--data-dir", &data_dir]);
    for leftover in &leftovers {
        assert!(!leftover.exists(), "{} is still there", leftover.display());
    }
    let (status, answer) = probe.call("POST", "/objects/put?key=k", "v").await;
    assert_eq!(status, 200, "the store no longer writes: {answer}");
}

/// A worker killed while it receives a part leaves the part half-written in its own directory
/// of the store's `tmp/`; the master removes that as it reaps the worker, not at the host's next
/// start, and the replacement worker stores parts.
#[tokio::test]
async fn a_killed_workers_half_written_part_is_removed_when_it_is_reaped() {
    use std::io::Write;
    let mut services = Services::start(Backends::SqliteLocal);
    let probe = AppHost::start(&mut services, "probe", "killed-mid-part", &[]);
    let upload = create(&probe, "k").await;
    let mut client = std::net::TcpStream::connect(probe.host.addr()).unwrap();
    let head = format!(
        "PUT /objects/part?key=k&upload_id={upload}&part=1 HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        8 * MIB
    );
    client.write_all(head.as_bytes()).unwrap();
    client.write_all(&random_bytes(4 * MIB, 9)).unwrap();
    let tmp = probe
        .host_data_dir()
        .join(format!("apps/{}/tmp", probe.app.app));
    let file_of_a_worker = |dir: &std::path::Path| -> Option<(u32, std::path::PathBuf)> {
        for worker in std::fs::read_dir(dir).ok()?.flatten() {
            let pid = worker.file_name().to_str()?.parse().ok()?;
            for file in std::fs::read_dir(worker.path()).ok()?.flatten() {
                if file.metadata().ok()?.len() > 0 {
                    return Some((pid, worker.path()));
                }
            }
        }
        None
    };
    let (pid, worker_dir) = blackbox::poll_until(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(20),
        || file_of_a_worker(&tmp),
    )
    .expect("no part was being written under the store's tmp/<worker pid>/");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let removed = blackbox::poll_until(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(20),
        || (!worker_dir.exists()).then_some(()),
    );
    assert!(
        removed.is_some(),
        "{} is still there after its worker was killed",
        worker_dir.display()
    );
    drop(client);
    // A new connection: the client's kept one went with the killed worker.
    let response = blackbox::http_client()
        .put(
            probe
                .host
                .url(&format!("/objects/part?key=k&upload_id={upload}&part=1")),
        )
        .body(random_bytes(MIB, 10))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// An S3 part is buffered whole for retries; with every part beyond `--part-buffer` and
/// `--spill-limit` smaller than a part, the part is refused at once with an answer that says
/// why, and a part that fits is stored.
#[tokio::test]
async fn a_part_beyond_the_spill_limit_is_refused_at_once() {
    let mut services = Services::start(Backends::PostgresS3);
    let probe = AppHost::start(
        &mut services,
        "probe",
        "spill",
        &["--part-buffer", "64KiB", "--spill-limit", "1MiB"],
    );
    let upload = create(&probe, "s").await;
    let part = |number: usize| format!("/objects/part?key=s&upload_id={upload}&part={number}");
    let started = std::time::Instant::now();
    let (status, answer) = probe.call("PUT", &part(1), random_bytes(2 * MIB, 7)).await;
    assert_eq!(status, 503, "{answer}");
    let text = answer["error"].as_str().unwrap_or_default();
    assert!(
        text.contains("no part buffer is free") && text.contains("--spill-limit"),
        "{answer}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let (status, answer) = probe.call("PUT", &part(1), random_bytes(MIB / 2, 8)).await;
    assert_eq!(status, 200, "{answer}");
}
