//! Kept WASIp3 instances, each serving up to `--instance-concurrency` of an app's requests at
//! once: which instance a request goes to, and when an instance stops taking requests.
//!
//! Each instance is driven by a task of its own (its store's event loop); a request reaches it
//! as a job on its channel. A request goes to an open instance with room, the busiest first,
//! so that requests gather on few instances; only when none has room does it make a new one.
//! An instance leaves the open list when it has been given its share of requests
//! (`--instance-max-requests`), when it has been idle for `--instance-idle-timeout`, or when
//! its driver closes it after a failure; its channel then closes once its queued jobs are
//! taken, and its driver ends once its requests are done.
//!
//! An instance is made only by a request holding an admission permit, when every open
//! instance is full: so an app has no more instances than requests it admits at once, as with
//! one request per instance.

use std::sync::Mutex;

use tokio::sync::mpsc;

use crate::lock::lock;
use crate::metrics::AppMetrics;
use crate::random::random_u64;
use crate::settings::app::InstanceReuse;

/// The open instances of one app in one worker.
pub struct SharedInstances<J> {
    reuse: InstanceReuse,
    open: Mutex<Open<J>>,
    metrics: AppMetrics,
}

struct Open<J> {
    instances: Vec<Entry<J>>,
    next_id: u64,
}

struct Entry<J> {
    id: u64,
    jobs: mpsc::UnboundedSender<J>,
    /// Jobs given and not yet finished.
    in_flight: usize,
    /// Jobs given, and the most it may be given (`None` = no limit).
    given: u64,
    limit: Option<u64>,
}

impl<J> SharedInstances<J> {
    pub fn new(reuse: InstanceReuse, metrics: AppMetrics) -> SharedInstances<J> {
        SharedInstances {
            reuse,
            open: Mutex::new(Open {
                instances: Vec::new(),
                next_id: 0,
            }),
            metrics,
        }
    }

    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        self.reuse.idle_timeout
    }

    /// Gives `job` to the busiest open instance with room; the job back when none has.
    pub fn assign(&self, mut job: J) -> Result<(), J> {
        let mut open = lock(&self.open);
        loop {
            let Some(index) = open
                .instances
                .iter()
                .enumerate()
                .filter(|(_, entry)| entry.in_flight < self.reuse.concurrency)
                .max_by_key(|(_, entry)| entry.in_flight)
                .map(|(index, _)| index)
            else {
                return Err(job);
            };
            let entry = &mut open.instances[index];
            match entry.jobs.send(job) {
                Ok(()) => {}
                // Its driver has ended (it failed): it is closed, and the job tries another.
                Err(mpsc::error::SendError(returned)) => {
                    job = returned;
                    let closed = open.instances.swap_remove(index);
                    if closed.in_flight == 0 {
                        self.metrics.instance_taken();
                    }
                    continue;
                }
            }
            if entry.in_flight == 0 {
                self.metrics.instance_taken();
            }
            entry.in_flight += 1;
            entry.given += 1;
            self.metrics.instance_reused();
            if entry.limit.is_some_and(|limit| entry.given >= limit) {
                // Its share is given: it serves what it has, then goes.
                open.instances.swap_remove(index);
            }
            return Ok(());
        }
    }

    /// Opens a new instance with `job` as its first: its id and its channel, for its driver.
    pub fn open_instance(&self, job: J) -> (u64, mpsc::UnboundedReceiver<J>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        // Cannot fail: the receiver is here.
        let _ = sender.send(job);
        let jitter = match self.reuse.max_requests_jitter {
            0 => 0,
            jitter => random_u64() % (jitter + 1),
        };
        let limit = self
            .reuse
            .max_requests
            .map(|limit| limit.saturating_add(jitter));
        let mut open = lock(&self.open);
        let id = open.next_id;
        open.next_id += 1;
        if limit.is_none_or(|limit| limit > 1) {
            open.instances.push(Entry {
                id,
                jobs: sender,
                in_flight: 1,
                given: 1,
                limit,
            });
        }
        (id, receiver)
    }

    /// One of the instance's jobs is done. Whether the instance is still open.
    pub fn finished(&self, id: u64) -> bool {
        let mut open = lock(&self.open);
        let Some(entry) = open.instances.iter_mut().find(|entry| entry.id == id) else {
            return false;
        };
        entry.in_flight -= 1;
        if entry.in_flight == 0 {
            self.metrics.instance_kept();
        }
        true
    }

    /// Takes the instance out of the open list: it gets no more jobs. Whether it was open.
    pub fn close(&self, id: u64) -> bool {
        self.close_if(id, |_| true)
    }

    /// Closes the instance if it has no job: it has been idle too long.
    pub fn close_if_idle(&self, id: u64) -> bool {
        self.close_if(id, |entry| entry.in_flight == 0)
    }

    fn close_if(&self, id: u64, condition: impl Fn(&Entry<J>) -> bool) -> bool {
        let mut open = lock(&self.open);
        let Some(index) = open.instances.iter().position(|entry| entry.id == id) else {
            return false;
        };
        if !condition(&open.instances[index]) {
            return false;
        }
        let closed = open.instances.swap_remove(index);
        if closed.in_flight == 0 {
            self.metrics.instance_taken();
        }
        true
    }
}
