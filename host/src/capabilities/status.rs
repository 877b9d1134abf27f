//! `host:capabilities/status`: memory figures for the guest — the host's, its budget, and the
//! calling instance's own memory against its cap.

use std::sync::OnceLock;

use crate::budget;
use crate::capabilities::host::capabilities::status::{Host, MemoryFigures};
use crate::guest::GuestState;

impl Host for GuestState {
    async fn memory(&mut self) -> wasmtime::Result<MemoryFigures> {
        Ok(MemoryFigures {
            host_resident: budget::host_resident_bytes(),
            host_budget: self.memory_budget(),
            host_limit: self.memory_budget().unwrap_or_else(machine_memory_limit),
            worker_resident: budget::resident_bytes(),
            instance_used: self.instance_memory() as u64,
            instance_limit: self.memory_limit(),
        })
    }
}

/// The cgroup's or machine's memory, read from `/sys` and `/proc` on the first call only: it is
/// taken as fixed for the life of the worker, so a status call does not pay for two file reads.
fn machine_memory_limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(budget::machine_memory_limit)
}
