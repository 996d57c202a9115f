//! `call-analytics`: running per-queue call counts in the function's kv bucket.
//!
//! Trigger: `cc.v1.calls.*.ended` and `cc.v1.calls.*.abandoned` (stream CC_CALLS), JSON
//! data with at least `queue` (a missing queue counts under `unknown`) and optionally
//! `duration_s`/`duration_ms` and `wait_s`. For the last subject token `ended` it counts a
//! handled call (adding its talk time), for `abandoned` an abandoned one; other events are
//! dropped. Counters live under `queue-<queue>` as
//! `{ "calls", "handled", "abandoned", "talk_time_s" }`. No outputs, so no publish
//! allow-list is needed; dashboards read the bucket.
//!
//! The kv interface has no compare-and-set, so two runtime nodes updating one queue at
//! the same instant can lose an increment: these are operational estimates, not billing
//! figures (give the trigger per-key ordering on the queue to make them exact).
//!
//! Payload types are local serde structs until `services/protocol` offers them.

use patchbay_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Deserialize)]
struct CallFinished {
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    duration_s: Option<u64>,
    #[serde(default)]
    duration_ms: Option<u64>,
}

/// Counters of one queue (the kv value).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct QueueStats {
    calls: u64,
    handled: u64,
    abandoned: u64,
    talk_time_s: u64,
}

/// How a call finished, from the subject's last token.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Handled,
    Abandoned,
}

impl QueueStats {
    fn record(&mut self, outcome: Outcome, talk_time_s: u64) {
        self.calls += 1;
        match outcome {
            Outcome::Handled => {
                self.handled += 1;
                self.talk_time_s += talk_time_s;
            }
            Outcome::Abandoned => self.abandoned += 1,
        }
    }
}

struct CallAnalytics;

impl Handler for CallAnalytics {
    fn handle(e: Event) -> Result<Vec<Event>, Failure> {
        let outcome = match e.subject_token_from_end(0) {
            Some("ended") => Outcome::Handled,
            Some("abandoned") => Outcome::Abandoned,
            _ => return Err(Failure::drop(format!("not a call outcome: {}", e.subject))),
        };
        let call: CallFinished = e.json()?;
        let queue = call.queue.as_deref().unwrap_or("unknown");
        let key = format!("queue-{}", kv::key_token(queue));
        let mut stats: QueueStats = kv::get_json(&key)?.unwrap_or_default();
        let talk_time_s = call
            .duration_s
            .or(call.duration_ms.map(|ms| ms / 1000))
            .unwrap_or(0);
        stats.record(outcome, talk_time_s);
        kv::set_json(&key, &stats)?;
        debug!("{key}: {} calls", stats.calls);
        Ok(vec![])
    }
}

patchbay_sdk::export!(CallAnalytics);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handled_calls_add_talk_time_and_abandoned_ones_do_not() {
        let mut s = QueueStats::default();
        s.record(Outcome::Handled, 120);
        s.record(Outcome::Abandoned, 999);
        assert_eq!(
            s,
            QueueStats {
                calls: 2,
                handled: 1,
                abandoned: 1,
                talk_time_s: 120
            }
        );
    }
}
