//! The library behind the `patchbay` command: everything the operator side of Patchbay
//! prepares before (and around) workloads connecting to the bus.
//!
//! * [`certs`] — workload identities (`kind/name`), the dev certificate authority and the
//!   per-workload certificates with SPIFFE URI SANs;
//! * [`access`] — `deploy/access.toml`, the deny-by-default subject permissions per identity,
//!   plus the expectations a deny-matrix test checks against a live server;
//! * [`admission`] — what `patchbay fn deploy` checks a deploy against: the hosting group's
//!   subjects and consumers from the policy the bootstrap stored;
//! * [`natsconf`] — the nats-server configuration (mTLS with `verify_and_map`, JetStream
//!   with `sync_interval: always`, one user per identity);
//! * [`streams`] — `deploy/streams.toml` and the idempotent admin bootstrap of the JetStream
//!   streams, KV buckets, object stores and durable consumers;
//! * [`local`] — the local stack (certificates, config, nats-server process, bootstrap)
//!   shared by `patchbay up` and the integration-test harness;
//! * [`connection`], [`envfile`] — how commands reach the bus (flags, env, `.patchbay/env`);
//! * [`function`] — the `patchbay fn …` commands ([`ordering`]: the partitioned copy and
//!   partition consumers behind `fn deploy --ordered`); [`token`] — `patchbay token …` (gateway
//!   API tokens); [`up`] — `patchbay up`; [`bench`], [`bench_gateway`] — `patchbay bench`;
//!   [`status`] — `patchbay status` (components by NATS micro discovery, functions);
//!   [`resilience`] — `patchbay resilience apply|show` (policies per target).
//!
//! It does not connect workloads to the bus (that is `patchbay-bus`), run functions
//! (`patchbay-host`) or parse command lines (the `patchbay` binary does, on top of this).

pub mod access;
pub mod admission;
pub mod bench;
pub mod bench_breaker;
pub mod bench_gateway;
pub mod certs;
pub mod connection;
pub mod envfile;
pub mod function;
pub mod local;
pub mod natsconf;
pub mod ordering;
pub mod resilience;
pub mod status;
pub mod streams;
pub mod token;
pub mod up;

#[cfg(test)]
mod test_nats;
