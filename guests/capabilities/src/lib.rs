//! The host's capabilities for Rust guests: `use capabilities::{crypto, status};` and call them. The
//! interfaces and their documentation are the WIT files in `wit/` at the repository root.

wit_bindgen::generate!({
    path: "../../wit",
    world: "host:capabilities/capabilities",
});

pub use host::capabilities::{crypto, status};
