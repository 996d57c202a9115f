//! HTTP functions: components targeting the standard `wasi:http/proxy` world, served one
//! fresh instance per request, with bodies streaming both ways.
//!
//! The same engine (pooling allocator, epoch thread, compile cache) runs them beside event
//! functions; only the linker differs: WASI p2 plus `wasi:http`, and no Patchbay imports,
//! so a component that `wasmtime serve` runs runs here unchanged. Outgoing HTTP requests
//! are refused (`HTTP-request-denied`) — a function reaches nothing it was not given.
//!
//! Not here: routing, authentication, limits on request bodies, metrics — the gateway does
//! those around [`HttpCode::handle`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use super::Engine;
use super::load::{LoadError, check_header, digest_of};
use crate::limits::{CallLimiter, Limits};

/// The export every `wasi:http/proxy` component has (any 0.2.x version).
pub const INCOMING_HANDLER_EXPORT: &str = "wasi:http/incoming-handler";

/// The response of an HTTP function; its body streams while the guest writes it.
pub type HttpResponse = hyper::Response<HyperOutgoingBody>;

/// A compiled, checked and pre-linked HTTP function. Cheap to clone.
#[derive(Clone)]
pub struct HttpCode {
    inner: Arc<HttpInner>,
}

struct HttpInner {
    digest: String,
    size: usize,
    pre: ProxyPre<HttpState>,
}

impl std::fmt::Debug for HttpCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCode")
            .field("digest", &self.inner.digest)
            .field("size", &self.inner.size)
            .finish()
    }
}

/// Why an HTTP function produced no response.
#[derive(Debug, thiserror::Error)]
pub enum HttpInvokeError {
    /// The pool has no free slot (the engine's `max_concurrent_instances`).
    #[error("no free instance slot: {reason}")]
    AtCapacity {
        /// wasmtime's explanation.
        reason: String,
    },
    /// The deadline passed before the guest set a response.
    #[error("no response within {elapsed:?}")]
    Timeout {
        /// Time spent.
        elapsed: Duration,
    },
    /// The guest answered with a `wasi:http` error code instead of a response.
    #[error("the function answered with error code {code:?}")]
    ErrorCode {
        /// The code.
        code: String,
    },
    /// The guest trapped, or returned without setting a response.
    #[error("the function failed: {reason}")]
    Trap {
        /// The trap and whatever the guest wrote to stderr.
        reason: String,
    },
}

impl HttpInvokeError {
    /// A stable label for metrics and logs.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AtCapacity { .. } => "at-capacity",
            Self::Timeout { .. } => "timeout",
            Self::ErrorCode { .. } => "error-code",
            Self::Trap { .. } => "trap",
        }
    }
}

/// The data of one HTTP function's store.
pub(crate) struct HttpState {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    hooks: DenyOutgoing,
    limiter: CallLimiter,
    deadline: Instant,
}

impl WasiView for HttpState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HttpState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Refuses every outgoing request: HTTP functions get no network of their own.
struct DenyOutgoing;

impl WasiHttpHooks for DenyOutgoing {
    fn send_request(
        &mut self,
        _request: http::Request<WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

pub(crate) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<HttpState>,
) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)
}

impl Engine {
    /// Check, compile and pre-link a `wasi:http/proxy` component (blocking, like
    /// [`Engine::load`]).
    pub fn load_http(&self, bytes: &[u8]) -> Result<HttpCode, LoadError> {
        let max = self.inner.config.max_component_bytes;
        if bytes.len() > max {
            return Err(LoadError::TooLarge {
                size: bytes.len(),
                max,
            });
        }
        check_header(bytes)?;
        let digest = digest_of(bytes);
        let (component, _origin) = self.compile_or_read_cache(&digest, bytes)?;
        let pre = self.link_http(&component)?;
        Ok(HttpCode {
            inner: Arc::new(HttpInner {
                digest,
                size: bytes.len(),
                pre,
            }),
        })
    }

    fn link_http(&self, component: &Component) -> Result<ProxyPre<HttpState>, LoadError> {
        let engine = &self.inner.wasmtime;
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let world_mismatch = || LoadError::WorldMismatch {
            expected: format!("{INCOMING_HANDLER_EXPORT} (the wasi:http/proxy world)"),
            found: exports.clone(),
        };
        if !exports
            .iter()
            .any(|name| name.split('@').next() == Some(INCOMING_HANDLER_EXPORT))
        {
            return Err(world_mismatch());
        }
        let instance_pre = self
            .inner
            .http_linker
            .instantiate_pre(component)
            .map_err(|e| {
                let reason = format!("{e:#}");
                let import = ty
                    .imports(engine)
                    .map(|(name, _)| name)
                    .find(|name| reason.contains(name))
                    .unwrap_or("<unknown>")
                    .to_owned();
                LoadError::UnsatisfiedImport { import, reason }
            })?;
        ProxyPre::new(instance_pre).map_err(|_| world_mismatch())
    }
}

impl HttpCode {
    /// Lower-case hex sha256 of the component bytes.
    #[must_use]
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    /// Serve one request in a fresh instance.
    ///
    /// Returns as soon as the guest sets the response (status and headers); the body then
    /// streams while the guest keeps writing, on a task of its own that ends at the
    /// deadline (the earlier of `deadline` and now + `limits.timeout`) at the latest.
    /// The request body streams into the guest as it reads.
    pub async fn handle<B>(
        &self,
        engine: &Engine,
        request: hyper::Request<B>,
        scheme: Scheme,
        limits: &Limits,
        deadline: Option<Instant>,
    ) -> Result<HttpResponse, HttpInvokeError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let start = Instant::now();
        let own = start + limits.timeout;
        let deadline = deadline.map_or(own, |d| d.min(own));
        if deadline <= start {
            return Err(HttpInvokeError::Timeout {
                elapsed: Duration::ZERO,
            });
        }
        let capture = engine.inner.config.max_captured_output_bytes;
        let stderr = MemoryOutputPipe::new(capture.max(1));
        let mut wasi = WasiCtxBuilder::new();
        wasi.allow_tcp(false)
            .allow_udp(false)
            .stderr(stderr.clone());
        let max_memory_bytes = engine.instance_memory_bytes(limits);
        let state = HttpState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            hooks: DenyOutgoing,
            limiter: CallLimiter::new(max_memory_bytes),
            deadline,
        };
        let mut store = Store::new(&engine.inner.wasmtime, state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|store| {
            Ok(if Instant::now() >= store.data().deadline {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        let trap = |e: wasmtime::Error| HttpInvokeError::Trap {
            reason: format!("{e:#}"),
        };
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(scheme, request)
            .map_err(trap)?;
        let out = store
            .data_mut()
            .http()
            .new_response_outparam(sender)
            .map_err(trap)?;
        let pre = self.inner.pre.clone();
        let digest = self.inner.digest.clone();
        // The guest keeps running after it set the response (it is still writing the
        // body), so it runs on its own task, bounded by the deadline.
        let task = tokio::spawn(async move {
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
            };
            let result = tokio::time::timeout_at(deadline.into(), run).await;
            match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    let stderr = String::from_utf8_lossy(&stderr.contents()).into_owned();
                    Err(classify(e, &stderr, start))
                }
                Err(_) => Err(HttpInvokeError::Timeout {
                    elapsed: start.elapsed(),
                }),
            }
            .inspect_err(|e| tracing::debug!(digest, error = %e, "http function ended badly"))
        });
        match receiver.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(code)) => Err(HttpInvokeError::ErrorCode {
                code: format!("{code:?}"),
            }),
            // The outparam was dropped unset: the task says why.
            Err(_) => Err(match task.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => HttpInvokeError::Trap {
                    reason: "the function returned without setting a response".into(),
                },
                Err(e) => HttpInvokeError::Trap {
                    reason: format!("the function's task failed: {e}"),
                },
            }),
        }
    }
}

fn classify(error: wasmtime::Error, stderr: &str, start: Instant) -> HttpInvokeError {
    if let Some(wasmtime::Trap::Interrupt) = error.downcast_ref::<wasmtime::Trap>() {
        return HttpInvokeError::Timeout {
            elapsed: start.elapsed(),
        };
    }
    if let Some(limit) = error.downcast_ref::<wasmtime::PoolConcurrencyLimitError>() {
        return HttpInvokeError::AtCapacity {
            reason: limit.to_string(),
        };
    }
    let stderr = stderr.trim();
    let reason = if stderr.is_empty() {
        format!("{error:#}")
    } else {
        format!("{stderr}\n{error:#}")
    };
    HttpInvokeError::Trap { reason }
}
