//! The Patchbay engine: runs event functions (WebAssembly components targeting
//! `patchbay:function/event-handler`) and `wasi:http/proxy` components in a sandbox, one
//! fresh instance per event or request.
//!
//! * [`world`] — the WIT bindings (the one `bindgen!`) and the event types;
//! * [`engine`] — the wasmtime configuration (pooling allocator, epoch deadlines, fuel),
//!   load (check the world, compile, cache, pre-link) and invoke under limits;
//! * [`capabilities`] — the bus/kv/config/log imports, the publish allow-list, the
//!   [`HostCapabilities`] trait a host implements and [`MemoryCapabilities`], an in-memory
//!   implementation for tests and tools;
//! * [`limits`] — per-invocation limits and the memory budget they reserve from;
//! * `args` (feature `cli`) — the engine flags every function-hosting binary shares.
//!
//! It never talks to NATS, reads a registry or decides what triggers an invocation: the
//! runtime node (`patchbay-host`) and the gateway wire those around it.

#[cfg(feature = "cli")]
pub mod args;
pub mod capabilities;
pub mod engine;
pub mod limits;
pub mod world;

pub use capabilities::{HostCapabilities, MemoryCapabilities, PublishAllowList};
pub use engine::{
    Engine, EngineConfig, EngineError, FunctionCode, HttpCode, HttpInvokeError, HttpResponse,
    Invocation, InvocationStats, InvokeError, InvokeErrorKind, InvokeOutcome, LoadError,
};
pub use limits::{Limits, MemoryBudget, MemoryReservation};
pub use world::{BusError, Event, Failure, KvError, Level, Retry};
