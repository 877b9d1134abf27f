//! Host-wide bounds on bulk work, shared by every worker process of a host: how many
//! encryptions run at once (`--encrypt-concurrency`, the seed's `BoundedSemaphore(4)`), and how
//! many part-sized buffers exist at once (the same number, each at most `--part-buffer`).
//!
//! Both are System V semaphores, made by the master and taken by workers with `SEM_UNDO`: a
//! worker that dies holding a slot gives it back, as the kernel undoes its operations.

use anyhow::{Context, Result};

/// Which bound of the set.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    /// Encryption and decryption running at once.
    Encryption = 0,
    /// Part buffers (an S3 part being uploaded, a part being verified) held at once.
    Buffers = 1,
}

/// The semaphore set, by its System V id.
#[derive(Debug, Clone, Copy)]
pub struct HostWideSlots {
    id: i32,
}

/// A taken slot, given back on drop.
pub struct Slot {
    id: i32,
    bound: Bound,
}

impl HostWideSlots {
    /// Made by the master with `slots` in each bound; `remove` it when the host stops.
    pub fn create(slots: u32) -> Result<HostWideSlots> {
        // SAFETY: semget/semctl with a private key and valid flags.
        let id = unsafe { libc::semget(libc::IPC_PRIVATE, 2, libc::IPC_CREAT | 0o600) };
        if id < 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot create the host-wide semaphores");
        }
        for bound in [Bound::Encryption, Bound::Buffers] {
            // SAFETY: SETVAL on a semaphore of the set just made.
            if unsafe { libc::semctl(id, bound as i32, libc::SETVAL, slots as libc::c_int) } < 0 {
                return Err(std::io::Error::last_os_error())
                    .context("cannot set the host-wide semaphores");
            }
        }
        Ok(HostWideSlots { id })
    }

    /// Opened by a worker from the id the master passed.
    pub fn open(id: i32) -> HostWideSlots {
        HostWideSlots { id }
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
        // `then`, not `then_some`: a Slot made and dropped unused would give back a slot.
        self.op(bound, -1, libc::IPC_NOWAIT as i16)
            .then(|| Slot { id: self.id, bound })
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
pub async fn take_if_bounded(slots: Option<HostWideSlots>, bound: Bound) -> Option<Slot> {
    match slots {
        Some(slots) => Some(slots.take_async(bound).await),
        None => None,
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        HostWideSlots { id: self.id }.op(self.bound, 1, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_given_back_once_and_only_when_taken() {
        let slots = HostWideSlots::create(1).unwrap();
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
        slots.remove();
    }
}
