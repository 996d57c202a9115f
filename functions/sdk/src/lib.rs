//! `patchbay-sdk`: write a Patchbay event function in a few lines.
//!
//! A function is a WebAssembly component for the WIT world
//! `patchbay:function/event-handler` (see `wit/function.wit`). This crate wraps the
//! bindings wit-bindgen generates for that world in plain Rust: a [`Handler`] trait, the
//! [`export!`] macro, builders and readers on [`Event`], constructors on [`Failure`], and
//! the host capabilities as modules ([`bus`], [`kv`], [`config`], [`log`]).
//!
//! ```ignore
//! use patchbay_sdk::prelude::*;
//!
//! struct Greeter;
//!
//! impl Handler for Greeter {
//!     fn handle(e: Event) -> Result<Vec<Event>, Failure> {
//!         let name: String = e.json()?; // malformed data -> dead-letter
//!         info!("greeting {name}");
//!         Ok(vec![Event::new("greetings.sent", "example.greeted.v1")
//!             .follows(&e)
//!             .with_json(&format!("hello, {name}"))?])
//!     }
//! }
//!
//! patchbay_sdk::export!(Greeter);
//! ```
//!
//! It does not decide what happens to outputs or failures — the runtime publishes outputs,
//! retries, dead-letters and traces — and it owns no contact-centre types.
//!
//! Builders and readers are plain Rust and unit-test natively; the capability functions
//! call host imports that exist only inside a component, so they are exercised by the
//! runtime's integration tests.

pub mod bus;
pub mod config;
mod event;
mod failure;
pub mod kv;
pub mod log;

/// Bindings wit-bindgen generates for the world `event-handler`; use the re-exports at the
/// crate root instead. Public only because [`export!`] expands in the function's crate.
///
/// This is the one place with `unsafe`: the generated glue lifts and lowers values
/// across the canonical ABI through raw pointers into the component's linear memory, and
/// exports `#[unsafe(export_name)]` entry points. It is generated from the checked WIT by
/// wit-bindgen, not written by hand.
#[doc(hidden)]
#[allow(unsafe_code, missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "event-handler",
        pub_export_macro: true,
        export_macro_name: "__export_event_handler",
        default_bindings_module: "::patchbay_sdk::bindings",
    });
}

pub use bindings::patchbay::function::types::{Event, Failure, Retry};
pub use event::PARTITION_KEY;
pub use serde_json;

/// What a function implements: handle one event, return the events to publish (possibly
/// none) or a [`Failure`] saying how the runtime should treat the input.
///
/// The runtime instantiates the component afresh for every event, so nothing survives
/// between calls except what the function keeps in [`kv`].
pub trait Handler {
    /// Handle `e`. Each returned event is published on its own `subject` (which must be
    /// in the function's `--publish` allow-list); for a request trigger the outputs are
    /// the reply.
    fn handle(e: Event) -> Result<Vec<Event>, Failure>;
}

/// Exports a [`Handler`] as the component's `patchbay:function/handler` — once per crate.
///
/// ```ignore
/// patchbay_sdk::export!(MyHandler);
/// ```
#[macro_export]
macro_rules! export {
    ($ty:ident) => {
        // The generated export glue is `unsafe` canonical-ABI code (see the SDK's
        // `bindings` module); it expands here because exports must live in the final crate.
        #[allow(unsafe_code)]
        const _: () = {
            impl $crate::bindings::exports::patchbay::function::handler::Guest for $ty {
                fn handle(
                    e: $crate::Event,
                ) -> ::core::result::Result<::std::vec::Vec<$crate::Event>, $crate::Failure>
                {
                    <$ty as $crate::Handler>::handle(e)
                }
            }
    $crate::bindings::__export_event_handler!($ty with_types_in $crate::bindings);
        };
    };
}

/// Everything a function usually needs: `use patchbay_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::{Event, Failure, Handler, bus, config, kv, log};
    pub use crate::{debug, error, info, trace, warn};
}
