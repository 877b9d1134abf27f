//! Another local user against the host's files and processes: files planted where the workers
//! keep their counters, a compile cache others may write, the modes of the data directory, and
//! the environment of the processes the host starts. The tests run as root and play the other
//! user (`nobody`) by planting files with its owner.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blackbox::{
    AppCopy, HostProcess, database_url, drop_postgres_app, free_port, guest, host_bin, http_client,
    poll_until, unique_name,
};
use serde_json::{Value, json};

/// The other local user: `nobody`.
const OTHER_UID: u32 = 65534;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests play a second local user by giving files its owner: run them as root"
    );
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The pids of the workers the host logged as booting.
fn booted_workers(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|line| line.split("Booting worker with pid: ").nth(1))
        .filter_map(|pid| pid.trim().parse().ok())
        .collect()
}

fn wait_for_workers(host: &HostProcess, count: usize) -> Vec<u32> {
    poll_until(Duration::from_secs(60), Duration::from_millis(20), || {
        let pids = booted_workers(&host.log());
        (pids.len() >= count).then_some(pids)
    })
    .unwrap_or_else(|| panic!("{count} workers did not boot; log:\n{}", host.log()))
}

/// Runs `command` until it exits, at most `timeout`; `None` (and the process killed) if it
/// is still running then.
fn run_until_exit(command: &mut Command, timeout: Duration) -> Option<(i32, String)> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    status.map(|status| (status.code().unwrap_or(-1), text))
}

#[tokio::test]
async fn metrics_files_planted_for_the_next_pids_are_never_opened() {
    require_root();
    // A directory like /dev/shm: anyone may create files in it, nobody may remove another's.
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shm");
    std::fs::create_dir(&shared).unwrap();
    set_mode(&shared, 0o1777);
    // What the other user reads: a file of its own, open to all, under the names the next
    // workers' counters would take; and symlinks to a file of its own.
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"").unwrap();
    std::os::unix::fs::chown(&victim, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    set_mode(&victim, 0o666);
    let metrics_port = free_port().to_string();
    let shared_arg = shared.to_string_lossy().into_owned();
    let host = HostProcess::start(
        &guest("hello"),
        &[
            "--worker-tmp-dir",
            &shared_arg,
            "--metrics-bind",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    );
    wait_for_workers(&host, 1);
    // Planted once the host runs, for the pids its next worker may get.
    let last_pid: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let planted = (last_pid + 1)..(last_pid + 3000);
    for pid in planted.clone() {
        let path = shared.join(format!("host-metrics-{pid}"));
        if pid % 2 == 0 {
            std::fs::write(&path, b"").unwrap();
            set_mode(&path, 0o666);
        } else {
            std::os::unix::fs::symlink(&victim, &path).unwrap();
        }
        std::os::unix::fs::lchown(&path, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    }
    host.signal(libc::SIGTTIN);
    let workers = wait_for_workers(&host, 2);
    assert!(
        workers.iter().any(|pid| planted.contains(pid)),
        "the new worker did not get a pid a file was planted for ({planted:?}): {workers:?}"
    );
    let client = http_client();
    for _ in 0..10 {
        let response = client.get(host.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    // The workers count in files of their own, which the master reads.
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let counted = {
        let mut counted = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while counted.is_none() && Instant::now() < deadline {
            let text = client
                .get(&metrics_url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            // The test's own readiness checks are counted too.
            counted = text
                .lines()
                .filter_map(|line| {
                    line.strip_prefix(r#"host_requests_total{app="hello",code="2xx"} "#)
                })
                .filter_map(|count| count.parse::<u64>().ok())
                .find(|&count| count >= 10);
        }
        counted
    };
    assert!(
        counted.is_some(),
        "the metrics lost requests; log:\n{}",
        host.log()
    );

    // The other user's files are as it left them: nothing written, nothing truncated.
    for pid in planted.clone() {
        let path = shared.join(format!("host-metrics-{pid}"));
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.uid(), OTHER_UID);
        if pid % 2 == 0 {
            assert_eq!(meta.len(), 0, "the host wrote into {}", path.display());
        }
    }
    assert_eq!(std::fs::metadata(&victim).unwrap().len(), 0);

    // The host's files are in a directory of its own that nobody else may enter.
    let private: Vec<PathBuf> = std::fs::read_dir(&shared)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&format!("host-{}-", host.pid())))
        })
        .collect();
    assert_eq!(private.len(), 1, "{private:?}");
    let meta = std::fs::metadata(&private[0]).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o700));
    for pid in &workers {
        let counters = private[0].join(format!("host-metrics-{pid}"));
        let meta = std::fs::symlink_metadata(&counters)
            .unwrap_or_else(|error| panic!("{}: {error}", counters.display()));
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o600));
    }
    assert!(!host.log().contains("[WARNING]"), "{}", host.log());
}

/// Every directory under `dir` that is not 0700 and every file that is not 0600, and the files.
fn modes_under(dir: &Path) -> (Vec<String>, Vec<String>) {
    let mut wrong = Vec::new();
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        let meta = std::fs::symlink_metadata(&current).unwrap();
        let mode = meta.mode() & 0o7777;
        let name = current.strip_prefix(dir).unwrap().display().to_string();
        if meta.is_dir() {
            if mode != 0o700 {
                wrong.push(format!("{name}/ {mode:o}"));
            }
            pending.extend(
                std::fs::read_dir(&current)
                    .unwrap()
                    .flatten()
                    .map(|entry| entry.path()),
            );
        } else {
            if mode != 0o600 {
                wrong.push(format!("{name} {mode:o}"));
            }
            files.push(name);
        }
    }
    (wrong, files)
}

#[tokio::test]
async fn the_data_directory_is_private_whatever_the_umask() {
    // SAFETY: umask only sets this process's file mode mask, which the host inherits.
    unsafe { libc::umask(0o022) };
    let app = AppCopy::new("lenzeye", &unique_name("private"));
    let host = HostProcess::start(&app.path, &["-e", "LENZEYE_PART_SIZE=5242880"]);
    let client = http_client();
    let call = |method: &str, path: &str, key: Option<&str>, body: Vec<u8>| {
        let mut request = client
            .request(method.parse().unwrap(), host.url(path))
            .body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };
    let (status, user) = call("POST", "/users", None, Vec::new()).await;
    assert_eq!(status, 201, "{user}");
    let key = user["api_key"].as_str().unwrap().to_owned();
    let file = blackbox::random_bytes(5 * 1024 * 1024 + 100, 7);
    let initiate = json!({"filename": "private.bin", "size": file.len()}).to_string();
    let (status, upload) = call("POST", "/upload/initiate", Some(&key), initiate.into()).await;
    assert_eq!(status, 201, "{upload}");
    let upload_id = upload["upload_id"].as_str().unwrap().to_owned();
    for (index, part) in file.chunks(5 * 1024 * 1024).enumerate() {
        let path = format!(
            "/upload/part?upload_id={upload_id}&part_number={}",
            index + 1
        );
        let (status, answer) = call("PUT", &path, Some(&key), part.to_vec()).await;
        assert_eq!(status, 200, "{answer}");
    }
    // A second upload stays unfinished, so its parts are on disk too.
    let initiate = json!({"filename": "pending.bin", "size": 10}).to_string();
    let (status, pending) = call("POST", "/upload/initiate", Some(&key), initiate.into()).await;
    assert_eq!(status, 201, "{pending}");
    let path = format!(
        "/upload/part?upload_id={}&part_number=1",
        pending["upload_id"].as_str().unwrap()
    );
    assert_eq!(call("PUT", &path, Some(&key), vec![1; 10]).await.0, 200);
    let path = format!("/upload/complete?upload_id={upload_id}");
    let (status, answer) = call("POST", &path, Some(&key), Vec::new()).await;
    assert_eq!(status, 200, "{answer}");

    // While the host runs, so that SQLite's -wal and -shm files are there.
    let (wrong, files) = modes_under(&host.data_dir());
    assert!(wrong.is_empty(), "not private: {wrong:?}");
    for expected in [
        "master.key",
        "host.sqlite",
        "host.sqlite-wal",
        "host.sqlite-shm",
        &format!("apps/{}/app.sqlite-wal", app.app),
    ] {
        assert!(
            files.iter().any(|file| file == expected),
            "no {expected} in {files:?}"
        );
    }
    let objects = files
        .iter()
        .filter(|file| file.contains("/objects/"))
        .count();
    let parts = files
        .iter()
        .filter(|file| file.contains("/uploads/"))
        .count();
    assert!(objects >= 1 && parts >= 1, "{files:?}");
}

#[test]
fn the_master_key_and_the_database_url_reach_no_child_environment() {
    let dir = tempfile::tempdir().unwrap();
    let dump = |event: &str| {
        format!(
            "{event} = \"env > {dir}/{event}.env; ls -l /proc/$$/fd > {dir}/{event}.fds\"\n",
            dir = dir.path().display()
        )
    };
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "[hooks]\n{}{}{}",
            dump("on_starting"),
            dump("post_fork"),
            dump("post_worker_init")
        ),
    )
    .unwrap();
    let master_key = hex::encode(blackbox::random_bytes(32, 11));
    let password = format!("pw{}", hex::encode(blackbox::random_bytes(12, 12)));
    let url = database_url().replacen("postgres@", &format!("postgres:{password}@"), 1);
    assert!(url.contains(&password), "{url}");
    let app = AppCopy::new("hello", &unique_name("environ"));
    drop_postgres_app(&app.app);
    let config_arg = config.to_string_lossy().into_owned();
    let host = HostProcess::start_with_env(
        &app.path,
        &["-c", &config_arg, "--workers", "2"],
        &[("HOST_MASTER_KEY", &master_key), ("DATABASE_URL", &url)],
    );
    let workers = wait_for_workers(&host, 2);
    for pid in workers {
        let environ =
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
                .replace('\0', "\n");
        assert!(!environ.contains(&master_key), "worker {pid}: {environ}");
        assert!(!environ.contains(&password), "worker {pid}: {environ}");
        // The settings were read and their descriptor closed.
        let descriptors: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .map(|target| target.display().to_string())
            .collect();
        assert!(
            !descriptors.iter().any(|target| target.contains("memfd")),
            "worker {pid}: {descriptors:?}"
        );
    }
    let dumps: Vec<(String, String)> = ["on_starting", "post_fork", "post_worker_init"]
        .iter()
        .map(|event| {
            let read = |suffix: &str| {
                let path = dir.path().join(format!("{event}.{suffix}"));
                poll_until(Duration::from_secs(30), Duration::from_millis(20), || {
                    std::fs::read_to_string(&path)
                        .ok()
                        .filter(|text| !text.is_empty())
                })
                .unwrap_or_else(|| panic!("the {event} hook wrote no {suffix}"))
            };
            (read("env"), read("fds"))
        })
        .collect();
    for (environment, descriptors) in &dumps {
        assert!(environment.contains("HOST_HOOK="), "{environment}");
        assert!(!environment.contains(&master_key), "{environment}");
        assert!(!environment.contains(&password), "{environment}");
        assert!(!descriptors.contains("memfd"), "{descriptors}");
    }
    drop(host);
    drop_postgres_app(&app.app);
}

fn serve_command(cache: &Path, data: &Path) -> Command {
    let mut command = Command::new(host_bin());
    command
        .args(["serve", &guest("hello"), "--bind"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--cache-dir")
        .arg(cache)
        .arg("--data-dir")
        .arg(data)
        .env_remove("HOST_CACHE_DIR");
    command
}

#[test]
fn a_compile_cache_another_user_can_write_is_refused() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    for (mode, owner, reason) in [
        (0o777, 0, "group or others may write it (mode 777)"),
        (0o755, OTHER_UID, "it belongs to uid 65534"),
    ] {
        set_mode(&cache, mode);
        std::os::unix::fs::chown(&cache, Some(owner), Some(owner)).unwrap();
        let outcome = run_until_exit(
            &mut serve_command(&cache, &dir.path().join("data")),
            Duration::from_secs(60),
        );
        let (code, log) = outcome.unwrap_or_else(|| {
            panic!("the host served from a cache (mode {mode:o}, uid {owner}) others may write")
        });
        assert_eq!(code, 3, "{log}");
        assert!(log.contains("the compile cache (--cache-dir)"), "{log}");
        assert!(log.contains(reason), "{log}");
        assert_eq!(
            std::fs::read_dir(&cache).unwrap().count(),
            0,
            "something was compiled into it"
        );
    }
}

#[test]
fn a_cached_artifact_another_user_could_have_written_is_rebuilt_not_run() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache_arg = cache.to_string_lossy().into_owned();
    let host = HostProcess::start(&guest("hello"), &["--cache-dir", &cache_arg]);
    assert_eq!(
        std::fs::metadata(&cache).unwrap().mode() & 0o777,
        0o700,
        "the cache was not made private"
    );
    drop(host);
    let artifact = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "cwasm"))
        .expect("no artifact was cached");
    // The artifact as another user would have left it, had the directory been open to it.
    std::os::unix::fs::chown(&artifact, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    let host = HostProcess::start(&guest("hello"), &["--cache-dir", &cache_arg]);
    let log = host.log();
    assert!(
        log.contains("is not to be trusted: it belongs to uid 65534") && log.contains("rebuilding"),
        "the planted artifact was run:\n{log}"
    );
    let meta = std::fs::symlink_metadata(&artifact).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    // An artifact others may write is not run either.
    drop(host);
    set_mode(&artifact, 0o666);
    let host = HostProcess::start(&guest("hello"), &["--cache-dir", &cache_arg]);
    let log = host.log();
    assert!(
        log.contains("group or others may write it (mode 666)") && log.contains("rebuilding"),
        "the artifact others may write was run:\n{log}"
    );
}
