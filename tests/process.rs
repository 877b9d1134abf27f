//! The gunicorn process model: a master and its worker processes, heartbeats, recycling,
//! signals, settings from every source, the memory budget and the hooks.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use blackbox::{
    HostProcess, guest, host_bin, http_client, poll_until, read_response, send_in_flight,
};

/// The worker processes of a master: its children started as `host worker`.
fn workers(master: u32) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The fields after the command name: state, ppid, …
        let Some(after_name) = stat.rsplit_once(") ").map(|(_, rest)| rest) else {
            continue;
        };
        let parent: Option<u32> = after_name
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let is_worker = cmdline.split(|b| *b == 0).nth(1) == Some(b"worker".as_slice());
        let alive = !after_name.starts_with('Z');
        if parent == Some(master) && is_worker && alive {
            pids.insert(pid);
        }
    }
    pids
}

fn wait_for_workers(host: &HostProcess, count: usize, within: Duration) -> BTreeSet<u32> {
    poll_until(within, Duration::from_millis(20), || {
        let pids = workers(host.pid());
        (pids.len() == count).then_some(pids)
    })
    .unwrap_or_else(|| {
        panic!(
            "expected {count} workers within {within:?}, have {:?}; log:\n{}",
            workers(host.pid()),
            host.log()
        )
    })
}

fn send(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid the test observed as a child of its host.
    assert_eq!(
        unsafe { libc::kill(pid as libc::pid_t, signal) },
        0,
        "kill({pid}, {signal})"
    );
}

async fn get_status(url: &str) -> u16 {
    http_client()
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[test]
fn workers_are_processes_and_a_killed_one_is_replaced_within_two_seconds() {
    let host = HostProcess::start(&guest("hello"), &["--workers", "3"]);
    let before = wait_for_workers(&host, 3, Duration::from_secs(10));
    let victim = *before.iter().next().unwrap();
    send(victim, libc::SIGKILL);
    let after = poll_until(Duration::from_secs(2), Duration::from_millis(10), || {
        let now = workers(host.pid());
        (now.len() == 3 && !now.contains(&victim)).then_some(now)
    });
    assert!(
        after.is_some(),
        "the killed worker was not replaced within 2 s; log:\n{}",
        host.log()
    );
    assert!(
        host.log().contains(&format!(
            "Worker (pid:{victim}) was sent SIGKILL! Perhaps out of memory?"
        )),
        "the log does not name the kill:\n{}",
        host.log()
    );
    let status = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(get_status(&host.url("/")));
    assert_eq!(status, 200);
}

#[test]
fn a_silent_worker_gets_worker_timeout_and_is_replaced() {
    let host = HostProcess::start(&guest("hello"), &["--workers", "1", "--timeout", "1"]);
    let stalled = *wait_for_workers(&host, 1, Duration::from_secs(10))
        .iter()
        .next()
        .unwrap();
    // A stopped process is the most complete stall: its event loop cannot stamp the heartbeat.
    send(stalled, libc::SIGSTOP);
    let replaced = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        let now = workers(host.pid());
        (now.len() == 1 && !now.contains(&stalled)).then_some(())
    });
    assert!(
        replaced.is_some(),
        "the stalled worker was not replaced; log:\n{}",
        host.log()
    );
    assert!(
        host.log()
            .contains(&format!("WORKER TIMEOUT (pid:{stalled})")),
        "log:\n{}",
        host.log()
    );
    let status = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(get_status(&host.url("/")));
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_recycles_workers_under_load_without_a_failed_request() {
    let host = HostProcess::start(
        &guest("hello"),
        &[
            "--workers",
            "2",
            "-k",
            "gthread",
            "--threads",
            "4",
            "--max-requests",
            "40",
            "--max-requests-jitter",
            "10",
        ],
    );
    // One connection per request: what is measured is the host, not the keep-alive race every
    // HTTP/1.1 server has when it closes an idle connection the client is about to reuse.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let url = host.url("/");
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..60 {
                match client.get(&url).send().await {
                    Ok(response) if response.status() == 200 => {}
                    Ok(response) => failures.push(format!("status {}", response.status())),
                    Err(error) => failures.push(format!("{error:?}")),
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.unwrap());
    }
    let log = host.log();
    let recycled = log
        .matches("Autorestarting worker after current request.")
        .count();
    println!(
        "480 requests, {recycled} worker recycles, {} failures",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}\nlog:\n{log}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        recycled >= 4,
        "expected at least 4 recycles in 480 requests with --max-requests 40..50, saw {recycled}"
    );
    // A worker that has just exited may not be replaced yet.
    wait_for_workers(&host, 2, Duration::from_secs(10));
}

/// Sends a slow request and returns once the host has read it; the thread yields its status.
fn slow_request_in_flight(host: &HostProcess) -> std::thread::JoinHandle<u16> {
    let mut stream = send_in_flight(host.addr(), "/sleep?ms=1500");
    std::thread::spawn(move || {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        read_response(&mut stream)
            .map(|response| response.status)
            .unwrap_or(0)
    })
}

#[test]
fn hup_and_term_drop_no_in_flight_request() {
    let mut host = HostProcess::start(
        &guest("faults"),
        &["--workers", "2", "-k", "gthread", "--threads", "4"],
    );
    let old = wait_for_workers(&host, 2, Duration::from_secs(10));
    let in_flight: Vec<_> = (0..4).map(|_| slow_request_in_flight(&host)).collect();
    host.signal(libc::SIGHUP);
    let new = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        let now = workers(host.pid());
        (now.len() == 2 && now.is_disjoint(&old)).then_some(now)
    });
    for request in in_flight {
        assert_eq!(
            request.join().unwrap(),
            200,
            "an in-flight request failed across HUP; log:\n{}",
            host.log()
        );
    }
    assert!(
        new.is_some(),
        "HUP did not replace the workers; log:\n{}",
        host.log()
    );
    let status = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(get_status(&host.url("/")));
    assert_eq!(status, 200);

    let in_flight: Vec<_> = (0..2).map(|_| slow_request_in_flight(&host)).collect();
    host.signal(libc::SIGTERM);
    for request in in_flight {
        assert_eq!(
            request.join().unwrap(),
            200,
            "an in-flight request failed across TERM; log:\n{}",
            host.log()
        );
    }
    let status = host
        .wait_exit(Duration::from_secs(10))
        .expect("the host did not exit after TERM");
    assert_eq!(status.code(), Some(0), "log:\n{}", host.log());
}

#[test]
fn ttin_and_ttou_add_and_remove_one_worker_never_below_one() {
    let host = HostProcess::start(&guest("hello"), &["--workers", "1"]);
    wait_for_workers(&host, 1, Duration::from_secs(10));
    host.signal(libc::SIGTTIN);
    wait_for_workers(&host, 2, Duration::from_secs(10));
    host.signal(libc::SIGTTOU);
    wait_for_workers(&host, 1, Duration::from_secs(10));
    host.signal(libc::SIGTTOU);
    // Give the master several of its checks to (wrongly) act on it.
    let dropped = poll_until(Duration::from_secs(1), Duration::from_millis(50), || {
        workers(host.pid()).is_empty().then_some(())
    });
    assert!(dropped.is_none(), "TTOU went below one worker");
    assert!(
        host.log().contains("hook nworkers_changed workers=2"),
        "log:\n{}",
        host.log()
    );
}

#[test]
fn a_config_over_the_memory_budget_is_refused_with_the_arithmetic() {
    let output = Command::new(host_bin())
        .args([
            "serve",
            &guest("hello"),
            "--workers",
            "4",
            "--threads",
            "6",
            "--memory-limit",
            "64MiB",
        ])
        .args(["--memory-budget", "512MiB", "--cache-dir"])
        .arg(blackbox::cache_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("does not fit --memory-budget 512 MiB"),
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains("4 workers × ("), "stderr:\n{stderr}");
    assert!(
        stderr.contains("6 instances × (64 MiB --memory-limit + 4 MiB host memory)"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("4 part buffers × 16 MiB --part-buffer"),
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains("What fits"), "stderr:\n{stderr}");
}

#[test]
fn settings_sources_take_precedence_as_in_gunicorn() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        "timeout = 11\nkeep_alive = 3\nthreads = 5\nbacklog = 100\nmax_requests = 10\n",
    )
    .unwrap();
    let output = Command::new(host_bin())
        .args(["serve", &guest("hello"), "-c"])
        .arg(&config)
        .args(["--backlog", "200", "--print-config"])
        .env("WEB_CONCURRENCY", "3")
        .env("HOST_KEEP_ALIVE", "4")
        .env("HOST_THREADS", "6")
        .env("HOST_CMD_ARGS", "--threads 7")
        // An environment set for gunicorn: above the config file, below the host's own.
        .env(
            "GUNICORN_CMD_ARGS",
            "--threads 9 --keep-alive 8 --max-requests 20 --graceful-timeout 12 --backlog 300",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let setting = |name: &str| {
        stdout
            .lines()
            .find(|line| line.starts_with(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("no {name} in:\n{stdout}"))
            .to_owned()
    };
    let expect = |name: &str, value: &str, source: &str| {
        let line = setting(name);
        assert!(line.starts_with(&format!("{name} = {value} ")), "{line}");
        assert!(
            line.contains(source),
            "{name} should come from {source}: {line}"
        );
    };
    expect("workers", "3", "WEB_CONCURRENCY");
    expect("timeout", "11", "config file");
    expect("keep_alive", "4", "HOST_KEEP_ALIVE");
    expect("threads", "7", "HOST_CMD_ARGS");
    expect("backlog", "200", "command line");
    expect("max_requests", "20", "GUNICORN_CMD_ARGS");
    expect("graceful_timeout", "12", "GUNICORN_CMD_ARGS");
    expect("max_requests_jitter", "0", "default");
}

#[test]
fn gunicorn_cmd_args_are_read_and_named_once() {
    let output = Command::new(host_bin())
        .args(["serve", &guest("hello"), "--check-config", "--threads", "3"])
        .arg("--cache-dir")
        .arg(blackbox::cache_dir())
        .env(
            "GUNICORN_CMD_ARGS",
            "--threads 9 --timeout 45 --database-url postgres://lenzeye:secret@127.0.0.1:1/lenzeye",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stderr:\n{stderr}");
    // The settings it supplied are named, the one the command line overrode is not, and no
    // value is printed (a database URL may carry a password).
    let notices: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("GUNICORN_CMD_ARGS supplied"))
        .collect();
    assert_eq!(notices.len(), 1, "stderr:\n{stderr}");
    assert!(
        notices[0].contains("--database-url --timeout (HOST_* settings"),
        "{}",
        notices[0]
    );
    assert!(!stderr.contains("secret"), "stderr:\n{stderr}");

    let refused = Command::new(host_bin())
        .args(["serve", &guest("hello"), "--check-config"])
        .env("GUNICORN_CMD_ARGS", "--no-such-flag")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("GUNICORN_CMD_ARGS"), "stderr:\n{stderr}");
}

#[test]
fn unknown_and_invalid_settings_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(&config, "wrokers = 2\n").unwrap();
    let output = Command::new(host_bin())
        .args(["serve", &guest("hello"), "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("unknown setting `wrokers`") && stderr.contains("workers"),
        "{stderr}"
    );

    let output = Command::new(host_bin())
        .args(["serve", &guest("hello"), "--workers", "many"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--workers"), "{stderr}");

    let output = Command::new(host_bin())
        .args(["serve", &guest("hello"), "--check-config", "--cache-dir"])
        .arg(blackbox::cache_dir())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("configuration OK"));
}

#[test]
fn hooks_run_their_commands_with_the_events_facts_and_the_pid_file_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ready.txt");
    let pidfile = dir.path().join("host.pid");
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "[hooks]\nwhen_ready = \"echo $HOST_HOOK $HOST_HOOK_PID $GREETING > {}\"\n",
            marker.display()
        ),
    )
    .unwrap();
    let config = config.to_string_lossy().into_owned();
    let pid_arg = pidfile.to_string_lossy().into_owned();
    let mut host = HostProcess::start(
        &guest("hello"),
        &["-c", &config, "-e", "GREETING=hello", "-p", &pid_arg],
    );
    let expected = format!("when_ready {} hello", host.pid());
    let written = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        std::fs::read_to_string(&marker)
            .ok()
            .filter(|text| text.trim() == expected)
    });
    assert!(
        written.is_some(),
        "the hook wrote {:?}, expected {expected:?}",
        std::fs::read_to_string(&marker).ok()
    );
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        host.pid().to_string()
    );
    host.signal(libc::SIGTERM);
    assert_eq!(
        host.wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert!(!pidfile.exists(), "the pid file outlived the host");
}

#[test]
fn hup_picks_up_a_changed_component_file() {
    let dir = tempfile::tempdir().unwrap();
    let component = dir.path().join("app.wasm");
    std::fs::copy(guest("hello"), &component).unwrap();
    let host = HostProcess::start(&component.to_string_lossy(), &["--workers", "1"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let body = |path: &str| {
        let url = host.url(path);
        runtime.block_on(async {
            http_client()
                .get(&url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    };
    assert_eq!(body("/"), "Hello, world!\n");
    std::fs::copy(guest("faults"), &component).unwrap();
    host.signal(libc::SIGHUP);
    let switched = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
        (body("/") == "ok\n").then_some(())
    });
    assert!(
        switched.is_some(),
        "the new component was not served after HUP; log:\n{}",
        host.log()
    );
}

/// `--reload`: a component written over in pieces is served once whole, after one reload; a
/// truncated one is refused and the old workers keep serving; a component renamed into place
/// (as a build does) is seen too. Requests sent all along never fail, and a worker that starts
/// while the file is broken serves the version last checked.
#[test]
fn reload_serves_each_finished_component_and_never_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let component = dir.path().join("app.wasm");
    std::fs::copy(guest("hello"), &component).unwrap();
    let host = HostProcess::start(
        &component.to_string_lossy(),
        &["--workers", "2", "--reload"],
    );
    let reloads = || host.log().matches("app.wasm changed").count();
    let url = host.url("/");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = std::thread::spawn({
        let stop = std::sync::Arc::clone(&stop);
        move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let client = http_client();
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = runtime.block_on(async {
                    let response = client.get(&url).send().await.map_err(|e| e.to_string())?;
                    let status = response.status();
                    let body = response.text().await.map_err(|e| e.to_string())?;
                    Ok::<_, String>(format!("{status} {body}"))
                });
                answers.push(answer);
                std::thread::sleep(Duration::from_millis(5));
            }
            answers
        }
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let body = |host: &HostProcess| {
        runtime.block_on(async {
            match http_client().get(host.url("/")).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        })
    };

    // Half a component: refused once, and the old one keeps answering.
    let faults = std::fs::read(guest("faults")).unwrap();
    std::fs::write(&component, &faults[..faults.len() / 2]).unwrap();
    let refused = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
        host.log().contains("reload refused").then_some(())
    });
    assert!(refused.is_some(), "log:\n{}", host.log());
    assert_eq!(body(&host), "Hello, world!\n");
    assert_eq!(
        host.log().matches("reload refused").count(),
        1,
        "{}",
        host.log()
    );
    assert_eq!(reloads(), 1, "{}", host.log());
    // A worker started now (one that exits, is recycled or added) serves the version that was
    // checked, not the broken file.
    let leaving = *wait_for_workers(&host, 2, Duration::from_secs(10))
        .iter()
        .next()
        .unwrap();
    send(leaving, libc::SIGTERM);
    let replaced = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        let now = workers(host.pid());
        (now.len() == 2 && !now.contains(&leaving)).then_some(())
    });
    assert!(replaced.is_some(), "log:\n{}", host.log());
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..10 {
        assert_eq!(body(&host), "Hello, world!\n", "log:\n{}", host.log());
    }

    // Written in four pieces 100 ms apart, as a slow build might: one reload, of the whole.
    let mut file = std::fs::File::create(&component).unwrap();
    for piece in faults.chunks(faults.len().div_ceil(4)) {
        std::io::Write::write_all(&mut file, piece).unwrap();
        file.sync_data().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(file);
    let switched = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        (body(&host) == "ok\n").then_some(())
    });
    assert!(switched.is_some(), "log:\n{}", host.log());
    assert_eq!(reloads(), 2, "{}", host.log());

    // Renamed into place over the old file.
    let staged = dir.path().join("app.wasm.new");
    std::fs::copy(guest("hello"), &staged).unwrap();
    std::fs::rename(&staged, &component).unwrap();
    let back = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        (body(&host) == "Hello, world!\n").then_some(())
    });
    assert!(back.is_some(), "log:\n{}", host.log());

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = client.join().unwrap();
    let failed: Vec<&Result<String, String>> = answers
        .iter()
        .filter(|answer| !matches!(answer, Ok(text) if text.starts_with("200 ")))
        .collect();
    assert!(answers.len() > 50, "{} requests", answers.len());
    assert!(failed.is_empty(), "{failed:?} of {}", answers.len());
}

#[test]
fn quit_stops_at_once_without_waiting_for_in_flight_requests() {
    let mut host = HostProcess::start(&guest("faults"), &["--graceful-timeout", "30"]);
    let _in_flight = send_in_flight(host.addr(), "/sleep?ms=20000");
    host.signal(libc::SIGQUIT);
    let status = host
        .wait_exit(Duration::from_secs(5))
        .expect("QUIT did not stop the host within 5 s");
    assert_eq!(status.code(), Some(0), "log:\n{}", host.log());
}

#[test]
fn usr1_reopens_the_log_files_after_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("error.log");
    let rotated = dir.path().join("error.log.1");
    let log_arg = log.to_string_lossy().into_owned();
    let host = HostProcess::start(
        &guest("hello"),
        &["--error-logfile", &log_arg, "--workers", "1"],
    );
    wait_for_workers(&host, 1, Duration::from_secs(10));
    std::fs::rename(&log, &rotated).unwrap();
    host.signal(libc::SIGUSR1);
    let reopened = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|text| text.contains("Reopened the log files"))
    });
    assert!(
        reopened.is_some(),
        "no new error log after USR1; the rotated one has:\n{}",
        std::fs::read_to_string(&rotated).unwrap_or_default()
    );
    assert!(
        std::fs::read_to_string(&rotated)
            .unwrap()
            .contains("Listening at:")
    );
}

/// The Procfile's command, run as a platform runs it: by a shell, with `host` on the PATH and
/// `PORT` set, from the repository (guests/lenzeye.wasm is relative). Its data and compile
/// cache go where the platform's XDG directories say.
#[tokio::test]
async fn the_procfile_command_serves_lenzeye_as_written() {
    let root = blackbox::repo_root();
    let procfile = std::fs::read_to_string(root.join("Procfile")).unwrap();
    let command = procfile
        .lines()
        .find_map(|line| line.strip_prefix("web: "))
        .expect("the Procfile has a web process");
    let port = blackbox::free_port();
    let home = tempfile::tempdir().unwrap();
    let bin_dir = host_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = home.path().join("log");
    let mut child = Command::new("sh")
        .args(["-c", &format!("exec {command}")])
        .current_dir(&root)
        .env("PATH", path)
        .env("PORT", port.to_string())
        .env("XDG_DATA_HOME", home.path().join("data"))
        .env("XDG_CACHE_HOME", home.path().join("cache"))
        .env_remove("HOST_CMD_ARGS")
        .env_remove("WEB_CONCURRENCY")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = http_client();
    let started = poll_until(Duration::from_secs(120), Duration::from_millis(50), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    });
    assert!(
        started.is_some(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );

    let json = |response: reqwest::Response| async move {
        serde_json::from_str::<serde_json::Value>(&response.text().await.unwrap()).unwrap()
    };
    let user = json(client.post(format!("{url}/users")).send().await.unwrap()).await;
    let key = user["api_key"]
        .as_str()
        .expect("a user was created")
        .to_owned();
    let file = b"a file uploaded through the Procfile's host".to_vec();
    let initiated = json(
        client
            .post(format!("{url}/upload/initiate"))
            .bearer_auth(&key)
            .body(serde_json::json!({"filename": "p.txt", "size": file.len()}).to_string())
            .send()
            .await
            .unwrap(),
    )
    .await;
    let upload_id = initiated["upload_id"].as_str().unwrap();
    let file_id = initiated["file_id"].as_str().unwrap();
    let part = client
        .put(format!(
            "{url}/upload/part?upload_id={upload_id}&part_number=1"
        ))
        .bearer_auth(&key)
        .body(file.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 200);
    let completed = client
        .post(format!("{url}/upload/complete?upload_id={upload_id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(completed.status(), 200);
    let download = client
        .get(format!("{url}/files/{file_id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(download.bytes().await.unwrap().to_vec(), file);

    // The seed's flags are in force: gthread with 6 threads, the heartbeat under /dev/shm.
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("Using worker: gthread"), "{log_text}");
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "the Procfile's host exited with {status}");
}

/// The example config file holds only settings the host knows, with values it takes.
#[test]
fn the_example_config_files_are_valid() {
    for (file, apps) in [("examples/host.toml", 1), ("examples/multi-app.toml", 3)] {
        let data = tempfile::tempdir().unwrap();
        let output = Command::new(host_bin())
            .current_dir(blackbox::repo_root())
            .args(["serve", "-c", file, "--check-config", "--data-dir"])
            .arg(data.path())
            .arg("--cache-dir")
            .arg(blackbox::cache_dir())
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.matches("configuration OK").count() == apps,
            "{file}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The host.toml of the Kubernetes example, its component where this checkout has it.
    let manifest =
        std::fs::read_to_string(blackbox::repo_root().join("examples/kubernetes.yaml")).unwrap();
    let (_, config_map) = manifest
        .split_once("  host.toml: |\n")
        .expect("the ConfigMap holds a host.toml");
    let embedded: String = config_map
        .lines()
        .take_while(|line| line.starts_with("    ") || line.is_empty())
        .map(|line| format!("{}\n", line.trim_start_matches("    ")))
        .collect();
    assert!(embedded.contains("memory_budget"), "{embedded}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        embedded.replace("/srv/guests/lenzeye.wasm", &guest("lenzeye")),
    )
    .unwrap();
    let output = Command::new(host_bin())
        .args(["serve", "--check-config", "-c"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--cache-dir")
        .arg(blackbox::cache_dir())
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "examples/kubernetes.yaml's host.toml: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // --print-config shows each app with the host's settings and its own overrides.
    let output = Command::new(host_bin())
        .current_dir(blackbox::repo_root())
        .args(["serve", "-c", "examples/multi-app.toml", "--print-config"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in [
        "name = \"dns-proxy\"",
        "allow_outbound = [\"ccp.netcup.net\"]",
        "timeout = 90",
        "capabilities = [\"status\"]",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    // The whole output is a config file: each app carries every app setting, the host's value
    // where its entry sets none.
    let printed: toml::Table = stdout.parse().expect("--print-config prints TOML");
    let apps = printed["app"].as_array().expect("[[app]] entries");
    let dns_proxy = apps
        .iter()
        .find(|app| app["name"].as_str() == Some("dns-proxy"))
        .expect("the dns-proxy app");
    assert_eq!(dns_proxy["memory_limit"].as_str(), Some("16MiB"));
    assert_eq!(dns_proxy["threads"].as_integer(), Some(4));
    assert_eq!(dns_proxy["worker_class"].as_str(), Some("gthread"));
}

/// A worker's private resident memory (`RssAnon`), in bytes.
fn private_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|value| value.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

/// A burst leaves a worker holding the pool slots and allocator pages it grew into; once no
/// connection has been open for `--idle-recycle`, the worker is replaced by a fresh one that
/// holds what the first held at its start, and serves. With `--idle-recycle 0` it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_grown_by_a_burst_is_replaced_once_quiet() {
    const MIB: u64 = 1 << 20;
    for (idle_recycle, replaced) in [("1", true), ("0", false)] {
        let host = HostProcess::start(
            &guest("faults"),
            &["--threads", "6", "--idle-recycle", idle_recycle],
        );
        let pid = *wait_for_workers(&host, 1, Duration::from_secs(10))
            .first()
            .unwrap();
        let at_start = private_memory(pid);
        grow_by_a_burst(&host).await;
        let grown = private_memory(pid);
        assert!(
            grown > at_start + 4 * MIB,
            "the burst did not grow the worker: {at_start} -> {grown} bytes"
        );
        if replaced {
            let fresh = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
                workers(host.pid())
                    .into_iter()
                    .find(|worker| *worker != pid)
            })
            .unwrap_or_else(|| panic!("the grown worker was not replaced; log:\n{}", host.log()));
            assert_eq!(get_status(&host.url("/")).await, 200);
            wait_for_workers(&host, 1, Duration::from_secs(5));
            let now = private_memory(fresh);
            assert!(
                now < grown - 4 * MIB,
                "the fresh worker holds {now} bytes, the grown one held {grown}"
            );
            assert!(
                host.log().contains("Recycling the worker"),
                "{}",
                host.log()
            );
        } else {
            tokio::time::sleep(Duration::from_secs(4)).await;
            assert_eq!(workers(host.pid()), BTreeSet::from([pid]));
        }
    }
}

/// A client that opens a connection for every request, so none stays open between them.
fn client_without_keep_alive() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Three bursts of six requests that each grow an instance by 8 MiB, on `host`'s faults guest.
async fn grow_by_a_burst(host: &HostProcess) {
    let client = client_without_keep_alive();
    for _ in 0..3 {
        let burst = (0..6).map(|_| {
            let request = client.get(host.url("/grow?mb=8")).send();
            async move { request.await.map(|r| r.status().as_u16()).unwrap_or(0) }
        });
        assert!(
            futures::future::join_all(burst)
                .await
                .iter()
                .all(|s| *s == 200)
        );
    }
}

/// Clients arriving while a quiet, grown worker hands over to its replacement (it keeps
/// accepting while the new one starts, then finishes what it accepted): every request is
/// answered, none waits for the replacement to start, and the replacement serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_arriving_during_an_idle_recycle_are_served_at_once() {
    let host = HostProcess::start(&guest("faults"), &["--threads", "6", "--idle-recycle", "1"]);
    let pid = *wait_for_workers(&host, 1, Duration::from_secs(10))
        .first()
        .unwrap();
    grow_by_a_burst(&host).await;
    poll_until(Duration::from_secs(10), Duration::from_millis(5), || {
        host.log().contains("Recycling the worker").then_some(())
    })
    .unwrap_or_else(|| panic!("the grown worker did not recycle; log:\n{}", host.log()));

    // From the decision on, through the handover and past it: a request every 20 ms.
    let client = client_without_keep_alive();
    let until = Instant::now() + Duration::from_secs(3);
    let mut failures = Vec::new();
    let mut slowest = Duration::ZERO;
    while Instant::now() < until {
        let started = Instant::now();
        match client.get(host.url("/")).send().await {
            Ok(response) if response.status() == 200 => {}
            Ok(response) => failures.push(format!("status {}", response.status())),
            Err(error) => failures.push(format!("{error:?}")),
        }
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failures.is_empty(), "{failures:?}; log:\n{}", host.log());
    assert!(
        slowest < Duration::from_millis(250),
        "a request waited {slowest:?} during the handover"
    );
    let now = workers(host.pid());
    assert!(
        now.len() == 1 && !now.contains(&pid),
        "the grown worker {pid} was not replaced: {now:?}"
    );
}

/// A master killed while a worker is still booting (here one TTIN asked for, killed as soon as
/// its process exists): the worker too sees its master gone once it serves, and leaves, rather
/// than take the orphaned worker's parent for its master and hold the address for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_booting_when_its_master_is_killed_leaves_too() {
    let host = HostProcess::start(&guest("hello"), &["--workers", "1"]);
    let first = wait_for_workers(&host, 1, Duration::from_secs(10));
    host.signal(libc::SIGTTIN);
    let booting = poll_until(Duration::from_secs(10), Duration::from_millis(1), || {
        workers(host.pid())
            .into_iter()
            .find(|pid| !first.contains(pid))
    })
    .unwrap_or_else(|| panic!("TTIN started no worker; log:\n{}", host.log()));
    host.signal(libc::SIGKILL);
    let gone = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        first
            .iter()
            .chain([&booting])
            .all(|pid| !running(*pid))
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "a worker of the killed master still runs: {first:?} + {booting}; log:\n{}",
        host.log()
    );
}

/// Whether the process `pid` is running (not gone, not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.rsplit_once(") ")?.1.chars().next()? != 'Z'))
        .unwrap_or(false)
}

/// A master killed outright leaves its workers no one to stop them: they see their parent
/// change and leave, and a host started at once on the same address and data directory binds
/// (retrying while they go, as gunicorn does) and serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_of_a_killed_master_leave_and_a_restart_takes_its_address() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_string_lossy().into_owned();
    let bind = format!("127.0.0.1:{}", blackbox::free_port());
    let args = ["--workers", "2", "--bind", &bind, "--data-dir", &data_dir];
    let killed = HostProcess::start(&guest("hello"), &args);
    let orphans = wait_for_workers(&killed, 2, Duration::from_secs(10));
    killed.signal(libc::SIGKILL);
    let restarted = HostProcess::start(&guest("hello"), &args);
    let gone = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        orphans.iter().all(|pid| !running(*pid)).then_some(())
    });
    assert!(
        gone.is_some(),
        "the killed master's workers {orphans:?} still run"
    );
    // With no master to reap them, they removed their own scratch directories.
    for pid in &orphans {
        let scratch = data.path().join("tmp").join(pid.to_string());
        assert!(!scratch.exists(), "{} is left", scratch.display());
    }
    assert_eq!(get_status(&format!("http://{bind}/")).await, 200);
    drop(killed);
    let log = restarted.log();
    assert!(!log.contains("Can't connect"), "{log}");
}
