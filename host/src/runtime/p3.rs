//! Serving WASIp3 (`wasi:http/service`) instances: a request on a fresh instance of its own,
//! and a kept instance that serves its requests, one or several at once, on one event loop
//! for its whole life (`shared`).
//!
//! A p3 guest returns its response head from `handle` and writes the body from tasks of its
//! own, which run only while the store's event loop (`run_concurrent`) does: so a request's
//! run lasts until its body has gone out whole, or cannot.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;
use wasmtime::Store;
use wasmtime::component::Accessor;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p3;
use wasmtime_wasi_http::p3::bindings::Service;

use crate::http::cut;
use crate::http::drain::DrainedIfDropped;
use crate::lock::lock;
use crate::metrics::Retired;
use crate::runtime::guest::{
    Guest, GuestFailure, GuestState, JobDone, RequestEnds, ResponseSender,
};
use crate::runtime::shared::SharedInstances;

/// Runs `service`'s handler on `request` and sends its response head; then lets the guest write
/// the body until it has gone out whole (`true`) or cannot (`false`: the client left, or the
/// guest answered with an error code instead).
pub async fn handle(
    accessor: &Accessor<GuestState>,
    service: &Service,
    request: hyper::Request<DrainedIfDropped>,
    scheme: Scheme,
    sender: ResponseSender,
    delivered: Option<cut::BodyDelivered>,
) -> wasmtime::Result<bool> {
    let request = with_absolute_uri(request, scheme);
    let (request, request_io) = accessor.with(|mut access| {
        let (request, io) = p3::Request::from_http(access.data_mut().http().hooks, request);
        // Its type names the hooks' lifetime, though it holds nothing of them.
        let io: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(io);
        (request, io)
    });
    let response = match service.handle(accessor, request).await? {
        Ok(response) => response,
        Err(code) => {
            sender.send(Err(format!("{code:?}")));
            return Ok(false);
        }
    };
    let response = accessor.with(|mut access| response.into_http(&mut access, request_io))?;
    if !sender.send(Ok(response)) {
        return Ok(false);
    }
    Ok(match delivered {
        Some(delivered) => delivered.await.is_ok(),
        None => false,
    })
}

/// Serves one request on a fresh instance of its own.
pub async fn serve_alone(
    store: &mut Store<GuestState>,
    service: &Service,
    request: hyper::Request<DrainedIfDropped>,
    scheme: Scheme,
    sender: ResponseSender,
    delivered: Option<cut::BodyDelivered>,
) -> wasmtime::Result<()> {
    store
        .run_concurrent(async |accessor| {
            handle(accessor, service, request, scheme, sender, delivered).await
        })
        .await?
        .map(drop)
}

/// The request with its scheme and authority (from `Host`) in its URI, where a p3 guest reads
/// them; a p2 guest is given them beside the request.
fn with_absolute_uri(
    mut request: hyper::Request<DrainedIfDropped>,
    scheme: Scheme,
) -> hyper::Request<DrainedIfDropped> {
    let mut parts = request.uri().clone().into_parts();
    if parts.authority.is_none() {
        parts.authority = request
            .headers()
            .get(hyper::header::HOST)
            .and_then(|host| host.to_str().ok()?.parse().ok());
    }
    parts.scheme = Some(match scheme {
        Scheme::Https => http::uri::Scheme::HTTPS,
        _ => http::uri::Scheme::HTTP,
    });
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    request
}

/// A request given to a shared instance.
pub struct Job {
    pub request: hyper::Request<DrainedIfDropped>,
    pub scheme: Scheme,
    pub deadline: Option<Instant>,
    pub ends: RequestEnds,
    /// Where the request ends.
    pub done: JobDone,
}

/// How a job on a shared instance ended, short of the instance failing.
enum JobEnd {
    /// Its response went out whole.
    Whole,
    /// Its response did not go out whole (the client left, or the guest gave an error code):
    /// what the guest still holds of it stays in the instance.
    Cut,
    /// Its deadline passed while the guest waited; the guest's task may still be running.
    Expired,
}

/// A job a shared instance holds: where it ends, and its deadline.
type Waiting = (JobDone, Option<Instant>);

/// A shared instance that failed: its error, and the job whose call failed, if one did.
struct InstanceFailed {
    error: wasmtime::Error,
    job: Option<u64>,
}

/// Runs a shared instance: takes its jobs and serves them at once on its event loop, until it
/// is closed (its share given, idle, or after a request that did not end well) and its jobs
/// are done, or until it fails, which fails every request it holds.
pub async fn drive(
    guest: Arc<Guest>,
    shared: Arc<SharedInstances<Job>>,
    mut store: Store<GuestState>, // watched by `guest::watch_shared_deadlines` since made
    service: Service,
    id: u64,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    // Each job's `done`, and its deadline, by its sequence number: answered from here even
    // when the instance fails and its jobs' futures are dropped.
    let waiting: Mutex<HashMap<u64, Waiting>> = Mutex::new(HashMap::new());
    // The outcomes of the last requests of a closed instance, sent once it is dropped.
    let last: Mutex<Vec<(JobDone, Result<(), GuestFailure>)>> = Mutex::new(Vec::new());
    let service = &service;
    let ended = store
        .run_concurrent(async |accessor| {
            let mut running = FuturesUnordered::<
                Pin<Box<dyn Future<Output = (u64, wasmtime::Result<JobEnd>)> + Send + '_>>,
            >::new();
            let mut retired = None;
            let mut channel_open = true;
            let mut next_seq = 0u64;
            // One timer for the idle timeout, set again only when it fires: then from when
            // the instance last became idle, if it is idle.
            let idle_timeout = shared.idle_timeout();
            let mut idle_since = Instant::now();
            let idle_timer = tokio::time::sleep(idle_timeout.unwrap_or(Duration::ZERO));
            tokio::pin!(idle_timer);
            loop {
                if !channel_open && running.is_empty() {
                    return Ok(retired.unwrap_or(Retired::Served));
                }
                let idle = running.is_empty();
                tokio::select! {
                    Some((seq, end)) = running.next(), if !idle => {
                        let end = end.map_err(|error| InstanceFailed { error, job: Some(seq) })?;
                        let mut open = shared.finished(id);
                        accessor.with(|mut access| access.data_mut().shared_request_ended(seq));
                        let Some((done, _)) = lock(&waiting).remove(&seq) else { continue };
                        let (outcome, closes) = match end {
                            JobEnd::Whole => (Ok(()), None),
                            JobEnd::Cut => (Ok(()), Some(Retired::Cut)),
                            JobEnd::Expired => (Err(guest.timeout_failure()), Some(Retired::Failed)),
                        };
                        if let Some(reason) = closes && shared.close(id) {
                            open = false;
                            retired = Some(reason);
                            accessor.with(|mut access| access.data_mut().shared_closed());
                        }
                        // The last request of a closed instance gives its admission permit
                        // back only once the instance is dropped (below).
                        if open || !running.is_empty() {
                            done.send(outcome);
                        } else {
                            lock(&last).push((done, outcome));
                        }
                        if running.is_empty() {
                            idle_since = Instant::now();
                        }
                    }
                    job = jobs.recv(), if channel_open => match job {
                        Some(job) => {
                            let seq = next_seq;
                            next_seq += 1;
                            let Job { request, scheme, deadline, ends, done } = job;
                            let span = done.span.clone();
                            lock(&waiting).insert(seq, (done, deadline));
                            accessor.with(|mut access| {
                                access.data_mut().shared_request_began(seq, deadline)
                            });
                            running.push(Box::pin(
                                serve_job(accessor, service, seq, request, scheme, deadline, ends)
                                    .instrument(span),
                            ));
                        }
                        None => channel_open = false,
                    },
                    // Not once the instance is closed, for whatever reason.
                    () = &mut idle_timer, if channel_open
                        && retired.is_none()
                        && idle_timeout.is_some() =>
                    {
                        let timeout = idle_timeout.unwrap_or_default();
                        let now = Instant::now();
                        let due = idle_since + timeout;
                        if idle && due <= now && shared.close_if_idle(id) {
                            retired = Some(Retired::Idle);
                            accessor.with(|mut access| access.data_mut().shared_closed());
                        } else {
                            idle_timer
                                .as_mut()
                                .reset(if idle && due > now { due } else { now + timeout });
                        }
                    }
                }
            }
        })
        .await;
    let refused_memory = store.data().refused_memory();
    // Dropped before the requests it held give their admission permits back: a request let in
    // may need its place in the pool.
    drop(store);
    for (done, outcome) in std::mem::take(&mut *lock(&last)) {
        done.send(outcome);
    }
    let failed = match ended {
        Ok(Ok(reason)) => {
            guest.metrics().instance_retired(reason);
            return;
        }
        Ok(Err(failed)) => failed,
        Err(error) => InstanceFailed { error, job: None },
    };
    shared.close(id);
    guest.metrics().instance_retired(Retired::Failed);
    let failure = guest.failure(failed.error, refused_memory);
    // Jobs given to the instance that it had not taken yet fail with it.
    jobs.close();
    let mut waiting = std::mem::take(&mut *lock(&waiting));
    while let Ok(job) = jobs.try_recv() {
        waiting.insert(u64::MAX - waiting.len() as u64, (job.done, job.deadline));
    }
    // A guest stopped with no request left (what an expired request had still running) is
    // nobody's failure.
    if !waiting.is_empty() {
        guest.count_failure(&failure);
    }
    let now = Instant::now();
    let alone = waiting.len() == 1;
    for (seq, (done, deadline)) in waiting {
        // The request whose call failed, or whose deadline has passed, or the only one, has the
        // failure itself; the others it served at once are told why they were stopped. (Which
        // request trapped is not known when the instance, rather than a call, fails.)
        let its_own = alone
            || failed.job == Some(seq)
            || (matches!(failure, GuestFailure::Timeout(_))
                && deadline.is_some_and(|deadline| deadline <= now));
        done.send(Err(if its_own {
            failure.clone()
        } else {
            GuestFailure::SharedInstanceFailed(Box::new(failure.clone()))
        }));
    }
}

/// Serves one job of a shared instance, within its deadline.
async fn serve_job(
    accessor: &Accessor<GuestState>,
    service: &Service,
    seq: u64,
    request: hyper::Request<DrainedIfDropped>,
    scheme: Scheme,
    deadline: Option<Instant>,
    ends: RequestEnds,
) -> (u64, wasmtime::Result<JobEnd>) {
    let RequestEnds {
        response,
        outcome,
        delivered,
    } = ends;
    let work = handle(
        accessor,
        service,
        request,
        scheme,
        response,
        Some(delivered),
    );
    let end = match deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline, work).await {
            Ok(whole) => whole.map(JobEnd::from_whole),
            // Its outcome is dropped unsettled: a body it began looks cut.
            Err(_) => return (seq, Ok(JobEnd::Expired)),
        },
        None => work.await.map(JobEnd::from_whole),
    };
    if end.is_ok() {
        outcome.settle(true);
    }
    (seq, end)
}

impl JobEnd {
    fn from_whole(whole: bool) -> JobEnd {
        if whole { JobEnd::Whole } else { JobEnd::Cut }
    }
}
