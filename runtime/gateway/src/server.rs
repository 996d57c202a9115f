//! The gateway process: state, router, listener (plain or TLS), graceful shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use patchbay_bus::Bus;
use patchbay_bus::resilience::Resilience;
use patchbay_engine::Engine;
use patchbay_registry::Registry;
use patchbay_telemetry::{Metrics, ReadyFlag};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::body::IdleTimeoutBody;
use crate::config::{GatewayConfig, TlsFiles};
use crate::connections::ConnectionLimits;
use crate::functions::{FunctionMetrics, HttpFunctions};
use crate::observe::{GatewayMetrics, observe};
use crate::ratelimit::RateLimiter;
use crate::token::TokenStore;

/// Why the gateway could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The bus connection failed.
    #[error(transparent)]
    Connect(#[from] patchbay_bus::ConnectError),
    /// The listener could not be bound.
    #[error("cannot listen on {address}")]
    Listen {
        /// The address.
        address: std::net::SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// TLS files could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The token store or registry could not be opened.
    #[error("{what}: {reason}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
}

/// Shared state of every handler.
pub struct AppState {
    pub(crate) bus: Bus,
    pub(crate) config: GatewayConfig,
    pub(crate) tokens: TokenStore,
    pub(crate) limiter: RateLimiter,
    pub(crate) metrics: GatewayMetrics,
    pub(crate) streams: StreamIndex,
    pub(crate) functions: HttpFunctions,
    /// Shed HTTP function requests (the runtime nodes' `patchbay_fn_shed_total`).
    pub(crate) function_metrics: FunctionMetrics,
    pub(crate) engine: Engine,
    /// Resilience policies of requests, invocations and HTTP function routes.
    pub(crate) resilience: Resilience,
    /// What the gateway's own bus identity may publish (see [`crate::bus_routes`]).
    pub(crate) grants: crate::bus_routes::GatewayGrants,
}

/// What handlers receive.
pub type Shared = Arc<AppState>;

/// Which stream stores a subject, asked once and remembered for a while (so a stream
/// created later is noticed without a restart).
#[derive(Default)]
pub struct StreamIndex {
    known: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

impl StreamIndex {
    const TTL: Duration = Duration::from_secs(10);
    const MAX_ENTRIES: usize = 10_000;

    /// The stream storing `subject`, if any. A failed lookup counts as "none" (the event
    /// is still published, at most once) and is not remembered.
    pub async fn stream_for(&self, bus: &Bus, subject: &str) -> Option<String> {
        if let Some((stream, at)) = self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(subject)
            && at.elapsed() < Self::TTL
        {
            return stream.clone();
        }
        use async_nats::jetstream::context::GetStreamByNameErrorKind as K;
        let stream = match bus.jetstream().stream_by_subject(subject).await {
            Ok(name) => Some(name),
            Err(e) if e.kind() == K::NotFound => None,
            Err(e) => {
                tracing::warn!(subject, error = %e, "cannot tell which stream stores the subject");
                return None;
            }
        };
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= Self::MAX_ENTRIES {
            known.retain(|_, (_, at)| at.elapsed() < Self::TTL);
        }
        known.insert(subject.to_owned(), (stream.clone(), Instant::now()));
        stream
    }
}

/// The public router (without state).
pub fn router(state: Shared) -> Router {
    let idle = state.config.body_idle_timeout;
    let body_timeouts = state.metrics.refused.with_label_values(&["body-timeout"]);
    Router::new()
        .route(
            "/v1/events/{subject}",
            post(crate::bus_routes::publish_event),
        )
        .route("/v1/request/{subject}", post(crate::bus_routes::request))
        .route(
            "/v1/functions/{name}/invoke",
            post(crate::bus_routes::invoke),
        )
        .route("/openapi.json", get(crate::openapi::document))
        .fallback(crate::functions::serve)
        // Span and metrics for every answer, refusals by the handlers included.
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            observe,
        ))
        // Outermost, so every route and HTTP function reads a body that cannot stall: a
        // client that stops sending must not hold a handler (and a connection) until it
        // gives up, so a body fails after `body_idle_timeout` without data.
        .layer(tower::util::MapRequestLayer::new(
            move |request: Request| {
                let counter = body_timeouts.clone();
                request.map(|body| Body::new(IdleTimeoutBody::new(body, idle, counter)))
            },
        ))
        .with_state(state)
}

/// Run a gateway until `shutdown` resolves, then stop accepting and drain in-flight
/// requests (bounded by `drain_timeout`).
pub async fn run(
    config: GatewayConfig,
    metrics: &Metrics,
    ready: ReadyFlag,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GatewayError> {
    let setup = |what: &'static str| {
        move |e: &dyn std::fmt::Display| GatewayError::Setup {
            what,
            reason: e.to_string(),
        }
    };
    check_limits(&config)?;
    let bus = patchbay_bus::connect(&config.bus).await?;
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| GatewayError::Listen {
                address: config.listen,
                source,
            })?;
    let local = listener
        .local_addr()
        .map_err(|source| GatewayError::Listen {
            address: config.listen,
            source,
        })?;
    if let Some(path) = &config.address_file {
        std::fs::write(path, local.to_string()).map_err(|e| setup("address file")(&e))?;
    }
    let tokens = TokenStore::open(&bus)
        .await
        .map_err(|e| setup("token store")(&e))?;
    let registry = Registry::open(&bus.jetstream())
        .await
        .map_err(|e| setup("function registry")(&e))?;
    let engine = Engine::new(config.engine.clone()).map_err(|e| setup("engine")(&e))?;
    let limiter = RateLimiter::new(
        Arc::new(patchbay_bus::SystemClock),
        config.rate_per_sec,
        config.burst,
    )
    .map_err(|e| setup("rate limit")(&e))?;
    let resilience = Resilience::start(&bus, metrics)
        .await
        .map_err(|e| setup("resilience metrics")(&e))?;
    let grants = crate::bus_routes::GatewayGrants::load(&bus).await;
    let state = Arc::new(AppState {
        grants,
        resilience,
        metrics: GatewayMetrics::new(metrics).map_err(|e| setup("metrics")(&e))?,
        bus,
        tokens,
        limiter,
        streams: StreamIndex::default(),
        functions: HttpFunctions::default(),
        function_metrics: FunctionMetrics::register(metrics)
            .map_err(|e| setup("function metrics")(&e))?,
        engine,
        config,
    });
    let watcher = tokio::spawn(crate::functions::watch(
        Arc::clone(&state),
        registry,
        ready.clone(),
    ));
    let discovery = crate::discovery::register(&state, local).await;
    tracing::info!(address = %local, tls = tls.is_some(), "gateway listening");

    let app = router(Arc::clone(&state));
    let builder = http_builder(&state.config);
    let limits = ConnectionLimits::new(
        state.config.max_connections,
        state.config.max_connections_per_ip,
    );
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Admission comes first: before TLS, before a byte of HTTP, before authentication.
        let permit = match limits.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                state
                    .metrics
                    .refused
                    .with_label_values(&[refusal.reason()])
                    .inc();
                tracing::debug!(%peer, %refusal, "connection refused");
                if tls.is_some() {
                    // With TLS an answer would cost a handshake per refused connection,
                    // which is exactly what an overloaded gateway must not spend: close.
                    drop(stream);
                } else {
                    limits.refuse(stream, refusal);
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Set when the connection's first request reaches the router (see below).
        let first_request = Arc::new(Notify::new());
        let arrived = Arc::clone(&first_request);
        let service = TowerToHyperService::new(app.clone().map_request(move |request| {
            arrived.notify_one();
            request
        }));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let header_timeout = state.config.header_read_timeout;
        let metrics = state.metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let serve = async {
                match tls {
                    None => {
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(stream) => {
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                    },
                }
            };
            tokio::pin!(serve);
            // hyper's own header timeout starts only once it knows the connection is
            // HTTP/1, so a client that sends nothing, stalls in the TLS handshake or the
            // HTTP/2 preface, would hold its socket forever. Until the first request
            // arrives, the whole connection has `header_read_timeout`; after it, hyper's
            // timer bounds every later request head on HTTP/1 (and so idle keep-alive).
            let served = tokio::select! {
                served = &mut serve => served,
                () = first_request.notified() => serve.await,
                () = tokio::time::sleep(header_timeout) => {
                    metrics.refused.with_label_values(&["header-timeout"]).inc();
                    return tracing::debug!(%peer, "no complete request in time: closing");
                }
            };
            match served {
                Ok(()) => {}
                Err(e) if is_header_timeout(&*e) => {
                    metrics.refused.with_label_values(&["header-timeout"]).inc();
                    tracing::debug!(%peer, "request head not complete in time: closed");
                }
                Err(e) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
            }
        });
    }
    tracing::info!("shutting down: draining in-flight requests");
    ready.set_ready(false);
    drop(listener);
    if tokio::time::timeout(state.config.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: closing the remaining connections");
    }
    watcher.abort();
    if let Some(discovery) = discovery {
        discovery.stop().await;
    }
    let _ = state.bus.client().flush().await;
    Ok(())
}

/// The connection builder: HTTP/1 and HTTP/2 with the header limits and timeouts of
/// `config`.
fn http_builder(config: &GatewayConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        // The read buffer bounds the request head; past it hyper answers 431 itself.
        .max_buf_size(config.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Whether a connection error is hyper's header-read timeout.
fn is_header_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// Refuse settings that would panic in hyper or shut every caller out.
fn check_limits(config: &GatewayConfig) -> Result<(), GatewayError> {
    let invalid = |reason: String| GatewayError::Setup {
        what: "connection limits",
        reason,
    };
    if config.max_connections == 0 || config.max_connections_per_ip == 0 {
        return Err(invalid(
            "max_connections and max_connections_per_ip must be at least 1".into(),
        ));
    }
    if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&config.max_header_bytes) {
        return Err(invalid(format!(
            "max_header_bytes must be between {MIN_HEADER_BYTES} and {MAX_HEADER_BYTES}, not {}",
            config.max_header_bytes
        )));
    }
    let timeouts = [
        ("header_read_timeout", config.header_read_timeout),
        ("body_idle_timeout", config.body_idle_timeout),
        ("body_read_timeout", config.body_read_timeout),
    ];
    if let Some((name, _)) = timeouts.iter().find(|(_, t)| t.is_zero()) {
        return Err(invalid(format!("{name} must be above zero")));
    }
    Ok(())
}

/// hyper's smallest read buffer.
const MIN_HEADER_BYTES: usize = 8 << 10;
/// Below JetStream's 64 KiB header limit with room for the headers the gateway adds
/// (trace context, deadline, de-duplication id), so a head the gateway accepts can
/// always be stored.
const MAX_HEADER_BYTES: usize = 48 << 10;

fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, GatewayError> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| GatewayError::Tls(format!("{}: {e}", files.cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| GatewayError::Tls(format!("{}: {e}", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| GatewayError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
