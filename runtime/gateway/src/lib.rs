//! The Patchbay HTTP gateway: how external callers — telephony adapters, CRMs, agent
//! desktops, dashboards — reach the bus (events in, request-reply, function invocation,
//! `wasi:http` functions run in-process, API tokens, OpenAPI).
//!
//! Empty on purpose: issue 4 ("HTTP gateway") fills it. Nothing here pretends to serve
//! yet, and `patchbay up` does not start a gateway until it does.
