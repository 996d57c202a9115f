//! Deadlines: the `patchbay-deadline` header and the clock it is read against.
//!
//! A deadline is absolute (milliseconds since the Unix epoch), set once by the gateway or
//! the first publisher and honoured by every hop: request timeouts and wasm epoch limits
//! are cut to it, work whose deadline has passed is not started, and no hop ever extends
//! it. Without the header, the target's own timeout applies.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use thiserror::Error;

/// Header carrying the absolute deadline, milliseconds since the Unix epoch.
pub const DEADLINE_HEADER: &str = "patchbay-deadline";

/// A `patchbay-deadline` header that is not a millisecond timestamp.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid {DEADLINE_HEADER} header {value:?}: expected milliseconds since the Unix epoch")]
pub struct DeadlineError {
    /// The header value found.
    pub value: String,
}

/// Wall-clock time, injectable so deadline logic is testable without sleeping.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told to (tests, simulations).
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `millis`.
    #[must_use]
    pub fn at(millis: u64) -> Self {
        Self(Arc::new(AtomicU64::new(millis)))
    }

    /// Move the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// An absolute point in time by which work must be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline {
    epoch_millis: u64,
}

impl Deadline {
    /// The deadline at `epoch_millis` milliseconds since the Unix epoch.
    #[must_use]
    pub fn at_millis(epoch_millis: u64) -> Self {
        Self { epoch_millis }
    }

    /// `timeout` from now on `clock`.
    #[must_use]
    pub fn after(clock: &dyn Clock, timeout: Duration) -> Self {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        Self::at_millis(clock.now_millis().saturating_add(ms))
    }

    /// Milliseconds since the Unix epoch.
    #[must_use]
    pub fn epoch_millis(self) -> u64 {
        self.epoch_millis
    }

    /// Time left on `clock`, or `None` once the deadline has passed.
    #[must_use]
    pub fn remaining(self, clock: &dyn Clock) -> Option<Duration> {
        let now = clock.now_millis();
        (now < self.epoch_millis).then(|| Duration::from_millis(self.epoch_millis - now))
    }

    /// Whether the deadline has passed on `clock`.
    #[must_use]
    pub fn has_passed(self, clock: &dyn Clock) -> bool {
        self.remaining(clock).is_none()
    }

    /// The deadline a hop should use: the incoming one if any, cut to `timeout` from now
    /// — never later than the incoming one.
    #[must_use]
    pub fn effective(incoming: Option<Self>, clock: &dyn Clock, timeout: Duration) -> Self {
        let own = Self::after(clock, timeout);
        incoming.map_or(own, |d| d.min(own))
    }

    /// The deadline carried by `headers`, if any.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Result<Option<Self>, DeadlineError> {
        let Some(value) = headers.and_then(|h| h.get(DEADLINE_HEADER)) else {
            return Ok(None);
        };
        value
            .as_str()
            .trim()
            .parse::<u64>()
            .map(|ms| Some(Self::at_millis(ms)))
            .map_err(|_| DeadlineError {
                value: value.as_str().to_owned(),
            })
    }

    /// Write the deadline into `headers`.
    pub fn write(self, headers: &mut HeaderMap) {
        headers.insert(DEADLINE_HEADER, self.epoch_millis.to_string().as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_time_shrinks_with_the_clock_and_ends_at_the_deadline() {
        let clock = ManualClock::at(1_000);
        let d = Deadline::after(&clock, Duration::from_millis(250));
        assert_eq!(d.remaining(&clock), Some(Duration::from_millis(250)));
        clock.advance(Duration::from_millis(200));
        assert_eq!(d.remaining(&clock), Some(Duration::from_millis(50)));
        clock.advance(Duration::from_millis(50));
        assert!(d.has_passed(&clock));
    }

    #[test]
    fn a_downstream_hop_never_extends_the_incoming_deadline() {
        let clock = ManualClock::at(10_000);
        let incoming = Deadline::at_millis(10_100);
        let d = Deadline::effective(Some(incoming), &clock, Duration::from_secs(5));
        assert_eq!(d, incoming);
        let shorter = Deadline::effective(Some(incoming), &clock, Duration::from_millis(20));
        assert_eq!(shorter.epoch_millis(), 10_020);
        let none = Deadline::effective(None, &clock, Duration::from_secs(1));
        assert_eq!(none.epoch_millis(), 11_000);
    }

    #[test]
    fn header_round_trips_and_garbage_is_an_error() {
        let mut h = HeaderMap::new();
        Deadline::at_millis(42).write(&mut h);
        assert_eq!(
            Deadline::from_headers(Some(&h)),
            Ok(Some(Deadline::at_millis(42)))
        );
        assert_eq!(Deadline::from_headers(None), Ok(None));
        h.insert(DEADLINE_HEADER, "soon");
        assert!(Deadline::from_headers(Some(&h)).is_err());
    }
}
