//! Publish and request on the bus. Every subject must be in the function's `--publish`
//! allow-list; the runtime adds trace context and enforces the invocation's deadline.

use std::time::Duration;

use crate::Event;
use crate::bindings::patchbay::function::bus as host;

pub use host::BusError;

/// Publishes `e` on `e.subject` (fire and forget).
pub fn publish(e: &Event) -> Result<(), BusError> {
    host::publish(e)
}

/// Sends `e` as a request on `e.subject` and waits for the reply, at most `timeout` (and
/// never past the invocation's own deadline). Timeouts above `u32::MAX` ms are capped.
pub fn request(e: &Event, timeout: Duration) -> Result<Event, BusError> {
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    host::request(e, ms)
}

/// A one-line description of `err`, for reasons and logs.
#[must_use]
pub fn describe(err: &BusError) -> String {
    match err {
        BusError::Forbidden(subject) => format!("forbidden subject {subject}"),
        BusError::Timeout => "timed out".into(),
        BusError::NoResponders => "no responders".into(),
        BusError::TooLarge(limit) => format!("event larger than the bus allows ({limit} bytes)"),
        BusError::Other(msg) => msg.clone(),
    }
}
