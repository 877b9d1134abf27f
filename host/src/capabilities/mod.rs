//! Host capabilities offered to guests, one WIT interface each (in `wit/`), one module each.

pub mod crypto;
pub mod status;

wasmtime::component::bindgen!({
    path: "../wit",
    world: "host:capabilities/capabilities",
    imports: { default: async | trappable },
});
