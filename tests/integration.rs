//! Every integration test that can share a process, in one test binary, so that `make
//! test` links wasmtime and the platform once, not once per file. Each module is one
//! area (`access`, `agents`, …) and reads on its own; `events.rs` keeps a binary of its own
//! because it installs the process-wide telemetry subscriber.
//!
//! Run one area with `cargo test -p patchbay-tests --test integration agents::`.

mod access;
mod agents;
mod batch;
mod canary;
mod drain;
mod function_behaviour;
mod function_delivery;
mod functions;
mod gateway;
mod memory_budget;
mod metrics;
mod nothing_lost;
mod ordering;
mod resilience;
mod routing;
mod status;
mod tls;
mod tokens;
mod topology;
#[path = "tracing.rs"]
mod traces;
