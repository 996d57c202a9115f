//! The Rust face of `wit/function.wit`: the one place in Patchbay that runs
//! `wasmtime::component::bindgen!`.
//!
//! Everything else in the host uses the types re-exported here, so the WIT stays the single
//! source of truth for what an event, a failure or a bus error looks like. This module does
//! not implement any import (that is [`crate::capabilities`]) and does not instantiate
//! anything (that is [`crate::engine`]).

mod bindings {
    // Generated items carry the WIT doc comments where the WIT has them; the glue the macro
    // adds (`*Pre`, `*Indices`, `add_to_linker`) has none.
    #![allow(missing_docs)]

    wasmtime::component::bindgen!({
        world: "event-handler",
        path: "../../wit",
        // Every import may wait on NATS (publish acks, requests, KV round trips), so every
        // import is an `async fn` on the host; to the guest the calls are still blocking.
        imports: { default: async },
        exports: { default: async },
        additional_derives: [PartialEq, Eq],
    });
}

pub use bindings::patchbay::function::bus::BusError;
pub use bindings::patchbay::function::kv::KvError;
pub use bindings::patchbay::function::log::Level;
pub use bindings::patchbay::function::types::{Event, Failure, Retry};

pub(crate) use bindings::patchbay::function::{bus, config, kv, log, types};
pub(crate) use bindings::{EventHandler, EventHandlerPre};

/// The WIT package every event function targets.
pub const PACKAGE: &str = "patchbay:function@0.1.0";

/// The world every event function targets.
pub const WORLD: &str = "patchbay:function/event-handler@0.1.0";

/// The export that makes a component an event function.
pub const HANDLER_EXPORT: &str = "patchbay:function/handler@0.1.0";

impl Level {
    /// The lower-case name of the level, as written in log records (`"warn"`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

impl Failure {
    /// The reason the handler gave, whichever way it declined the event.
    #[must_use]
    pub fn reason(&self) -> &str {
        match self {
            Failure::Retry(retry) => &retry.reason,
            Failure::DeadLetter(reason) | Failure::Drop(reason) => reason,
        }
    }
}
