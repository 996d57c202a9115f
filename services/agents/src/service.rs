//! The agents service's entry point, the same shape as every Patchbay service's: [`Args`]
//! (its flags, bus connection included), a [`ServiceContext`] from the process that runs
//! it, and a shutdown signal. `patchbay-agents run` runs it alone; `patchbay-node` runs it
//! beside other services.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use patchbay_bus::args::BusArgs;
use patchbay_telemetry::ServiceContext;

use crate::AgentsConfig;
use crate::engine::EngineConfig;

/// The agents service's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Engine settings (TOML with the fields of `EngineConfig`, see deploy/agents.toml);
    /// defaults without it.
    #[arg(long, env = "PATCHBAY_AGENTS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Most inputs applied per batch (one snapshot is written per batch).
    #[arg(long, env = "PATCHBAY_AGENTS_MAX_BATCH", default_value_t = 256)]
    pub max_batch: usize,
    /// How often queue gauges are refreshed (they are also refreshed after each batch).
    #[arg(long, env = "PATCHBAY_AGENTS_STATS_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub stats_interval: Duration,
    /// How long SIGTERM may spend finishing the batch in hand (its inputs are redelivered
    /// if it runs out).
    #[arg(long, env = "PATCHBAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Instance name (logs, traces, connection name, CloudEvents source).
    #[arg(long, env = "PATCHBAY_AGENTS_INSTANCE", default_value = "agents-1")]
    pub instance: String,
    /// The bus connection (its own certificate: see `identity`).
    #[command(flatten)]
    pub bus: BusArgs,
}

impl Args {
    /// The workload identity whose certificate the service connects with.
    #[must_use]
    pub fn identity(&self) -> String {
        "service/agents".to_owned()
    }
}

/// Engine settings from a TOML file with the fields of [`EngineConfig`].
pub fn load_engine_config(path: &Path) -> anyhow::Result<EngineConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read engine config {}", path.display()))?;
    toml::from_str::<EngineConfig>(&text)
        .with_context(|| format!("failed to parse engine config {}", path.display()))
}

/// Run the agents service until `shutdown` resolves (see [`crate::run`]).
pub async fn serve(
    args: Args,
    context: ServiceContext,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let metrics = context.metrics();
    let engine = match &args.config {
        Some(path) => load_engine_config(path)?,
        None => EngineConfig::default(),
    };
    tracing::info!(config = ?args.config, ?engine, "engine settings");
    let bus = args
        .bus
        .service_config("patchbay-agents", &args.instance, metrics)?;
    let mut config = AgentsConfig::new(bus, engine);
    config.max_batch = args.max_batch;
    config.stats_interval = args.stats_interval;
    config.drain_timeout = args.drain_timeout;
    crate::run(
        config,
        metrics,
        context.readiness("agents-consumers"),
        shutdown,
    )
    .await
    .context("agents service failed")
}
