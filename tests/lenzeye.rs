//! The Lenzeye guest end to end, as its clients use it, through the real binary on both backend
//! pairs: a 64 MiB + 123 byte file in 10 MiB parts sent out of order four at a time, a part sent
//! again, a restart between parts, the file back byte for byte and by range; aborts that leave
//! nothing; another user's files out of reach; bad requests answered and changing nothing; a
//! tampered file never served; 1 GiB through a guest capped far below it (16 MiB, 25 MiB for
//! the Flask one, whose interpreter alone takes 24.9 MiB).
//!
//! Every scenario runs against both components that serve the API: the Rust guest
//! (`guests/lenzeye.wasm`) and Lenzeye in Flask (`guests/lenzeye-py.wasm`, built by
//! `guests/python/build`), as `<scenario>::rust` and `<scenario>::python`. The uploads and
//! downloads on SQLite + local run on reused instances, a user after another on one instance.

use std::process::Command;

use blackbox::{
    AppCopy, AppHost, Backends, HostProcess, Services, free_port, local_object_bytes,
    local_object_files, metric, random_bytes, repo_root, unique_name,
};
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;
const PART: usize = 10 * MIB;

/// A component serving Lenzeye's API.
#[derive(Debug, Clone, Copy)]
enum Lenzeye {
    Rust,
    Python,
}

impl Lenzeye {
    /// Its name under guests/.
    fn guest(self) -> &'static str {
        match self {
            Lenzeye::Rust => "lenzeye",
            Lenzeye::Python => "lenzeye-py",
        }
    }

    /// The smallest `--memory-limit` (in whole MiB) it takes 1 GiB under. The Rust guest needs
    /// little beyond its 1.2 MiB start. The Flask one starts with 24.9 MiB of linear memory
    /// (CPython, Flask, the bridge and host_capabilities), and its requests grow that by a
    /// page or two, whatever the file's size: 25 MiB, what the host asks of it at least (at
    /// 24.875 MiB the first SQL result no longer fits).
    fn gigabyte_memory_limit_mib(self) -> u32 {
        match self {
            Lenzeye::Rust => 16,
            Lenzeye::Python => 25,
        }
    }
}

/// `scenario(guest, args…)` as a test of each component: `name::rust` and `name::python`.
macro_rules! for_each_guest {
    ($name:ident: $scenario:ident($($arg:expr),*)) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn rust() {
                $scenario(Lenzeye::Rust $(, $arg)*).await;
            }

            #[tokio::test]
            async fn python() {
                $scenario(Lenzeye::Python $(, $arg)*).await;
            }
        }
    };
}

/// A Lenzeye user: requests with its API key, to the app behind `app_host` (a `Host` header)
/// when the host serves several.
struct User<'a> {
    host: &'a HostProcess,
    app_host: Option<String>,
    key: String,
}

impl<'a> User<'a> {
    async fn create(host: &'a AppHost) -> User<'a> {
        User::create_at(&host.host, None).await
    }

    async fn create_at(host: &'a HostProcess, app_host: Option<&str>) -> User<'a> {
        let mut user = User {
            host,
            app_host: app_host.map(str::to_owned),
            key: String::new(),
        };
        let (status, answer) = user.call("POST", "/users", "").await;
        assert_eq!(status, 201, "{answer}");
        user.key = answer["api_key"].as_str().unwrap().to_owned();
        user
    }

    fn with_key(host: &'a AppHost, key: &str) -> User<'a> {
        User {
            host: &host.host,
            app_host: None,
            key: key.to_owned(),
        }
    }

    fn request(&self, method: &str, path: &str) -> reqwest::RequestBuilder {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = blackbox::http_client()
            .request(method, self.host.url(path))
            .bearer_auth(&self.key);
        if let Some(app_host) = &self.app_host {
            request = request.header("host", app_host);
        }
        request
    }

    async fn call(&self, method: &str, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = self
            .request(method, path)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|error| panic!("{method} {path}: {error}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn initiate(&self, filename: &str, size: usize) -> (String, String) {
        let body =
            json!({"filename": filename, "size": size, "content_type": "application/x-test"});
        let (status, answer) = self
            .call("POST", "/upload/initiate", body.to_string())
            .await;
        assert_eq!(status, 201, "{answer}");
        assert_eq!(answer["part_size"], PART, "{answer}");
        assert_eq!(answer["parts"], size.div_ceil(PART), "{answer}");
        (
            answer["upload_id"].as_str().unwrap().to_owned(),
            answer["file_id"].as_str().unwrap().to_owned(),
        )
    }

    async fn part(&self, upload_id: &str, number: usize, bytes: Vec<u8>) -> (u16, Value) {
        self.call(
            "PUT",
            &format!("/upload/part?upload_id={upload_id}&part_number={number}"),
            bytes,
        )
        .await
    }

    async fn complete(&self, upload_id: &str) -> (u16, Value) {
        self.call(
            "POST",
            &format!("/upload/complete?upload_id={upload_id}"),
            "",
        )
        .await
    }

    async fn download(
        &self,
        file_id: &str,
        range: Option<&str>,
    ) -> (u16, Vec<u8>, reqwest::header::HeaderMap) {
        let mut request = self.request("GET", &format!("/files/{file_id}"));
        if let Some(range) = range {
            request = request.header("range", range);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, response.bytes().await.unwrap().to_vec(), headers)
    }
}

fn part_of(file: &[u8], number: usize) -> Vec<u8> {
    file[(number - 1) * PART..(number * PART).min(file.len())].to_vec()
}

/// Sends `numbers` four at a time, each expected to be taken.
async fn send_parts(user: &User<'_>, upload_id: &str, file: &[u8], numbers: &[usize]) {
    let sends = futures::stream::iter(numbers.iter().map(|&number| {
        let bytes = part_of(file, number);
        async move { (number, user.part(upload_id, number, bytes).await) }
    }))
    .buffer_unordered(4)
    .collect::<Vec<_>>()
    .await;
    for (number, (status, answer)) in sends {
        assert_eq!(status, 200, "part {number}: {answer}");
        assert_eq!(answer["part_number"], number, "{answer}");
    }
}

/// How the host gives requests their instances.
#[derive(Debug, Clone, Copy)]
enum Instances {
    /// A fresh instance for every request, the default.
    Fresh,
    /// An instance serves one request after another (`--instance-max-requests 0`), so one
    /// user's request may find what another's left in the guest.
    Reused,
}

async fn uploads_and_downloads(guest: Lenzeye, backends: Backends, instances: Instances) {
    let mut services = Services::start(backends);
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_string_lossy().into_owned();
    let app = AppCopy::new(guest.guest(), &unique_name("lenzeye"));
    let max_requests = match instances {
        Instances::Fresh => "1",
        Instances::Reused => "0",
    };
    let metrics_port = free_port();
    let metrics_bind = format!("127.0.0.1:{metrics_port}");
    let args = [
        "--data-dir",
        &data_dir,
        "-k",
        "gthread",
        "--threads",
        "6",
        "--workers",
        "2",
        "--instance-max-requests",
        max_requests,
        "--metrics-bind",
        &metrics_bind,
    ];
    let file = random_bytes(64 * MIB + 123, 64);

    // The first host takes half the parts, out of order, four at a time.
    let host = AppHost::serve(&mut services, app, &args);
    let user = User::create(&host).await;
    let key = user.key.clone();
    let (upload_id, file_id) = user.initiate("report.bin", file.len()).await;
    send_parts(&user, &upload_id, &file, &[7, 2, 5, 1]).await;
    // A part sent again (with wrong bytes first, then right ones) replaces itself.
    let (status, _) = user.part(&upload_id, 3, random_bytes(PART, 3)).await;
    assert_eq!(status, 200);
    let (status, answer) = user.complete(&upload_id).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["missing_parts"], json!([4, 6]), "{answer}");

    // A restart between parts: the second host finishes the upload.
    let host = host.restart(&mut services, &args);
    let user = User::with_key(&host, &key);
    send_parts(&user, &upload_id, &file, &[6, 3, 4]).await;
    let (status, done) = user.complete(&upload_id).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["size"], file.len(), "{done}");
    assert_eq!(done["hmac"].as_str().unwrap().len(), 64, "{done}");
    let (status, again) = user.complete(&upload_id).await;
    assert_eq!(
        (status, &again),
        (200, &done),
        "completing again answers the same"
    );

    let (status, whole, headers) = user.download(&file_id, None).await;
    assert_eq!(status, 200);
    assert!(whole == file, "the download is not the file uploaded");
    // Several at once, as a download page's clients do: each whole, none logged as cut below.
    let at_once =
        futures::future::join_all((0..8).map(|_| user.download(&file_id, Some("bytes=0-1048575"))))
            .await;
    for (status, range, _) in at_once {
        assert_eq!(status, 206);
        assert!(
            range == file[..MIB],
            "a range read at once with others differs"
        );
    }
    assert_eq!(headers["content-type"], "application/x-test");
    // A range across a part boundary, and the last bytes.
    let (status, range, headers) = user
        .download(&file_id, Some("bytes=10485700-10485899"))
        .await;
    assert_eq!(status, 206);
    assert!(range == file[10_485_700..10_485_900], "the range differs");
    assert_eq!(
        headers["content-range"],
        format!("bytes 10485700-10485899/{}", file.len())
    );
    let (status, tail, _) = user.download(&file_id, Some("bytes=-123")).await;
    assert_eq!((status, tail.as_slice()), (206, &file[file.len() - 123..]));
    let (status, _, _) = user
        .download(&file_id, Some(&format!("bytes={}-", file.len())))
        .await;
    assert_eq!(status, 416);

    let (status, listed) = user.call("GET", "/files", "").await;
    assert_eq!(status, 200);
    assert_eq!(listed["files"][0]["file_id"], file_id.as_str(), "{listed}");
    assert_eq!(listed["files"][0]["status"], "ready", "{listed}");

    // Another user sees none of it.
    let stranger = User::create(&host).await;
    let (status, _, _) = stranger.download(&file_id, None).await;
    assert_eq!(status, 404, "another user's file was served");
    let (status, listed) = stranger.call("GET", "/files", "").await;
    assert_eq!((status, &listed["files"]), (200, &json!([])));
    let (status, _) = stranger
        .call("DELETE", &format!("/files/{file_id}"), "")
        .await;
    assert_eq!(status, 404, "another user's file was deleted");
    let (status, _) = stranger.complete(&upload_id).await;
    assert_eq!(status, 404);
    // Instances were reused for these requests, or never.
    let reused = format!("host_instances_reused_total{{app=\"{}\"}}", host.app.app);
    match (instances, metric(metrics_port, &reused).await) {
        (Instances::Fresh, 0) => {}
        (Instances::Reused, count) if count > 0 => {}
        (instances, count) => panic!("{count} reused with {instances:?} instances"),
    }

    // An aborted upload leaves nothing in storage or in the registry.
    let (upload_id, aborted_id) = user.initiate("aborted.bin", 2 * PART).await;
    send_parts(&user, &upload_id, &file[..2 * PART], &[1, 2]).await;
    let (status, _) = stranger
        .call("POST", &format!("/upload/abort?upload_id={upload_id}"), "")
        .await;
    assert_eq!(status, 404, "another user aborted the upload");
    let (status, _) = user
        .call("POST", &format!("/upload/abort?upload_id={upload_id}"), "")
        .await;
    assert_eq!(status, 204);
    let (status, _) = user.part(&upload_id, 1, part_of(&file, 1)).await;
    assert_eq!(status, 404, "an aborted upload takes parts");
    assert_eq!(
        leftovers(&services, &host, &aborted_id),
        0,
        "the aborted upload left something"
    );

    // Deleting the finished file removes it too.
    let (status, _) = user.call("DELETE", &format!("/files/{file_id}"), "").await;
    assert_eq!(status, 204);
    let (status, _, _) = user.download(&file_id, None).await;
    assert_eq!(status, 404);
    assert_eq!(
        leftovers(&services, &host, &file_id),
        0,
        "the deleted file left something"
    );
    // Nothing above went wrong, so nothing is logged as if it had: not a download the client
    // took whole as cut, nor the store's "no such upload" that tells an abort it is done.
    let log = host.host.log();
    assert!(
        !log.contains("[ERROR]") && !log.contains("[WARNING]"),
        "{log}"
    );
}

/// What storage and the registry still hold of a file: objects, upload parts, registry rows.
fn leftovers(services: &Services, host: &AppHost, file_id: &str) -> usize {
    let app = &host.app.app;
    match &services.s3 {
        Some(s3) => {
            let key = format!("tests/{app}/files/{file_id}");
            let stored = s3.keys().iter().filter(|k| **k == key).count()
                + s3.uploads().iter().filter(|k| **k == key).count();
            let rows = blackbox::psql(&format!(
                "SELECT (SELECT count(*) FROM host_state.hmac_entries WHERE app = '{app}' AND name = '{file_id}')
                      + (SELECT count(*) FROM host_state.hmac_parts WHERE app = '{app}' AND name = '{file_id}')"
            ));
            stored + rows.parse::<usize>().unwrap()
        }
        None => {
            let root = host.host_data_dir().join("apps").join(app);
            let key = format!("files/{file_id}");
            let uploads = std::fs::read_dir(root.join("uploads")).map_or(0, |dir| {
                dir.flatten()
                    .filter(|upload| {
                        std::fs::read_to_string(upload.path().join("key"))
                            .ok()
                            .as_deref()
                            == Some(key.as_str())
                    })
                    .count()
            });
            let objects = usize::from(root.join(format!("objects/files/{file_id}.o")).exists());
            let script = format!(
                "import sqlite3; db = sqlite3.connect('{}'); print(sum(db.execute(q, ('{app}', '{file_id}')).fetchone()[0] for q in ['SELECT count(*) FROM hmac_entries WHERE app = ? AND name = ?', 'SELECT count(*) FROM hmac_parts WHERE app = ? AND name = ?']))",
                host.host_data_dir().join("host.sqlite").display()
            );
            let output = Command::new("python3")
                .args(["-c", &script])
                .output()
                .expect("python3 runs");
            assert!(
                output.status.success(),
                "counting the registry rows failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let rows: usize = String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse()
                .expect("the script prints a count");
            uploads + objects + rows
        }
    }
}

// Each backend pair with each way of giving instances; the other scenarios run on fresh ones.
for_each_guest!(
    uploads_and_downloads_on_sqlite_and_the_local_store_reusing_instances:
        uploads_and_downloads(Backends::SqliteLocal, Instances::Reused)
);
for_each_guest!(
    uploads_and_downloads_on_postgres_and_s3:
        uploads_and_downloads(Backends::PostgresS3, Instances::Fresh)
);
for_each_guest!(
    an_upload_past_the_expiry_is_gone_for_its_client: an_expired_upload(Backends::PostgresS3)
);

for_each_guest!(
    the_first_requests_at_once_on_sqlite_make_the_tables_once:
        first_requests_at_once(Backends::SqliteLocal)
);
for_each_guest!(
    the_first_requests_at_once_on_postgres_make_the_tables_once:
        first_requests_at_once(Backends::PostgresS3)
);

/// A new app's first requests, at once on two workers, find no tables, and several of them
/// make them at the same time: every one is answered as if the tables had always been there,
/// and nothing is logged as gone wrong.
async fn first_requests_at_once(guest: Lenzeye, backends: Backends) {
    let mut services = Services::start(backends);
    let args = ["-k", "gthread", "--threads", "4", "--workers", "2"];
    let host = AppHost::start(&mut services, guest.guest(), "first", &args);
    let users = futures::future::join_all((0..8).map(|_| User::create(&host))).await;
    let (status, answer) = users[0].call("GET", "/files", "").await;
    assert_eq!(status, 200, "{answer}");
    let log = host.host.log();
    assert!(
        !log.contains("[ERROR]") && !log.contains("[WARNING]"),
        "{log}"
    );
}

/// An upload its client left past `--upload-expiry` is removed by the host; the client coming
/// back is told it is gone (404 for a part, 409 to start again for the complete), never a 500,
/// and nothing of it is stored.
async fn an_expired_upload(guest: Lenzeye, backends: Backends) {
    let mut services = Services::start(backends);
    let host = AppHost::start(
        &mut services,
        guest.guest(),
        "expired",
        &["--upload-expiry", "1", "--memory-limit", "32MiB"],
    );
    let user = User::create(&host).await;
    let file = random_bytes(PART + 10, 11);
    let (upload_id, _) = user.initiate("late.bin", file.len()).await;
    let (status, answer) = user.part(&upload_id, 1, part_of(&file, 1)).await;
    assert_eq!(status, 200, "{answer}");
    // Past twice the expiry, in whole seconds, and a sweep's interval (0.5 to 1.5 s).
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let (status, answer) = user.part(&upload_id, 2, part_of(&file, 2)).await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = user.complete(&upload_id).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("start it again"),
        "{answer}"
    );
    if let Some(s3) = &services.s3 {
        assert_eq!(s3.uploads(), Vec::<String>::new());
    }
    assert!(
        !host.host.log().contains("[WARNING]"),
        "{}",
        host.host.log()
    );
}

for_each_guest!(bad_requests_are_answered_and_change_nothing: bad_requests());

async fn bad_requests(guest: Lenzeye) {
    let mut services = Services::start(Backends::SqliteLocal);
    let host = AppHost::start(&mut services, guest.guest(), "badinput", &[]);
    let user = User::create(&host).await;
    let (status, answer) = host.call("GET", "/files", "").await;
    assert_eq!(status, 401, "no key: {answer}");
    let wrong = User::with_key(&host, "lz_nope");
    assert_eq!(wrong.call("GET", "/files", "").await.0, 401);

    for body in [
        "not json",
        r#"{"size": 10}"#,
        r#"{"filename": "x", "size": -1}"#,
        r#"{"filename": "x", "size": "10"}"#,
    ] {
        let (status, answer) = user.call("POST", "/upload/initiate", body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let file = random_bytes(PART + 10, 5);
    let (upload_id, file_id) = user.initiate("x.bin", file.len()).await;
    for (number, bytes, expected) in [
        (0, vec![1u8; 10], 400),
        (3, vec![1u8; 10], 400),
        (2, vec![1u8; 9], 400),
        (1, vec![1u8; 100], 400),
    ] {
        let (status, answer) = user.part(&upload_id, number, bytes).await;
        assert_eq!(status, expected, "part {number}: {answer}");
    }
    let (status, _) = user.part("no-such-upload", 1, vec![0; 10]).await;
    assert_eq!(status, 404);
    // No Content-Length: a chunked body.
    let chunked =
        reqwest::Body::wrap_stream(futures::stream::iter([Ok::<_, std::io::Error>(vec![
            0u8;
            10
        ])]));
    let (status, answer) = user
        .call(
            "PUT",
            &format!("/upload/part?upload_id={upload_id}&part_number=2"),
            chunked,
        )
        .await;
    assert_eq!(status, 411, "{answer}");
    let (status, answer) = user.complete(&upload_id).await;
    assert_eq!(
        (status, &answer["missing_parts"]),
        (409, &json!([1, 2])),
        "{answer}"
    );
    let (status, _, _) = user.download(&file_id, None).await;
    assert_eq!(status, 409, "an incomplete file was served");
    // None of it changed anything: the upload still completes from scratch.
    send_parts(&user, &upload_id, &file, &[2, 1]).await;
    assert_eq!(user.complete(&upload_id).await.0, 200);
    let (status, whole, _) = user.download(&file_id, None).await;
    assert!(
        status == 200 && whole == file,
        "the file came back different"
    );
    let (status, answer) = user.part(&upload_id, 1, part_of(&file, 1)).await;
    assert_eq!(status, 409, "a completed upload took a part: {answer}");

    // A changed byte in storage: the file is not served, and the log says why.
    let object = host
        .host_data_dir()
        .join("apps")
        .join(&host.app.app)
        .join(format!("objects/files/{file_id}.o"));
    let first_file = local_object_files(&object)[0].clone();
    let mut stored = std::fs::read(&first_file).unwrap();
    stored[100] ^= 0x20;
    std::fs::write(&first_file, stored).unwrap();
    let (status, body, _) = user.download(&file_id, None).await;
    assert_eq!(status, 500, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("failed verification"));
    assert!(
        host.host.log().contains("does not match its MAC"),
        "{}",
        host.host.log()
    );
    let (status, _) = host.call("GET", "/upload/ram-status", "").await;
    assert_eq!(
        status, 401,
        "ram-status needs a key like every route but /users"
    );
    let (status, figures) = user.call("GET", "/upload/ram-status", "").await;
    assert_eq!(status, 200);
    for field in [
        "ram_used_mb",
        "ram_limit_mb",
        "ram_free_mb",
        "instance_memory_mb",
        "instance_memory_limit_mb",
    ] {
        assert!(figures[field].is_number(), "{field}: {figures}");
    }
}

for_each_guest!(a_gigabyte_through_a_guest_capped_far_below_it: a_gigabyte());

/// 1 GiB up and back down through a guest whose memory cap is its starting memory and a few
/// MiB: 16 MiB for the Rust guest, `gigabyte_memory_limit_mib` for each.
async fn a_gigabyte(guest: Lenzeye) {
    const PARTS: usize = 103;
    const SIZE: usize = 1 << 30;
    let limit = guest.gigabyte_memory_limit_mib();
    let memory_limit = format!("{limit}MiB");
    let mut services = Services::start(Backends::SqliteLocal);
    let host = AppHost::start(
        &mut services,
        guest.guest(),
        "gigabyte",
        &[
            "--memory-limit",
            &memory_limit,
            "-k",
            "gthread",
            "--threads",
            "4",
            "--timeout",
            "120",
        ],
    );
    let user = User::create(&host).await;
    let (upload_id, file_id) = user.initiate("big.bin", SIZE).await;
    // Parts are made on the fly from a seed, so the test holds at most four of them.
    let part = |number: usize| {
        let length = PART.min(SIZE - (number - 1) * PART);
        random_bytes(length, number as u64)
    };
    let sends = futures::stream::iter((1..=PARTS).map(|number| {
        let bytes = part(number);
        let user = &user;
        let upload_id = &upload_id;
        async move { (number, user.part(upload_id, number, bytes).await.0) }
    }))
    .buffer_unordered(4)
    .collect::<Vec<_>>()
    .await;
    assert!(sends.iter().all(|(_, status)| *status == 200), "{sends:?}");
    let (status, done) = user.complete(&upload_id).await;
    assert_eq!(status, 200, "{done}");
    let mut expected = Sha256::new();
    for number in 1..=PARTS {
        expected.update(part(number));
    }
    let response = user
        .request("GET", &format!("/files/{file_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut received = Sha256::new();
    let mut length = 0usize;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        length += chunk.len();
        received.update(&chunk);
    }
    assert_eq!(length, SIZE);
    assert_eq!(
        received.finalize(),
        expected.finalize(),
        "the gigabyte came back different"
    );
    let (_, figures) = user.call("GET", "/upload/ram-status", "").await;
    assert_eq!(
        figures["instance_memory_limit_mb"],
        f64::from(limit),
        "{figures}"
    );
}

#[test]
fn the_readme_and_the_procfile_serve_lenzeye() {
    // The README opens with two commands: set up and serve Lenzeye, and run the tests, which
    // is what CI runs too.
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```sh\n")
        .skip(1)
        .take(2)
        .filter_map(|block| block.split_once("```").map(|(block, _)| block.trim()))
        .collect();
    assert_eq!(
        blocks,
        [
            "guests/build && cargo build --release -p host && target/release/host serve guests/lenzeye.wasm",
            "tests/run"
        ],
        "the README's first two commands"
    );
    let ci = std::fs::read_to_string(repo_root().join(".ci/run")).unwrap();
    assert!(ci.contains("\nexec tests/run \"$@\"\n"), "{ci}");
    let procfile = std::fs::read_to_string(repo_root().join("Procfile")).unwrap();
    assert!(
        procfile.starts_with("web: host serve guests/lenzeye.wasm "),
        "{procfile}"
    );
}

/// Uploads `file` for `user` in whole parts, four at a time: the file's id.
async fn stored_file(user: &User<'_>, name: &str, file: &[u8]) -> String {
    let (upload_id, file_id) = user.initiate(name, file.len()).await;
    let numbers: Vec<usize> = (1..=file.len().div_ceil(PART)).collect();
    send_parts(user, &upload_id, file, &numbers).await;
    let (status, done) = user.complete(&upload_id).await;
    assert_eq!(status, 200, "{done}");
    file_id
}

/// A client that asks for a file, reads the answer's head (sent once the first part is
/// checked, so its buffer is held) and then reads nothing more, with a receive buffer of a
/// few KiB so that little of the body fits in flight.
async fn stalled_download(
    host: &HostProcess,
    user: &User<'_>,
    file_id: &str,
) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(host.addr()).await.unwrap();
    let request = format!(
        "GET /files/{file_id} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\r\n",
        user.app_host.as_deref().unwrap_or("localhost"),
        user.key
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(std::time::Duration::from_secs(30), stream.read(&mut byte))
            .await
            .expect("the answer's head came in time")
            .unwrap();
        assert_eq!(
            read,
            1,
            "closed before the head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Four clients of one app start downloads and never read them: as many as the host's part
/// buffers (`--encrypt-concurrency 4`). Another user of the same app and a user of another app
/// in the same host still download their files, whole and in time: no part buffer waits on a
/// client that does not read.
async fn stalled_downloads_hold_no_part_buffer(guest: Lenzeye, backends: Backends) {
    let mut services = Services::start(backends);
    let (attacked, neighbour) = (unique_name("stalled"), unique_name("neighbour"));
    let args = services.host_args(&attacked);
    services.host_args(&neighbour);
    let lenzeye = blackbox::guest(guest.guest());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            r#"
worker_class = "gthread"
threads = 8
timeout = 30

[[app]]
name = "{attacked}"
component = "{lenzeye}"
hosts = ["attacked.test"]

[[app]]
name = "{neighbour}"
component = "{lenzeye}"
hosts = ["neighbour.test"]
"#
        ),
    )
    .unwrap();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let host = HostProcess::start_with_config_and_env(&config, &args, &blackbox::S3_CREDENTIALS);
    let attacker = User::create_at(&host, Some("attacked.test")).await;
    let other_user = User::create_at(&host, Some("attacked.test")).await;
    let other_app = User::create_at(&host, Some("neighbour.test")).await;
    let file = random_bytes(3 * PART, 9);
    let attacked_file = stored_file(&attacker, "a.bin", &file).await;
    let victims = [
        (&other_user, stored_file(&other_user, "u.bin", &file).await),
        (&other_app, stored_file(&other_app, "n.bin", &file).await),
    ];

    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(stalled_download(&host, &attacker, &attacked_file).await);
    }
    for (user, file_id) in victims {
        let started = std::time::Instant::now();
        let (status, body, _) = user.download(&file_id, None).await;
        let took = started.elapsed();
        assert_eq!(status, 200);
        assert!(body == file, "the download is not the file uploaded");
        eprintln!(
            "{backends:?}: 30 MiB for {:?} in {took:?} while four downloads stalled",
            user.app_host
        );
        assert!(
            took < std::time::Duration::from_secs(10),
            "a download took {took:?} while four others stalled"
        );
    }
    drop(stalled);
}

for_each_guest!(
    stalled_downloads_hold_no_part_buffer_sqlite_local:
        stalled_downloads_hold_no_part_buffer(Backends::SqliteLocal)
);
for_each_guest!(
    stalled_downloads_hold_no_part_buffer_postgres_s3:
        stalled_downloads_hold_no_part_buffer(Backends::PostgresS3)
);

fn md5_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import hashlib, sys; print(hashlib.md5(sys.stdin.buffer.read()).hexdigest())",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let output = child.wait_with_output().unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// What the store holds of the first attempt at part 1 of a file: its bytes (the local
/// store's part file), or the S3 server's ETag of them (their MD5).
enum FirstAttempt {
    Bytes(Vec<u8>),
    Md5(String),
}

fn first_attempt(services: &Services, host: &AppHost, file_id: &str) -> FirstAttempt {
    let app = &host.app.app;
    match &services.s3 {
        Some(s3) => {
            let etags = s3.part_etags(&format!("tests/{app}/files/{file_id}"));
            assert_eq!(etags.len(), 1, "{etags:?}");
            FirstAttempt::Md5(etags[0].clone())
        }
        None => {
            let uploads = host.host_data_dir().join("apps").join(app).join("uploads");
            let key = format!("files/{file_id}");
            let upload = std::fs::read_dir(uploads)
                .unwrap()
                .flatten()
                .find(|upload| {
                    std::fs::read_to_string(upload.path().join("key"))
                        .ok()
                        .as_deref()
                        == Some(key.as_str())
                })
                .expect("the upload's directory");
            let part = std::fs::read_dir(upload.path())
                .unwrap()
                .flatten()
                .find(|entry| entry.file_name().to_string_lossy().ends_with(".part"))
                .expect("the stored part");
            FirstAttempt::Bytes(std::fs::read(part.path()).unwrap())
        }
    }
}

fn stored_object(services: &Services, host: &AppHost, file_id: &str) -> Vec<u8> {
    let app = &host.app.app;
    match &services.s3 {
        Some(s3) => s3.object(&format!("tests/{app}/files/{file_id}")),
        None => local_object_bytes(
            &host
                .host_data_dir()
                .join("apps")
                .join(app)
                .join(format!("objects/files/{file_id}.o")),
        ),
    }
}

/// A part sent again with other bytes is encrypted under a keystream of its own: with the
/// same keystream, anyone holding both stored ciphertexts would hold the XOR of the two
/// plaintexts. The file still downloads as the second attempt, verified.
async fn a_part_sent_again_gets_a_keystream_of_its_own(guest: Lenzeye, backends: Backends) {
    let mut services = Services::start(backends);
    let host = AppHost::start(&mut services, guest.guest(), "resend", &[]);
    let user = User::create(&host).await;
    let size = MIB + 5;
    let (first, second) = (random_bytes(size, 21), random_bytes(size, 22));
    let (upload_id, file_id) = user.initiate("twice.bin", size).await;
    assert_eq!(user.part(&upload_id, 1, first.clone()).await.0, 200);
    let first_stored = first_attempt(&services, &host, &file_id);
    assert_eq!(user.part(&upload_id, 1, second.clone()).await.0, 200);
    let second_attempt = first_attempt(&services, &host, &file_id);
    let (status, done) = user.complete(&upload_id).await;
    assert_eq!(status, 200, "{done}");
    let second_stored = stored_object(&services, &host, &file_id);
    assert_eq!(second_stored.len(), size);
    // The S3 server's part ETag is the MD5 of the part's bytes, so comparing MD5s compares bytes.
    if let FirstAttempt::Md5(etag) = &second_attempt {
        assert_eq!(
            *etag,
            md5_hex(&second_stored),
            "a part's ETag is not its MD5"
        );
    }
    // What the first ciphertext would be had both attempts used one keystream.
    let with_one_keystream: Vec<u8> = second_stored
        .iter()
        .zip(&second)
        .zip(&first)
        .map(|((cipher, plain), other)| cipher ^ plain ^ other)
        .collect();
    match first_stored {
        FirstAttempt::Bytes(bytes) => {
            assert_eq!(bytes.len(), size);
            assert!(bytes != with_one_keystream, "the keystream was used twice");
        }
        FirstAttempt::Md5(etag) => {
            assert_ne!(
                etag,
                md5_hex(&with_one_keystream),
                "the keystream was used twice"
            );
        }
    }
    let (status, body, _) = user.download(&file_id, None).await;
    assert_eq!(status, 200);
    assert!(body == second, "the download is not the second attempt");
    let (status, range, _) = user.download(&file_id, Some("bytes=1000-1999")).await;
    assert_eq!((status, range.as_slice()), (206, &second[1000..2000]));
}

for_each_guest!(
    a_part_sent_again_gets_a_keystream_of_its_own_sqlite_local:
        a_part_sent_again_gets_a_keystream_of_its_own(Backends::SqliteLocal)
);
for_each_guest!(
    a_part_sent_again_gets_a_keystream_of_its_own_postgres_s3:
        a_part_sent_again_gets_a_keystream_of_its_own(Backends::PostgresS3)
);
