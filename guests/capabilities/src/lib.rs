//! The host's capabilities for Rust guests: `use capabilities::status;` and call it. The
//! interfaces and their documentation are the WIT files in `wit/` at the repository root.

wit_bindgen::generate!({
    path: "../../wit",
    world: "host:capabilities/capabilities",
});

pub use host::capabilities::status;
