//! The files of an object in the host's local store, read as the store lays them out: a file
//! for an object put whole, a directory of parts and a `manifest` for one completed from parts.

use std::fs;
use std::path::{Path, PathBuf};

/// The files of the object at `path` (`…/objects/<key>.o`), in the order of its bytes.
pub fn local_object_files(path: &Path) -> Vec<PathBuf> {
    if !path.is_dir() {
        return vec![path.to_path_buf()];
    }
    let manifest = fs::read_to_string(path.join("manifest"))
        .unwrap_or_else(|e| panic!("{} has no manifest: {e}", path.display()));
    manifest
        .lines()
        .map(|line| {
            let (_, name) = line.split_once(' ').expect("`<size> <name>` lines");
            path.join(name)
        })
        .collect()
}

/// The bytes of the object at `path`.
pub fn local_object_bytes(path: &Path) -> Vec<u8> {
    local_object_files(path)
        .iter()
        .flat_map(|file| fs::read(file).expect("the object's file reads"))
        .collect()
}
