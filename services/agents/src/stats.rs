//! Real-time queue statistics: plain structs the adapter turns into Prometheus gauges and
//! a request reply, and the simulator averages over replications.
//!
//! Owns the definitions (what is counted where, which service-level formulas); the engine
//! fills them in [`crate::engine::Engine::stats`]. Counters are cumulative since the
//! engine started or since [`crate::engine::Engine::reset_counters`], and survive
//! snapshot / restore. A call counts in the queue it is in when its wait ends (answer or
//! abandon); its wait is measured from when it was *first* queued, so overflow does not
//! reset it.

use patchbay_protocol::payload::AgentState;
use serde::{Deserialize, Serialize};

/// Cumulative counters of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueueCounters {
    /// Calls that entered the queue (routed to it or overflowed into it).
    pub entered: u64,
    /// Calls accepted by an agent while in this queue.
    pub answered: u64,
    /// … of which within the service-level threshold.
    pub answered_within_threshold: u64,
    /// Calls whose caller hung up while waiting in this queue (offered or not).
    pub abandoned: u64,
    /// … of which within the threshold ("short abandons").
    pub abandoned_within_threshold: u64,
    /// Calls that overflowed out of this queue.
    pub overflowed_out: u64,
    /// Sum of the waits (first queued → accepted) of answered calls, for ASA.
    pub answer_wait_ms_total: u64,
}

impl QueueCounters {
    /// Calls whose wait ended in this queue: answered + abandoned (the "offered" of the
    /// service-level formulas; overflowed calls count in the queue they end in).
    #[must_use]
    pub fn offered(&self) -> u64 {
        self.answered + self.abandoned
    }

    /// Add another queue's counters (for totals).
    pub fn merge(&mut self, other: &Self) {
        self.entered += other.entered;
        self.answered += other.answered;
        self.answered_within_threshold += other.answered_within_threshold;
        self.abandoned += other.abandoned;
        self.abandoned_within_threshold += other.abandoned_within_threshold;
        self.overflowed_out += other.overflowed_out;
        self.answer_wait_ms_total += other.answer_wait_ms_total;
    }

    /// The three common service-level formulas at `threshold_secs`.
    #[must_use]
    pub fn service_level(&self, threshold_secs: u64) -> ServiceLevel {
        let within = self.answered_within_threshold as f64;
        let ratio = |den: u64| (den > 0).then(|| within / den as f64);
        ServiceLevel {
            threshold_secs,
            of_offered: ratio(self.offered()),
            of_answered: ratio(self.answered),
            of_offered_less_short_abandons: ratio(
                self.offered()
                    .saturating_sub(self.abandoned_within_threshold),
            ),
        }
    }

    /// Average speed of answer in seconds (None before the first answer).
    #[must_use]
    pub fn asa_secs(&self) -> Option<f64> {
        (self.answered > 0)
            .then(|| self.answer_wait_ms_total as f64 / 1000.0 / self.answered as f64)
    }

    /// Abandoned / offered (None before the first call ended its wait).
    #[must_use]
    pub fn abandon_rate(&self) -> Option<f64> {
        let offered = self.offered();
        (offered > 0).then(|| self.abandoned as f64 / offered as f64)
    }
}

/// Service level: the share of calls answered within `threshold_secs`, by the three
/// formulas in common use. Each is `None` while its denominator is zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceLevel {
    /// The threshold T.
    pub threshold_secs: u64,
    /// answered within T / offered (answered + abandoned). The strictest; the default
    /// shown on dashboards.
    pub of_offered: Option<f64>,
    /// answered within T / answered. Ignores abandons; what Erlang C predicts when nobody
    /// abandons.
    pub of_answered: Option<f64>,
    /// answered within T / (offered − abandoned within T). Short abandons are neither
    /// good nor bad.
    pub of_offered_less_short_abandons: Option<f64>,
}

/// Agents counted by published state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentsByState {
    /// Logged out.
    pub offline: u32,
    /// Ready for work.
    pub available: u32,
    /// Holding an offer.
    pub reserved: u32,
    /// Handling work.
    pub busy: u32,
    /// After-call work.
    pub wrap_up: u32,
    /// Missed an offer, not offered work.
    pub not_responding: u32,
    /// On a break.
    pub on_break: u32,
}

impl AgentsByState {
    /// Count one agent in `state`.
    pub fn add(&mut self, state: AgentState) {
        let slot = match state {
            AgentState::Offline => &mut self.offline,
            AgentState::Available => &mut self.available,
            AgentState::Reserved => &mut self.reserved,
            AgentState::Busy => &mut self.busy,
            AgentState::WrapUp => &mut self.wrap_up,
            AgentState::NotResponding => &mut self.not_responding,
            AgentState::Break => &mut self.on_break,
        };
        *slot += 1;
    }

    /// The count in `state`.
    #[must_use]
    pub fn get(&self, state: AgentState) -> u32 {
        match state {
            AgentState::Offline => self.offline,
            AgentState::Available => self.available,
            AgentState::Reserved => self.reserved,
            AgentState::Busy => self.busy,
            AgentState::WrapUp => self.wrap_up,
            AgentState::NotResponding => self.not_responding,
            AgentState::Break => self.on_break,
        }
    }

    /// Agents working or ready (not offline, not on break).
    #[must_use]
    pub fn staffed(&self) -> u32 {
        self.available + self.reserved + self.busy + self.wrap_up + self.not_responding
    }

    /// Agents occupied by work (reserved, busy, wrap-up).
    #[must_use]
    pub fn occupied(&self) -> u32 {
        self.reserved + self.busy + self.wrap_up
    }

    /// occupied / staffed, right now.
    #[must_use]
    pub fn occupancy(&self) -> Option<f64> {
        let staffed = self.staffed();
        (staffed > 0).then(|| f64::from(self.occupied()) / f64::from(staffed))
    }
}

/// The real-time picture of one queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Calls waiting (including those being offered).
    pub waiting: u64,
    /// The longest current wait (since first queued), ms.
    pub longest_wait_ms: u64,
    /// Agents serving this queue, by state (agents without a queue list serve all).
    pub agents: AgentsByState,
    /// Cumulative counters.
    pub counters: QueueCounters,
    /// Service level by the three formulas.
    pub service_level: ServiceLevel,
    /// Average speed of answer, seconds.
    pub asa_secs: Option<f64>,
    /// Abandoned / offered.
    pub abandon_rate: Option<f64>,
    /// Occupancy of the queue's staffed agents right now (occupied / staffed).
    pub occupancy: Option<f64>,
}

impl QueueStats {
    pub(crate) fn empty(queue: &str, threshold_secs: u64) -> Self {
        Self {
            queue: queue.to_string(),
            waiting: 0,
            longest_wait_ms: 0,
            agents: AgentsByState::default(),
            counters: QueueCounters::default(),
            service_level: ServiceLevel {
                threshold_secs,
                ..ServiceLevel::default()
            },
            asa_secs: None,
            abandon_rate: None,
            occupancy: None,
        }
    }

    pub(crate) fn set_counters(&mut self, counters: QueueCounters) {
        self.counters = counters;
        self.service_level = counters.service_level(self.service_level.threshold_secs);
        self.asa_secs = counters.asa_secs();
        self.abandon_rate = counters.abandon_rate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_level_formulas_differ_only_in_their_denominator() {
        let c = QueueCounters {
            answered: 80,
            answered_within_threshold: 60,
            abandoned: 20,
            abandoned_within_threshold: 10,
            ..QueueCounters::default()
        };
        let sl = c.service_level(20);
        assert_eq!(sl.of_offered, Some(0.6));
        assert_eq!(sl.of_answered, Some(0.75));
        assert_eq!(sl.of_offered_less_short_abandons, Some(60.0 / 90.0));
        assert_eq!(c.abandon_rate(), Some(0.2));
    }

    #[test]
    fn rates_are_absent_before_any_call() {
        let c = QueueCounters::default();
        assert_eq!(c.service_level(20).of_offered, None);
        assert_eq!(c.asa_secs(), None);
        assert_eq!(c.abandon_rate(), None);
    }
}
