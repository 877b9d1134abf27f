//! Host-wide bounds on bulk work, shared by every worker process of a host: how many
//! encryptions run at once (`--encrypt-concurrency`, the seed's `BoundedSemaphore(4)`), how
//! many part buffers are held in memory at once (the same number, each at most
//! `--part-buffer`), and how many MiB of part buffers are spilled to files (`--spill-limit`).
//!
//! Both are System V semaphores, made by the master and taken by workers with `SEM_UNDO`: a
//! worker that dies holding a slot gives it back, as the kernel undoes its operations.

use anyhow::{Context, Result};

/// Which bound of the set.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    /// Encryption and decryption running at once.
    Encryption = 0,
    /// Part buffers (an S3 part being uploaded, a part being verified) held in memory at once.
    Buffers = 1,
    /// MiB of part buffers spilled to files, across the host.
    SpilledMib = 2,
}

const BOUNDS: [Bound; 3] = [Bound::Encryption, Bound::Buffers, Bound::SpilledMib];

/// The most a System V semaphore counts, and so the most MiB `--spill-limit` counts.
pub const MAX_UNITS: u32 = crate::settings::MAX_SEMAPHORE_UNITS;

/// The semaphore set, by its System V id.
#[derive(Debug, Clone, Copy)]
pub struct HostSemaphores {
    id: i32,
}

/// A taken slot, given back on drop.
pub struct Slot {
    id: i32,
    bound: Bound,
    units: i16,
}

impl HostSemaphores {
    /// Made by the master with `slots` encryption and memory-buffer slots and `spill_mib` MiB of
    /// spill files (each at most `MAX_UNITS`); `remove` it when the host stops.
    pub fn create(slots: u32, spill_mib: u32) -> Result<HostSemaphores> {
        // SAFETY: semget/semctl with a private key and valid flags.
        let id = unsafe {
            libc::semget(
                libc::IPC_PRIVATE,
                BOUNDS.len() as i32,
                libc::IPC_CREAT | 0o600,
            )
        };
        if id < 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot create the host-wide semaphores");
        }
        for bound in BOUNDS {
            let value = match bound {
                Bound::SpilledMib => spill_mib,
                _ => slots,
            }
            .min(MAX_UNITS);
            // SAFETY: SETVAL on a semaphore of the set just made.
            if unsafe { libc::semctl(id, bound as i32, libc::SETVAL, value as libc::c_int) } < 0 {
                return Err(std::io::Error::last_os_error())
                    .context("cannot set the host-wide semaphores");
            }
        }
        Ok(HostSemaphores { id })
    }

    /// Opened by a worker from the id the master passed.
    pub fn open(id: i32) -> HostSemaphores {
        HostSemaphores { id }
    }

    pub fn id(&self) -> i32 {
        self.id
    }

    pub fn remove(&self) {
        // SAFETY: IPC_RMID on the set this master created.
        unsafe { libc::semctl(self.id, 0, libc::IPC_RMID) };
    }

    /// A slot if one is free now.
    pub fn try_take(&self, bound: Bound) -> Option<Slot> {
        self.try_take_units(bound, 1)
    }

    /// `units` of `bound` at once if they are free now (none if more than the bound holds).
    pub fn try_take_units(&self, bound: Bound, units: u32) -> Option<Slot> {
        let units = i16::try_from(units).ok()?;
        // `then`, not `then_some`: a Slot made and dropped unused would give back a slot.
        self.op(bound, -units, libc::IPC_NOWAIT as i16)
            .then(|| Slot {
                id: self.id,
                bound,
                units,
            })
    }

    /// Waits for a slot without holding a thread: slots are held for a chunk's worth of work,
    /// so a waiter tries again each millisecond rather than parking a blocking thread (which,
    /// one per waiter, is what a busy host would run out of).
    pub async fn take_async(&self, bound: Bound) -> Slot {
        loop {
            if let Some(slot) = self.try_take(bound) {
                return slot;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Whether the operation was done. Interrupted waits are retried; any other failure means
    /// the semaphore is gone (the host is stopping), and the work goes on without the bound
    /// rather than failing.
    fn op(&self, bound: Bound, change: i16, flags: i16) -> bool {
        let mut operation = libc::sembuf {
            sem_num: bound as u16,
            sem_op: change,
            sem_flg: libc::SEM_UNDO as i16 | flags,
        };
        // SAFETY: one valid sembuf for a semaphore of the set.
        while unsafe { libc::semop(self.id, &mut operation, 1) } < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return false,
                _ => return true,
            }
        }
        true
    }
}

/// A slot of `bound` once one is free, or none when the host has no bounds (a compile step).
pub async fn take_if_bounded(slots: Option<HostSemaphores>, bound: Bound) -> Option<Slot> {
    match slots {
        Some(slots) => Some(slots.take_async(bound).await),
        None => None,
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        HostSemaphores { id: self.id }.op(self.bound, self.units, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_given_back_once_and_only_when_taken() {
        let slots = HostSemaphores::create(1, 10).unwrap();
        let held = slots.try_take(Bound::Encryption).expect("one slot is free");
        for _ in 0..3 {
            assert!(
                slots.try_take(Bound::Encryption).is_none(),
                "a second slot was free"
            );
        }
        assert!(
            slots.try_take(Bound::Buffers).is_some(),
            "the bounds are separate"
        );
        drop(held);
        let again = slots
            .try_take(Bound::Encryption)
            .expect("the slot came back");
        assert!(
            slots.try_take(Bound::Encryption).is_none(),
            "the slot came back twice"
        );
        drop(again);
        let spilled = slots
            .try_take_units(Bound::SpilledMib, 7)
            .expect("7 of 10 MiB");
        assert!(slots.try_take_units(Bound::SpilledMib, 4).is_none());
        let rest = slots
            .try_take_units(Bound::SpilledMib, 3)
            .expect("the other 3 MiB");
        drop(spilled);
        assert!(slots.try_take_units(Bound::SpilledMib, 8).is_none());
        drop(rest);
        assert!(slots.try_take_units(Bound::SpilledMib, 10).is_some());
        slots.remove();
    }
}
