//! Instances kept between an app's requests (`--instance-max-requests` above 1): an instance
//! whose request went well, and whose response went out whole, waits here for the app's next
//! request, up to its share of requests and for at most `--instance-idle-timeout`.
//!
//! An instance is kept only by the request that holds its admission permit, before the permit
//! is given back, and a request makes a fresh instance only when none is kept: so an app never
//! has more instances, running and kept together, than it has permits. The pool, the worker's
//! memory and `--memory-budget` are sized for that many already.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::lock::lock;
use crate::metrics::{AppMetrics, Retired};
use crate::random::random_u64;
use crate::settings::app::InstanceReuse;

/// Suspect failures, with no request sent again to tell, after which an app's instances are
/// taken to be unable to serve twice.
const STRIKES: u32 = 3;

/// What a kept instance has done so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct Instance {
    /// Requests it has served.
    pub served: u64,
    /// Requests it may serve: --instance-max-requests plus its jitter; `None` = no limit.
    limit: Option<u64>,
}

/// The instances of one app in one worker that wait for a request, the most recent last.
pub struct KeptInstances<T> {
    app: String,
    reuse: InstanceReuse,
    idle: Mutex<Vec<Idle<T>>>,
    /// Cleared, for good, once the app's instances are found unable to serve twice.
    reusable: AtomicBool,
    /// Set once an instance has served two requests: the app's instances can be reused.
    served_twice: AtomicBool,
    /// Instances whose second request failed, before any served two.
    strikes: AtomicU32,
    sweeping: AtomicBool,
    metrics: AppMetrics,
}

struct Idle<T> {
    kept: T,
    instance: Instance,
    since: Instant,
}

impl<T: Send + 'static> KeptInstances<T> {
    pub fn new(app: &str, reuse: InstanceReuse, metrics: AppMetrics) -> Arc<KeptInstances<T>> {
        Arc::new(KeptInstances {
            app: app.to_owned(),
            reuse,
            idle: Mutex::new(Vec::new()),
            reusable: AtomicBool::new(true),
            served_twice: AtomicBool::new(false),
            strikes: AtomicU32::new(0),
            sweeping: AtomicBool::new(false),
            metrics,
        })
    }

    /// A new instance's record, with its share of requests drawn.
    pub fn fresh(&self) -> Instance {
        let jitter = match self.reuse.max_requests_jitter {
            0 => 0,
            jitter => random_u64() % (jitter + 1),
        };
        Instance {
            served: 0,
            limit: self
                .reuse
                .max_requests
                .map(|limit| limit.saturating_add(jitter)),
        }
    }

    /// The most recently kept instance that has not idled too long, if any.
    pub fn take(&self) -> Option<(T, Instance)> {
        if !self.reusable.load(Ordering::Acquire) {
            return None;
        }
        let mut idle = lock(&self.idle);
        while let Some(candidate) = idle.pop() {
            self.metrics.instance_taken();
            if self.expired(&candidate) {
                self.metrics.instance_retired(Retired::Idle);
                continue;
            }
            self.metrics.instance_reused();
            return Some((candidate.kept, candidate.instance));
        }
        None
    }

    /// Keeps an instance whose request went well, unless it has served its share.
    pub fn keep(self: &Arc<Self>, instance: Instance, kept: T) {
        if instance.served >= 2 {
            self.served_twice.store(true, Ordering::Release);
        }
        if !self.reusable.load(Ordering::Acquire) {
            self.metrics.instance_retired(Retired::NotReusable);
            return;
        }
        if instance.limit.is_some_and(|limit| instance.served >= limit) {
            self.metrics.instance_retired(Retired::Served);
            return;
        }
        lock(&self.idle).push(Idle {
            kept,
            instance,
            since: Instant::now(),
        });
        self.metrics.instance_kept();
        self.sweep_idle();
    }

    /// An instance whose request failed is dropped.
    pub fn retire_failed(&self) {
        self.metrics.instance_retired(Retired::Failed);
    }

    /// An instance whose response did not go out whole is dropped.
    pub fn retire_cut(&self) {
        self.metrics.instance_retired(Retired::Cut);
    }

    /// Whether the app's instances are still on trial: none has served two requests yet, so a
    /// failure on a kept one may be the instance's, and its request is worth sending again.
    pub fn on_trial(&self) -> bool {
        !self.served_twice.load(Ordering::Acquire) && self.reusable.load(Ordering::Acquire)
    }

    /// Whether the failure of a kept instance's request may be the instance's rather than the
    /// request's: it failed its second request, and no instance of the app has served two yet.
    pub fn suspect(&self, instance: &Instance, reused: bool) -> bool {
        reused && instance.served == 1 && self.on_trial()
    }

    /// A suspect failure whose request could not be sent again to tell: the app's instances are
    /// taken to be unable to serve twice after `STRIKES` of them.
    pub fn strike(&self, failure: &impl std::fmt::Display) {
        if self.strikes.fetch_add(1, Ordering::AcqRel) + 1 >= STRIKES {
            self.cannot_serve_twice(failure);
        }
    }

    /// The app's instances cannot serve twice (a runtime that ends with its first request): a
    /// request that failed on a kept instance went well on a fresh one. They are no longer kept,
    /// and every request gets a fresh one.
    pub fn cannot_serve_twice(&self, failure: &impl std::fmt::Display) {
        if self.reusable.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                "app {}: its instances cannot serve a second request ({failure}, where a fresh instance did not fail); every request now gets a fresh instance, as with --instance-max-requests 1",
                self.app
            );
            let dropped = std::mem::take(&mut *lock(&self.idle));
            for _ in dropped {
                self.metrics.instance_taken();
                self.metrics.instance_retired(Retired::NotReusable);
            }
        }
    }

    fn expired(&self, idle: &Idle<T>) -> bool {
        self.reuse
            .idle_timeout
            .is_some_and(|timeout| idle.since.elapsed() >= timeout)
    }

    /// Drops the instances idle past --instance-idle-timeout, so that an app no request comes
    /// to gives back their memory: a task per app, started with its first kept instance.
    fn sweep_idle(self: &Arc<Self>) {
        let Some(timeout) = self.reuse.idle_timeout else {
            return;
        };
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let instances: Weak<KeptInstances<T>> = Arc::downgrade(self);
        let every = (timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(instances) = instances.upgrade() else {
                    return;
                };
                let expired: Vec<Idle<T>> = {
                    let mut idle = lock(&instances.idle);
                    let (expired, kept) = std::mem::take(&mut *idle)
                        .into_iter()
                        .partition(|candidate| instances.expired(candidate));
                    *idle = kept;
                    expired
                };
                for _ in &expired {
                    instances.metrics.instance_taken();
                    instances.metrics.instance_retired(Retired::Idle);
                }
            }
        });
    }
}
