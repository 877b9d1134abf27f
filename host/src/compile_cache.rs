//! Compiled components on disk, so a restart does not recompile.
//!
//! An artifact is keyed by the component's SHA-256 and the engine's compatibility hash (wasmtime
//! version, target, every setting that changes code), and stored with the SHA-256 of its own
//! bytes. A truncated, corrupted or stale artifact fails that check or wasmtime's own and is
//! rebuilt. Artifacts are written to a temporary file and renamed, so a crash mid-write leaves
//! nothing half-written under the final name. Loading maps the file, so every process serving
//! the same artifact shares its code pages.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use aws_lc_rs::digest::{SHA256, digest};
use wasmtime::Engine;
use wasmtime::component::Component;

pub fn load_component(
    engine: &Engine,
    component_path: &Path,
    cache_dir: &Path,
) -> Result<Component> {
    let bytes = std::fs::read(component_path)
        .with_context(|| format!("cannot read the component {}", component_path.display()))?;
    let artifact = cache_dir.join(format!("{}.cwasm", cache_key(engine, &bytes)));
    let shown = component_path.display();

    if artifact.exists() {
        match load_verified(engine, &artifact) {
            Ok(component) => {
                tracing::info!("loaded compiled {shown} from cache {}", artifact.display());
                return Ok(component);
            }
            Err(error) => tracing::warn!(
                "cached compilation {} is unusable ({error:#}); rebuilding",
                artifact.display()
            ),
        }
    }

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
            load_verified(engine, &artifact)
        }
        Err(error) => {
            tracing::warn!("compiled {shown} but cannot cache it ({error:#}); serving from memory");
            // SAFETY: these bytes were produced by this engine a moment ago.
            unsafe { Component::deserialize(engine, &compiled) }
                .map_err(anyhow::Error::from)
                .context("cannot load the compiled component")
        }
    }
}

fn cache_key(engine: &Engine, component: &[u8]) -> String {
    let mut engine_hash = std::hash::DefaultHasher::new();
    engine
        .precompile_compatibility_hash()
        .hash(&mut engine_hash);
    let mut key = aws_lc_rs::digest::Context::new(&SHA256);
    key.update(component);
    key.update(&engine_hash.finish().to_le_bytes());
    hex::encode(key.finish().as_ref())
}

fn digest_path(artifact: &Path) -> PathBuf {
    artifact.with_extension("sha256")
}

fn load_verified(engine: &Engine, artifact: &Path) -> Result<Component> {
    let expected =
        std::fs::read_to_string(digest_path(artifact)).context("its checksum file is missing")?;
    let actual = hex::encode(digest(
        &SHA256,
        &std::fs::read(artifact).context("cannot read it")?,
    ));
    if expected.trim() != actual {
        bail!("its checksum does not match (corrupted or truncated)");
    }
    // SAFETY: the artifact was written by `store` from `Engine::precompile_component` and its
    // bytes match the checksum written with it; wasmtime also refuses artifacts of another
    // version or configuration.
    unsafe { Component::deserialize_file(engine, artifact) }
        .map_err(anyhow::Error::from)
        .context("wasmtime refused it")
}

fn store(artifact: &Path, compiled: &[u8]) -> Result<()> {
    let dir = artifact
        .parent()
        .context("the cache path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
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
