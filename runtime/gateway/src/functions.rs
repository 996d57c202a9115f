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

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Limited};
use patchbay_bus::Deadline;
use patchbay_bus::resilience::{FailureKind, Target};
use patchbay_host::registry::{FunctionSpec, HTTP_ROUTE_WILDCARD, Registry, Trigger};
use patchbay_host::{Engine, HttpCode, HttpInvokeError, Limits};
use patchbay_telemetry::ReadyFlag;
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
    let mut entries = match registry.specs().watch_with_history(">").await {
        Ok(entries) => entries,
        Err(e) => return tracing::error!(error = %e, "cannot watch the function registry"),
    };
    while let Some(entry) = entries.next().await {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!(error = %e, "registry watch error");
                continue;
            }
        };
        match entry.operation {
            kv::Operation::Put => match patchbay_host::registry::decode(&entry.key, &entry.value) {
                Ok(spec) => apply(&state, &registry, spec).await,
                Err(e) => tracing::error!(error = %e, "ignoring corrupt function spec"),
            },
            kv::Operation::Delete | kv::Operation::Purge => unmount(&state, &entry.key),
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
    let mounted = Mounted {
        name: spec.name.clone(),
        version: version.version,
        route: route.clone(),
        digest: version.digest.clone(),
        code,
        limits,
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
        Ok(()) => call(&state, &function, request).await,
        Err(problem) => problem.into_response(),
    };
    response.extensions_mut().insert(label);
    response
}

fn authorize(caller: Result<Caller, Problem>, function: &Mounted) -> Result<(), Problem> {
    caller?.may_invoke(&function.name)
}

async fn call(state: &Shared, function: &Mounted, request: Request) -> Response {
    let (deadline, bus_deadline) = match crate::bus_routes::timeout(state, request.headers()) {
        Ok(timeout) => (
            Instant::now() + timeout,
            Deadline::after(state.bus.clock(), timeout),
        ),
        Err(problem) => return problem.into_response(),
    };
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
    let run = async {
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
        (result, failed)
    };
    let result = match state
        .resilience
        .once(&target, Some(bus_deadline), run)
        .await
    {
        Ok(result) => result,
        Err(rejected) => {
            return Problem::refused_by_policy(rejected, &target.to_string()).into_response();
        }
    };
    match result {
        Ok(response) => response.map(Body::new),
        Err(e) => {
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
