//! `patchbay-gateway`: the HTTP gateway. It connects as `gateway/<name>`, serves the
//! public API and the HTTP functions, and drains on SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use patchbay_bus::args::BusArgs;
use patchbay_bus::trace::BusMetrics;
use patchbay_gateway::{GatewayConfig, TlsFiles};
use patchbay_host::EngineConfig;
use patchbay_telemetry::{TelemetryArgs, shutdown_signal};

/// Run the Patchbay HTTP gateway.
#[derive(Debug, Parser)]
#[command(name = "patchbay-gateway", version, about)]
struct Args {
    /// Instance name; its certificate must carry `spiffe://<trust-domain>/gateway/<name>`.
    #[arg(long, env = "PATCHBAY_GATEWAY_NAME", default_value = "gateway")]
    name: String,
    /// Public listener.
    #[arg(
        long,
        env = "PATCHBAY_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    listen: SocketAddr,
    /// Terminate TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "PATCHBAY_GATEWAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key for --tls-cert (PEM).
    #[arg(long, env = "PATCHBAY_GATEWAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Largest body of the /v1 routes, bytes.
    #[arg(long, env = "PATCHBAY_GATEWAY_MAX_BODY", default_value_t = 1 << 20)]
    max_body: usize,
    /// Largest request body an HTTP function may read, bytes.
    #[arg(long, env = "PATCHBAY_GATEWAY_MAX_FUNCTION_BODY", default_value_t = 64 << 20)]
    max_function_body: usize,
    /// Deadline of a request without Request-Timeout.
    #[arg(long, env = "PATCHBAY_GATEWAY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Longest Request-Timeout honoured.
    #[arg(long, env = "PATCHBAY_GATEWAY_MAX_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    max_timeout: Duration,
    /// Requests per second per token (unless the token sets its own).
    #[arg(long, env = "PATCHBAY_GATEWAY_RATE", default_value_t = 1000.0)]
    rate: f64,
    /// Burst per token (unless the token sets its own).
    #[arg(long, env = "PATCHBAY_GATEWAY_BURST", default_value_t = 2000)]
    burst: u32,
    /// How long SIGTERM waits for in-flight requests.
    #[arg(long, env = "PATCHBAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Instance slots for HTTP functions (concurrent requests they serve).
    #[arg(long, env = "PATCHBAY_MAX_INSTANCES", default_value_t = 256)]
    max_instances: u32,
    /// Directory for compiled components, so a restart skips compilation.
    #[arg(long, env = "PATCHBAY_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Write the bound public address here once listening (for --listen with port 0).
    #[arg(long, env = "PATCHBAY_GATEWAY_ADDRESS_FILE")]
    address_file: Option<PathBuf>,
    /// Longest time to deliver a complete request head (TLS handshake included); also the
    /// idle timeout of kept-alive HTTP/1 connections.
    #[arg(long, env = "PATCHBAY_GATEWAY_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// Longest pause within a request body before the request is answered 408.
    #[arg(long, env = "PATCHBAY_GATEWAY_BODY_IDLE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    body_idle_timeout: Duration,
    /// Longest time to read the whole body of a /v1 route before it is answered 408.
    #[arg(long, env = "PATCHBAY_GATEWAY_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// Largest request head (request line and headers), bytes; larger ones get 431.
    #[arg(long, env = "PATCHBAY_GATEWAY_MAX_HEADER_BYTES", default_value_t = 32 << 10)]
    max_header_bytes: usize,
    /// Open connections at most; more are answered 503 and closed.
    #[arg(long, env = "PATCHBAY_GATEWAY_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Open connections per client address at most; more are answered 429 and closed.
    #[arg(
        long,
        env = "PATCHBAY_GATEWAY_MAX_CONNECTIONS_PER_IP",
        default_value_t = 256
    )]
    max_connections_per_ip: usize,
    #[command(flatten)]
    bus: BusArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = args
        .telemetry
        .start("patchbay-gateway", &args.name, "registry", |k| {
            std::env::var(k).ok()
        })
        .await
        .context("failed to start telemetry")?;
    let (metrics, ready) = (&started.metrics, started.ready.clone());

    let bus = args
        .bus
        .config(format!("patchbay-gateway/{}", args.name))
        .context("invalid subject prefix")?
        .metrics(BusMetrics::register(metrics).context("failed to register bus metrics")?);
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
    config.engine = EngineConfig {
        max_concurrent_instances: args.max_instances,
        cache_dir: args.cache_dir,
        ..EngineConfig::default()
    };
    patchbay_gateway::run(config, metrics, ready, shutdown_signal())
        .await
        .context("gateway failed")
}
