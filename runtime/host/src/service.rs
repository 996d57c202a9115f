//! The runtime node's entry point, the same shape as every Patchbay service's: [`Args`]
//! (its flags, bus connection included), a [`ServiceContext`] from the process that runs
//! it, and a shutdown signal. `patchbay-runtime` runs it alone; `patchbay-node` runs it
//! beside other services.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use patchbay_bus::args::BusArgs;
use patchbay_telemetry::ServiceContext;

use patchbay_engine::args::EngineArgs;

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
    /// Most outputs of stream and schedule triggers stored in one atomic batch: the
    /// outputs of invocations that finish together share a commit (one fsync); 0 stores
    /// each output with its own publish.
    #[arg(long, env = "PATCHBAY_OUTPUT_BATCH", default_value_t = patchbay_bus::batch::MAX_BATCH)]
    pub output_batch: usize,
    /// The engine: instance slots, memory budget, compile cache.
    #[command(flatten)]
    pub engine: EngineArgs,
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
    let config = NodeConfig {
        bus: args
            .bus
            .service_config("patchbay-runtime", &args.node, metrics)?,
        node: args.node,
        engine: args.engine.config(),
        drain_timeout: args.drain_timeout,
        output_batch: args.output_batch,
    };
    crate::run(config, metrics, context.readiness("registry"), shutdown)
        .await
        .context("runtime node failed")
}
