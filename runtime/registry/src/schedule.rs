//! Cron schedules for `schedule` triggers (five fields, or six with seconds first).
//!
//! Exactly one run per tick across all nodes comes from the bus, not from here: every
//! node publishes each tick to PATCHBAY_TICKS with a `Nats-Msg-Id` naming the function
//! and the tick time, the stream keeps the first copy, and a shared durable consumer
//! hands it to one node. This module only answers "when is the next tick?".

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use thiserror::Error;

/// A cron expression that cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid cron expression {expression:?}: {reason}")]
pub struct ScheduleError {
    /// The expression.
    pub expression: String,
    /// Why it was refused.
    pub reason: String,
}

/// A parsed cron schedule (UTC).
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
}

impl Schedule {
    /// Parse `expression`; a leading seconds field is optional.
    pub fn parse(expression: &str) -> Result<Self, ScheduleError> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expression)
            .map_err(|e| ScheduleError {
                expression: expression.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self { cron })
    }

    /// The first tick strictly after `after_millis` (ms since the Unix epoch), always on
    /// a whole second.
    #[must_use]
    pub fn next_after(&self, after_millis: u64) -> Option<u64> {
        // croner keeps the sub-second part of its start time, so an unaligned start would
        // give every node its own tick times (and tick ids): one run per node per tick
        // instead of one per tick. Ticks are whole seconds; so is the search's start.
        let whole_second = after_millis - after_millis % 1000;
        let after = DateTime::<Utc>::from_timestamp_millis(i64::try_from(whole_second).ok()?)?;
        let next = self.cron.find_next_occurrence(&after, false).ok()?;
        u64::try_from(next.timestamp_millis()).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn per_second_schedules_tick_every_second_on_the_second() {
        let s = Schedule::parse("* * * * * *").unwrap();
        assert_eq!(s.next_after(1_000_500), Some(1_001_000));
        assert_eq!(s.next_after(1_000_999), Some(1_001_000));
        assert_eq!(s.next_after(1_001_000), Some(1_002_000));
    }

    #[test]
    fn nodes_started_at_different_moments_agree_on_tick_times() {
        let s = Schedule::parse("*/2 * * * * *").unwrap();
        // Starting at arbitrary milliseconds, ticks still fall on the schedule's seconds.
        assert_eq!(s.next_after(1_795_648_369_740), Some(1_795_648_370_000));
        assert_eq!(s.next_after(1_795_648_370_044), Some(1_795_648_372_000));
        let five = Schedule::parse("*/5 * * * *").unwrap();
        assert_eq!(five.next_after(60_123), Some(300_000));
    }

    #[test]
    fn five_field_expressions_tick_on_minutes() {
        let s = Schedule::parse("*/5 * * * *").unwrap();
        // 1970-01-01T00:01:00Z → next multiple of five minutes.
        assert_eq!(s.next_after(60_000), Some(300_000));
    }

    #[test]
    fn nonsense_is_refused_with_the_expression_named() {
        let err = Schedule::parse("every tuesday").unwrap_err();
        assert_eq!(err.expression, "every tuesday");
        assert!(Schedule::parse("").is_err());
        assert!(Schedule::parse("61 * * * * *").is_err());
    }
}
