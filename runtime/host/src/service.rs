//! The runtime node's entry point, the same shape as every Patchbay service's: [`Args`]
//! (its flags, bus connection included), a [`ServiceContext`] from the process that runs
//! it, and a shutdown signal. `patchbay-runtime` runs it alone; `patchbay-node` runs it
//! beside other services.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use patchbay_bus::args::BusArgs;
use patchbay_telemetry::ServiceContext;

use patchbay_engine::EngineConfig;

use crate::NodeConfig;

/// The runtime node's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Node name; its certificate must carry `spiffe://<trust-domain>/runtime/<node>`.
    #[arg(long, env = "PATCHBAY_NODE", default_value = "node-1")]
    pub node: String,
    /// How long SIGTERM waits for in-flight invocations.
    #[arg(long, env = "PATCHBAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Instance slots in the pooling allocator (concurrent invocations across functions).
    #[arg(long, env = "PATCHBAY_MAX_INSTANCES", default_value_t = 256)]
    pub max_instances: u32,
    /// Linear memory all invocations on this node may hold together, e.g. `2GiB`, `512MiB`
    /// (a bare number is MiB). Each invocation reserves its version's whole `--memory`
    /// before it starts; what does not fit waits until its deadline (or, without one, for
    /// its timeout) and is then refused as overloaded. A version runs at most
    /// budget / memory invocations at once; one whose memory exceeds the budget is not
    /// served. Leave room for the runtime itself (~150 MiB) within the host's memory.
    #[arg(long, env = "PATCHBAY_MEMORY_BUDGET", default_value = "4GiB", value_parser = patchbay_engine::limits::parse_budget)]
    pub memory_budget: u64,
    /// Directory for compiled components (keyed by digest and engine), so a restarted
    /// node skips compilation. Unset: compile into memory only.
    #[arg(long, env = "PATCHBAY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The bus connection (its own certificate: see `identity`).
    #[command(flatten)]
    pub bus: BusArgs,
}

impl Args {
    /// The workload identity whose certificate the node connects with.
    #[must_use]
    pub fn identity(&self) -> String {
        format!("runtime/{}", self.node)
    }
}

/// Run the node until `shutdown` resolves (see [`crate::run`]).
pub async fn serve(
    args: Args,
    context: ServiceContext,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let metrics = context.metrics();
    let engine = EngineConfig {
        max_concurrent_instances: args.max_instances,
        memory_budget_bytes: args.memory_budget,
        cache_dir: args.cache_dir,
        ..EngineConfig::default()
    };
    let config = NodeConfig {
        bus: args
            .bus
            .service_config("patchbay-runtime", &args.node, metrics)?,
        node: args.node,
        engine,
        drain_timeout: args.drain_timeout,
    };
    crate::run(config, metrics, context.readiness("registry"), shutdown)
        .await
        .context("runtime node failed")
}
