//! The gateway's entry point, the same shape as every Patchbay service's: [`Args`] (its
//! flags, bus connection included), a [`ServiceContext`] from the process that runs it,
//! and a shutdown signal. `patchbay-gateway` runs it alone; `patchbay-node` runs it beside
//! other services.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use patchbay_bus::args::BusArgs;
use patchbay_engine::args::EngineArgs;
use patchbay_telemetry::ServiceContext;

use crate::{GatewayConfig, TlsFiles};

/// The gateway's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Instance name; its certificate must carry `spiffe://<trust-domain>/gateway/<name>`.
    #[arg(long, env = "PATCHBAY_GATEWAY_NAME", default_value = "gateway")]
    pub name: String,
    /// Public listener.
    #[arg(
        long,
        env = "PATCHBAY_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// Terminate TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "PATCHBAY_GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key for --tls-cert (PEM).
    #[arg(long, env = "PATCHBAY_GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Largest body of the /v1 routes, bytes.
    #[arg(long, env = "PATCHBAY_GATEWAY_MAX_BODY", default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Largest request body an HTTP function may read, bytes.
    #[arg(long, env = "PATCHBAY_GATEWAY_MAX_FUNCTION_BODY", default_value_t = 64 << 20)]
    pub max_function_body: usize,
    /// Deadline of a request without Request-Timeout.
    #[arg(long, env = "PATCHBAY_GATEWAY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Longest Request-Timeout honoured.
    #[arg(long, env = "PATCHBAY_GATEWAY_MAX_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_timeout: Duration,
    /// Requests per second per token (unless the token sets its own).
    #[arg(long, env = "PATCHBAY_GATEWAY_RATE", default_value_t = 1000.0)]
    pub rate: f64,
    /// Burst per token (unless the token sets its own).
    #[arg(long, env = "PATCHBAY_GATEWAY_BURST", default_value_t = 2000)]
    pub burst: u32,
    /// How long SIGTERM waits for in-flight requests.
    #[arg(long, env = "PATCHBAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// The engine of the HTTP functions: instance slots, memory budget, compile cache.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Write the bound public address here once listening (for --listen with port 0).
    #[arg(long, env = "PATCHBAY_GATEWAY_ADDRESS_FILE")]
    pub address_file: Option<PathBuf>,
    /// Longest time to deliver a complete request head (TLS handshake included); also the
    /// idle timeout of kept-alive HTTP/1 connections.
    #[arg(long, env = "PATCHBAY_GATEWAY_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// Longest pause within a request body before the request is answered 408.
    #[arg(long, env = "PATCHBAY_GATEWAY_BODY_IDLE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub body_idle_timeout: Duration,
    /// Longest time to read the whole body of a /v1 route before it is answered 408.
    #[arg(long, env = "PATCHBAY_GATEWAY_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,
    /// Largest request head (request line and headers), bytes; larger ones get 431.
    #[arg(long, env = "PATCHBAY_GATEWAY_MAX_HEADER_BYTES", default_value_t = 32 << 10)]
    pub max_header_bytes: usize,
    /// Open connections at most; more are answered 503 and closed.
    #[arg(long, env = "PATCHBAY_GATEWAY_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Open connections per client address at most; more are answered 429 and closed.
    #[arg(
        long,
        env = "PATCHBAY_GATEWAY_MAX_CONNECTIONS_PER_IP",
        default_value_t = 256
    )]
    pub max_connections_per_ip: usize,
    /// The bus connection (its own certificate: see `identity`).
    #[command(flatten)]
    pub bus: BusArgs,
}

impl Args {
    /// The workload identity whose certificate the gateway connects with.
    #[must_use]
    pub fn identity(&self) -> String {
        format!("gateway/{}", self.name)
    }
}

/// Run the gateway until `shutdown` resolves (see [`crate::run`]).
pub async fn serve(
    args: Args,
    context: ServiceContext,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let metrics = context.metrics();
    let bus = args
        .bus
        .service_config("patchbay-gateway", &args.name, metrics)?;
    let mut config = GatewayConfig::new(bus, args.listen);
    config.name = args.name;
    config.tls = args
        .tls_cert
        .zip(args.tls_key)
        .map(|(cert, key)| TlsFiles { cert, key });
    config.max_body_bytes = args.max_body;
    config.max_function_body_bytes = args.max_function_body;
    config.default_timeout = args.timeout;
    config.max_timeout = args.max_timeout;
    config.rate_per_sec = args.rate;
    config.burst = args.burst;
    config.drain_timeout = args.drain_timeout;
    config.address_file = args.address_file;
    config.header_read_timeout = args.header_timeout;
    config.body_idle_timeout = args.body_idle_timeout;
    config.body_read_timeout = args.body_timeout;
    config.max_header_bytes = args.max_header_bytes;
    config.max_connections = args.max_connections;
    config.max_connections_per_ip = args.max_connections_per_ip;
    config.engine = args.engine.config();
    crate::run(config, metrics, context.readiness("registry"), shutdown)
        .await
        .context("gateway failed")
}
