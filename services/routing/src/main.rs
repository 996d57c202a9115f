//! `patchbay-routing`: the call-routing service as its own process. It connects as
//! `service/routing`, binds the durable consumer `routing` on CC_CALLS, routes calls by
//! the rules file (hot-reloaded) and drains on SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use patchbay_bus::args::BusArgs;
use patchbay_bus::trace::BusMetrics;
use patchbay_routing::RoutingConfig;
use patchbay_telemetry::{TelemetryArgs, shutdown_signal};

/// Route incoming contact-centre calls to queues.
#[derive(Debug, Parser)]
#[command(name = "patchbay-routing", version, about)]
struct Args {
    /// The routing rules file (TOML); reloaded when it changes.
    #[arg(
        long,
        env = "PATCHBAY_ROUTING_RULES",
        default_value = "deploy/routing.toml"
    )]
    rules: PathBuf,
    /// How often the rules file is checked for changes.
    #[arg(long, env = "PATCHBAY_ROUTING_RELOAD_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    reload_interval: Duration,
    /// How long the customer lookup may take before routing falls back to the default
    /// tier (never longer than an incoming `patchbay-deadline`).
    #[arg(long, env = "PATCHBAY_ROUTING_LOOKUP_TIMEOUT", default_value = "250ms", value_parser = humantime::parse_duration)]
    lookup_timeout: Duration,
    /// Calls handled at once.
    #[arg(long, env = "PATCHBAY_ROUTING_MAX_IN_FLIGHT", default_value_t = 64)]
    max_in_flight: usize,
    /// How long SIGTERM waits for in-flight calls.
    #[arg(long, env = "PATCHBAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Instance name (logs, traces, connection name).
    #[arg(long, env = "PATCHBAY_ROUTING_INSTANCE", default_value = "routing-1")]
    instance: String,
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
        .start(
            "patchbay-routing",
            &args.instance,
            "routing-consumer",
            |k| std::env::var(k).ok(),
        )
        .await
        .context("failed to start telemetry")?;
    let (metrics, ready) = (&started.metrics, started.ready.clone());

    let bus = args
        .bus
        .config(format!("patchbay-routing/{}", args.instance))
        .context("invalid subject prefix")?
        .metrics(BusMetrics::register(metrics).context("failed to register bus metrics")?);
    let mut config = RoutingConfig::new(bus, args.rules);
    config.reload_interval = args.reload_interval;
    config.lookup_timeout = args.lookup_timeout;
    config.max_in_flight = args.max_in_flight;
    config.drain_timeout = args.drain_timeout;
    config.metrics = metrics.clone();
    config.ready = Some(ready);
    patchbay_routing::run(config, shutdown_signal())
        .await
        .context("routing service failed")
}
