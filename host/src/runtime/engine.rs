//! The wasmtime engine: a pooling allocator sized from the concurrency settings and the memory
//! cap, copy-on-write memory images, and epoch interruption driven by one ticker thread.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig,
};

/// How often the epoch advances, which is how often a running guest yields its thread to other
/// requests and how precisely deadlines hold: every 10 ms while guests answer quickly, every
/// millisecond while one computes for longer. With two looping guests on two cores, other
/// requests waited ~0.5 s with 10 ms slices and ~0.08 s with 1 ms slices; ticking at 1 ms all
/// the time cost 8% of the requests per second of short requests.
const EPOCH_TICK: Duration = Duration::from_millis(10);
const EPOCH_TICK_WHILE_COMPUTING: Duration = Duration::from_millis(1);

/// Per-component ceilings of the pool. Rust and C components need 1 memory, 2-4 tables and
/// 3-6 core instances; other toolchains add a few more.
const MEMORIES_PER_COMPONENT: u32 = 4;
const TABLES_PER_COMPONENT: u32 = 8;
const CORE_INSTANCES_PER_COMPONENT: u32 = 16;

/// Memory a freed pool slot keeps mapped and resets with `memset` (only the pages the guest
/// dirtied, found with PAGEMAP_SCAN where the kernel has it) instead of `madvise`: the
/// syscall per request is what limits `wasmtime serve`.
const LINEAR_MEMORY_KEEP_RESIDENT: u64 = 2 << 20;
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// What the engine is sized from.
#[derive(Debug, Clone, Copy)]
pub struct EngineSizing {
    /// Guest instances alive at once.
    pub instances: usize,
    /// Cap on one instance's linear memory.
    pub memory_limit: u64,
    /// Whether an app is a WASIp3 component: the component model's async ABI costs every
    /// request of every app some 10-20% (measured on the p2 hello), so it is on only then.
    pub async_components: bool,
}

impl EngineSizing {
    /// One engine serves all of a worker's apps: its pool holds every app's instances, each
    /// slot as large as the largest cap (each app's own cap is enforced by its limiter).
    pub fn for_apps(apps: &[crate::settings::App]) -> EngineSizing {
        EngineSizing {
            instances: apps.iter().map(|app| app.settings.concurrency).sum(),
            memory_limit: apps
                .iter()
                .map(|app| app.settings.memory_limit)
                .max()
                .unwrap_or(1 << 16),
            // A component that cannot be read is reported when it is loaded.
            async_components: apps.iter().any(|app| match &app.version {
                Some(version) => version.serves_p3,
                None => serves_p3(&app.component).unwrap_or(true),
            }),
        }
    }
}

/// Whether the component at `path` exports `wasi:http/handler@0.3` (the `wasi:http/service`
/// world of WASIp3), read from its own export section without compiling it.
fn serves_p3(path: &std::path::Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    exports_p3(&bytes)
}

/// The linear memory the component `bytes` hold once instantiated: the sum of the minimum sizes
/// of the memories its core modules define, which its `--memory-limit` must cover.
pub fn initial_memory(bytes: &[u8]) -> Result<u64> {
    let mut total = 0u64;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        if let wasmparser::Payload::MemorySection(memories) = payload? {
            for memory in memories {
                let memory = memory?;
                let page = memory.page_size_log2.map_or(64 * 1024, |log2| 1u64 << log2);
                total = total.saturating_add(memory.initial.saturating_mul(page));
            }
        }
    }
    Ok(total)
}

/// Whether the component `bytes` export `wasi:http/handler@0.3`.
pub fn exports_p3(bytes: &[u8]) -> Result<bool> {
    // The payloads of nested modules and components come between their section and its end.
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload? {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentExportSection(exports) if depth == 0 => {
                for export in exports {
                    if export?.name.name.starts_with("wasi:http/handler@0.3") {
                        return Ok(true);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

pub fn build(sizing: EngineSizing) -> Result<Engine> {
    let instances = u32::try_from(sizing.instances).unwrap_or(u32::MAX).max(1);
    let page = 64 * 1024;
    let max_memory = sizing.memory_limit.div_ceil(page) * page;

    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .total_memories(instances.saturating_mul(MEMORIES_PER_COMPONENT))
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .total_tables(instances.saturating_mul(TABLES_PER_COMPONENT))
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .total_stacks(instances)
        .max_memory_size(
            usize::try_from(max_memory).context("--memory-limit does not fit this machine")?,
        )
        .linear_memory_keep_resident(
            usize::try_from(LINEAR_MEMORY_KEEP_RESIDENT.min(max_memory)).unwrap_or(0),
        )
        .table_keep_resident(TABLE_KEEP_RESIDENT)
        .pagemap_scan(Enabled::Auto);

    let mut config = Config::new();
    config
        .wasm_component_model(true)
        // WASIp3 components (`wasi:http/service`) are built on the async ABI: streams, futures
        // and tasks.
        .wasm_component_model_async(sizing.async_components)
        .concurrency_support(sizing.async_components)
        .epoch_interruption(true)
        .memory_init_cow(true)
        .cranelift_opt_level(OptLevel::Speed)
        .parallel_compilation(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    // Each pool slot reserves 4 GiB of address space (what lets compiled code skip bounds
    // checks), so a pool of tens of thousands of instances does not fit in it.
    Engine::new(&config)
        .map_err(anyhow::Error::from)
        .with_context(|| {
            format!(
                "cannot create the wasmtime engine with a pool of {instances} instances (the \
                 instances of every app at once: --threads, or --worker-connections with gevent)"
            )
        })
}

/// Guests running in this process; whether the ticker sleeps; the ticker, to wake it.
static RUNNING_GUESTS: AtomicUsize = AtomicUsize::new(0);
/// Guests that have run through two slices in a row (see `SliceWatch`).
static COMPUTING_GUESTS: AtomicUsize = AtomicUsize::new(0);
static TICKER_PARKED: AtomicBool = AtomicBool::new(false);
static TICKER: OnceLock<std::thread::Thread> = OnceLock::new();
/// Ticks without a running guest before the ticker sleeps: under load it never does, so
/// requests do not pay for waking it.
const IDLE_TICKS_BEFORE_SLEEP: u32 = 100;

/// Starts the one thread that advances the epoch; it lives as long as the process, and sleeps
/// once no guest has run for a second (ticking every millisecond for nothing cost an idle
/// worker 2% of a core).
pub fn start_epoch_ticker(engine: &Engine) -> Result<()> {
    let engine = engine.weak();
    let thread = std::thread::Builder::new()
        .name("epoch-ticker".into())
        .spawn(move || {
            let mut idle_ticks = 0;
            while let Some(engine) = engine.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(if COMPUTING_GUESTS.load(Ordering::Relaxed) > 0 {
                    EPOCH_TICK_WHILE_COMPUTING
                } else {
                    EPOCH_TICK
                });
                if RUNNING_GUESTS.load(Ordering::SeqCst) > 0 {
                    idle_ticks = 0;
                    continue;
                }
                idle_ticks += 1;
                if idle_ticks >= IDLE_TICKS_BEFORE_SLEEP {
                    TICKER_PARKED.store(true, Ordering::SeqCst);
                    // A guest that started before the flag was set did not wake the ticker.
                    if RUNNING_GUESTS.load(Ordering::SeqCst) == 0 {
                        std::thread::park();
                    }
                    TICKER_PARKED.store(false, Ordering::SeqCst);
                    idle_ticks = 0;
                }
            }
        })
        .context("cannot start the epoch ticker thread")?;
    let _ = TICKER.set(thread.thread().clone());
    Ok(())
}

/// Marks a guest as running until dropped, so that the epoch advances for its deadline and its
/// time slices.
pub struct GuestRunning(());

impl GuestRunning {
    pub fn start() -> GuestRunning {
        RUNNING_GUESTS.fetch_add(1, Ordering::SeqCst);
        if TICKER_PARKED.load(Ordering::SeqCst)
            && let Some(ticker) = TICKER.get()
        {
            ticker.unpark();
        }
        GuestRunning(())
    }
}

impl Drop for GuestRunning {
    fn drop(&mut self) {
        RUNNING_GUESTS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Watches a guest's time slices: one that runs through two slices in a row (its epoch
/// callbacks come one tick apart, with no wait in between) counts as computing until it ends,
/// and while any guest does, slices are shorter, so that it cannot hold a thread others are
/// waiting for. A guest whose callback follows a wait (a body read, an outbound call) is not.
#[derive(Default)]
pub struct SliceWatch {
    last_slice_end: Option<std::time::Instant>,
    computing: Option<Computing>,
}

impl SliceWatch {
    /// Called from the epoch callback, at the end of each slice.
    pub fn slice_ended(&mut self) {
        let now = std::time::Instant::now();
        let back_to_back = self
            .last_slice_end
            .is_some_and(|last| now.duration_since(last) <= EPOCH_TICK * 3 / 2);
        if back_to_back && self.computing.is_none() {
            COMPUTING_GUESTS.fetch_add(1, Ordering::Relaxed);
            self.computing = Some(Computing);
        }
        self.last_slice_end = Some(now);
    }
}

struct Computing;

impl Drop for Computing {
    fn drop(&mut self) {
        COMPUTING_GUESTS.fetch_sub(1, Ordering::Relaxed);
    }
}
