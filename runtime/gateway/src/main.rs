//! `patchbay-gateway`: the HTTP gateway. It connects as `gateway/<name>`, serves the
//! public API and the HTTP functions, and drains on SIGTERM.

use anyhow::Context as _;
use clap::Parser;
use patchbay_telemetry::{TelemetryArgs, shutdown_signal};

/// Run the Patchbay HTTP gateway.
#[derive(Debug, Parser)]
#[command(name = "patchbay-gateway", version, about)]
struct Cli {
    #[command(flatten)]
    service: patchbay_gateway::service::Args,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let started = cli
        .telemetry
        .start("patchbay-gateway", &cli.service.name, |k| {
            std::env::var(k).ok()
        })
        .await
        .context("failed to start telemetry")?;
    let context = started.alone("gateway");
    patchbay_gateway::service::serve(cli.service, context, shutdown_signal()).await
}
