//! The Patchbay HTTP gateway: how external callers — telephony adapters, CRMs, agent
//! desktops, dashboards — reach the bus.
//!
//! * [`bus_routes`] — `POST /v1/events/{subject}` (CloudEvents in both HTTP content modes;
//!   201 once a stream stored it, 202 on core subjects), `POST /v1/request/{subject}` and
//!   `POST /v1/functions/{name}/invoke` (NATS request-reply; outcomes mapped to statuses);
//! * [`functions`] — HTTP functions (`wasi:http/proxy` components) run in this process
//!   from the same registry the runtime nodes watch, bodies streaming both ways;
//! * [`auth`], [`token`], [`ratelimit`] — bearer tokens with scopes, stored hashed in the
//!   `patchbay-tokens` bucket, and a per-token rate limit;
//! * [`problem`] — every error as RFC 9457 problem+json; [`openapi`] — the OpenAPI 3.1
//!   document at `/openapi.json`;
//! * [`observe`] — a server span continuing the caller's `traceparent` (and returning
//!   it), the deadline every bus message carries, metrics per route and status;
//! * [`discovery`] — the `$SRV` (NATS micro) answers: HTTP functions and routes with
//!   their request and 5xx counts;
//! * [`server`] — listener (plain or rustls TLS), header-read timeout, graceful drain,
//!   [`run`]; [`connections`] — global and per-address connection caps, answered before
//!   any authentication; [`body`] — request bodies that time out when the client stalls.
//!
//! Health and metrics are on the admin listener of `patchbay-telemetry`, never on the
//! public one.

pub mod auth;
pub mod body;
pub mod bus_routes;
pub mod config;
pub mod connections;
pub mod discovery;
pub mod functions;
pub mod observe;
pub mod openapi;
pub mod problem;
pub mod ratelimit;
pub mod server;
pub mod service;
pub mod token;

pub use config::{GatewayConfig, TlsFiles};
pub use server::{GatewayError, router, run};
