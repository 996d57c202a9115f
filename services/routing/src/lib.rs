//! `patchbay-routing`: the call-routing core service — a pure routing engine (queue,
//! priority, skills, overflow, business hours; customer lookup with a deadline and a
//! fallback) behind a thin NATS adapter.
//!
//! Empty on purpose: issue 5 ("Contact-centre core services") fills it. Its subjects are
//! already defined in `patchbay-protocol` and its permissions in `deploy/access.toml`.
