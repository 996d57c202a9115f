//! `patchbay-routing`: the call-routing service as its own process. It connects as
//! `service/routing`, binds the durable consumer `routing` on CC_CALLS, routes calls by
//! the rules file (hot-reloaded) and drains on SIGTERM.

use anyhow::Context as _;
use clap::Parser;
use patchbay_telemetry::{TelemetryArgs, shutdown_signal};

/// Route incoming contact-centre calls to queues.
#[derive(Debug, Parser)]
#[command(name = "patchbay-routing", version, about)]
struct Cli {
    #[command(flatten)]
    service: patchbay_routing::service::Args,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let started = cli
        .telemetry
        .start("patchbay-routing", &cli.service.instance, |k| {
            std::env::var(k).ok()
        })
        .await
        .context("failed to start telemetry")?;
    let context = started.alone("routing");
    patchbay_routing::service::serve(cli.service, context, shutdown_signal()).await
}
