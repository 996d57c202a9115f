//! The routing service's entry point, the same shape as every Patchbay service's:
//! [`Args`] (its flags, bus connection included), a [`ServiceContext`] from the process
//! that runs it, and a shutdown signal. `patchbay-routing` runs it alone; `patchbay-node`
//! runs it beside other services.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use patchbay_bus::args::BusArgs;
use patchbay_telemetry::ServiceContext;

use crate::RoutingConfig;

/// The routing service's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The routing rules file (TOML); reloaded when it changes.
    #[arg(
        long,
        env = "PATCHBAY_ROUTING_RULES",
        default_value = "deploy/routing.toml"
    )]
    pub rules: PathBuf,
    /// How often the rules file is checked for changes.
    #[arg(long, env = "PATCHBAY_ROUTING_RELOAD_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
    /// How long the customer lookup may take before routing falls back to the default
    /// tier (never longer than an incoming `patchbay-deadline`).
    #[arg(long, env = "PATCHBAY_ROUTING_LOOKUP_TIMEOUT", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub lookup_timeout: Duration,
    /// Calls handled at once.
    #[arg(long, env = "PATCHBAY_ROUTING_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,
    /// How long SIGTERM waits for in-flight calls.
    #[arg(long, env = "PATCHBAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Instance name (logs, traces, connection name).
    #[arg(long, env = "PATCHBAY_ROUTING_INSTANCE", default_value = "routing-1")]
    pub instance: String,
    /// The bus connection (its own certificate: see `identity`).
    #[command(flatten)]
    pub bus: BusArgs,
}

impl Args {
    /// The workload identity whose certificate the service connects with.
    #[must_use]
    pub fn identity(&self) -> String {
        "service/routing".to_owned()
    }
}

/// Run the routing service until `shutdown` resolves (see [`crate::run`]).
pub async fn serve(
    args: Args,
    context: ServiceContext,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let metrics = context.metrics();
    let bus = args
        .bus
        .service_config("patchbay-routing", &args.instance, metrics)?;
    let mut config = RoutingConfig::new(bus, args.rules);
    config.reload_interval = args.reload_interval;
    config.lookup_timeout = args.lookup_timeout;
    config.max_in_flight = args.max_in_flight;
    config.drain_timeout = args.drain_timeout;
    config.metrics = metrics.clone();
    config.ready = Some(context.readiness("routing-consumer"));
    crate::run(config, shutdown)
        .await
        .context("routing service failed")
}
