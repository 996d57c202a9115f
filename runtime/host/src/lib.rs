//! The Patchbay function host: runs event functions (WebAssembly components targeting
//! `patchbay:function/event-handler`) in a sandbox, one fresh instance per event.
//!
//! * [`world`] — the WIT bindings (the one `bindgen!`) and the event types;
//! * [`engine`] — load (check, compile, cache, pre-link) and invoke under limits;
//! * [`capabilities`] — the bus/kv/config/log imports, the publish allow-list, and the
//!   [`HostCapabilities`] trait the node implements over NATS;
//! * [`limits`] — per-invocation limits and the node-wide memory budget they reserve from.
//!
//! The engine never talks to NATS itself; the node wires triggers, the registry and the
//! NATS-backed capabilities around it:
//!
//! * [`registry`] — function specs (KV, revision CAS) and artifacts (object store);
//! * [`ordering`] — per-key ordered `stream` triggers: partitions, names, transform;
//! * [`node`] — a runtime node: registry watch, hot swap, drain, the `run` entry point;
//! * [`triggers`] — subject, stream, schedule and invoke triggers (one shape);
//! * [`dispatch`] — the one invocation path and the NATS-backed imports;
//! * [`reply`], [`dlq`] — what callers and the dead-letter stream receive;
//! * [`discovery`] — the node's `$SRV` (NATS micro) answers: one endpoint per function;
//! * [`canary`] — sticky canary routing and the node-side automatic rollback;
//! * [`schedule`] — cron parsing; [`metrics`] — the host's Prometheus metrics.

pub mod canary;
pub mod capabilities;
/// Dead-letter records (defined on the wire crate, shared with services and the CLI).
pub use patchbay_bus::dlq;
/// Invocation replies (defined on the wire crate, shared with the gateway and services).
pub use patchbay_bus::reply;
pub mod discovery;
pub mod dispatch;
pub mod engine;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod ordering;
pub mod registry;
pub mod schedule;
pub(crate) mod triggers;
pub mod world;

pub use node::{NodeConfig, NodeError, run};
pub use triggers::status::{NodeStatus, ServedFunction};

pub use capabilities::{HostCapabilities, MemoryCapabilities, PublishAllowList};
pub use engine::{
    Engine, EngineConfig, EngineError, FunctionCode, HttpCode, HttpInvokeError, HttpResponse,
    Invocation, InvocationStats, InvokeError, InvokeErrorKind, InvokeOutcome, LoadError,
};
pub use limits::{Limits, MemoryBudget, MemoryReservation};
pub use world::{BusError, Event, Failure, KvError, Level, Retry};
