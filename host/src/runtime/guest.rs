//! The guest component: compiled once, instantiated for a request (fresh for every request, or
//! kept for the app's next ones: `kept`), run under its memory cap and deadline, with only the
//! imports of the `wasi:http/proxy` world (WASIp2) or the `wasi:http/service` world (WASIp3),
//! the `wasi:cli` pieces that language runtimes pull in (no preopened files, no sockets,
//! outbound HTTP only as its app is granted) and the host capabilities it is granted; its stdout
//! and stderr become log lines of the request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;
use wasmtime::component::{Linker, ResourceTable, ResourceTableError};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p3::bindings::{Service, ServicePre};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::capabilities::streams::{MAX_CAPABILITY_STREAMS, StreamCount, TooManyStreams};
use crate::capabilities::{AppCapabilities, CapabilityView, RequestBounds};
use crate::http::cut;
use crate::http::drain::DrainedIfDropped;
use crate::metrics::AppMetrics;
use crate::runtime::guest_output::{GuestOutput, OutputSpan};
use crate::runtime::kept::KeptInstances;
use crate::runtime::memory_limiter::MemoryLimiter;
use crate::runtime::outbound::OutboundClient;
use crate::runtime::p3;
use crate::runtime::shared::SharedInstances;
use crate::runtime::warm_pages::WarmPages;
use crate::settings::App;
use crate::settings::{Settings, human_size};

pub struct Guest {
    engine: Engine,
    pre: HandlerPre,
    memory_limit: u64,
    memory_budget: Option<u64>,
    timeout: Option<Duration>,
    capabilities: Arc<AppCapabilities>,
    /// `-e KEY=VALUE` pairs, the app's own and its secrets: its environment.
    env: Vec<(String, String)>,
    outbound: Arc<OutboundClient>,
    metrics: AppMetrics,
    /// p2 instances kept between requests; `None` when every request gets a fresh one.
    kept: Option<Arc<KeptInstances<Kept>>>,
    /// Kept p3 instances, each on its own event loop, in place of `kept`.
    shared: Option<Arc<SharedInstances<p3::Job>>>,
    /// `None` when the component is not mapped from its artifact.
    warm_pages: Option<WarmPages>,
}

/// The HTTP handler a component exports, linked and ready to instantiate.
pub enum HandlerPre {
    /// `wasi:http/incoming-handler@0.2`: the `wasi:http/proxy` world.
    P2(ProxyPre<GuestState>),
    /// `wasi:http/handler@0.3`: the `wasi:http/service` world, on the component model's async
    /// ABI.
    P3(ServicePre<GuestState>),
}

/// The HTTP handler of one instance.
enum Handler {
    P2(Proxy),
    P3(Service),
}

impl HandlerPre {
    async fn instantiate(&self, store: &mut Store<GuestState>) -> wasmtime::Result<Handler> {
        Ok(match self {
            HandlerPre::P2(pre) => Handler::P2(pre.instantiate_async(store).await?),
            HandlerPre::P3(pre) => Handler::P3(pre.instantiate_async(store).await?),
        })
    }
}

/// An instance kept for the app's next request.
pub struct Kept {
    store: Store<GuestState>,
    handler: Handler,
}

/// A response head, or the error code a guest answered with instead.
type ResponseOrCode = Result<hyper::Response<HyperOutgoingBody>, String>;

/// How long a kept instance waits, once its guest has returned, for its response to go out
/// whole (the bytes are written by then, and usually sent): a client slower than that holds
/// neither the instance nor its permit, and the instance is dropped.
const DELIVERY_WAIT: Duration = Duration::from_secs(1);

/// What a request's run answers through: the response head, the outcome the response body's
/// end waits on, and word of the body having gone out whole.
pub struct RequestEnds {
    pub response: ResponseSender,
    pub outcome: cut::GuestOutcome,
    pub delivered: cut::BodyDelivered,
}

/// Where a guest's response head goes; it marks the request as responded as it sends, so that a
/// failure right after is known as one that cut the body.
pub struct ResponseSender {
    sender: oneshot::Sender<ResponseOrCode>,
    responded: Arc<AtomicBool>,
}

impl ResponseSender {
    /// Whether the response went to a request still waiting for it.
    pub fn send(self, response: ResponseOrCode) -> bool {
        if response.is_ok() {
            self.responded.store(true, Ordering::Release);
        }
        self.sender.send(response).is_ok()
    }
}

/// How a request served by a kept p3 instance ends, sent by the instance's task: its outcome
/// goes to the request, if it still waits (it had no response), its admission permit is given
/// back, and a failure after its response began is logged under its request id.
pub struct JobDone {
    outcome: oneshot::Sender<Result<(), GuestFailure>>,
    responded: Arc<AtomicBool>,
    _permit: Box<dyn Send>,
    _running: InstanceRunning,
    pub span: tracing::Span,
}

impl JobDone {
    pub fn send(self, outcome: Result<(), GuestFailure>) {
        if let Err(failure) = &outcome
            && self.responded.load(Ordering::Acquire)
        {
            let _request = self.span.enter();
            tracing::error!("the response was cut short: {failure}");
        }
        let _ = self.outcome.send(outcome);
    }
}

/// What runs a request once it is given to an instance: a task of its own, or a kept p3
/// instance's task, which tells its outcome.
enum Run<P> {
    Task(tokio::task::JoinHandle<(Result<(), GuestFailure>, Option<P>)>),
    Shared(oneshot::Receiver<Result<(), GuestFailure>>),
}

/// A request that failed, and the permit it held when it can be sent again.
struct Failed<P> {
    failure: GuestFailure,
    permit: Option<P>,
}

/// A guest's error for its answer and the error log: its causes on one line, without the wasm
/// backtrace wasmtime adds (a debug record has it).
fn one_line(error: &wasmtime::Error) -> String {
    // The backtrace is a context of the error, not a cause of its own type: known by its text.
    let backtrace = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(ToString::to_string);
    error
        .chain()
        .map(|cause| cause.to_string())
        .filter(|text| Some(text) != backtrace.as_ref())
        .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(": ")
}

/// The whole error, backtrace included, as one log record: its lines joined.
fn one_record(error: &wasmtime::Error) -> String {
    format!("{error:?}")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// A copy of a request without a body, to send again.
fn replayable(
    request: &hyper::Request<DrainedIfDropped>,
) -> Option<hyper::Request<DrainedIfDropped>> {
    if !hyper::body::Body::is_end_stream(request.body()) {
        return None;
    }
    let mut copy = hyper::Request::new(DrainedIfDropped::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// Why a guest gave no response.
#[derive(Debug, Clone)]
pub enum GuestFailure {
    Timeout(Duration),
    MemoryLimit {
        requested: usize,
        limit: u64,
    },
    Trapped(String),
    TooManyResources,
    TooManyStreams,
    NoResponse,
    ErrorCode(String),
    /// The instance failed while it served this request and others at once: why.
    SharedInstanceFailed(Box<GuestFailure>),
}

impl GuestFailure {
    pub fn status(&self) -> hyper::StatusCode {
        match self {
            GuestFailure::Timeout(_) => hyper::StatusCode::GATEWAY_TIMEOUT,
            // Stopped for another request's deadline: sent again, it may well be answered.
            GuestFailure::SharedInstanceFailed(why)
                if matches!(**why, GuestFailure::Timeout(_)) =>
            {
                hyper::StatusCode::SERVICE_UNAVAILABLE
            }
            GuestFailure::SharedInstanceFailed(why) => why.status(),
            _ => hyper::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl std::fmt::Display for GuestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestFailure::Timeout(timeout) => write!(
                f,
                "timeout: the app did not finish within the {}s --timeout and was stopped",
                timeout.as_secs_f64()
            ),
            GuestFailure::MemoryLimit { requested, limit } => write!(
                f,
                "memory limit exceeded: the app tried to grow its memory to {}, beyond its {} --memory-limit",
                human_size(*requested as u64),
                human_size(*limit)
            ),
            GuestFailure::Trapped(trap) => write!(f, "the app failed: it trapped ({trap})"),
            GuestFailure::TooManyResources => write!(
                f,
                "host resources exhausted: the app held {MAX_HOST_RESOURCES} host resources (streams, headers, requests, handles) at once, the most an instance may"
            ),
            GuestFailure::TooManyStreams => write!(
                f,
                "host resources exhausted: the app held {MAX_CAPABILITY_STREAMS} streams of the host's capabilities (object reads, encryption, MAC, verification) at once, the most an instance may"
            ),
            GuestFailure::NoResponse => write!(f, "the app returned without sending a response"),
            GuestFailure::ErrorCode(code) => write!(f, "the app answered with an error: {code}"),
            GuestFailure::SharedInstanceFailed(why) => match &**why {
                GuestFailure::Timeout(timeout) => write!(
                    f,
                    "the app's instance was stopped while it served this request: another request it served at once ran past the {}s --timeout",
                    timeout.as_secs_f64()
                ),
                why => write!(
                    f,
                    "the app failed while its instance served this request and others at once: {why}"
                ),
            },
        }
    }
}

/// The host resources (streams, header maps, requests, capability handles) an instance may hold
/// at once. Each costs host memory outside the guest's `--memory-limit`; wasmtime's default of a
/// million would let one instance hold hundreds of MiB. Real guests hold tens.
const MAX_HOST_RESOURCES: usize = 10_000;

/// An instance counted as running, by the epoch ticker and in the app's metrics, until dropped:
/// also when its task panics or is dropped.
struct InstanceRunning {
    metrics: AppMetrics,
    _epoch: crate::runtime::engine::GuestRunning,
}

impl InstanceRunning {
    fn start(metrics: &AppMetrics) -> InstanceRunning {
        metrics.instance_started();
        InstanceRunning {
            metrics: metrics.clone(),
            _epoch: crate::runtime::engine::GuestRunning::start(),
        }
    }
}

impl Drop for InstanceRunning {
    fn drop(&mut self) {
        self.metrics.instance_finished();
    }
}

/// Raised from the epoch callback when a guest runs past its deadline.
#[derive(Debug)]
struct DeadlineExceeded;

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request's deadline passed")
    }
}

impl std::error::Error for DeadlineExceeded {}

/// `component` linked to WASI (p2 and p3), `wasi:http` and the capabilities `app` is granted,
/// ready to instantiate: all `host prepare` needs to check that the host can serve it. Its
/// exports tell which `wasi:http` it serves.
pub fn link(
    engine: &Engine,
    component: &wasmtime::component::Component,
    app: &App,
) -> Result<HandlerPre> {
    crate::capabilities::check_grants(engine, component, app)?;
    let mut linker = Linker::<GuestState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(anyhow::Error::from)
        .context("cannot link wasi")?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(anyhow::Error::from)
        .context("cannot link wasi:http")?;
    // WASIp3 only for a p3 component: the engine runs async components only when an app is
    // one (`EngineSizing::async_components`).
    let p3 = component
        .component_type()
        .exports(engine)
        .any(|(name, _)| name.starts_with("wasi:http/handler@0.3"));
    if p3 {
        wasmtime_wasi::p3::add_to_linker(&mut linker)
            .map_err(anyhow::Error::from)
            .context("cannot link wasi@0.3")?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)
            .map_err(anyhow::Error::from)
            .context("cannot link wasi:http@0.3")?;
    }
    crate::capabilities::add_to_linker(
        &mut linker,
        &app.capabilities,
        GuestState::capability_view,
    )?;
    let pre = linker
        .instantiate_pre(component)
        .map_err(anyhow::Error::from)
        .context("the component needs imports this host does not provide")?;
    if let Ok(pre) = ProxyPre::new(pre.clone()) {
        return Ok(HandlerPre::P2(pre));
    }
    ServicePre::new(pre)
        .map(HandlerPre::P3)
        .map_err(anyhow::Error::from)
        .context(
            "the component exports neither wasi:http/incoming-handler@0.2 (the wasi:http/proxy \
             world) nor wasi:http/handler@0.3 (the wasi:http/service world): this host serves \
             those two",
        )
}

impl Guest {
    /// The component linked and attached to the app's capabilities.
    pub fn new(
        engine: &Engine,
        component: &wasmtime::component::Component,
        settings: &Settings,
        app: &App,
        capabilities: Arc<AppCapabilities>,
        metrics: AppMetrics,
    ) -> Result<Guest> {
        let pre = link(engine, component, app)?;
        let reuse = &app.settings.reuse;
        let shared = match &pre {
            HandlerPre::P3(_) => reuse.keeps_instances(),
            HandlerPre::P2(_) => {
                if reuse.concurrency > 1 && reuse.keeps_instances() {
                    tracing::info!(
                        "app {}: a WASIp2 instance serves one request at a time (--instance-concurrency applies to WASIp3 components)",
                        app.name
                    );
                }
                false
            }
        };
        metrics.set_memory_cap(
            app.settings
                .memory_limit
                .saturating_mul(app.settings.concurrency as u64),
        );
        Ok(Guest {
            engine: engine.clone(),
            pre,
            memory_limit: app.settings.memory_limit,
            memory_budget: settings.memory_budget,
            timeout: app.settings.timeout,
            capabilities,
            env: app.guest_env()?,
            outbound: Arc::new(OutboundClient::new(
                &app.name,
                &app.settings.outbound,
                metrics.clone(),
            )?),
            kept: (app.settings.reuse.keeps_instances() && !shared)
                .then(|| KeptInstances::new(&app.name, app.settings.reuse, metrics.clone())),
            shared: shared
                .then(|| Arc::new(SharedInstances::new(app.settings.reuse, metrics.clone()))),
            warm_pages: WarmPages::for_component(component),
            metrics,
        })
    }

    /// Runs `request` in an instance (kept, or fresh) and returns the guest's response as soon
    /// as it has set one; the guest keeps streaming the body from its own task, holding `permit`
    /// until it is done.
    pub async fn serve<P: Send + 'static>(
        self: &Arc<Self>,
        request: hyper::Request<DrainedIfDropped>,
        scheme: Scheme,
        permit: P,
    ) -> Result<hyper::Response<HyperOutgoingBody>, GuestFailure> {
        // A request without a body can be sent again, to a fresh instance, when the kept
        // instance it went to turns out unable to serve a second request: copied only while the
        // app's instances are on trial, not on every request once one has served two.
        let replay = self
            .kept
            .as_ref()
            .filter(|kept| kept.on_trial())
            .and_then(|_| replayable(&request));
        let (failure, permit) = match self
            .serve_once(request, scheme.clone(), permit, false)
            .await
        {
            // The permit comes back with a failure that may be the kept instance's.
            Err(Failed {
                failure,
                permit: Some(permit),
            }) => (failure, permit),
            served => return served.map_err(|failed| failed.failure),
        };
        let Some(kept) = &self.kept else {
            return Err(failure);
        };
        let Some(request) = replay else {
            kept.strike(&failure);
            return Err(failure);
        };
        tracing::debug!("sent again, to a fresh instance, after: {failure}");
        let retried = self.serve_once(request, scheme, permit, true).await;
        if retried.is_ok() {
            kept.cannot_serve_twice(&failure);
        }
        retried.map_err(|failed| failed.failure)
    }

    async fn serve_once<P: Send + 'static>(
        self: &Arc<Self>,
        request: hyper::Request<DrainedIfDropped>,
        scheme: Scheme,
        permit: P,
        fresh: bool,
    ) -> Result<hyper::Response<HyperOutgoingBody>, Failed<P>> {
        let (sender, receiver) = oneshot::channel();
        let (guest_finished, ending, delivered) = cut::guest_outcome();
        let deadline = self.timeout.map(|timeout| Instant::now() + timeout);
        // Set as the guest sends its response head: a later failure can only cut the body.
        let responded = Arc::new(AtomicBool::new(false));
        let ends = RequestEnds {
            response: ResponseSender {
                sender,
                responded: Arc::clone(&responded),
            },
            outcome: guest_finished,
            delivered,
        };
        let failed = |failure| Failed {
            failure,
            permit: None,
        };
        // A kept p3 instance's own task serves the request and ends it, permit and all: no task
        // of the request's own is needed.
        let run = match &self.shared {
            Some(shared) => {
                let (outcome, failure) = oneshot::channel();
                let done = JobDone {
                    outcome,
                    responded,
                    _permit: Box::new(permit),
                    _running: InstanceRunning::start(&self.metrics),
                    span: tracing::Span::current(),
                };
                self.run_shared(
                    shared,
                    p3::Job {
                        request,
                        scheme,
                        deadline,
                        ends,
                        done,
                    },
                );
                Run::Shared(failure)
            }
            None => {
                let guest = Arc::clone(self);
                Run::Task(tokio::spawn(
                    async move {
                        let (outcome, suspect) =
                            guest.run(request, scheme, deadline, ends, fresh).await;
                        if let Err(failure) = &outcome
                            && responded.load(Ordering::Acquire)
                        {
                            tracing::error!("the response was cut short: {failure}");
                        }
                        // Given back for the request to be sent again, if it never had a
                        // response.
                        let permit =
                            (suspect && !responded.load(Ordering::Acquire)).then_some(permit);
                        (outcome, permit)
                    }
                    .instrument(tracing::Span::current()),
                ))
            }
        };
        match receiver.await {
            Ok(Ok(response)) => {
                // The body ends whole only if the guest finishes; otherwise it looks cut.
                let declared = response
                    .headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|length| length.to_str().ok()?.parse().ok());
                Ok(response.map(|body| ending.body(body, declared)))
            }
            Ok(Err(code)) => Err(failed(GuestFailure::ErrorCode(code))),
            Err(_) => match run {
                Run::Task(task) => match task.await {
                    Ok((Ok(()), permit)) => Err(Failed {
                        failure: GuestFailure::NoResponse,
                        permit,
                    }),
                    Ok((Err(failure), permit)) => Err(Failed { failure, permit }),
                    Err(panic) => Err(failed(GuestFailure::Trapped(format!(
                        "the host task failed: {panic}"
                    )))),
                },
                Run::Shared(outcome) => Err(failed(match outcome.await {
                    Ok(Ok(())) => GuestFailure::NoResponse,
                    Ok(Err(failure)) => failure,
                    Err(_) => GuestFailure::Trapped(
                        "the host task serving the instance failed".to_owned(),
                    ),
                })),
            },
        }
    }

    /// Runs the request in an instance (a fresh one if `fresh`); `true` beside the outcome when a
    /// failure, or no response, would be the kept instance's rather than the request's
    /// (`KeptInstances::suspect`).
    async fn run(
        self: &Arc<Self>,
        request: hyper::Request<DrainedIfDropped>,
        scheme: Scheme,
        deadline: Option<Instant>,
        ends: RequestEnds,
        fresh: bool,
    ) -> (Result<(), GuestFailure>, bool) {
        let _running = InstanceRunning::start(&self.metrics);
        let RequestEnds {
            response: sender,
            outcome,
            delivered,
        } = ends;
        let kept = match &self.kept {
            Some(kept) if !fresh => kept.take(),
            _ => None,
        };
        let reused = kept.is_some();
        let (mut store, mut handler, mut instance) = match kept {
            Some((kept, instance)) => (kept.store, Some(kept.handler), instance),
            None => {
                let instance = self.kept.as_ref().map(|kept| kept.fresh());
                (self.new_store(), None, instance.unwrap_or_default())
            }
        };
        let suspect = self
            .kept
            .as_ref()
            .is_some_and(|kept| kept.suspect(&instance, reused));
        store.data_mut().begin_request(deadline);
        Self::watch_deadline(&mut store, deadline);
        // Known once the response has gone out whole or cannot: a p3 guest's body is written
        // while its instance runs, so its run lasts until then.
        let mut delivered = Some(delivered);
        let call = async {
            let handler = match handler.take() {
                Some(handler) => handler,
                None => {
                    self.metrics.instance_created();
                    let handler = self.pre.instantiate(&mut store).await?;
                    self.warm();
                    handler
                }
            };
            match &handler {
                Handler::P2(proxy) => {
                    let request = store
                        .data_mut()
                        .http()
                        .new_incoming_request(scheme, request)?;
                    let response = store
                        .data_mut()
                        .http()
                        .new_response_outparam_from_callback(move |response| {
                            sender.send(response.map_err(|code| format!("{code:?}")));
                        })?;
                    proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut store, request, response)
                        .await?;
                }
                // A fresh p3 instance: kept ones run on their own event loops (`run_shared`).
                Handler::P3(service) => {
                    let delivered = delivered.take();
                    p3::serve_alone(&mut store, service, request, scheme, sender, delivered)
                        .await?;
                }
            }
            Ok::<_, wasmtime::Error>(handler)
        };
        let result = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, call).await {
                Ok(result) => result,
                // The guest was waiting on I/O (a slow client, a sleep) when time ran out.
                Err(_) => Err(DeadlineExceeded.into()),
            },
            None => call.await,
        };
        let result = result.map_err(|error| self.failure(error, store.data().refused_memory()));
        if let (false, Ok(_), Some(warm_pages)) = (reused, &result, &self.warm_pages) {
            warm_pages.learn();
        }
        // Before the store, and with it the response body's sender, is dropped.
        outcome.settle(result.is_ok());
        if let Err(failure) = &result {
            self.count_failure(failure);
        }
        let Some(kept) = &self.kept else {
            return (result.map(drop), false);
        };
        let handler = match result {
            Ok(handler) => handler,
            Err(failure) => {
                kept.retire_failed();
                return (Err(failure), suspect);
            }
        };
        instance.served += 1;
        // The instance is kept only once its response has gone out whole: until then the
        // body's sender lives in its store.
        let whole = match delivered {
            None => false,
            Some(delivered) => {
                let waited_enough = Instant::now() + DELIVERY_WAIT;
                let wait_until =
                    deadline.map_or(waited_enough, |deadline| deadline.min(waited_enough));
                tokio::time::timeout_at(wait_until, delivered)
                    .await
                    .is_ok_and(|sent| sent.is_ok())
            }
        };
        if whole {
            kept.keep(instance, Kept { store, handler });
        } else {
            kept.retire_cut();
        }
        (Ok(()), suspect)
    }

    /// Gives `job` to a shared p3 instance with room, or to a new one made on a task of its
    /// own (a client that leaves meanwhile does not cut it short); the instance ends the job, and
    /// a failure to make the instance is the job's.
    fn run_shared(self: &Arc<Self>, shared: &Arc<SharedInstances<p3::Job>>, job: p3::Job) {
        let Err(job) = shared.assign(job) else {
            return;
        };
        // Made here, where the guest's output at its start is logged under the request.
        let mut store = self.new_store();
        watch_shared_deadlines(&mut store);
        self.metrics.instance_created();
        let guest = Arc::clone(self);
        let shared = Arc::clone(shared);
        tokio::spawn(
            async move {
                let instance = guest.pre.instantiate(&mut store).await;
                if instance.is_ok() {
                    guest.warm();
                }
                let service = match instance {
                    Ok(Handler::P3(service)) => service,
                    Ok(Handler::P2(_)) => unreachable!("a shared instance is a p3 one"),
                    Err(error) => {
                        let failure = guest.failure(error, store.data().refused_memory());
                        guest.count_failure(&failure);
                        // Dropped before the permit is given back: a request let in may need
                        // its place in the pool.
                        drop(store);
                        job.done.send(Err(failure));
                        return;
                    }
                };
                let (id, jobs) = shared.open_instance(job);
                p3::drive(guest, shared, store, service, id, jobs).await;
            }
            .instrument(tracing::info_span!(parent: None, "instance")),
        );
    }

    pub fn metrics(&self) -> &AppMetrics {
        &self.metrics
    }

    fn warm(&self) {
        if let Some(warm_pages) = &self.warm_pages {
            warm_pages.warm();
        }
    }

    /// A request stopped at its deadline.
    pub fn timeout_failure(&self) -> GuestFailure {
        GuestFailure::Timeout(self.timeout.unwrap_or_default())
    }

    /// Counts a failed request in the app's metrics.
    pub fn count_failure(&self, failure: &GuestFailure) {
        match failure {
            GuestFailure::Timeout(_) => self.metrics.timed_out(),
            GuestFailure::MemoryLimit { .. } => self.metrics.memory_refused(),
            GuestFailure::Trapped(_)
            | GuestFailure::TooManyResources
            | GuestFailure::TooManyStreams => self.metrics.trapped(),
            _ => {}
        }
    }

    /// Every epoch tick the guest yields its thread; past the deadline it is stopped.
    fn watch_deadline(store: &mut Store<GuestState>, deadline: Option<Instant>) {
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut context| {
            context.data_mut().slices.slice_ended();
            match deadline {
                Some(deadline) if Instant::now() >= deadline => Err(DeadlineExceeded.into()),
                _ => Ok(UpdateDeadline::Yield(1)),
            }
        });
    }

    pub fn failure(&self, error: wasmtime::Error, memory_refused: Option<usize>) -> GuestFailure {
        if error.downcast_ref::<DeadlineExceeded>().is_some() {
            return self.timeout_failure();
        }
        if let Some(requested) = memory_refused {
            tracing::debug!("after a refused memory grow: {}", one_record(&error));
            return GuestFailure::MemoryLimit {
                requested,
                limit: self.memory_limit,
            };
        }
        tracing::debug!("guest error: {}", one_record(&error));
        if error
            .chain()
            .any(|cause| matches!(cause.downcast_ref(), Some(ResourceTableError::Full)))
        {
            return GuestFailure::TooManyResources;
        }
        if error
            .chain()
            .any(|cause| cause.downcast_ref::<TooManyStreams>().is_some())
        {
            return GuestFailure::TooManyStreams;
        }
        match error.downcast_ref::<wasmtime::Trap>() {
            Some(trap) => GuestFailure::Trapped(trap.to_string()),
            None => GuestFailure::Trapped(one_line(&error)),
        }
    }

    fn new_store(&self) -> Store<GuestState> {
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HOST_RESOURCES);
        let output_span = OutputSpan::current();
        let state = GuestState {
            wasi: WasiCtxBuilder::new()
                .stdout(GuestOutput::new("stdout", output_span.clone()))
                .stderr(GuestOutput::new("stderr", output_span.clone()))
                .envs(&self.env)
                .build(),
            http: WasiHttpCtx::new(),
            table,
            hooks: OutboundHttp {
                client: Arc::clone(&self.outbound),
                deadline: None,
            },
            limiter: MemoryLimiter::new(self.memory_limit, self.metrics.clone()),
            memory_limit: self.memory_limit,
            memory_budget: self.memory_budget,
            capabilities: Arc::clone(&self.capabilities),
            streams: Default::default(),
            slices: Default::default(),
            shared: Default::default(),
            output_span,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        store
    }
}

pub struct GuestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: OutboundHttp,
    limiter: MemoryLimiter,
    memory_limit: u64,
    memory_budget: Option<u64>,
    capabilities: Arc<AppCapabilities>,
    /// The capability streams the instance holds.
    streams: StreamCount,
    slices: crate::runtime::engine::SliceWatch,
    /// The requests a shared p3 instance serves at once.
    shared: SharedRequests,
    /// Where the guest's stdout and stderr are logged: under the request it serves.
    output_span: OutputSpan,
}

#[derive(Default)]
struct SharedRequests {
    /// The deadlines of the requests it serves, by their sequence numbers.
    deadlines: Vec<(u64, Instant)>,
    serving: usize,
    /// It takes no more requests: once it serves none, whatever the guest still runs is
    /// stopped.
    closed: bool,
}

/// A shared instance's guest yields its thread every epoch tick, and is stopped once one of its
/// requests is past its deadline (one request computing holds the whole instance, so the
/// others cannot be served anyway), or once it is closed and still runs with no request.
pub fn watch_shared_deadlines(store: &mut Store<GuestState>) {
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut context| {
        let state = context.data_mut();
        state.slices.slice_ended();
        let now = Instant::now();
        let shared = &state.shared;
        if (shared.closed && shared.serving == 0)
            || shared
                .deadlines
                .iter()
                .any(|&(_, deadline)| now >= deadline)
        {
            return Err(DeadlineExceeded.into());
        }
        Ok(UpdateDeadline::Yield(1))
    });
}

impl GuestState {
    /// Readies the instance's state for a request that must be done by `deadline`.
    fn begin_request(&mut self, deadline: Option<Instant>) {
        self.output_span.follow_current();
        self.hooks.deadline = deadline;
        self.slices = Default::default();
        self.limiter.forget_refusal();
    }

    /// A shared instance takes a request that must be done by `deadline`. Outbound calls and
    /// capabilities, which cannot tell its requests apart, keep within the earliest deadline.
    pub fn shared_request_began(&mut self, seq: u64, deadline: Option<Instant>) {
        // The guest came back to its event loop: it is not computing through its slices.
        self.slices = Default::default();
        if self.shared.serving == 0 {
            self.limiter.forget_refusal();
        }
        self.shared.serving += 1;
        if let Some(deadline) = deadline {
            self.shared.deadlines.push((seq, deadline));
        }
        self.hooks.deadline = self.shared.deadlines.iter().map(|&(_, at)| at).min();
    }

    pub fn shared_request_ended(&mut self, seq: u64) {
        self.slices = Default::default();
        self.shared.serving -= 1;
        self.shared.deadlines.retain(|&(of, _)| of != seq);
        self.hooks.deadline = self.shared.deadlines.iter().map(|&(_, at)| at).min();
    }

    pub fn shared_closed(&mut self) {
        self.shared.closed = true;
    }

    /// The size of a memory grow the limiter refused since it last forgot one.
    pub fn refused_memory(&self) -> Option<usize> {
        self.limiter.refused()
    }

    /// What a capability call of this instance sees (`capabilities::add_to_linker`).
    fn capability_view(&mut self) -> CapabilityView<'_> {
        CapabilityView {
            app: &self.capabilities,
            table: &mut self.table,
            streams: &mut self.streams,
            request: RequestBounds {
                deadline: self.hooks.deadline,
                memory_limit: self.memory_limit,
                instance_memory: self.limiter.in_use(),
                memory_budget: self.memory_budget,
            },
        }
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            hooks: &mut self.hooks,
            table: &mut self.table,
            ctx: &mut self.http,
        }
    }
}

/// Outbound HTTP through the app's client, within the request's deadline.
struct OutboundHttp {
    client: Arc<OutboundClient>,
    deadline: Option<Instant>,
}

impl WasiHttpHooks for OutboundHttp {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _io: Box<
            dyn Future<Output = wasmtime_wasi_http::Result<(), wasmtime_wasi_http::Error>> + Send,
        >,
    ) -> Box<dyn Future<Output = wasmtime_wasi_http::Result<crate::runtime::outbound::Sent>> + Send>
    {
        let client = Arc::clone(&self.client);
        let deadline = self.deadline;
        Box::new(
            client
                .send(request, options, deadline)
                .instrument(tracing::Span::current()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_error_is_one_line_for_the_client_and_one_record_for_the_log() {
        let error = wasmtime::Error::msg(
            "error while executing at wasm backtrace:\n    0: 0x1f - f\n    1: 0x2a - g",
        )
        .context("the guest failed");
        assert_eq!(
            one_line(&error),
            "the guest failed: error while executing at wasm backtrace: 0: 0x1f - f 1: 0x2a - g"
        );
        assert!(!one_record(&error).contains('\n'), "{}", one_record(&error));
    }
}
