//! The library behind the `patchbay` command: the commands, their flags and how they
//! render, on top of the crates that do the work.
//!
//! * [`connection`], [`envfile`] — how commands reach the bus (flags, env, `.patchbay/env`);
//! * [`function`] — the `patchbay fn …` commands ([`ordering`]: the partitioned copy and
//!   partition consumers behind `fn deploy --ordered`); [`token`] — `patchbay token …` (gateway
//!   API tokens); [`up`] — `patchbay up`;
//!   [`status`] — `patchbay status` (components by NATS micro discovery, functions);
//!   [`resilience`] — `patchbay resilience apply|show` (policies per target).
//!
//! The access policy, nats-server config, JetStream declarations and bootstrap,
//! certificates, deploy admission and the local stack are `patchbay-control`'s.
//! It does not connect workloads to the bus (that is `patchbay-bus`), run functions
//! (`patchbay-host`) or parse command lines (the `patchbay` binary does, on top of this).

pub mod connection;
pub mod envfile;
pub mod function;
pub mod ordering;
pub mod resilience;
pub mod status;
pub mod token;
pub mod up;
