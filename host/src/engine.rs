//! The wasmtime engine: a pooling allocator sized from the concurrency settings and the memory
//! cap, copy-on-write memory images, and epoch interruption driven by one ticker thread.

use std::time::Duration;

use anyhow::{Context, Result};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig,
};

/// How often the epoch advances: the granularity of deadlines, and how often a busy guest
/// yields its thread to other requests.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

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
        .epoch_interruption(true)
        .memory_init_cow(true)
        .cranelift_opt_level(OptLevel::Speed)
        .parallel_compilation(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    // Each pool slot reserves address space for the largest memory; the default reservation
    // (4 GiB) lets compiled code skip bounds checks, so only grow it for larger caps.
    if max_memory > 4 << 30 {
        config.memory_reservation(max_memory);
    }
    Engine::new(&config)
        .map_err(anyhow::Error::from)
        .context("cannot create the wasmtime engine")
}

/// Starts the one thread that advances the epoch; it lives as long as the process.
pub fn start_epoch_ticker(engine: &Engine) -> Result<()> {
    let engine = engine.weak();
    std::thread::Builder::new()
        .name("epoch-ticker".into())
        .spawn(move || {
            while let Some(engine) = engine.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .context("cannot start the epoch ticker thread")?;
    Ok(())
}
