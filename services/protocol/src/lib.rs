//! The contact-centre protocol: subjects and payloads of calls, agents, customers and
//! recordings.
//!
//! This crate is the only place that knows contact-centre subject names; the platform
//! crates know nothing of calls or agents. It depends on serde and on the subject
//! mechanism of `patchbay-bus` only (without its client half), so wasm functions can use
//! it too. Commands (requests to do something) and events (facts that happened) never
//! share a subject, so no service consumes its own output.

pub mod payload;
pub mod subjects;

pub use subjects::{AgentCommand, AgentEvent, CallEvent, CcSubject, CcSubjects};
