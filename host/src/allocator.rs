//! The allocator, mimalloc, with the same settings in every process of the host (the master,
//! its workers and the compile step), unless the environment sets them.
//!
//! mimalloc as it comes commits an 8 MiB arena up front: most of an idle worker's memory, while
//! committing on demand costs nothing measurable. It keeps freed pages for a second before
//! giving them back, and does so only when it is next called: under a stream of 10 MiB parts a
//! worker then holds twice the memory it uses, and a master, idle once its workers run, kept the
//! 21 MB a Python component took to read and check (a master of 44 MiB instead of 11; the master
//! now collects after reading them). Here it keeps them 1 ms: giving them back at once cost a
//! `madvise` every other request, each a TLB flush that interrupts the other core, and put short
//! requests on fresh instances into a slow mode of up to twice the CPU in some runs; 1 ms kept
//! them out of it in every run, for 4 MiB more at the peak of Lenzeye's uploads. And it collects
//! the pages other threads freed into a thread's heap only every 10,000 slow allocations: chunks
//! of a stream cross threads, so a worker kept ~5 MiB more under load.

use std::ffi::OsString;

/// Many small allocations per request (headers, resources, futures) from several threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's names for the settings, and their values here.
const SETTINGS: [(&str, mimalloc_option::Id, std::ffi::c_long); 3] = [
    (
        "MIMALLOC_ARENA_EAGER_COMMIT",
        mimalloc_option::ARENA_EAGER_COMMIT,
        0,
    ),
    ("MIMALLOC_PURGE_DELAY", mimalloc_option::PURGE_DELAY, 1),
    (
        "MIMALLOC_GENERIC_COLLECT",
        mimalloc_option::GENERIC_COLLECT,
        10,
    ),
];

/// The settings as environment variables, for a process this one starts: mimalloc reads them
/// when the process starts.
pub fn for_children() -> [(&'static str, OsString); 3] {
    SETTINGS.map(|(name, _, value)| {
        (
            name,
            std::env::var_os(name).unwrap_or_else(|| value.to_string().into()),
        )
    })
}

/// Applies the settings to this process, whose allocator read its environment before `main`:
/// those the environment does not set.
pub fn apply_here() {
    for (name, option, value) in SETTINGS {
        if std::env::var_os(name).is_none() {
            // SAFETY: mimalloc's options are plain integers it reads atomically; setting one is
            // allowed at any time.
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
    }
}

/// Gives back to the system the memory this process has freed (after a large transient
/// allocation in a process that then idles).
pub fn give_back_freed() {
    // SAFETY: collecting is allowed from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// The option numbers of the mimalloc that libmimalloc-sys 0.1.49 builds (3.3: `mi_option_t` in
/// its `mimalloc.h`; 2.x numbers some of them differently), which its Rust binding does not
/// name. The test below checks them against mimalloc's own defaults.
mod mimalloc_option {
    pub type Id = libmimalloc_sys::mi_option_t;
    pub const ARENA_EAGER_COMMIT: Id = 4;
    pub const PURGE_DELAY: Id = 15;
    pub const GENERIC_COLLECT: Id = 34;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A number that names another option would set that option instead, silently: each one
    /// must read mimalloc's default for the option it names (where the environment leaves it).
    #[test]
    fn each_option_number_names_the_option_mimalloc_knows_by_that_name() {
        let defaults = [
            (
                "MIMALLOC_ARENA_EAGER_COMMIT",
                mimalloc_option::ARENA_EAGER_COMMIT,
                2,
            ),
            ("MIMALLOC_PURGE_DELAY", mimalloc_option::PURGE_DELAY, 1000),
            (
                "MIMALLOC_GENERIC_COLLECT",
                mimalloc_option::GENERIC_COLLECT,
                10_000,
            ),
        ];
        assert_eq!(
            defaults.map(|(name, ..)| name),
            SETTINGS.map(|(name, ..)| name)
        );
        for (name, option, default) in defaults {
            if std::env::var_os(name).is_some() {
                continue;
            }
            // SAFETY: reading an option is allowed at any time.
            let value = unsafe { libmimalloc_sys::mi_option_get(option) };
            assert_eq!(
                value, default,
                "{name} is option {option}, whose value is {value}"
            );
        }
    }
}
