//! The host's capabilities for Rust guests: `use capabilities::{crypto, hmac_registry, objects,
//! sql, status};` and call them. The interfaces and their documentation are the WIT files in
//! `wit/` at the repository root. Streams are `wasip2`'s, so a request body's stream can be
//! handed to the host as it is.

wit_bindgen::generate!({
    path: "../../wit",
    world: "host:capabilities/capabilities",
    with: {
        "wasi:io/error@0.2.12": wasip2::io::error,
        "wasi:io/poll@0.2.12": wasip2::io::poll,
        "wasi:io/streams@0.2.12": wasip2::io::streams,
    },
});

pub use host::capabilities::{crypto, hmac_registry, objects, sql, status};

/// The object store's parts as the registry's `finish` takes them.
pub fn registry_parts(stored: &[objects::PartInfo]) -> Vec<hmac_registry::Part> {
    stored
        .iter()
        .map(|part| hmac_registry::Part {
            number: part.number,
            size: part.size,
            etag: part.etag.clone(),
        })
        .collect()
}
