//! Per-app Prometheus metrics shared between worker processes and the master.
//! Each worker owns one tmpfs file (`<dir>/host-metrics-<pid>`, in the master's private
//! directory of `--worker-tmp-dir`, see `run_dir`), memory-mapped, with a fixed
//! self-describing layout: header (magic, version, app count), 64-byte app name slots, then one
//! block of u64 atomics per app. Workers bump them with relaxed atomics: no locks, no syscalls.
//! The master maps every live worker's file read-only and sums per app name at scrape time; when a
//! worker exits it folds that worker's counters (not gauges) into retired totals and deletes the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{Display, Write as _};
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode as S};
use memmap2::{MmapOptions, MmapRaw};
use tracing::warn;

const MAGIC: u64 = u64::from_le_bytes(*b"HOSTMTRC");
// The slot count is folded in so any layout change is caught without a manual bump.
const VERSION: u64 = (1 << 32) | SLOTS as u64;
const HEADER_WORDS: usize = 3;
const NAME_LEN: usize = 64;
// Bounds what a corrupt header can make the master allocate.
const MAX_APPS: usize = 4096;
pub const FILE_PREFIX: &str = "host-metrics-";

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
// Upper bounds in microseconds, so the hot path compares integers; `LE` are their labels.
const LE_US: [u64; 14] = [
    5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000, 30_000_000, 60_000_000, INF,
];
const INF: u64 = u64::MAX;
const LE: [&str; 14] = [
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60",
    "+Inf",
];

// One line per plain metric: adding a field here is all the layout and renderer need.
macro_rules! fields {
    ($($var:ident: $kind:ident $name:literal $help:literal,)*) => {
        #[derive(Clone, Copy)]
        enum F { $($var),* }
        const FIELDS: &[(&str, &str, &str)] = &[$((stringify!($kind), $name, $help)),*];
    };
}
fields! {
    InstancesRunning: gauge "host_instances_running" "Instances currently executing a request.",
    QueueDepth: gauge "host_queue_depth" "Requests waiting for a free instance.",
    MemoryInUse: gauge "host_memory_in_use_bytes" "Linear memory held by running instances.",
    MemoryCap: gauge "host_memory_cap_bytes" "Configured memory cap.",
    Traps: counter "host_traps_total" "Instances that trapped.",
    Timeouts: counter "host_timeouts_total" "Requests that hit the execution timeout.",
    MemoryRefusals: counter "host_memory_limit_refusals_total" "Memory growths refused by the limit.",
    BusyRefusals: counter "host_busy_refusals_total" "Requests refused with 503: the queue was full, or the wait too long.",
    Outbound: counter "host_outbound_requests_total" "Outbound HTTP requests attempted.",
    OutboundDenied: counter "host_outbound_denied_total" "Outbound HTTP requests denied by policy.",
    InstancesCreated: counter "host_instances_created_total" "Instances created.",
    InstancesReused: counter "host_instances_reused_total" "Requests served by an instance kept from an earlier request.",
    InstancesKept: gauge "host_instances_kept" "Idle instances kept for the next requests.",
}

/// Why an instance that could have been kept was dropped (`host_instances_retired_total`).
#[derive(Debug, Clone, Copy)]
pub enum Retired {
    /// It served its --instance-max-requests.
    Served = 0,
    /// It was idle for --instance-idle-timeout.
    Idle = 1,
    /// Its request failed: a trap, the deadline, the memory limit, no response.
    Failed = 2,
    /// Its response did not go out whole (the client left, or the guest never finished it).
    Cut = 3,
    /// Its app's instances cannot serve twice, and are no longer kept.
    NotReusable = 4,
}

const RETIRED_REASONS: [&str; 5] = ["served", "idle", "failed", "cut", "not_reusable"];

const REQ: usize = 0;
const BUCKET: usize = REQ + CLASSES.len();
const LAT_SUM: usize = BUCKET + LE_US.len();
const RETIRED: usize = LAT_SUM + 1;
const PLAIN: usize = RETIRED + RETIRED_REASONS.len();
const SLOTS: usize = PLAIN + FIELDS.len();

fn is_counter(slot: usize) -> bool {
    slot < PLAIN || FIELDS[slot - PLAIN].0 == "counter"
}
fn file_len(apps: usize) -> usize {
    HEADER_WORDS * 8 + apps * NAME_LEN + apps * SLOTS * 8
}
fn first_slot(apps: usize, app: usize) -> usize {
    HEADER_WORDS + apps * NAME_LEN / 8 + app * SLOTS
}
/// Path of a worker's metrics file; worker and master must use the same `dir`.
pub fn metrics_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{FILE_PREFIX}{pid}"))
}
fn words(map: &MmapRaw) -> &[AtomicU64] {
    // SAFETY: the mapping is page aligned, lives as long as `map`, AtomicU64 has u64's layout and
    // every access (ours and the other process's) goes through atomics.
    unsafe { std::slice::from_raw_parts(map.as_ptr().cast::<AtomicU64>(), map.len() / 8) }
}

/// Worker side: owns the mapped file. The file is deliberately left behind on drop.
pub struct WorkerMetrics {
    map: Arc<MmapRaw>,
    apps: usize,
}

impl WorkerMetrics {
    pub fn create(dir: &Path, pid: u32, apps: &[String]) -> anyhow::Result<WorkerMetrics> {
        if apps.len() > MAX_APPS {
            bail!("too many apps for metrics: {}", apps.len());
        }
        for name in apps {
            if name.len() > NAME_LEN || name.contains('\0') {
                bail!("app name {name:?} unusable for metrics (max {NAME_LEN} bytes, no NUL)");
            }
        }
        // Only the host's user may have put anything there: the file is never someone else's,
        // whom its counters would tell about the traffic, and who could truncate it under the
        // mapping (SIGBUS).
        crate::run_dir::check_private(dir)?;
        let path = metrics_path(dir, pid);
        // A file of an earlier worker with this pid, whose exit the master has not yet seen.
        if let Err(error) = std::fs::remove_file(&path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            return Err(error).with_context(|| format!("removing {}", path.display()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let len = file_len(apps.len());
        // Allocate now: a sparse tmpfs page that cannot be backed later would SIGBUS the hot path.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if rc != 0 {
            let err = std::io::Error::from_raw_os_error(rc);
            return Err(err).with_context(|| format!("allocating {}", path.display()));
        }
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .with_context(|| format!("mapping {}", path.display()))?;
        for (i, name) in apps.iter().enumerate() {
            // SAFETY: in bounds (len computed above); nobody reads names before the magic is set.
            unsafe {
                let dst = map.as_mut_ptr().add(HEADER_WORDS * 8 + i * NAME_LEN);
                std::ptr::copy_nonoverlapping(name.as_ptr(), dst, name.len());
            }
        }
        let w = words(&map);
        w[1].store(VERSION, Relaxed);
        w[2].store(apps.len() as u64, Relaxed);
        // Magic last, with Release: a reader that sees it sees a complete header and names.
        w[0].store(MAGIC, Release);
        Ok(WorkerMetrics {
            map: Arc::new(map),
            apps: apps.len(),
        })
    }

    /// Handle for the app at `index` in the list given to `create`.
    /// # Panics
    /// If `index` is out of range (a programming error).
    pub fn app(&self, index: usize) -> AppMetrics {
        assert!(
            index < self.apps,
            "app index {index} out of range ({} apps)",
            self.apps
        );
        AppMetrics {
            map: self.map.clone(),
            base: first_slot(self.apps, index),
        }
    }
}

/// Cheap cloneable per-app handle; every method is a relaxed atomic op on shared memory.
#[derive(Clone)]
pub struct AppMetrics {
    map: Arc<MmapRaw>,
    base: usize,
}

impl AppMetrics {
    /// Counters nobody reads: for a worker without `--metrics-bind`, the compile step, tests.
    pub fn detached() -> AppMetrics {
        let map = MmapOptions::new()
            .len(SLOTS * 8)
            .map_anon()
            .map(MmapRaw::from);
        match map {
            Ok(map) => AppMetrics {
                map: Arc::new(map),
                base: 0,
            },
            // Without even an anonymous page the process could not serve anyway.
            Err(error) => panic!("cannot map memory for counters: {error}"),
        }
    }

    fn add(&self, slot: usize, n: u64) {
        words(&self.map)[self.base + slot].fetch_add(n, Relaxed);
    }
    // Saturating so an unbalanced dec shows as 0 rather than 2^64.
    fn sub(&self, slot: usize, n: u64) {
        let _ = words(&self.map)[self.base + slot]
            .fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(n)));
    }

    pub fn request_finished(&self, status: u16, latency: Duration) {
        // Codes outside 100-599 (hyper allows up to 999) fold into the nearest class.
        self.add(REQ + usize::from(status / 100).clamp(1, 5) - 1, 1);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        // First bound >= us; the last bound is u64::MAX so this is always in range.
        self.add(BUCKET + LE_US.partition_point(|&le| le < us), 1);
        self.add(LAT_SUM, us);
    }
    pub fn instance_started(&self) {
        self.add(PLAIN + F::InstancesRunning as usize, 1)
    }
    pub fn instance_finished(&self) {
        self.sub(PLAIN + F::InstancesRunning as usize, 1)
    }
    pub fn queued(&self) {
        self.add(PLAIN + F::QueueDepth as usize, 1)
    }
    pub fn dequeued(&self) {
        self.sub(PLAIN + F::QueueDepth as usize, 1)
    }
    pub fn memory_grew(&self, bytes: u64) {
        self.add(PLAIN + F::MemoryInUse as usize, bytes)
    }
    pub fn memory_released(&self, bytes: u64) {
        self.sub(PLAIN + F::MemoryInUse as usize, bytes)
    }
    pub fn set_memory_cap(&self, bytes: u64) {
        words(&self.map)[self.base + PLAIN + F::MemoryCap as usize].store(bytes, Relaxed);
    }
    pub fn instance_created(&self) {
        self.add(PLAIN + F::InstancesCreated as usize, 1)
    }
    pub fn instance_reused(&self) {
        self.add(PLAIN + F::InstancesReused as usize, 1)
    }
    pub fn instance_kept(&self) {
        self.add(PLAIN + F::InstancesKept as usize, 1)
    }
    pub fn instance_taken(&self) {
        self.sub(PLAIN + F::InstancesKept as usize, 1)
    }
    pub fn instance_retired(&self, why: Retired) {
        self.add(RETIRED + why as usize, 1)
    }
    pub fn trapped(&self) {
        self.add(PLAIN + F::Traps as usize, 1)
    }
    pub fn timed_out(&self) {
        self.add(PLAIN + F::Timeouts as usize, 1)
    }
    pub fn memory_refused(&self) {
        self.add(PLAIN + F::MemoryRefusals as usize, 1)
    }
    pub fn busy(&self) {
        self.add(PLAIN + F::BusyRefusals as usize, 1)
    }
    pub fn outbound(&self, denied: bool) {
        self.add(PLAIN + F::Outbound as usize, 1);
        if denied {
            self.add(PLAIN + F::OutboundDenied as usize, 1);
        }
    }
}

type Values = [u64; SLOTS];

/// Reads one worker file: (app name, slot values) per app.
fn read_worker(path: &Path) -> anyhow::Result<Vec<(String, Values)>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let len = usize::try_from(file.metadata()?.len())?;
    if len < file_len(0) {
        bail!("too short ({len} bytes)");
    }
    let map = MmapOptions::new().len(len).map_raw_read_only(&file)?;
    let w = words(&map);
    if w[0].load(Acquire) != MAGIC {
        bail!("bad magic (worker still creating it?)");
    }
    let (version, apps) = (w[1].load(Relaxed), w[2].load(Relaxed) as usize);
    if version != VERSION {
        bail!("layout version {version:#x}, expected {VERSION:#x}");
    }
    if apps > MAX_APPS || len < file_len(apps) {
        bail!("{len} bytes cannot hold {apps} apps");
    }
    let mut out = Vec::with_capacity(apps);
    for app in 0..apps {
        let mut raw = [0u8; NAME_LEN];
        // SAFETY: in bounds (checked above); names are immutable once the magic is visible.
        unsafe {
            std::ptr::copy_nonoverlapping(
                map.as_ptr().add(HEADER_WORDS * 8 + app * NAME_LEN),
                raw.as_mut_ptr(),
                NAME_LEN,
            )
        };
        let end = raw.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        let name = std::str::from_utf8(&raw[..end]).context("app name is not UTF-8")?;
        let base = first_slot(apps, app);
        out.push((
            name.to_owned(),
            std::array::from_fn(|i| w[base + i].load(Relaxed)),
        ));
    }
    Ok(out)
}

/// Master side: sums live workers' files and keeps the counters of exited ones.
#[derive(Default)]
pub struct MetricsCollector {
    dir: PathBuf,
    retired: BTreeMap<String, Values>,
    /// The workers whose files are read: from their start to their exit.
    live: BTreeSet<u32>,
}

impl MetricsCollector {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            ..Self::default()
        }
    }

    pub fn worker_started(&mut self, pid: u32) {
        self.live.insert(pid);
    }

    /// Call after reaping the worker: folds its counters into the retired totals, deletes its file.
    pub fn worker_exited(&mut self, pid: u32) {
        self.live.remove(&pid);
        let path = metrics_path(&self.dir, pid);
        match read_worker(&path) {
            Ok(apps) => {
                for (name, values) in apps {
                    let total = self.retired.entry(name).or_insert([0; SLOTS]);
                    for (slot, v) in values.iter().enumerate().filter(|(s, _)| is_counter(*s)) {
                        total[slot] = total[slot].wrapping_add(*v);
                    }
                }
            }
            Err(e) => warn!(pid, path = %path.display(), "metrics of exited worker lost: {e:#}"),
        }
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %path.display(), "removing metrics file: {e}");
        }
    }

    /// Prometheus text format 0.0.4 for retired totals plus the live workers.
    pub fn render(&self) -> String {
        let mut apps = self.retired.clone();
        for &pid in &self.live {
            let path = metrics_path(&self.dir, pid);
            match read_worker(&path) {
                Ok(worker) => {
                    for (name, values) in worker {
                        let total = apps.entry(name).or_insert([0; SLOTS]);
                        for (t, v) in total.iter_mut().zip(values) {
                            *t = t.wrapping_add(v);
                        }
                    }
                }
                // A worker still booting has no file yet.
                Err(e)
                    if e.root_cause()
                        .downcast_ref::<std::io::Error>()
                        .map(|e| e.kind())
                        == Some(std::io::ErrorKind::NotFound) => {}
                Err(e) => warn!(pid, path = %path.display(), "skipping metrics file: {e:#}"),
            }
        }
        let apps: Vec<(String, Values)> = apps.into_iter().map(|(n, v)| (escape(&n), v)).collect();
        let mut o = String::with_capacity(4096);
        family(
            &mut o,
            REQS,
            "counter",
            "Requests finished, by status class.",
        );
        for (app, v) in &apps {
            for (i, class) in CLASSES.iter().enumerate() {
                sample(&mut o, REQS, app, &format!(",code=\"{class}\""), v[REQ + i]);
            }
        }
        family(&mut o, DUR, "histogram", "Request latency.");
        for (app, v) in &apps {
            let mut cum = 0u64;
            for (i, le) in LE.iter().enumerate() {
                cum = cum.wrapping_add(v[BUCKET + i]);
                sample(
                    &mut o,
                    &format!("{DUR}_bucket"),
                    app,
                    &format!(",le=\"{le}\""),
                    cum,
                );
            }
            sample(
                &mut o,
                &format!("{DUR}_sum"),
                app,
                "",
                v[LAT_SUM] as f64 / 1e6,
            );
            // From the buckets: a scrape racing an update must see +Inf == _count.
            sample(&mut o, &format!("{DUR}_count"), app, "", cum);
        }
        family(
            &mut o,
            RETIRED_TOTAL,
            "counter",
            "Instances dropped that could have been kept, by why.",
        );
        for (app, v) in &apps {
            for (i, reason) in RETIRED_REASONS.iter().enumerate() {
                let label = format!(",reason=\"{reason}\"");
                sample(&mut o, RETIRED_TOTAL, app, &label, v[RETIRED + i]);
            }
        }
        for (i, &(kind, name, help)) in FIELDS.iter().enumerate() {
            family(&mut o, name, kind, help);
            for (app, v) in &apps {
                sample(&mut o, name, app, "", v[PLAIN + i]);
            }
        }
        family(&mut o, "host_workers", "gauge", "Live worker processes.");
        let _ = writeln!(o, "host_workers {}", self.live.len());
        o
    }
}

const REQS: &str = "host_requests_total";
const DUR: &str = "host_request_duration_seconds";
const RETIRED_TOTAL: &str = "host_instances_retired_total";

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}
fn sample(out: &mut String, name: &str, app: &str, extra: &str, value: impl Display) {
    let _ = writeln!(out, "{name}{{app=\"{app}\"{extra}}} {value}");
}
fn escape(label: &str) -> String {
    let s = label.replace('\\', "\\\\").replace('"', "\\\"");
    s.replace('\n', "\\n")
}

/// Serves `GET /metrics` and `GET /healthz` over HTTP/1 until the task is dropped.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let render = Arc::new(render);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                crate::http::accept_failed(e).await;
                continue;
            }
        };
        let render = render.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let resp = respond(req.method(), req.uri().path(), &*render);
            async move { Ok::<_, std::convert::Infallible>(resp) }
        });
        tokio::spawn(async move {
            // The timer makes hyper's 30 s header-read timeout effective against idle clients.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

fn respond(method: &Method, path: &str, render: &dyn Fn() -> String) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let (status, ctype, body) = match (path, method) {
        ("/metrics", &Method::GET) => (S::OK, "text/plain; version=0.0.4; charset=utf-8", render()),
        ("/healthz", &Method::GET) => (S::OK, TEXT, "ok\n".into()),
        ("/metrics" | "/healthz", _) => {
            (S::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n".into())
        }
        _ => (S::NOT_FOUND, TEXT, "not found\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    if status == S::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("metrics-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::private_fs::create_dir_all(&dir).unwrap();
        dir
    }
    /// A collector reading the files of the workers `pids` in `dir`.
    fn collector(dir: &Path, pids: &[u32]) -> MetricsCollector {
        let mut collector = MetricsCollector::new(dir.to_path_buf());
        for &pid in pids {
            collector.worker_started(pid);
        }
        collector
    }
    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }
    fn has(out: &str, line: &str) -> bool {
        out.lines().any(|l| l == line)
    }

    #[test]
    fn aggregates_and_retires() {
        let dir = test_dir("agg");
        let a = WorkerMetrics::create(&dir, 1001, &names(&["hello", "lenz\"eye"])).unwrap();
        let b = WorkerMetrics::create(&dir, 1002, &names(&["other", "hello"])).unwrap();
        let (ah, bh, ms) = (a.app(0), b.app(1), Duration::from_millis);
        ah.request_finished(200, ms(3));
        ah.clone().request_finished(201, ms(20));
        bh.request_finished(204, ms(2000));
        bh.request_finished(404, ms(7));
        ah.instance_started();
        ah.instance_started();
        ah.instance_finished();
        bh.instance_started();
        bh.memory_grew(4096);
        bh.memory_released(8192); // saturates at 0
        ah.memory_grew(1000);
        ah.trapped();
        bh.trapped();
        bh.outbound(true);
        a.app(1).busy();
        b.app(0).request_finished(500, ms(1));
        let mut c = collector(&dir, &[1001, 1002]);
        let out = c.render();
        for line in [
            r#"host_requests_total{app="hello",code="2xx"} 3"#,
            r#"host_requests_total{app="hello",code="4xx"} 1"#,
            r#"host_requests_total{app="other",code="5xx"} 1"#,
            r#"host_request_duration_seconds_bucket{app="hello",le="0.005"} 1"#,
            r#"host_request_duration_seconds_bucket{app="hello",le="0.01"} 2"#,
            r#"host_request_duration_seconds_bucket{app="hello",le="0.025"} 3"#,
            r#"host_request_duration_seconds_bucket{app="hello",le="1"} 3"#,
            r#"host_request_duration_seconds_bucket{app="hello",le="2.5"} 4"#,
            r#"host_request_duration_seconds_bucket{app="hello",le="+Inf"} 4"#,
            r#"host_request_duration_seconds_sum{app="hello"} 2.03"#,
            r#"host_request_duration_seconds_count{app="hello"} 4"#,
            r#"host_instances_running{app="hello"} 2"#,
            r#"host_memory_in_use_bytes{app="hello"} 1000"#,
            r#"host_traps_total{app="hello"} 2"#,
            r#"host_outbound_requests_total{app="hello"} 1"#,
            r#"host_outbound_denied_total{app="hello"} 1"#,
            r#"host_busy_refusals_total{app="lenz\"eye"} 1"#,
            "# TYPE host_request_duration_seconds histogram",
            "host_workers 2",
        ] {
            assert!(has(&out, line), "missing {line}\n{out}");
        }

        c.worker_exited(1002);
        assert!(!metrics_path(&dir, 1002).exists());
        let out = c.render();
        for line in [
            r#"host_requests_total{app="hello",code="2xx"} 3"#,
            r#"host_requests_total{app="other",code="5xx"} 1"#,
            r#"host_request_duration_seconds_count{app="hello"} 4"#,
            r#"host_traps_total{app="hello"} 2"#,
            r#"host_instances_running{app="hello"} 1"#,
            r#"host_instances_running{app="other"} 0"#,
            "host_workers 1",
        ] {
            assert!(has(&out, line), "missing {line}\n{out}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_is_well_formed() {
        let dir = test_dir("format");
        let w = WorkerMetrics::create(&dir, 7, &names(&["a\\b\nc\"d", "x"])).unwrap();
        w.app(0).request_finished(200, Duration::from_micros(1));
        w.app(1).request_finished(503, Duration::from_secs(100_000));
        w.app(1).set_memory_cap(1 << 30);
        let out = collector(&dir, &[7]).render();
        assert!(
            has(
                &out,
                r#"host_requests_total{app="a\\b\nc\"d",code="2xx"} 1"#
            ),
            "{out}"
        );
        let mut typed = HashSet::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().unwrap().is_finite(), "{line}");
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| typed.contains(*b));
            assert!(
                typed.contains(name) || base.is_some(),
                "no TYPE before {line}"
            );
            if labels.is_empty() {
                continue;
            }
            // Walk name="escaped value" pairs, comma separated, closed by '}'.
            let mut chars = labels.chars().peekable();
            loop {
                let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                assert!(
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert_eq!(chars.next(), Some('"'), "{line}");
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => assert!(matches!(chars.next(), Some('\\' | '"' | 'n')), "{line}"),
                        '"' => break,
                        '\n' => panic!("raw newline in {line}"),
                        _ => {}
                    }
                }
                match chars.next() {
                    Some(',') => continue,
                    Some('}') if chars.peek().is_none() => break,
                    other => panic!("unexpected {other:?} in {line}"),
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_are_skipped() {
        let dir = test_dir("bad");
        std::fs::write(metrics_path(&dir, 1), [1u8; 10]).unwrap();
        std::fs::write(metrics_path(&dir, 2), vec![0u8; file_len(2)]).unwrap();
        let ok = WorkerMetrics::create(&dir, 3, &names(&["good"])).unwrap();
        ok.app(0).timed_out();
        // Header claims more apps than the file holds.
        let w = WorkerMetrics::create(&dir, 4, &names(&["big"])).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(metrics_path(&dir, 4))
            .unwrap();
        drop(w);
        f.set_len(file_len(1) as u64 - 8).unwrap();
        let out = collector(&dir, &[1, 2, 3, 4, 5]).render();
        assert!(has(&out, r#"host_timeouts_total{app="good"} 1"#), "{out}");
        assert!(!out.contains("big"), "{out}");
        assert!(has(&out, "host_workers 5"));
        assert!(WorkerMetrics::create(&dir, 6, &names(&[&"x".repeat(65)])).is_err());
        assert!(WorkerMetrics::create(&dir, 6, &names(&[&"x".repeat(64)])).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn serves_http() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_metrics(listener, || "host_workers 1\n".to_owned()));
        let get = |method: &'static str, path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut resp = String::new();
            s.read_to_string(&mut resp).await.unwrap();
            resp
        };
        let r = get("GET", "/metrics").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{r}"
        );
        assert!(r.ends_with("\r\n\r\nhost_workers 1\n"), "{r}");
        let r = get("GET", "/healthz").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\nok\n"),
            "{r}"
        );
        assert!(get("GET", "/nope").await.starts_with("HTTP/1.1 404"));
        assert!(get("POST", "/metrics").await.starts_with("HTTP/1.1 405"));
        server.abort();
    }
}
