//! Everything Patchbay puts on the wire.
//!
//! This crate owns the NATS connection (mutual TLS with rustls, one identity per
//! workload), the subject mechanism and the platform subjects, the one subject-pattern
//! algebra ([`pattern`]: match, cover, overlap) every policy and allow-list uses, the
//! CloudEvents envelope on NATS headers, W3C trace-context propagation, the
//! `patchbay-deadline` header and the publish/request primitives that apply all of them (single, and in atomic batches: [`batch`]), plus the two record shapes every
//! component shares: the reply to an invocation ([`reply`]) and the dead-letter record
//! ([`dlq`]), the NATS micro discovery every component answers ([`discovery`]), the
//! request-side resilience mechanisms, policies and request loop ([`resilience`]), and
//! what every durable consumer loop does alike ([`pull`]: drain hand-back, redelivery
//! backoff, panic containment), the hop chains that stop event loops ([`hops`]), and
//! client-certificate rotation without a restart (a renewed pair on disk is checked,
//! swapped in and the connection re-established).
//! It does not own any business subject (those live in `patchbay-protocol`),
//! any stream layout (that is `deploy/streams.toml`) or telemetry set-up
//! (`patchbay-telemetry`).
//!
//! Without the default `client` feature only [`subject`] and [`pattern`] are compiled,
//! with no dependencies beyond `thiserror`, so guest code can share the subject mechanism.

#[cfg(feature = "cli")]
pub mod args;
#[cfg(feature = "client")]
pub mod batch;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub mod deadline;
#[cfg(feature = "client")]
pub mod discovery;
#[cfg(feature = "client")]
pub mod dlq;
#[cfg(feature = "client")]
pub mod event;
#[cfg(feature = "client")]
pub mod hops;
pub mod pattern;
#[cfg(feature = "client")]
pub mod pull;
#[cfg(feature = "client")]
pub mod reply;
#[cfg(feature = "client")]
pub mod resilience;
#[cfg(feature = "client")]
mod rotation;
pub mod subject;
#[cfg(feature = "client")]
pub mod trace;

#[cfg(feature = "client")]
pub use client::{
    Bus, BusConfig, BusNotice, ConnectError, ConnectErrorKind, PublishError, RequestError,
    RequestErrorKind, RequestOptions, SpiffeId, connect,
};
#[cfg(feature = "client")]
pub use deadline::{Clock, Deadline, ManualClock, SystemClock};
#[cfg(feature = "client")]
pub use event::{CloudEvent, EventError};
pub use subject::{Subjects, Token};

/// Re-exported so users of this crate agree on one async-nats version.
#[cfg(feature = "client")]
pub use async_nats;
