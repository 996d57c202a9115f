//! The Patchbay runtime node: serves every deployed function on the bus, running each
//! event in the engine (`patchbay-engine`, wasmtime, no NATS) with NATS-backed
//! capabilities, and wires triggers, the registry and canary judging around it:
//!
//! * [`node`] — a runtime node: registry watch, hot swap, drain, the `run` entry point;
//! * [`triggers`] — subject, stream, schedule and invoke triggers (one shape);
//! * [`dispatch`] — the one invocation path and the NATS-backed imports;
//! * [`reply`], [`dlq`] — what callers and the dead-letter stream receive;
//! * [`discovery`] — the node's `$SRV` (NATS micro) answers: one endpoint per function;
//! * [`canary`] — canary routing and the node-side automatic rollback (the pure choice
//!   is the registry's);
//! * [`metrics`] — the host's Prometheus metrics;
//!
//! specs, versions and triggers come from `patchbay-registry`.

pub mod canary;
/// Dead-letter records (defined on the wire crate, shared with services and the CLI).
pub use patchbay_bus::dlq;
/// Invocation replies (defined on the wire crate, shared with the gateway and services).
pub use patchbay_bus::reply;
pub mod discovery;
pub mod dispatch;
pub mod metrics;
pub mod node;
pub mod service;
pub(crate) mod triggers;

pub use node::{NodeConfig, NodeError, run};
pub use triggers::status::{NodeStatus, ServedFunction};
