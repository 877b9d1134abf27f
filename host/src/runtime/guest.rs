//! The guest component: compiled once, instantiated fresh for every request, run under its
//! memory cap and deadline, with only the imports of the `wasi:http/proxy` world, the `wasi:cli`
//! pieces that language runtimes pull in (no preopened files, no sockets, outbound HTTP only as
//! its app is granted) and the host capabilities it is granted; its stdout and stderr become log
//! lines of the request.

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
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::capabilities::streams::{MAX_CAPABILITY_STREAMS, StreamCount, TooManyStreams};
use crate::capabilities::{AppCapabilities, CapabilityView, RequestBounds};
use crate::http::cut;
use crate::http::drain::DrainedIfDropped;
use crate::metrics::AppMetrics;
use crate::runtime::guest_output::GuestOutput;
use crate::runtime::memory_limiter::MemoryLimiter;
use crate::runtime::outbound::OutboundClient;
use crate::settings::App;
use crate::settings::{Settings, human_size};

pub struct Guest {
    engine: Engine,
    pre: ProxyPre<GuestState>,
    memory_limit: u64,
    memory_budget: Option<u64>,
    timeout: Option<Duration>,
    capabilities: Arc<AppCapabilities>,
    /// `-e KEY=VALUE` pairs, the app's own and its secrets: its environment.
    env: Vec<(String, String)>,
    outbound: Arc<OutboundClient>,
    metrics: AppMetrics,
}

/// Why a guest gave no response.
#[derive(Debug)]
pub enum GuestFailure {
    Timeout(Duration),
    MemoryLimit { requested: usize, limit: u64 },
    Trapped(String),
    TooManyResources,
    TooManyStreams,
    NoResponse,
    ErrorCode(String),
}

impl GuestFailure {
    pub fn status(&self) -> hyper::StatusCode {
        match self {
            GuestFailure::Timeout(_) => hyper::StatusCode::GATEWAY_TIMEOUT,
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

/// `component` linked to WASI, `wasi:http` and the capabilities `app` is granted, ready to
/// instantiate: all `host prepare` needs to check that the host can serve it.
pub fn link(
    engine: &Engine,
    component: &wasmtime::component::Component,
    app: &App,
) -> Result<ProxyPre<GuestState>> {
    crate::capabilities::check_grants(engine, component, app)?;
    let mut linker = Linker::<GuestState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(anyhow::Error::from)
        .context("cannot link wasi")?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(anyhow::Error::from)
        .context("cannot link wasi:http")?;
    crate::capabilities::add_to_linker(
        &mut linker,
        &app.capabilities,
        GuestState::capability_view,
    )?;
    let pre = linker
        .instantiate_pre(component)
        .map_err(anyhow::Error::from)
        .context("the component needs imports this host does not provide")?;
    ProxyPre::new(pre)
        .map_err(anyhow::Error::from)
        .context("the component does not export wasi:http/incoming-handler (is it built for the wasi:http/proxy world?)")
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
            metrics,
        })
    }

    /// Runs `request` in a fresh instance and returns the guest's response as soon as it has
    /// set one; the guest keeps streaming the body from its own task, holding `permit` until it
    /// is done.
    pub async fn serve(
        self: &Arc<Self>,
        request: hyper::Request<DrainedIfDropped>,
        scheme: Scheme,
        permit: impl Send + 'static,
    ) -> Result<hyper::Response<HyperOutgoingBody>, GuestFailure> {
        let (sender, receiver) = oneshot::channel();
        let (guest_finished, ending) = cut::guest_outcome();
        let deadline = self.timeout.map(|timeout| Instant::now() + timeout);
        let guest = Arc::clone(self);
        // Set once the client has the response head: a later failure can only cut the body.
        let responded = Arc::new(AtomicBool::new(false));
        let run = tokio::spawn({
            let responded = Arc::clone(&responded);
            async move {
                let outcome = guest
                    .run(request, scheme, sender, deadline, guest_finished)
                    .await;
                drop(permit);
                if let Err(failure) = &outcome
                    && responded.load(Ordering::Acquire)
                {
                    tracing::error!("the response was cut short: {failure}");
                }
                outcome
            }
            .instrument(tracing::Span::current())
        });
        match receiver.await {
            Ok(Ok(response)) => {
                responded.store(true, Ordering::Release);
                // The body ends whole only if the guest finishes; otherwise it looks cut.
                Ok(response.map(|body| ending.body(body)))
            }
            Ok(Err(code)) => Err(GuestFailure::ErrorCode(format!("{code:?}"))),
            Err(_) => match run.await {
                Ok(Ok(())) => Err(GuestFailure::NoResponse),
                Ok(Err(failure)) => Err(failure),
                Err(panic) => Err(GuestFailure::Trapped(format!(
                    "the host task failed: {panic}"
                ))),
            },
        }
    }

    async fn run(
        &self,
        request: hyper::Request<DrainedIfDropped>,
        scheme: Scheme,
        sender: oneshot::Sender<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>,
        deadline: Option<Instant>,
        outcome: cut::GuestOutcome,
    ) -> Result<(), GuestFailure> {
        let _running = InstanceRunning::start(&self.metrics);
        let mut store = self.new_store(deadline);
        let call = async {
            let request = store
                .data_mut()
                .http()
                .new_incoming_request(scheme, request)?;
            let response = store.data_mut().http().new_response_outparam(sender)?;
            let proxy = self.pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, request, response)
                .await
        };
        let result = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, call).await {
                Ok(result) => result,
                // The guest was waiting on I/O (a slow client, a sleep) when time ran out.
                Err(_) => Err(DeadlineExceeded.into()),
            },
            None => call.await,
        };
        let failure = result.map_err(|error| self.failure(error, store.data().limiter.refused()));
        // Before the store, and with it the response body's sender, is dropped.
        outcome.settle(failure.is_ok());
        match &failure {
            Err(GuestFailure::Timeout(_)) => self.metrics.timed_out(),
            Err(GuestFailure::MemoryLimit { .. }) => self.metrics.memory_refused(),
            Err(
                GuestFailure::Trapped(_)
                | GuestFailure::TooManyResources
                | GuestFailure::TooManyStreams,
            ) => self.metrics.trapped(),
            _ => {}
        }
        failure
    }

    fn failure(&self, error: wasmtime::Error, memory_refused: Option<usize>) -> GuestFailure {
        if error.downcast_ref::<DeadlineExceeded>().is_some() {
            return GuestFailure::Timeout(self.timeout.unwrap_or_default());
        }
        if let Some(requested) = memory_refused {
            tracing::debug!("after a refused memory grow: {error:?}");
            return GuestFailure::MemoryLimit {
                requested,
                limit: self.memory_limit,
            };
        }
        tracing::debug!("guest error: {error:?}");
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
            None => GuestFailure::Trapped(format!("{error:#}")),
        }
    }

    fn new_store(&self, deadline: Option<Instant>) -> Store<GuestState> {
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HOST_RESOURCES);
        let state = GuestState {
            wasi: WasiCtxBuilder::new()
                .stdout(GuestOutput::new("stdout"))
                .stderr(GuestOutput::new("stderr"))
                .envs(&self.env)
                .build(),
            http: WasiHttpCtx::new(),
            table,
            hooks: OutboundHttp {
                client: Arc::clone(&self.outbound),
                deadline,
            },
            limiter: MemoryLimiter::new(self.memory_limit, self.metrics.clone()),
            memory_limit: self.memory_limit,
            memory_budget: self.memory_budget,
            capabilities: Arc::clone(&self.capabilities),
            streams: Default::default(),
            slices: Default::default(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        // Every epoch tick the guest yields its thread; past the deadline it is stopped.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut context| {
            context.data_mut().slices.slice_ended();
            match deadline {
                Some(deadline) if Instant::now() >= deadline => Err(DeadlineExceeded.into()),
                _ => Ok(UpdateDeadline::Yield(1)),
            }
        });
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
}

impl GuestState {
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
