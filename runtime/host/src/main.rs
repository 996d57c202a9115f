//! `patchbay-runtime`: one runtime node. It connects with its own identity
//! (`runtime/<node>`), serves every deployed function and drains on SIGTERM.

use anyhow::Context as _;
use clap::Parser;
use patchbay_telemetry::{TelemetryArgs, shutdown_signal};

/// Run a Patchbay runtime node.
#[derive(Debug, Parser)]
#[command(name = "patchbay-runtime", version, about)]
struct Cli {
    #[command(flatten)]
    service: patchbay_host::service::Args,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let started = cli
        .telemetry
        .start("patchbay-runtime", &cli.service.node, |k| {
            std::env::var(k).ok()
        })
        .await
        .context("failed to start telemetry")?;
    let context = started.alone("runtime");
    patchbay_host::service::serve(cli.service, context, shutdown_signal()).await
}
