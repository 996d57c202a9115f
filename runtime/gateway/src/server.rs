//! The gateway process: state, router, listener (plain or TLS), graceful shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use patchbay_bus::Bus;
use patchbay_bus::resilience::Resilience;
use patchbay_host::Engine;
use patchbay_host::registry::Registry;
use patchbay_telemetry::{Metrics, ReadyFlag};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::{GatewayConfig, TlsFiles};
use crate::functions::HttpFunctions;
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
    pub(crate) engine: Engine,
    /// Resilience policies of requests, invocations and HTTP function routes.
    pub(crate) resilience: Resilience,
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
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            observe,
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
    let state = Arc::new(AppState {
        resilience,
        metrics: GatewayMetrics::new(metrics).map_err(|e| setup("metrics")(&e))?,
        bus,
        tokens,
        limiter,
        streams: StreamIndex::default(),
        functions: HttpFunctions::default(),
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
    let builder = auto::Builder::new(TokioExecutor::new());
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
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let served = match tls {
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => {
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                    Err(e) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                },
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
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
