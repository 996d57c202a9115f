//! `patchbay-agents`: the agent-assignment core service — a pure assignment engine
//! (states, reservations, longest-idle selection, wrap-up, statistics, simulation) with
//! an injected clock, behind a thin NATS adapter.
//!
//! Empty on purpose: issue 5 ("Contact-centre core services") fills it. Its subjects are
//! already defined in `patchbay-protocol`, its state bucket (`cc-agents`) and durable
//! consumers in `deploy/streams.toml`.
