//! The crypto capability through a real guest: parts encrypted on their own equal the whole and
//! match an independent AES-CTR (the openssl command), key ids are the documented wrapping and
//! belong to their app, and the encryption bound holds across all workers.

use blackbox::{HostProcess, MASTER_KEY, guest, http_client, openssl_ctr, unwrap_key_id};

fn master_key_file(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("master.key");
    std::fs::write(&path, MASTER_KEY).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test]
async fn parts_of_odd_sizes_equal_the_whole_and_match_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = master_key_file(&dir);
    let host = HostProcess::start(&guest("faults"), &["--master-key-file", &key_file]);
    let plaintext: Vec<u8> = (0..100_003u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let response = http_client()
        .post(host.url("/crypto?parts=1,15,17,4096,65536,5000"))
        .body(plaintext.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    let ciphertext = hex::decode(answer["ciphertext"].as_str().unwrap()).unwrap();
    let iv = answer["iv"].as_str().unwrap();
    let key = unwrap_key_id(answer["key_id"].as_str().unwrap(), "faults");
    assert_eq!(ciphertext.len(), plaintext.len());
    assert!(
        ciphertext == openssl_ctr(&key, iv, &plaintext),
        "the parts differ from openssl's AES-256-CTR of the whole"
    );
}

#[tokio::test]
async fn a_key_id_is_refused_to_another_app_and_when_altered() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = master_key_file(&dir);
    let other = dir.path().join("other.wasm");
    std::fs::copy(guest("faults"), &other).unwrap();
    let owner = HostProcess::start(&guest("faults"), &["--master-key-file", &key_file]);
    let stranger = HostProcess::start(&other.to_string_lossy(), &["--master-key-file", &key_file]);
    let client = http_client();
    let sealed: serde_json::Value = serde_json::from_str(
        &client
            .post(owner.url("/crypto"))
            .body("secret")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let (key, iv) = (
        sealed["key_id"].as_str().unwrap(),
        sealed["iv"].as_str().unwrap(),
    );
    let ciphertext = hex::decode(sealed["ciphertext"].as_str().unwrap()).unwrap();
    let apply = |host: &HostProcess, key: &str| {
        let request = client
            .post(host.url(&format!("/crypto/apply?key={key}&iv={iv}")))
            .body(ciphertext.clone());
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    assert_eq!(apply(&owner, key).await, (200, "secret".to_owned()));
    let (status, body) = apply(&stranger, key).await;
    assert_eq!(
        (status, body.trim()),
        (403, "CryptoError::InvalidKey"),
        "another app used the key"
    );
    let mut altered = key.to_owned().into_bytes();
    altered[30] = if altered[30] == b'A' { b'B' } else { b'A' };
    let (status, _) = apply(&owner, &String::from_utf8(altered).unwrap()).await;
    assert_eq!(status, 403, "an altered key id was accepted");
}

/// The most encryptions the debug log shows running at the same moment, across all workers.
fn most_at_once(log: &str) -> usize {
    most_at_once_of(log, "crypto: ")
}

/// The same, counting only the lines that contain `marker` (`crypto: app NAME:`).
fn most_at_once_of(log: &str, marker: &str) -> usize {
    let mut events = Vec::new();
    for line in log.lines().filter(|line| line.contains(marker)) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = |word: &str| {
            words
                .iter()
                .position(|w| *w == word)
                .and_then(|i| words.get(i + 1)?.parse::<u128>().ok())
        };
        if let (Some(start), Some(end)) = (at("from"), at("to")) {
            events.push((start, 1i64));
            events.push((end, -1i64));
        }
    }
    events.sort();
    let (mut now, mut most) = (0i64, 0i64);
    for (_, change) in events {
        now += change;
        most = most.max(now);
    }
    most as usize
}

/// Encryption load: half the requests encrypt a list in one call, half a stream of their body
/// chunk by chunk.
async fn burn(host: &HostProcess, requests: usize) {
    let client = http_client();
    let calls = (0..requests).map(|index| {
        let request = if index % 2 == 0 {
            client.get(host.url("/crypto/burn?mb=16"))
        } else {
            client
                .post(host.url("/crypto/stream"))
                .body(vec![7u8; 16 << 20])
        }
        .send();
        async move {
            match request.await {
                Ok(response) => (
                    response.status().as_u16(),
                    response.text().await.unwrap_or_default(),
                ),
                Err(error) => (0, error.to_string()),
            }
        }
    });
    let answers = futures::future::join_all(calls).await;
    assert!(
        answers
            .iter()
            .all(|(status, body)| *status == 200 && body.contains("16777216 bytes")),
        "{answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_encryption_bound_holds_across_workers() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = master_key_file(&dir);
    let common = [
        "--master-key-file",
        &key_file,
        "--workers",
        "4",
        "-k",
        "gthread",
        "--threads",
        "4",
        "--log-level",
        "debug",
    ];

    let bounded = HostProcess::start(
        &guest("faults"),
        &[&common[..], &["--encrypt-concurrency", "1"]].concat(),
    );
    burn(&bounded, 16).await;
    let at_once = most_at_once(&bounded.log());
    println!("--encrypt-concurrency 1: at most {at_once} encryptions at once");
    assert_eq!(at_once, 1, "the bound of 1 was exceeded across the workers");

    // The same load with a bound of 4 does overlap: the measure above can see a broken bound.
    let loose = HostProcess::start(
        &guest("faults"),
        &[&common[..], &["--encrypt-concurrency", "4"]].concat(),
    );
    burn(&loose, 16).await;
    let at_once = most_at_once(&loose.log());
    println!("--encrypt-concurrency 4: at most {at_once} encryptions at once");
    assert!(
        (2..=4).contains(&at_once),
        "expected overlapping encryptions within the bound of 4, saw {at_once}"
    );
}

/// `GET /crypto/burn?mb=N` on `app` (its Host header).
async fn burn_on(client: &reqwest::Client, url: &str, app: &str) -> u16 {
    match client
        .get(url)
        .header("host", format!("{app}.test"))
        .send()
        .await
    {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.text().await;
            status
        }
        Err(_) => 0,
    }
}

/// A hostile app that keeps more encryptions going than the host has slots holds only its share
/// of them (`--encrypt-concurrency` divided among the apps of a worker), so the app beside it
/// always finds a slot of its own: the debug log shows when each encryption ran, and for which
/// app.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_that_floods_the_encryption_slots_leaves_its_neighbour_its_share() {
    // The victim's encryptions are short and the hostile app's take a fraction of its requests'
    // time, and on two cores the scheduler can keep them apart for a whole flood: a victim
    // that had to wait for the hostile app's slot never overlaps it in any of three floods.
    for flood in 1..=3 {
        let (hostile, both) = flood_beside_a_victim().await;
        assert_eq!(
            hostile, 1,
            "the hostile app, five requests at once, ran more than its share of 1 encryption"
        );
        if both == 2 {
            return;
        }
        println!("flood {flood}: the victim's encryptions did not overlap the hostile app's");
    }
    panic!(
        "the victim never encrypted beside the hostile app: it waited for the hostile app's slot"
    );
}

/// One flood of the hostile app's encryptions beside the victim's: the most the hostile app ran
/// at once, and the most of both.
async fn flood_beside_a_victim() -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "worker_class = \"gthread\"\nthreads = 8\nencrypt_concurrency = 2\nmemory_limit = \"96MiB\"\n\
             log_level = \"debug\"\n\
             [[app]]\nname = \"hostile\"\ncomponent = \"{faults}\"\nhosts = [\"hostile.test\"]\n\
             [[app]]\nname = \"victim\"\ncomponent = \"{faults}\"\nhosts = [\"victim.test\"]\n",
            faults = guest("faults"),
        ),
    )
    .unwrap();
    let key_file = master_key_file(&dir);
    let host = HostProcess::start_with_config(&config, &["--master-key-file", &key_file]);
    let client = http_client();
    let hostile_url = host.url("/crypto/burn?mb=32");
    // Long enough to overlap the hostile app's encryptions, which take a fraction of its
    // requests' time.
    let victim_url = host.url("/crypto/burn?mb=16");
    let flood_over = std::sync::atomic::AtomicBool::new(false);
    let flood = async {
        futures::future::join_all((0..5).map(|_| async {
            for _ in 0..10 {
                assert_eq!(burn_on(&client, &hostile_url, "hostile").await, 200);
            }
        }))
        .await;
        flood_over.store(true, std::sync::atomic::Ordering::Release);
    };
    // The victim encrypts for as long as the flood lasts, however fast the machine is.
    let victim = async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut sent = 0;
        while sent < 10 || !flood_over.load(std::sync::atomic::Ordering::Acquire) {
            assert_eq!(burn_on(&client, &victim_url, "victim").await, 200);
            sent += 1;
        }
    };
    tokio::join!(flood, victim);
    let log = host.log();
    let (hostile, victim, both) = (
        most_at_once_of(&log, "crypto: app hostile:"),
        most_at_once_of(&log, "crypto: app victim:"),
        most_at_once(&log),
    );
    println!(
        "--encrypt-concurrency 2, two apps: at most {hostile} hostile and {victim} victim \
         encryptions at once, {both} in all"
    );
    (hostile, both)
}
