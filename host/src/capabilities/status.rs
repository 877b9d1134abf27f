//! `host:capabilities/status`: memory figures for the guest — the host's, its budget, and the
//! calling instance's own memory against its cap.

use std::sync::OnceLock;

use crate::capabilities::CapabilityView;
use crate::capabilities::host::capabilities::status::{Host, MemoryFigures};
use crate::proc_memory;

impl Host for CapabilityView<'_> {
    async fn memory(&mut self) -> wasmtime::Result<MemoryFigures> {
        Ok(MemoryFigures {
            host_resident: proc_memory::host_resident_bytes(),
            host_budget: self.request.memory_budget,
            host_limit: self
                .request
                .memory_budget
                .unwrap_or_else(machine_memory_limit),
            worker_resident: proc_memory::resident_bytes(),
            instance_used: self.request.instance_memory as u64,
            instance_limit: self.request.memory_limit,
        })
    }
}

/// The cgroup's or machine's memory, read from `/sys` and `/proc` on the first call only: it is
/// taken as fixed for the life of the worker, so a status call does not pay for two file reads.
fn machine_memory_limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(proc_memory::machine_memory_limit)
}
