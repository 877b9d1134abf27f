//! The pages of its initial memory that a fresh instance of a component writes, learned from the
//! first instances and copied for each later one before it runs.
//!
//! A fresh instance maps the component's initial memory copy-on-write from the compiled
//! artifact. A guest that reads a page before writing it (an interpreter does, for every object
//! it touches) takes two faults for it, and the second replaces a mapping the worker's other
//! threads may have cached, so the kernel interrupts each core running one of them to flush it:
//! a Flask hello on a fresh CPython instance writes ~1,200 pages scattered over 24 MiB, and spent
//! two thirds of its 31 ms in those interruptions with both cores busy. wasmtime keeps an
//! instance's dirtied pages for the next one in the slot only up to 32 runs of them, far fewer
//! than such a guest has.
//!
//! So the first instances' written pages are read from `/proc/self/pagemap`, and every later
//! instance has them copied at once with `MADV_POPULATE_WRITE`: one call, no interruption of
//! other cores, and no page the guest would not have copied itself. A guest whose writes fit in
//! what wasmtime keeps (a Rust guest's do) is left alone after its first instances.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

const PAGE: usize = 4096;
/// Fresh instances whose written pages are learned.
const LEARNING_SAMPLES: u32 = 8;
/// The runs of dirtied pages wasmtime resets by copying and keeps for the slot's next instance
/// (its PAGEMAP_SCAN's `MAX_REGIONS`): a guest that writes no more needs nothing from here.
const RUNS_WASMTIME_KEEPS: usize = 32;
/// The most ranges one `process_madvise` call takes (`UIO_MAXIOV`).
const MAX_RANGES_PER_CALL: usize = 1024;

pub struct WarmPages {
    /// The compiled artifact, as `/proc/self/maps` shows it: device (`fe:00`) and inode.
    device: String,
    inode: u64,
    /// This process's `/proc/self/pagemap` and pidfd, opened once: a worker never forks.
    pagemap: File,
    pidfd: OwnedFd,
    learning: Mutex<Learning>,
    /// `None` once learned that there is nothing worth copying.
    learned: OnceLock<Option<Vec<Image>>>,
    /// Set when the kernel refuses to populate: nothing more is tried.
    refused: AtomicBool,
}

#[derive(Default)]
struct Learning {
    samples: u32,
    /// Pages seen written, by the file offset of the image they belong to.
    written: HashMap<u64, Vec<bool>>,
}

/// One initial memory image, by its offset in the artifact, and the runs of its pages to copy.
struct Image {
    offset: u64,
    runs: Vec<(usize, usize)>,
    /// A page wasmtime does not keep: written (and so private) in a slot that has been
    /// populated, or has served a request, since it was last reset.
    probe: usize,
}

/// A copy-on-write mapping of an image into one instance slot.
struct Mapping {
    start: usize,
    pages: usize,
    offset: u64,
}

impl WarmPages {
    /// For `component`, whose compiled code is mapped from its artifact file; `None` when it is
    /// not (loaded from memory), since then wasmtime copies its memory images differently.
    pub fn for_component(component: &wasmtime::component::Component) -> Option<WarmPages> {
        // Pagemap entries and the learned pages are counted in 4 KiB pages.
        // SAFETY: sysconf has no preconditions.
        if unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != PAGE as libc::c_long {
            return None;
        }
        let code = component.image_range().start as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        let line = maps.lines().find(|line| {
            line.split_whitespace()
                .next()
                .and_then(address_range)
                .is_some_and(|(start, end)| (start..end).contains(&code))
        })?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Inode 0: anonymous memory, a component deserialized from bytes.
        let inode: u64 = fields.get(4)?.parse().ok().filter(|&inode| inode != 0)?;
        // SAFETY: pidfd_open on this process; the descriptor is owned from here on.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as libc::c_int) })?;
        Some(WarmPages {
            device: fields.get(3)?.to_string(),
            inode,
            pagemap: File::open("/proc/self/pagemap").ok()?,
            pidfd,
            learning: Mutex::new(Learning::default()),
            learned: OnceLock::new(),
            refused: AtomicBool::new(false),
        })
    }

    /// After a fresh instance has served its request: its written pages, while still learning.
    pub fn learn(&self) {
        if self.learned.get().is_some() {
            return;
        }
        // Another request is learning: this one's sample is not needed.
        let Ok(mut learning) = self.learning.try_lock() else {
            return;
        };
        for mapping in self.mappings() {
            let Some(private) = private_pages(&self.pagemap, &mapping) else {
                continue;
            };
            let written = learning
                .written
                .entry(mapping.offset)
                .or_insert_with(|| vec![false; mapping.pages]);
            for (seen, now) in written.iter_mut().zip(private) {
                *seen |= now;
            }
        }
        learning.samples += 1;
        if learning.samples < LEARNING_SAMPLES {
            return;
        }
        let images: Vec<Image> = learning
            .written
            .iter()
            .filter_map(|(&offset, written)| {
                let runs = runs(written);
                let &(last_start, last_len) = runs.last()?;
                (runs.len() > RUNS_WASMTIME_KEEPS).then(|| Image {
                    offset,
                    runs,
                    probe: last_start + last_len - 1,
                })
            })
            .collect();
        if images.is_empty() {
            tracing::debug!(
                "what a fresh instance writes is kept by the engine: nothing copied ahead"
            );
            let _ = self.learned.set(None);
            return;
        }
        let pages: usize = images
            .iter()
            .flat_map(|image| &image.runs)
            .map(|(_, len)| len)
            .sum();
        tracing::debug!(
            "a fresh instance writes {pages} pages of its initial memory that are copied before it runs"
        );
        let _ = self.learned.set(Some(images));
    }

    /// Before a fresh instance runs: the learned pages copied in every slot holding one of the
    /// component's images that has not had them since it was last reset (the new instance's;
    /// another slot's copy is kept for its next instance). Copying keeps each page's contents,
    /// so a slot in use by another instance is left as it is.
    pub fn warm(&self) {
        let Some(Some(images)) = self.learned.get() else {
            return;
        };
        if self.refused.load(Ordering::Relaxed) {
            return;
        }
        for mapping in self.mappings() {
            let Some(image) = images.iter().find(|image| image.offset == mapping.offset) else {
                continue;
            };
            if image.probe >= mapping.pages || is_private(&self.pagemap, mapping.start, image.probe)
            {
                continue;
            }
            if let Err(error) = populate(&self.pidfd, &mapping, &image.runs) {
                tracing::debug!("instance pages are left to fault in: {error}");
                self.refused.store(true, Ordering::Relaxed);
                return;
            }
        }
    }

    /// The writable private mappings of the artifact: memory images in instance slots.
    fn mappings(&self) -> Vec<Mapping> {
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return Vec::new();
        };
        maps.lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (range, perms, offset, device, inode) = (
                    fields.next()?,
                    fields.next()?,
                    fields.next()?,
                    fields.next()?,
                    fields.next()?,
                );
                if perms != "rw-p" || device != self.device || inode.parse() != Ok(self.inode) {
                    return None;
                }
                let (start, end) = address_range(range)?;
                Some(Mapping {
                    start,
                    pages: (end - start) / PAGE,
                    offset: u64::from_str_radix(offset, 16).ok()?,
                })
            })
            .collect()
    }
}

/// `start-end` of a `/proc/self/maps` line, in hex.
fn address_range(field: &str) -> Option<(usize, usize)> {
    let (start, end) = field.split_once('-')?;
    Some((
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    ))
}

/// A pagemap entry: present (bit 63) and not a file page (bit 61), i.e. a private copy.
fn private(entry: u64) -> bool {
    entry >> 63 & 1 == 1 && entry >> 61 & 1 == 0
}

fn is_private(pagemap: &File, start: usize, page: usize) -> bool {
    let mut entry = [0u8; 8];
    let at = ((start / PAGE + page) * 8) as u64;
    pagemap.read_exact_at(&mut entry, at).is_ok() && private(u64::from_le_bytes(entry))
}

fn private_pages(pagemap: &File, mapping: &Mapping) -> Option<Vec<bool>> {
    let mut entries = vec![0u8; mapping.pages * 8];
    pagemap
        .read_exact_at(&mut entries, (mapping.start / PAGE * 8) as u64)
        .ok()?;
    Some(
        entries
            .chunks_exact(8)
            .map(|entry| private(u64::from_le_bytes(entry.try_into().unwrap_or_default())))
            .collect(),
    )
}

/// The runs of `true` in `pages`, as (first page, length).
fn runs(pages: &[bool]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (page, _) in pages.iter().enumerate().filter(|(_, written)| **written) {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == page => *len += 1,
            _ => runs.push((page, 1)),
        }
    }
    runs
}

/// Faults `runs` of `mapping` in writable: private copies, taken without a page fault each.
fn populate(pidfd: &OwnedFd, mapping: &Mapping, runs: &[(usize, usize)]) -> std::io::Result<()> {
    let ranges: Vec<libc::iovec> = runs
        .iter()
        .map(|&(first, len)| libc::iovec {
            iov_base: (mapping.start + first * PAGE) as *mut libc::c_void,
            iov_len: len * PAGE,
        })
        .collect();
    for chunk in ranges.chunks(MAX_RANGES_PER_CALL) {
        // SAFETY: the ranges lie in a mapping of this process; MADV_POPULATE_WRITE faults
        // pages in without changing what they hold.
        let done = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd.as_raw_fd(),
                chunk.as_ptr(),
                chunk.len(),
                libc::MADV_POPULATE_WRITE,
                0,
            )
        };
        if done < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_the_stretches_of_written_pages() {
        let pages = [false, true, true, false, true, false, false, true];
        assert_eq!(runs(&pages), vec![(1, 2), (4, 1), (7, 1)]);
        assert_eq!(runs(&[false, false]), vec![]);
    }
}
