//! Components compiled, instantiated and run under their bounds: the engine, the compile
//! cache, the guest store, the memory limiter, guest output, outbound HTTP, and the pages a fresh
//! instance is given ahead.

pub mod compile_cache;
pub mod engine;
pub mod guest;
pub mod guest_output;
pub mod kept;
pub mod memory_limiter;
pub mod outbound;
pub mod p3;
pub mod shared;
pub mod warm_pages;
