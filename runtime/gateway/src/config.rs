//! [`GatewayConfig`]: everything a gateway process is started with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use patchbay_bus::BusConfig;
use patchbay_engine::EngineConfig;

/// How a gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Bus connection (identity `gateway/<name>`).
    pub bus: BusConfig,
    /// Instance name (for logs, `patchbay-node`-style headers and metrics).
    pub name: String,
    /// Public listener.
    pub listen: SocketAddr,
    /// Terminate TLS with this certificate chain and key (PEM); `None` serves plain HTTP
    /// (behind a load balancer that terminates TLS, or locally).
    pub tls: Option<TlsFiles>,
    /// Largest request body of the `/v1/…` routes (events, requests, invocations). They
    /// become one NATS message, so the server's `max_payload` also bounds them. Default
    /// 1 MiB.
    pub max_body_bytes: usize,
    /// Largest request body an HTTP function may read. Bodies stream, so this is a guard
    /// against abuse, not a memory bound. Default 64 MiB.
    pub max_function_body_bytes: usize,
    /// Deadline of a request that carries no `Request-Timeout`. Default 5 s.
    pub default_timeout: Duration,
    /// Longest `Request-Timeout` honoured (longer ones are cut to it). Default 60 s.
    pub max_timeout: Duration,
    /// Per-token request rate (requests per second) unless the token sets its own.
    pub rate_per_sec: f64,
    /// Per-token burst unless the token sets its own.
    pub burst: u32,
    /// The embedded function engine (HTTP functions).
    pub engine: EngineConfig,
    /// How long shutdown waits for in-flight requests (and streaming bodies) to finish.
    pub drain_timeout: Duration,
    /// Write the bound public address (`host:port`) to this file once listening, so a
    /// supervisor or test that asked for port 0 can find it.
    pub address_file: Option<PathBuf>,
    /// How long a connection may take to deliver a complete request head (TLS handshake
    /// and, on HTTP/1, every later head on a kept-alive connection included); past it the
    /// connection is closed without an answer. It is also the idle timeout of a kept-alive
    /// HTTP/1 connection. Default 10 s.
    pub header_read_timeout: Duration,
    /// Longest pause in a request body (time waiting for the next chunk while the handler
    /// wants one). Past it the `/v1/…` routes answer 408 and close the connection; an HTTP
    /// function sees a read timeout. Default 10 s.
    pub body_idle_timeout: Duration,
    /// Longest time to read the whole body of a `/v1/…` route (they are buffered and at
    /// most `max_body_bytes`); past it, 408. Function bodies stream and are bounded by
    /// `body_idle_timeout` only. Default 30 s.
    pub body_read_timeout: Duration,
    /// Largest request head (request line and headers), bytes; a larger one is answered
    /// 431. At least 8 KiB (smaller values are raised to it). Default 32 KiB, like nginx's
    /// `large_client_header_buffers`.
    pub max_header_bytes: usize,
    /// Open connections the public listener holds at most; a connection past it is
    /// answered 503 with `Retry-After` and closed (closed at once with TLS). Keep it well
    /// below the process's file descriptor limit so the admin listener, the NATS
    /// connection and the function engine always have descriptors left. Default 4096.
    pub max_connections: usize,
    /// Open connections one client address may hold at most, checked when the connection
    /// is accepted (before any authentication); past it the connection is answered 429 and
    /// closed. Behind a load balancer or NAT every client shares one address: raise it to
    /// `max_connections` there. Default 256.
    pub max_connections_per_ip: usize,
}

/// PEM files for TLS termination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

impl GatewayConfig {
    /// Defaults for everything but the bus and the listener.
    #[must_use]
    pub fn new(bus: BusConfig, listen: SocketAddr) -> Self {
        Self {
            bus,
            name: "gateway".into(),
            listen,
            tls: None,
            max_body_bytes: 1 << 20,
            max_function_body_bytes: 64 << 20,
            default_timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(60),
            rate_per_sec: 1000.0,
            burst: 2000,
            engine: EngineConfig::default(),
            drain_timeout: Duration::from_secs(10),
            address_file: None,
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_header_bytes: 32 << 10,
            max_connections: 4096,
            max_connections_per_ip: 256,
        }
    }
}
