//! The master and its workers: the processes, the protocol between them (`handoff`), their
//! heartbeats, hooks and the memory budget.

pub mod arbiter;
pub mod budget;
pub mod handoff;
pub mod heartbeat;
pub mod hooks;
pub mod reloader;
pub mod worker;
