//! A `host serve` process: started, awaited (by polling its socket, never by sleeping),
//! measured (its process tree's memory) and stopped.

use super::*;

/// A running `host serve`. Dropping it stops it: SIGTERM, up to 5 s, then SIGKILL.
pub struct HostProcess {
    child: Child,
    ready: Ready,
    log_path: PathBuf,
    stdout_path: PathBuf,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

/// Why a host did not come up.
struct StartFailure {
    exited: Option<ExitStatus>,
    log: String,
}

impl HostProcess {
    /// `host serve <component> --bind 127.0.0.1:<free port> --cache-dir <shared cache> <extra_args>`,
    /// awaited until `GET /` answers. `extra_args` may carry its own `--cache-dir`, and more
    /// `--bind`s (the first bind is the one `addr()` and `base_url()` name).
    pub fn start(component: &str, extra_args: &[&str]) -> HostProcess {
        HostProcess::start_with_env(component, extra_args, &[])
    }

    /// `start`, with `env` added to the host's environment.
    pub fn start_with_env(
        component: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> HostProcess {
        HostProcess::start_serving(&[component], extra_args, env)
    }

    /// `start` for the apps of a config file: `host serve -c <config> …`.
    pub fn start_with_config(config: &Path, extra_args: &[&str]) -> HostProcess {
        HostProcess::start_with_config_and_env(config, extra_args, &[])
    }

    /// `start_with_config`, with `env` added to the host's environment.
    pub fn start_with_config_and_env(
        config: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> HostProcess {
        let config = config.to_string_lossy();
        HostProcess::start_serving(&["-c", &config], extra_args, env)
    }

    /// `host serve <what> --bind 127.0.0.1:<free port> …`, with another port when another test
    /// took the free one first.
    fn start_serving(what: &[&str], extra_args: &[&str], env: &[(&str, &str)]) -> HostProcess {
        const ATTEMPTS: usize = 3;
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut args: Vec<String> = vec!["serve".into()];
            args.extend(what.iter().map(|arg| arg.to_string()));
            args.extend(["--bind".into(), addr.to_string()]);
            if !extra_args.contains(&"--cache-dir") {
                args.push("--cache-dir".into());
                args.push(cache_dir().to_string_lossy().into_owned());
            }
            let dir = test_dir();
            // Each host keeps its data (master key, databases, objects) to itself.
            if !extra_args.contains(&"--data-dir") {
                args.push("--data-dir".into());
                args.push(dir.path().join("data").to_string_lossy().into_owned());
            }
            args.extend(extra_args.iter().map(|arg| arg.to_string()));
            match HostProcess::try_spawn(&args, env, Ready::Tcp(addr), dir) {
                Ok(host) => return host,
                // Another test took the port between free_port() and the bind: try another.
                Err(failure) if failure.exited.is_some() && failure.log.contains("cannot bind") => {
                    last = failure.log;
                }
                Err(failure) => panic!("{}", failure.describe(&args)),
            }
        }
        panic!("host could not bind a free port in {ATTEMPTS} attempts; last log:\n{last}");
    }

    /// `host <args>` with `env` added to the environment, awaited until `GET /` answers on `ready`.
    pub fn spawn(args: &[String], env: &[(&str, &str)], ready: Ready) -> HostProcess {
        match HostProcess::try_spawn(args, env, ready, test_dir()) {
            Ok(host) => host,
            Err(failure) => panic!("{}", failure.describe(args)),
        }
    }

    fn try_spawn(
        args: &[String],
        env: &[(&str, &str)],
        ready: Ready,
        dir: tempfile::TempDir,
    ) -> Result<HostProcess, StartFailure> {
        let log_path = dir.path().join("stderr.log");
        let stdout_path = dir.path().join("stdout.log");
        let stderr = fs::File::create(&log_path).expect("cannot create the log file");
        let stdout = fs::File::create(&stdout_path).expect("cannot create the stdout file");
        let mut command = Command::new(host_bin());
        command
            .args(args)
            // No ./host.toml from wherever the tests run is picked up.
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // Only the test's arguments configure the host: drop the environment variables it reads
        // settings from (HOST_*, and gunicorn's PORT, WEB_CONCURRENCY, FORWARDED_ALLOW_IPS,
        // GUNICORN_CMD_ARGS).
        for (name, _) in std::env::vars_os() {
            let name_text = name.to_string_lossy();
            if name_text.starts_with("HOST_")
                || [
                    "PORT",
                    "WEB_CONCURRENCY",
                    "FORWARDED_ALLOW_IPS",
                    "DATABASE_URL",
                    "GUNICORN_CMD_ARGS",
                ]
                .contains(&name_text.as_ref())
            {
                command.env_remove(&name);
            }
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().expect("cannot start the host binary");
        let mut host = HostProcess {
            child,
            ready,
            log_path,
            stdout_path,
            data_dir: args
                .iter()
                .rposition(|arg| arg == "--data-dir")
                .and_then(|index| args.get(index + 1))
                .map_or_else(|| dir.path().join("data"), PathBuf::from),
            _dir: dir,
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(Some(status)) = host.child.try_wait() {
                return Err(StartFailure {
                    exited: Some(status),
                    log: host.log(),
                });
            }
            if host.answers() && host.ready.held_by(host.child.id()) {
                return Ok(host);
            }
            if Instant::now() >= deadline {
                return Err(StartFailure {
                    exited: None,
                    log: host.log(),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Whether `GET /` gets any HTTP response right now.
    fn answers(&self) -> bool {
        let request =
            |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let first_bytes = |stream: &mut dyn ReadWrite, request: String| -> bool {
            if stream.write_all(request.as_bytes()).is_err() {
                return false;
            }
            let mut head = [0u8; 8];
            stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
        };
        match &self.ready {
            Ready::Tcp(addr) => match TcpStream::connect_timeout(addr, Duration::from_secs(1)) {
                Ok(mut stream) => {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    first_bytes(&mut stream, request(&addr.to_string()))
                }
                Err(_) => false,
            },
            Ready::Unix(path) => match UnixStream::connect(path) {
                Ok(mut stream) => {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    first_bytes(&mut stream, request("localhost"))
                }
                Err(_) => false,
            },
        }
    }

    /// Where the host keeps its data: its last `--data-dir`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// The first bind's address (TCP hosts only).
    pub fn addr(&self) -> SocketAddr {
        match &self.ready {
            Ready::Tcp(addr) => *addr,
            Ready::Unix(path) => panic!(
                "this host listens on unix:{}, it has no TCP address",
                path.display()
            ),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `base_url()` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the host wrote to stderr so far (its error log unless `--error-logfile` says otherwise).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Everything the host wrote to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stdout_path).unwrap_or_default()).into_owned()
    }

    /// Sends a signal (`libc::SIGTERM`, …) to the host.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid this test started and has not reaped yet.
        let result = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(
            result,
            0,
            "kill({}, {signal}) failed: {}",
            self.child.id(),
            io::Error::last_os_error()
        );
    }

    /// The exit status, if the host exits within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                Ok(None) => return None,
                Err(error) => panic!("cannot wait for the host: {error}"),
            }
        }
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The CPU time (user and system) the host and the processes it started have used: utime
    /// and stime in /proc/<pid>/stat, which count the threads that have exited too.
    pub fn cpu_time(&self) -> Duration {
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let ticks: u64 = process_tree(self.pid())
            .iter()
            .filter_map(|pid| {
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (_, after_comm) = stat.rsplit_once(')')?;
                let fields: Vec<&str> = after_comm.split_whitespace().collect();
                // After the command: state (field 3) … utime (14), stime (15).
                Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
            })
            .sum();
        Duration::from_millis(ticks * 1000 / ticks_per_second)
    }

    /// The host's resident set size in KiB: VmRSS in /proc/<pid>/status, summed over the host
    /// process and any processes it started (worker processes, if the host forks them).
    pub fn rss_kib(&self) -> u64 {
        let own = vm_rss_kib(self.pid()).expect("no VmRSS for the host: has it exited?");
        let descendants: u64 = process_tree(self.pid())[1..]
            .iter()
            .filter_map(|pid| vm_rss_kib(*pid))
            .sum();
        own + descendants
    }

    /// The peak resident set size (VmHWM) in KiB of the host process and of each process it
    /// started, summed: what the processes held at their highest, however briefly.
    pub fn peak_rss_kib(&self) -> u64 {
        process_tree(self.pid())
            .iter()
            .filter_map(|pid| proc_status_kib(*pid, "VmHWM:"))
            .sum()
    }
}

impl HostProcess {
    /// The descriptors open in the host's processes (the master and its workers): listening
    /// sockets, connections, files.
    pub fn open_files(&self) -> usize {
        process_tree(self.pid())
            .iter()
            .filter_map(|pid| fs::read_dir(format!("/proc/{pid}/fd")).ok())
            .map(|fds| fds.count())
            .sum()
    }
}

/// `pid` and all its descendants, from the parent pids in /proc/*/stat.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            // `pid (comm) state ppid …`; comm may contain spaces and parentheses.
            let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            let Some((_, after_comm)) = stat.rsplit_once(')') else {
                continue;
            };
            if let Some(parent) = after_comm
                .split_whitespace()
                .nth(1)
                .and_then(|ppid| ppid.parse::<u32>().ok())
            {
                parents.push((child, parent));
            }
        }
    }
    let mut tree = vec![pid];
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(child, _)| *child),
        );
        next += 1;
    }
    tree
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// A `kB` figure of /proc/<pid>/status, by its label.
fn proc_status_kib(pid: u32, label: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

impl StartFailure {
    fn describe(&self, args: &[String]) -> String {
        let what = match self.exited {
            Some(status) => format!("exited with {status} before it answered"),
            None => format!("did not answer GET / within {}s", START_DEADLINE.as_secs()),
        };
        format!("host {} {what}; its log:\n{}", args.join(" "), self.log)
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if self.is_alive() {
            // SAFETY: as in `signal`; the child has not been reaped.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- log of host pid {} ----\n{}---- end of log ----",
                self.child.id(),
                self.log()
            );
        }
    }
}
