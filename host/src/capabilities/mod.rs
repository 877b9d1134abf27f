//! Host capabilities offered to guests, one WIT interface each (in `wit/`), one module each.

pub mod status;

wasmtime::component::bindgen!({
    path: "../wit",
    world: "host:capabilities/capabilities",
});
