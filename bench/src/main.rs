//! `patchbay-bench`: every Patchbay benchmark, each figure printed beside a baseline
//! measured in the same run on the same machine (`make bench` builds it in release mode
//! and runs it). Not shipped: no benchmark code lives in a product binary or a library's
//! public API.
//!
//! * [`suites`] — the suites and their flags (`--suite all|functions|gateway|tracing|breaker|topology|agents`):
//!   a function on a `subject` trigger beside a native echo responder, the engine's
//!   instantiate+call time, tracing on and off;
//! * [`bench_gateway`] — the gateway against `wasmtime serve` (with `wrk`);
//! * [`bench_breaker`] — what an open breaker saves a failing call path;
//! * [`bench_topology`] — the call lifecycle and total memory, monolith against split;
//! * [`bench_agents`] — the agents service's decisions/s, latency and fsyncs per decision
//!   through the bus, atomic batches against pipelined single publishes.

mod bench_agents;
mod bench_breaker;
mod bench_gateway;
mod bench_topology;
mod suites;

use clap::Parser;

/// Patchbay benchmarks, each beside a baseline measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "patchbay-bench", version, about)]
struct Cli {
    #[command(flatten)]
    args: suites::BenchArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Warnings only, unless `PATCHBAY_LOG` says otherwise: the figures are the answer.
    let filter = std::env::var("PATCHBAY_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
    suites::run(Cli::parse().args).await
}
