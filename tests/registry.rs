//! The HMAC registry with encryption streams and the object store, as Lenzeye uses them: parts
//! encrypted and MACed on their way to storage, out of order, at once, on several workers, sent
//! again, across a restart; the tag checked against the README's construction computed by
//! Python; downloads verified part by part, a tampered object never passed on as good.

use std::process::Command;

use blackbox::{
    AppCopy, AppHost, Backends, Services, openssl_ctr, random_bytes, repo_root, unique_name,
    unwrap_key_id,
};

const MIB: usize = 1 << 20;
const PART: usize = 5 * MIB;
const IV: &str = "f0e1d2c3b4a5968778695a4b3c2d1e0f";

/// The README's Python construction of the tag (tests/support/object_tag.py).
fn python_tag(key: &[u8], part_size: usize, data: &[u8]) -> String {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), data).unwrap();
    let output = Command::new("python3")
        .arg(repo_root().join("tests/support/object_tag.py"))
        .args([
            hex::encode(key),
            part_size.to_string(),
            file.path().to_string_lossy().into_owned(),
        ])
        .output()
        .expect("python3 computes the independent tag");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

struct Upload<'a> {
    probe: &'a AppHost,
    key: String,
    upload: String,
    enc: String,
}

impl Upload<'_> {
    async fn part(&self, number: usize, plaintext: &[u8]) -> (u16, serde_json::Value) {
        let path = format!(
            "/pipeline/part?key={}&upload_id={}&part={number}&name={}&enc={}&iv={IV}&offset={}",
            self.key,
            self.upload,
            self.key,
            self.enc,
            (number - 1) * PART
        );
        self.probe.call("PUT", &path, plaintext.to_vec()).await
    }

    fn read_path(&self, first: usize, skip: usize, take: usize) -> String {
        format!(
            "/pipeline/read?key={}&name={}&enc={}&iv={IV}&part_size={PART}&first={first}&skip={skip}&take={take}",
            self.key, self.key, self.enc
        )
    }
}

async fn key_id(probe: &AppHost) -> String {
    let (_, answer) = probe.call("GET", "/crypto/key", "").await;
    answer["key_id"].as_str().unwrap().to_owned()
}

async fn parts_in_any_order_make_the_documented_tag(backends: Backends) {
    let mut services = Services::start(backends);
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_string_lossy().into_owned();
    let app = AppCopy::new("probe", &unique_name("registry"));
    let app_name = app.app.clone();
    let args = [
        "--data-dir",
        &data_dir,
        "--workers",
        "3",
        "-k",
        "gthread",
        "--threads",
        "4",
    ];
    let plaintext = random_bytes(2 * PART + MIB + 13, 7);
    let part =
        |number: usize| &plaintext[(number - 1) * PART..(number * PART).min(plaintext.len())];

    // First host: the entry begins, parts 3 and 1 arrive at once.
    let probe = AppHost::serve(&mut services, app, &args);
    let (enc, mac) = (key_id(&probe).await, key_id(&probe).await);
    let (_, created) = probe.call("POST", "/objects/multipart?key=doc", "").await;
    let upload = Upload {
        probe: &probe,
        key: "doc".into(),
        upload: created["upload_id"].as_str().unwrap().into(),
        enc: enc.clone(),
    };
    let (status, answer) = probe
        .call(
            "POST",
            &format!("/registry/begin?name=doc&key_id={mac}"),
            "",
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (first, third) = futures::join!(upload.part(1, part(1)), upload.part(3, part(3)));
    assert_eq!(first.0, 200, "{}", first.1);
    assert_eq!(third.0, 200, "{}", third.1);
    let upload_id = upload.upload.clone();
    drop(upload);

    // A restart mid-upload: the registry and the stored parts are still there.
    let probe = probe.restart(&mut services, &args);
    let upload = Upload {
        probe: &probe,
        key: "doc".into(),
        upload: upload_id,
        enc: enc.clone(),
    };
    // Part 2, first with wrong bytes, then again with the right ones: the repeat replaces it.
    assert_eq!(upload.part(2, &random_bytes(PART, 99)).await.0, 200);
    assert_eq!(upload.part(2, part(2)).await.0, 200);
    let (status, finished) = probe
        .call(
            "POST",
            &format!(
                "/registry/finish?key=doc&upload_id={}&name=doc",
                upload.upload
            ),
            "",
        )
        .await;
    assert_eq!(status, 200, "{finished}");
    let tag = finished["tag"].as_str().unwrap().to_owned();

    // What is stored is AES-256-CTR of the file as openssl makes it, and its tag is the
    // README's construction, computed by Python from the stored bytes and the unwrapped key.
    let (_, ciphertext) = probe.bytes("GET", "/objects/get?key=doc", "").await;
    let enc_key = unwrap_key_id(&enc, &app_name);
    assert!(
        ciphertext == openssl_ctr(&enc_key, IV, &plaintext),
        "the stored bytes are not the file's AES-256-CTR"
    );
    assert_eq!(
        python_tag(&unwrap_key_id(&mac, &app_name), PART, &ciphertext),
        tag
    );

    // Downloads: the whole file, and a range across a part boundary.
    let (status, whole) = probe
        .bytes("GET", &upload.read_path(1, 0, plaintext.len()), "")
        .await;
    assert_eq!(status, 200);
    assert!(whole == plaintext, "the download differs from the upload");
    let (status, range) = probe
        .bytes("GET", &upload.read_path(2, PART - 100, 300), "")
        .await;
    assert_eq!(status, 200);
    assert!(
        range == plaintext[2 * PART - 100..2 * PART + 200],
        "the range differs"
    );

    // Tampering: a changed byte in part 2 makes a read from part 2 an error answer, and a
    // read from part 1 a broken body; no changed byte is ever passed on.
    let mut tampered = ciphertext.clone();
    tampered[PART + 12345] ^= 1;
    let (status, _) = probe.call("PUT", "/objects/put?key=doc", tampered).await;
    assert_eq!(status, 200);
    let (status, answer) = probe.call("GET", &upload.read_path(2, 0, 10), "").await;
    assert_eq!(status, 500, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("Tampered(2)"),
        "{answer}"
    );
    let response = probe
        .client
        .get(probe.host.url(&upload.read_path(1, 0, plaintext.len())))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "part 1 is good, so the answer starts"
    );
    let body = response.bytes().await;
    assert!(
        body.is_err(),
        "a download through a tampered part ended as if it were whole"
    );
    assert!(
        probe
            .host
            .log()
            .contains("part 2 of \"doc\" does not match its MAC"),
        "{}",
        probe.host.log()
    );
}

#[tokio::test]
async fn parts_in_any_order_make_the_documented_tag_sqlite_local() {
    parts_in_any_order_make_the_documented_tag(Backends::SqliteLocal).await;
}

#[tokio::test]
async fn parts_in_any_order_make_the_documented_tag_postgres_s3() {
    parts_in_any_order_make_the_documented_tag(Backends::PostgresS3).await;
}

async fn finishing_checks_the_registry_against_the_store(backends: Backends) {
    let mut services = Services::start(backends);
    let probe = AppHost::start(&mut services, "probe", "finish", &[]);
    let (enc, mac) = (key_id(&probe).await, key_id(&probe).await);
    let (_, created) = probe.call("POST", "/objects/multipart?key=f", "").await;
    let upload = Upload {
        probe: &probe,
        key: "f".into(),
        upload: created["upload_id"].as_str().unwrap().into(),
        enc,
    };
    let finish = format!("/registry/finish?key=f&upload_id={}&name=f", upload.upload);
    assert_eq!(
        probe
            .call("POST", &format!("/registry/begin?name=f&key_id={mac}"), "")
            .await
            .0,
        200
    );
    // Another key for the same name is refused; the same key again is fine.
    let other = key_id(&probe).await;
    let (status, answer) = probe
        .call(
            "POST",
            &format!("/registry/begin?name=f&key_id={other}"),
            "",
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("EntryExists"),
        "{answer}"
    );
    assert_eq!(
        probe
            .call("POST", &format!("/registry/begin?name=f&key_id={mac}"), "")
            .await
            .0,
        200
    );

    assert_eq!(upload.part(1, &random_bytes(PART, 1)).await.0, 200);
    assert_eq!(upload.part(3, b"last").await.0, 200);
    let (status, answer) = probe.call("POST", &finish, "").await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("MissingParts([2])"),
        "{answer}"
    );
    // Part 2 stored without passing the registry: the registry does not know it.
    let (status, _) = probe
        .call(
            "PUT",
            &format!("/objects/part?key=f&upload_id={}&part=2", upload.upload),
            random_bytes(PART, 2),
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = probe.call("POST", &finish, "").await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("MismatchedParts([2])"),
        "{answer}"
    );
    // Sent properly, the object finishes; a late part is refused; finishing again is the same tag.
    assert_eq!(upload.part(2, &random_bytes(PART, 3)).await.0, 200);
    let (status, first) = probe.call("POST", &finish, "").await;
    assert_eq!(status, 200, "{first}");
    let (status, tag) = probe.call("GET", "/registry/tag?name=f", "").await;
    assert_eq!((status, &tag["tag"]), (200, &first["tag"]));
    let (status, answer) = probe
        .call("POST", "/registry/add-bytes?name=f&part=4&etag=x", "late")
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("Finished"),
        "{answer}"
    );
    let (status, _) = probe.call("GET", "/registry/tag?name=nothing", "").await;
    assert_eq!(status, 404);
    let (status, _) = probe.call("POST", "/registry/discard?name=f", "").await;
    assert_eq!(status, 200);
    let (status, _) = probe.call("GET", "/registry/tag?name=f", "").await;
    assert_eq!(status, 404, "a discarded entry is gone");
}

#[tokio::test]
async fn finishing_checks_the_registry_against_the_store_sqlite_local() {
    finishing_checks_the_registry_against_the_store(Backends::SqliteLocal).await;
}

#[tokio::test]
async fn finishing_checks_the_registry_against_the_store_postgres_s3() {
    finishing_checks_the_registry_against_the_store(Backends::PostgresS3).await;
}

#[test]
fn the_readme_documents_the_construction_the_tests_check() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let snippet = std::fs::read_to_string(repo_root().join("tests/support/object_tag.py")).unwrap();
    let function = snippet
        .split("\n\nif __name__")
        .next()
        .and_then(|head| head.split_once("def object_tag"))
        .map(|(_, rest)| format!("def object_tag{rest}"))
        .unwrap();
    // The README indents its code blocks; compare line by line, without the indentation.
    let lines = |text: &str| {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        lines(&readme).contains(&lines(&function)),
        "README.md must show the construction exactly as tests/support/object_tag.py has it"
    );
}

/// A hostile guest claims, at `finish`, that part 4,000,000,000 is stored: the registry refuses
/// the number where it comes in, at once, instead of walking every number below it inside its
/// write transaction (and gathering billions of missing ones in host memory), and the entry
/// still finishes afterwards with the parts that exist.
async fn finish_refuses_part_numbers_beyond_s3s(backends: Backends) {
    let mut services = Services::start(backends);
    let probe = AppHost::start(&mut services, "probe", "claim", &[]);
    let (enc, mac) = (key_id(&probe).await, key_id(&probe).await);
    let (_, created) = probe.call("POST", "/objects/multipart?key=c", "").await;
    let upload = Upload {
        probe: &probe,
        key: "c".into(),
        upload: created["upload_id"].as_str().unwrap().into(),
        enc,
    };
    let (status, answer) = probe
        .call("POST", &format!("/registry/begin?name=c&key_id={mac}"), "")
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(upload.part(1, b"the only part").await.0, 200);
    let finish = format!("/registry/finish?key=c&upload_id={}&name=c", upload.upload);
    for claim in ["4000000000", "10001", "0"] {
        let started = std::time::Instant::now();
        let (status, answer) = probe
            .call("POST", &format!("{finish}&claim={claim}"), "")
            .await;
        assert_eq!(status, 400, "part {claim}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("InvalidPartNumber"),
            "part {claim}: {answer}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "refusing part {claim} took {:?}",
            started.elapsed()
        );
    }
    let (status, answer) = probe.call("POST", &finish, "").await;
    assert_eq!(status, 200, "the entry no longer finishes: {answer}");
}

#[tokio::test]
async fn finish_refuses_part_numbers_beyond_s3s_sqlite_local() {
    finish_refuses_part_numbers_beyond_s3s(Backends::SqliteLocal).await;
}

#[tokio::test]
async fn finish_refuses_part_numbers_beyond_s3s_postgres_s3() {
    finish_refuses_part_numbers_beyond_s3s(Backends::PostgresS3).await;
}

/// An upload no part reaches for `--upload-expiry` is removed as an S3 lifecycle rule would
/// remove it, on both stores: its stored parts, the store's upload and its registry entry. An
/// upload that keeps receiving parts stays, and so does a finished entry.
async fn abandoned_uploads_expire(backends: Backends) {
    let mut services = Services::start(backends);
    let probe = AppHost::start(&mut services, "probe", "expiry", &["--upload-expiry", "3"]);
    let mac = key_id(&probe).await;
    let enc = key_id(&probe).await;
    let mut uploads = Vec::new();
    for key in ["abandoned", "active", "done"] {
        let (status, answer) = probe
            .call("POST", &format!("/objects/multipart?key={key}"), "")
            .await;
        assert_eq!(status, 200, "{answer}");
        let path = format!("/registry/begin?name={key}&key_id={mac}");
        assert_eq!(probe.call("POST", &path, "").await.0, 200);
        let upload = Upload {
            probe: &probe,
            key: key.to_owned(),
            upload: answer["upload_id"].as_str().unwrap().to_owned(),
            enc: enc.clone(),
        };
        assert_eq!(upload.part(1, b"first").await.0, 200);
        uploads.push(upload);
    }
    let [abandoned, active, done] = &uploads[..] else {
        unreachable!()
    };
    let finish = format!(
        "/registry/finish?key=done&upload_id={}&name=done",
        done.upload
    );
    let (status, answer) = probe.call("POST", &finish, "").await;
    assert_eq!(status, 200, "{answer}");
    let tag = answer["tag"].clone();

    // What a host that failed to create an upload (a full disk) once left: a directory with
    // no key, which no upload id reaches.
    let keyless =
        probe
            .host_data_dir()
            .join(format!("apps/{}/uploads/{}", probe.app.app, "0".repeat(32)));
    if services.s3.is_none() {
        std::fs::create_dir_all(&keyless).unwrap();
        let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
        std::fs::File::open(&keyless)
            .unwrap()
            .set_modified(day_ago)
            .unwrap();
    }
    // Past twice the expiry (a sweep aborts what it has seen idle for the expiry) and the
    // sweep's interval, the active upload gets a part every second.
    let mut fresh = None;
    for number in 2..=12 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert_eq!(active.part(number, b"more").await.0, 200);
        if number == 11 {
            // An upload with no part yet, younger than the expiry, whatever date the store
            // gives its start (moto says 2010 for every upload).
            let (status, answer) = probe.call("POST", "/objects/multipart?key=fresh", "").await;
            assert_eq!(status, 200, "{answer}");
            fresh = answer["upload_id"].as_str().map(str::to_owned);
        }
    }
    let fresh = fresh.unwrap();
    let (status, answer) = probe
        .call(
            "GET",
            &format!("/objects/parts?key=fresh&upload_id={fresh}"),
            "",
        )
        .await;
    assert_eq!(
        status, 200,
        "an upload younger than the expiry was aborted: {answer}"
    );
    let parts = |upload: &Upload| {
        format!(
            "/objects/parts?key={}&upload_id={}",
            upload.key, upload.upload
        )
    };
    let (status, answer) = probe.call("GET", &parts(abandoned), "").await;
    assert_eq!(status, 404, "the abandoned upload is still there: {answer}");
    let (status, answer) = probe
        .call("GET", "/registry/parts?name=abandoned", "")
        .await;
    assert_eq!(status, 404, "its registry entry is still there: {answer}");
    let (status, answer) = probe.call("GET", &parts(active), "").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer.as_array().map(Vec::len), Some(12), "{answer}");
    let (status, answer) = probe.call("GET", "/registry/parts?name=active", "").await;
    assert_eq!(
        answer.as_array().map(Vec::len),
        Some(12),
        "{status} {answer}"
    );
    let (status, answer) = probe.call("GET", "/registry/tag?name=done", "").await;
    assert_eq!((status, &answer["tag"]), (200, &tag), "{answer}");
    if let Some(s3) = &services.s3 {
        let left = s3.uploads();
        assert!(
            !left.iter().any(|key| key.ends_with("/abandoned")),
            "S3 still holds the upload: {left:?}"
        );
    }
    assert!(!keyless.exists(), "{} is still there", keyless.display());
    let log = probe.host.log();
    assert!(log.contains("aborted 1 upload(s)"), "{log}");
    assert!(!log.contains("[WARNING]"), "{log}");
}

#[tokio::test]
async fn abandoned_uploads_expire_sqlite_local() {
    abandoned_uploads_expire(Backends::SqliteLocal).await;
}

#[tokio::test]
async fn abandoned_uploads_expire_postgres_s3() {
    abandoned_uploads_expire(Backends::PostgresS3).await;
}
