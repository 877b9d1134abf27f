//! Compiled components on disk, so a restart does not recompile.
//!
//! An artifact is keyed by the component's SHA-256 and the engine's compatibility hash (wasmtime
//! version, target, every setting that changes code), and stored with the SHA-256 of its own
//! bytes. A truncated, corrupted or stale artifact fails that check or wasmtime's own and is
//! rebuilt. Artifacts are written to a temporary file and renamed, so a crash mid-write leaves
//! nothing half-written under the final name. Loading maps the file, so every process serving
//! the same artifact shares its code pages.
//!
//! An artifact is machine code the workers run, so the cache is trusted only if no other local
//! user can write it: the directory (and those above it) must belong to the host's user (or
//! root) and be writable by nobody else, else the host refuses to start; an artifact or checksum
//! file that is a symlink, belongs to someone else or may be written by others is not loaded
//! but rebuilt.

use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use aws_lc_rs::digest::{SHA256, digest};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::private_fs;
use crate::settings::ComponentVersion;

/// Makes the cache directory (0700) if it is missing, and refuses one another local user could
/// write: the master calls it before anything is compiled.
pub fn prepare_dir(cache_dir: &Path) -> Result<()> {
    // An existing directory is not made private here: it is refused, since what another user
    // may have placed in it is already there.
    private_fs::create_missing_dirs(cache_dir).context("the compile cache (--cache-dir)")?;
    private_fs::check_trusted_dir(cache_dir, "the compile cache (--cache-dir)")
        .context("refusing to run machine code from it")
}

/// The version of the component at `path` that a later `load_component` loads.
pub fn version_of(path: &Path) -> Result<ComponentVersion> {
    let bytes = read_component(path)?;
    Ok(ComponentVersion {
        digest: hex::encode(digest(&SHA256, &bytes)),
        // Not a component at all: refused when it is compiled, with the reason.
        serves_p3: crate::runtime::engine::exports_p3(&bytes).unwrap_or(true),
        initial_memory: crate::runtime::engine::initial_memory(&bytes).unwrap_or(0),
    })
}

fn read_component(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the component {}", path.display()))
}

/// The component at `component_path`, compiled, from the cache if it holds it. With
/// `digest_wanted`, the version of that SHA-256: taken from the cache without reading the file,
/// and refused if it must be compiled and the file no longer holds it.
pub fn load_component(
    engine: &Engine,
    component_path: &Path,
    cache_dir: &Path,
    digest_wanted: Option<&str>,
) -> Result<Component> {
    load_or_compile(engine, component_path, cache_dir, digest_wanted)
        .map(|(component, _)| component)
}

/// `load_component`, and whether it had to compile the component.
pub fn load_or_compile(
    engine: &Engine,
    component_path: &Path,
    cache_dir: &Path,
    digest_wanted: Option<&str>,
) -> Result<(Component, bool)> {
    let shown = component_path.display();
    let read = || -> Result<(Vec<u8>, String)> {
        let bytes = read_component(component_path)?;
        let found = hex::encode(digest(&SHA256, &bytes));
        if digest_wanted.is_some_and(|wanted| wanted != found) {
            bail!("{shown} changed since it was checked; a reload serves the new version");
        }
        Ok((bytes, found))
    };
    let (bytes, component_digest) = match digest_wanted {
        Some(wanted) => (None, wanted.to_owned()),
        None => {
            let (bytes, found) = read()?;
            (Some(bytes), found)
        }
    };
    let artifact = cache_dir.join(format!("{}.cwasm", cache_key(engine, &component_digest)));
    prepare_dir(cache_dir)?;
    if artifact.symlink_metadata().is_ok() {
        match load_verified(engine, &artifact) {
            Ok(component) => {
                tracing::info!("loaded compiled {shown} from cache {}", artifact.display());
                return Ok((component, false));
            }
            Err(error) => tracing::warn!(
                "cached compilation {} is unusable ({error:#}); rebuilding",
                artifact.display()
            ),
        }
    }
    let bytes = match bytes {
        Some(bytes) => bytes,
        None => read()?.0,
    };
    let started = Instant::now();
    let compiled = engine
        .precompile_component(&bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{shown} is not a valid WebAssembly component"))?;
    let elapsed = started.elapsed();
    match store(&artifact, &compiled) {
        Ok(()) => {
            tracing::info!(
                "compiled {shown} in {:.1}s and cached at {}",
                elapsed.as_secs_f64(),
                artifact.display()
            );
            load_verified(engine, &artifact).map(|component| (component, true))
        }
        Err(error) => {
            tracing::warn!("compiled {shown} but cannot cache it ({error:#}); serving from memory");
            // SAFETY: these bytes were produced by this engine a moment ago.
            unsafe { Component::deserialize(engine, &compiled) }
                .map(|component| (component, true))
                .map_err(anyhow::Error::from)
                .context("cannot load the compiled component")
        }
    }
}

/// The artifact's name: the component's SHA-256 (hex) and the engine's compatibility hash.
fn cache_key(engine: &Engine, component_digest: &str) -> String {
    let mut engine_hash = std::hash::DefaultHasher::new();
    engine
        .precompile_compatibility_hash()
        .hash(&mut engine_hash);
    let mut key = aws_lc_rs::digest::Context::new(&SHA256);
    key.update(component_digest.as_bytes());
    key.update(&engine_hash.finish().to_le_bytes());
    hex::encode(key.finish().as_ref())
}

fn digest_path(artifact: &Path) -> PathBuf {
    artifact.with_extension("sha256")
}

fn load_verified(engine: &Engine, artifact: &Path) -> Result<Component> {
    let mut expected = String::new();
    open_trusted(&digest_path(artifact))
        .context("its checksum file")?
        .read_to_string(&mut expected)
        .context("cannot read its checksum file")?;
    let mut file = open_trusted(artifact)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).context("cannot read it")?;
    if expected.trim() != hex::encode(digest(&SHA256, &bytes)) {
        bail!("its checksum does not match (corrupted or truncated)");
    }
    drop(bytes);
    // The very file that was checked is mapped: through its descriptor, not its name again.
    let checked = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    // SAFETY: the artifact was written by `store` from `Engine::precompile_component` and its
    // bytes match the checksum written with it; wasmtime also refuses artifacts of another
    // version or configuration.
    unsafe { Component::deserialize_file(engine, &checked) }
        .map_err(anyhow::Error::from)
        .context("wasmtime refused it")
}

/// Opens a cache file only if it is a regular file (not a symlink) that only the host's user
/// (or root) could have written.
fn open_trusted(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata().context("cannot look at it")?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if let Some(reason) = private_fs::writable_by_others(&meta, false) {
        bail!("{} is not to be trusted: {reason}", path.display());
    }
    Ok(file)
}

fn store(artifact: &Path, compiled: &[u8]) -> Result<()> {
    let dir = artifact
        .parent()
        .context("the cache path has no directory")?;
    private_fs::create_missing_dirs(dir)?;
    // The checksum goes first: a process that sees the artifact can then always verify it.
    write_atomically(
        &digest_path(artifact),
        hex::encode(digest(&SHA256, compiled)).as_bytes(),
    )?;
    write_atomically(artifact, compiled)
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().context("no parent directory")?;
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    file.write_all(contents)?;
    file.as_file().sync_all()?;
    file.persist(path)
        .with_context(|| format!("cannot move the artifact into {}", path.display()))?;
    Ok(())
}
