//! HTTP functions: `wasi:http/proxy` components deployed with `--trigger http:<route>`,
//! run inside the gateway process.
//!
//! The gateway watches the same registry as runtime nodes and keeps a route table of the
//! HTTP functions' active versions; a deploy, rollback or removal takes effect on every
//! gateway without a restart, and a request already running finishes on the version it
//! started with. A request reaches a function when no gateway route matched (the
//! gateway's own `/v1/…` and `/openapi.json` always win): an exact route first, then the
//! longest prefix route (`/crm/...`). The component sees the original path and query.
//!
//! Callers need a token with `invoke:<function>` (or `admin`); the request body streams
//! into the guest (bounded by `max_function_body_bytes`), the response streams out while
//! the guest writes it.
//!
//! The same protections as a runtime node's invocations:
//!
//! * **Memory budget.** Every request reserves its version's memory limit from the
//!   gateway's budget (`--memory-budget`, [`patchbay_engine::MemoryBudget`]) before its
//!   instance exists, and holds it until the response body is done. What does not fit waits
//!   at most half of the request's deadline, then is shed: `503` problem `overloaded` with
//!   `Retry-After`, counted in `patchbay_fn_shed_total{function,reason="memory"}`. A
//!   version whose limit exceeds the whole budget is not mounted (the previous one stays).
//! * **Hop chain.** A request enters the chain it carries in `patchbay-hops` (or starts
//!   one) as `fn/<name>`, and is served inside it ([`patchbay_bus::hops::scope`]), so
//!   whatever is sent on its behalf carries it (`wasi:http` components have no bus imports
//!   of their own today). A request already at the hop limit is refused: `508` problem
//!   `hop-limit` naming the chain, counted in
//!   `patchbay_gateway_refused_total{reason="hop-limit"}`; an unreadable chain is `400`.
//! * **Panic containment.** A panic while serving a request ends that request only: `500`
//!   problem before the response started, an aborted body after.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt as _;
use http::StatusCode;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use patchbay_bus::Deadline;
use patchbay_bus::hops::HOPS_HEADER;
use patchbay_bus::resilience::{FailureKind, Target};
use patchbay_engine::limits::BudgetError;
use patchbay_engine::{Engine, HttpCode, HttpInvokeError, Limits, MemoryBudget, MemoryReservation};
use patchbay_registry::{Change, FunctionSpec, HTTP_ROUTE_WILDCARD, Registry, Trigger};
use patchbay_telemetry::{Metrics, ReadyFlag};
use prometheus::{IntCounter, IntCounterVec};
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};

use crate::auth::Caller;
use crate::observe::RouteLabel;
use crate::problem::Problem;
use crate::server::Shared;

/// One HTTP function's active version, ready to serve.
#[derive(Debug)]
pub struct Mounted {
    /// Function name.
    pub name: String,
    /// Active version.
    pub version: u32,
    /// The route as deployed (`/hello`, `/crm/...`).
    pub route: String,
    /// Digest of the component.
    pub digest: String,
    code: HttpCode,
    limits: Limits,
    /// What each request reserves from the memory budget, bytes: the version's memory
    /// limit, cut to the engine's per-instance ceiling.
    memory_bytes: u64,
}

impl Mounted {
    /// The path a route matches exactly, or the prefix it matches below.
    fn matches(&self, path: &str) -> Option<usize> {
        match self.route.strip_suffix(HTTP_ROUTE_WILDCARD) {
            None => (path == self.route).then_some(usize::MAX),
            Some(base) => {
                let below = base.is_empty()
                    || path == base
                    || path
                        .strip_prefix(base)
                        .is_some_and(|rest| rest.starts_with('/'));
                below.then_some(base.len())
            }
        }
    }
}

/// The route table: function name → its mounted active version.
#[derive(Debug, Default)]
pub struct HttpFunctions {
    mounted: RwLock<HashMap<String, Arc<Mounted>>>,
}

impl HttpFunctions {
    /// The function serving `path`: an exact route first, then the longest prefix.
    #[must_use]
    pub fn find(&self, path: &str) -> Option<Arc<Mounted>> {
        let mounted = self.mounted.read().unwrap_or_else(PoisonError::into_inner);
        mounted
            .values()
            .filter_map(|m| m.matches(path).map(|score| (score, m)))
            .max_by_key(|(score, m)| (*score, std::cmp::Reverse(m.name.clone())))
            .map(|(_, m)| Arc::clone(m))
    }

    /// The route of function `name`, if it is an HTTP function served here.
    #[must_use]
    pub fn route_of(&self, name: &str) -> Option<String> {
        self.mounted
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(|m| m.route.clone())
    }

    /// Every mounted function.
    #[must_use]
    pub fn all(&self) -> Vec<Arc<Mounted>> {
        self.mounted
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn insert(&self, mounted: Mounted) -> Option<Arc<Mounted>> {
        self.mounted
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(mounted.name.clone(), Arc::new(mounted))
    }

    fn remove(&self, name: &str) -> Option<Arc<Mounted>> {
        self.mounted
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
    }
}

/// Keep the route table in step with the registry until the watch ends.
pub async fn watch(state: Shared, registry: Registry, ready: ReadyFlag) {
    match registry.list().await {
        Ok(specs) => {
            for spec in specs {
                apply(&state, &registry, spec).await;
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot list the function registry"),
    }
    ready.set_ready(true);
    let mut changes = match registry.changes().await {
        Ok(changes) => std::pin::pin!(changes),
        Err(e) => return tracing::error!(error = %e, "cannot watch the function registry"),
    };
    while let Some(change) = changes.next().await {
        match change {
            Change::Stored(spec) => apply(&state, &registry, spec).await,
            Change::Removed(name) => unmount(&state, &name),
        }
    }
    tracing::error!("registry watch ended");
}

async fn apply(state: &Shared, registry: &Registry, spec: FunctionSpec) {
    let version = match spec.active_version() {
        Ok(v) => v.clone(),
        Err(e) => {
            return tracing::error!(function = %spec.name, error = %e, "ignoring function spec");
        }
    };
    let Trigger::Http { route } = &version.trigger else {
        // Not (or no longer) an HTTP function.
        return unmount(state, &spec.name);
    };
    let current = state.functions.route_of(&spec.name).and_then(|_| {
        state
            .functions
            .all()
            .into_iter()
            .find(|m| m.name == spec.name)
    });
    if current
        .as_ref()
        .is_some_and(|m| m.version == version.version && &m.route == route)
    {
        return;
    }
    let code = match load(&state.engine, registry, &version.digest).await {
        Ok(code) => code,
        Err(e) => {
            return tracing::error!(function = %spec.name, version = version.version, error = %e,
                "cannot load HTTP function; keeping the previous version");
        }
    };
    let limits = Limits {
        timeout: version.limits.timeout(),
        max_memory_bytes: usize::try_from(version.limits.memory_bytes).unwrap_or(usize::MAX),
        ..Limits::default()
    };
    let memory_bytes = state.engine.instance_memory_bytes(&limits) as u64;
    let budget = state.engine.memory_budget();
    if budget.instances(memory_bytes) == 0 {
        return tracing::error!(
            function = %spec.name,
            version = version.version,
            memory_mib = memory_bytes >> 20,
            budget_mib = budget.total_bytes() >> 20,
            "cannot serve HTTP function version: one instance's memory limit exceeds this gateway's whole memory budget; keeping the previous version"
        );
    }
    let mounted = Mounted {
        name: spec.name.clone(),
        version: version.version,
        route: route.clone(),
        digest: version.digest.clone(),
        code,
        limits,
        memory_bytes,
    };
    tracing::info!(function = %spec.name, version = version.version, route = %route, "serving HTTP function");
    state
        .metrics
        .functions
        .with_label_values(&[
            spec.name.as_str(),
            &version.version.to_string(),
            route.as_str(),
        ])
        .set(1.0);
    if let Some(old) = state.functions.insert(mounted) {
        forget_gauge(state, &old);
    }
}

fn unmount(state: &Shared, name: &str) {
    if let Some(old) = state.functions.remove(name) {
        tracing::info!(function = %name, "no longer serving HTTP function");
        forget_gauge(state, &old);
    }
}

fn forget_gauge(state: &Shared, old: &Mounted) {
    if let Some(current) = state.functions.find(&old.route)
        && current.name == old.name
        && current.version == old.version
    {
        return;
    }
    let _ = state.metrics.functions.remove_label_values(&[
        old.name.as_str(),
        &old.version.to_string(),
        old.route.as_str(),
    ]);
}

async fn load(engine: &Engine, registry: &Registry, digest: &str) -> Result<HttpCode, String> {
    let bytes = registry
        .get_artifact(digest)
        .await
        .map_err(|e| e.to_string())?;
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || engine.load_http(&bytes))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// The gateway's fallback: serve the request with the HTTP function whose route matches.
pub async fn serve(
    State(state): State<Shared>,
    caller: Result<Caller, Problem>,
    request: Request,
) -> Response {
    let path = request.uri().path().to_owned();
    let Some(function) = state.functions.find(&path) else {
        return Problem::not_found()
            .with_detail(format!("no route or HTTP function serves {path}"))
            .into_response();
    };
    let label = RouteLabel(format!("fn:{}", function.name));
    let mut response = match authorize(caller, &function) {
        Ok(()) => contained(&function.name, call(&state, &function, request)).await,
        Err(problem) => problem.into_response(),
    };
    response.extensions_mut().insert(label);
    response
}

fn authorize(caller: Result<Caller, Problem>, function: &Mounted) -> Result<(), Problem> {
    caller?.may_invoke(&function.name)
}

/// Serve `work` (one request), turning a panic into a `500` problem for that request.
async fn contained(function: &str, work: impl Future<Output = Response>) -> Response {
    match patchbay_bus::pull::contain_panic(work).await {
        Ok(response) => response,
        Err(reason) => {
            tracing::error!(function, %reason, "serving an HTTP function request panicked");
            Problem::internal().into_response()
        }
    }
}

async fn call(state: &Shared, function: &Mounted, request: Request) -> Response {
    let hops = match enter_hop(state, request.headers(), &format!("fn/{}", function.name)) {
        Ok(hops) => hops,
        Err(problem) => return problem.into_response(),
    };
    patchbay_bus::hops::scope(hops, run(state, function, request)).await
}

/// The hop chain a request to `handler` continues (or starts): `400` for an unreadable
/// `patchbay-hops`, `508` (counted, logged) past the hop limit. Every gateway route
/// serves its request inside the chain this returns, so what it publishes carries it.
pub(crate) fn enter_hop(
    state: &Shared,
    headers: &http::HeaderMap,
    handler: &str,
) -> Result<patchbay_bus::hops::HopChain, Problem> {
    let carried = request_hops(headers)?;
    state
        .bus
        .enter_hop(Some(&carried), handler)
        .map_err(|refused| {
            state
                .metrics
                .refused
                .with_label_values(&["hop-limit"])
                .inc();
            tracing::warn!(handler, %refused, "refused a request at the hop limit");
            hop_limit(&refused)
        })
}

/// The `patchbay-hops` chain a request carries, as the bus reads it (several header lines
/// are one chain, in order); `400` when a value is not visible ASCII.
fn request_hops(headers: &http::HeaderMap) -> Result<async_nats::HeaderMap, Problem> {
    let mut carried = async_nats::HeaderMap::new();
    let mut values = Vec::new();
    for value in headers.get_all(HOPS_HEADER) {
        values.push(value.to_str().map_err(|_| {
            Problem::bad_request(format!(
                "{HOPS_HEADER} must list handler names in visible ASCII, comma-separated"
            ))
        })?);
    }
    if !values.is_empty() {
        carried.insert(HOPS_HEADER, values.join(",").as_str());
    }
    Ok(carried)
}

/// `508`: the request has passed through as many handlers as the hop limit allows.
fn hop_limit(refused: &patchbay_bus::hops::HopLimitExceeded) -> Problem {
    Problem::typed(StatusCode::LOOP_DETECTED, "hop-limit", "Hop limit exceeded")
        .with_detail(refused.to_string())
}

/// What the HTTP functions export besides the per-route request metrics.
#[derive(Clone, Debug)]
pub struct FunctionMetrics {
    /// `patchbay_fn_shed_total{function,reason}`, the runtime nodes' family: requests
    /// refused before they started because no memory was free in time (`memory`).
    pub shed: IntCounterVec,
}

impl FunctionMetrics {
    /// Register the HTTP functions' metrics.
    pub fn register(metrics: &Metrics) -> Result<Self, patchbay_telemetry::TelemetryError> {
        Ok(Self {
            shed: metrics.counter_vec(
                "patchbay_fn_shed_total",
                "Invocations refused before they started because the node could not take them in time.",
                &["function", "reason"],
            )?,
        })
    }
}

/// Reserve `bytes` from `budget` for a request with `timeout` left, waiting at most half
/// of it (past that the function could do little of its work, and the refusal still
/// reaches a caller who gives up at the deadline); what cannot start in time is counted
/// in `shed` and answered `503` with `Retry-After`.
async fn reserve_memory(
    budget: &MemoryBudget,
    bytes: u64,
    timeout: Duration,
    shed: &IntCounter,
) -> Result<MemoryReservation, Problem> {
    let refused = match budget.try_reserve(bytes) {
        Ok(memory) => return Ok(memory),
        Err(refused @ BudgetError::TooLarge { .. }) => refused,
        Err(BudgetError::Exhausted { .. }) => {
            let now = tokio::time::Instant::now();
            let until = now.checked_add(timeout / 2).unwrap_or(now);
            match budget.reserve(bytes, until).await {
                Ok(memory) => return Ok(memory),
                Err(refused) => refused,
            }
        }
    };
    shed.inc();
    tracing::warn!(error = %refused, "shed an HTTP function request: no memory to run it in time");
    Err(
        Problem::typed(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "Overloaded")
            .with_detail(refused.to_string())
            .with_retry_after(Duration::from_secs(1)),
    )
}

/// Why a request produced no response of the function's.
enum NotServed {
    /// No memory in time.
    Shed(Problem),
    /// The invocation failed.
    Failed(HttpInvokeError),
}

async fn run(state: &Shared, function: &Mounted, request: Request) -> Response {
    let timeout = match crate::bus_routes::timeout(state, request.headers()) {
        Ok(timeout) => timeout,
        Err(problem) => return problem.into_response(),
    };
    let (deadline, bus_deadline) = (
        Instant::now() + timeout,
        Deadline::after(state.bus.clock(), timeout),
    );
    let limit = state.config.max_function_body_bytes;
    let (mut parts, body) = request.into_parts();
    if parts.uri.authority().is_none() && !parts.headers.contains_key(http::header::HOST) {
        // wasi:http needs an authority; HTTP/1.0 clients may send none.
        parts.headers.insert(
            http::header::HOST,
            http::HeaderValue::from_static("localhost"),
        );
    }
    let body = Limited::new(body, limit).map_err(move |e| -> wasmtime_wasi_http::Error {
        if e.is::<http_body_util::LengthLimitError>() {
            ErrorCode::HttpRequestBodySize(Some(limit as u64)).into()
        } else if crate::body::BodyTimeout::is_cause_of(&*e) {
            // The client stalled (`body_idle_timeout`).
            ErrorCode::ConnectionReadTimeout.into()
        } else {
            // The client went away or sent a malformed body.
            ErrorCode::HttpProtocolError.into()
        }
    });
    let request = http::Request::from_parts(parts, body);
    let scheme = if state.config.tls.is_some() {
        Scheme::Https
    } else {
        Scheme::Http
    };
    let target = Target::Route(function.route.clone());
    // One attempt (the body streams, so it cannot be replayed) under the route's breaker,
    // concurrency limit and deadline; a 5xx or a failed invocation counts as a failure.
    let shed = state
        .function_metrics
        .shed
        .with_label_values(&[function.name.as_str(), "memory"]);
    let invoke = async {
        // Before the instance exists; held until the response body is done (the guest
        // writes it), not just until the head.
        let memory = match reserve_memory(
            state.engine.memory_budget(),
            function.memory_bytes,
            timeout,
            &shed,
        )
        .await
        {
            Ok(memory) => memory,
            // Not the function's failure: the breaker does not count it.
            Err(problem) => return (Err(NotServed::Shed(problem)), None),
        };
        let result = function
            .code
            .handle(
                &state.engine,
                request,
                scheme,
                &function.limits,
                Some(deadline),
            )
            .await;
        let failed = match &result {
            Ok(response) if response.status().is_server_error() => Some(FailureKind::Error),
            Ok(_) => None,
            Err(HttpInvokeError::Timeout { .. }) => Some(FailureKind::Timeout),
            Err(_) => Some(FailureKind::Error),
        };
        let result = result
            .map(|response| (response, memory))
            .map_err(NotServed::Failed);
        (result, failed)
    };
    let result = match state
        .resilience
        .once(&target, Some(bus_deadline), invoke)
        .await
    {
        Ok(result) => result,
        Err(rejected) => {
            return Problem::refused_by_policy(rejected, &target.to_string()).into_response();
        }
    };
    match result {
        Ok((response, memory)) => {
            let name = function.name.clone();
            let until = tokio::time::Instant::from_std(deadline);
            response.map(|body| Body::new(FunctionBody::new(body, memory, until, name)))
        }
        Err(NotServed::Shed(problem)) => problem.into_response(),
        Err(NotServed::Failed(e)) => {
            tracing::warn!(function = %function.name, version = function.version, error = %e, "HTTP function failed");
            match e {
                HttpInvokeError::Timeout { .. } => Problem::gateway_timeout(format!(
                    "{} did not respond before the deadline",
                    function.name
                )),
                HttpInvokeError::AtCapacity { .. } => {
                    Problem::service_unavailable("no free instance slot; retry shortly".to_owned())
                        .with_retry_after(Duration::from_secs(1))
                }
                HttpInvokeError::ErrorCode { .. } | HttpInvokeError::Trap { .. } => {
                    Problem::internal()
                }
            }
            .into_response()
        }
    }
}

/// A function's response body: holds the request's memory reservation while the guest
/// may still be running (it writes the body as the client reads it), and turns a panic
/// while the body is produced into an error that ends this response only.
///
/// A body read to its end means the guest finished writing: the memory goes back when it
/// is dropped. A body dropped before (the client went away, a panic) leaves a guest that
/// may run on until its deadline, so the memory is held until then.
struct FunctionBody<B> {
    inner: B,
    memory: Option<MemoryReservation>,
    /// When the guest is stopped at the latest.
    deadline: tokio::time::Instant,
    function: String,
    ended: bool,
    panicked: bool,
}

impl<B> FunctionBody<B> {
    fn new(
        inner: B,
        memory: MemoryReservation,
        deadline: tokio::time::Instant,
        function: String,
    ) -> Self {
        Self {
            inner,
            memory: Some(memory),
            deadline,
            function,
            ended: false,
            panicked: false,
        }
    }
}

impl<B> Drop for FunctionBody<B> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (Some(memory), Ok(runtime)) =
            (self.memory.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let deadline = self.deadline;
        runtime.spawn(async move {
            tokio::time::sleep_until(deadline).await;
            drop(memory);
        });
    }
}

impl<B> HttpBody for FunctionBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.panicked {
            return Poll::Ready(None);
        }
        let inner = &mut this.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll_frame(cx))) {
            Ok(Poll::Ready(None)) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Ok(poll) => poll.map(|frame| frame.map(|f| f.map_err(Into::into))),
            Err(payload) => {
                let reason = patchbay_bus::pull::panic_message(payload.as_ref());
                tracing::error!(function = %this.function, %reason, "producing an HTTP function's response body panicked; aborting that response");
                this.panicked = true;
                Poll::Ready(Some(Err(reason.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.panicked || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use patchbay_bus::hops::HopChain;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn counter() -> IntCounter {
        IntCounter::new("shed_test_total", "t").unwrap()
    }

    #[tokio::test]
    async fn a_panic_while_serving_becomes_a_500_problem_for_that_request_only() {
        let calm = contained("f", async { StatusCode::OK.into_response() }).await;
        assert_eq!(calm.status(), StatusCode::OK);
        let panicked = contained("f", async {
            if calm.status().is_success() {
                panic!("bug in the HTTP function path");
            }
            StatusCode::OK.into_response()
        })
        .await;
        assert_eq!(panicked.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            panicked.headers()[http::header::CONTENT_TYPE],
            crate::problem::PROBLEM_JSON
        );
        let body = panicked.into_body().collect().await.unwrap().to_bytes();
        assert!(
            !String::from_utf8_lossy(&body).contains("bug in"),
            "the panic message is logged, not sent"
        );
    }

    #[test]
    fn a_request_continues_the_chain_it_carries_and_is_refused_at_the_limit() {
        let mut headers = http::HeaderMap::new();
        let none = request_hops(&headers).unwrap();
        let started = HopChain::from_headers(Some(&none))
            .enter("fn/crm", 3)
            .unwrap();
        assert_eq!(started.handlers(), ["fn/crm"]);

        headers.append(HOPS_HEADER, "gateway/a".parse().unwrap());
        headers.append(HOPS_HEADER, "fn/b".parse().unwrap());
        let carried = request_hops(&headers).unwrap();
        let continued = HopChain::from_headers(Some(&carried))
            .enter("fn/crm", 3)
            .unwrap();
        assert_eq!(continued.handlers(), ["gateway/a", "fn/b", "fn/crm"]);

        headers.append(HOPS_HEADER, "fn/c".parse().unwrap());
        let at_limit = request_hops(&headers).unwrap();
        let refused = HopChain::from_headers(Some(&at_limit))
            .enter("fn/crm", 3)
            .unwrap_err();
        let problem = hop_limit(&refused);
        assert_eq!(problem.status, StatusCode::LOOP_DETECTED);
        assert!(problem.type_uri.ends_with("/hop-limit"), "{problem:?}");
        let detail = problem.detail.unwrap();
        assert!(detail.contains("gateway/a,fn/b,fn/c,fn/crm"), "{detail}");
    }

    #[test]
    fn an_unreadable_chain_is_a_bad_request() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            HOPS_HEADER,
            http::HeaderValue::from_bytes(b"fn/\xff").unwrap(),
        );
        let problem = request_hops(&headers).unwrap_err();
        assert_eq!(problem.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_finds_no_memory_in_half_its_deadline_is_shed_with_503_and_counted() {
        let budget = MemoryBudget::new(100 * MIB);
        let shed = counter();
        let held = reserve_memory(&budget, 64 * MIB, Duration::from_secs(4), &shed)
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let problem = reserve_memory(&budget, 64 * MIB, Duration::from_secs(4), &shed)
            .await
            .unwrap_err();
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "waited half its deadline"
        );
        assert_eq!(problem.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(problem.retry_after(), Some(Duration::from_secs(1)));
        assert!(problem.type_uri.ends_with("/overloaded"), "{problem:?}");
        assert_eq!(shed.get(), 1);

        // Memory given back while one waits: it starts.
        let waiter = {
            let (budget, shed) = (budget.clone(), shed.clone());
            tokio::spawn(async move {
                reserve_memory(&budget, 64 * MIB, Duration::from_secs(4), &shed).await
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(held);
        let started = waiter.await.unwrap().unwrap();
        assert_eq!(started.bytes(), 64 * MIB);
        assert_eq!(shed.get(), 1);
    }

    /// A body yielding `chunks` frames, then panicking if `panic_after` says so.
    struct TestBody {
        chunks: usize,
        panic_after: bool,
    }

    impl HttpBody for TestBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.chunks > 0 {
                self.chunks -= 1;
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))));
            }
            if self.panic_after {
                panic!("body stream bug");
            }
            Poll::Ready(None)
        }
    }

    fn body(budget: &MemoryBudget, inner: TestBody, deadline: Duration) -> Body {
        let memory = budget.try_reserve(64 * MIB).unwrap();
        let until = tokio::time::Instant::now() + deadline;
        Body::new(FunctionBody::new(inner, memory, until, "f".into()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_read_to_its_end_gives_the_memory_back() {
        let budget = MemoryBudget::new(100 * MIB);
        let b = body(
            &budget,
            TestBody {
                chunks: 2,
                panic_after: false,
            },
            Duration::from_secs(30),
        );
        assert_eq!(budget.reserved_bytes(), 64 * MIB, "held while streaming");
        assert_eq!(b.collect().await.unwrap().to_bytes(), "xx");
        assert_eq!(budget.reserved_bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_dropped_early_holds_the_memory_until_the_guest_deadline() {
        let budget = MemoryBudget::new(100 * MIB);
        let b = body(
            &budget,
            TestBody {
                chunks: 2,
                panic_after: false,
            },
            Duration::from_secs(10),
        );
        drop(b);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(budget.reserved_bytes(), 64 * MIB, "the guest may still run");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(budget.reserved_bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_while_the_body_streams_ends_that_body_with_an_error() {
        let budget = MemoryBudget::new(100 * MIB);
        let mut b = body(
            &budget,
            TestBody {
                chunks: 1,
                panic_after: true,
            },
            Duration::from_secs(5),
        );
        let first = b.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "x");
        let failed = b.frame().await.unwrap().unwrap_err();
        assert!(failed.to_string().contains("body stream bug"), "{failed}");
        assert!(b.frame().await.is_none(), "nothing after the error");
        drop(b);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(budget.reserved_bytes(), 0);
    }
}
