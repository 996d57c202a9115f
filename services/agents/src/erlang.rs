//! Erlang C: the planner's closed-form answer for an M/M/N queue (Poisson arrivals,
//! exponential handle times, N identical agents, nobody abandons, FIFO).
//!
//! Owns the formulas only; the simulator ([`crate::simulate`]) prints them beside its
//! own figures, and a test checks the real engine agrees. With traffic `A` Erlangs
//! (arrival rate × mean handle time) and `N` agents:
//!
//! * P(wait) = C(N, A), computed from Erlang B by the stable recurrence
//!   `B(0) = 1, B(n) = A·B(n−1) / (n + A·B(n−1))`, then `C = N·B / (N − A·(1 − B))`;
//! * SL(t) = 1 − C · e^(−(N − A)·t / AHT) (share answered within `t`);
//! * ASA = C · AHT / (N − A).
//!
//! When `A ≥ N` the queue grows without bound: P(wait) = 1, SL = 0, ASA = ∞.

use serde::Serialize;

/// The probability that a call waits (Erlang C), for `agents` and `traffic` Erlangs.
#[must_use]
pub fn p_wait(agents: u32, traffic: f64) -> f64 {
    let n = f64::from(agents);
    if agents == 0 || traffic >= n {
        return 1.0;
    }
    if traffic <= 0.0 {
        return 0.0;
    }
    let mut b = 1.0;
    for k in 1..=agents {
        b = traffic * b / (f64::from(k) + traffic * b);
    }
    n * b / (n - traffic * (1.0 - b))
}

/// The share of calls answered within `threshold_secs`.
#[must_use]
pub fn service_level(agents: u32, traffic: f64, aht_secs: f64, threshold_secs: f64) -> f64 {
    let n = f64::from(agents);
    if traffic >= n {
        return 0.0;
    }
    1.0 - p_wait(agents, traffic) * (-(n - traffic) * threshold_secs / aht_secs).exp()
}

/// The average speed of answer, seconds.
#[must_use]
pub fn asa_secs(agents: u32, traffic: f64, aht_secs: f64) -> f64 {
    let n = f64::from(agents);
    if traffic >= n {
        return f64::INFINITY;
    }
    p_wait(agents, traffic) * aht_secs / (n - traffic)
}

/// Erlang C figures for one staffing question.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ErlangC {
    /// Agents.
    pub agents: u32,
    /// Offered traffic, Erlangs.
    pub traffic: f64,
    /// Mean handle time, seconds.
    pub aht_secs: f64,
    /// Service-level threshold, seconds.
    pub threshold_secs: f64,
    /// P(wait).
    pub p_wait: f64,
    /// Share answered within the threshold.
    pub service_level: f64,
    /// Average speed of answer, seconds.
    pub asa_secs: f64,
    /// Agent occupancy (A / N, capped at 1).
    pub occupancy: f64,
}

impl ErlangC {
    /// "What do `agents` agents give at `calls` calls per `period_secs` with `aht_secs`
    /// handle time, measured at `threshold_secs`?"
    #[must_use]
    pub fn new(
        agents: u32,
        calls: f64,
        period_secs: f64,
        aht_secs: f64,
        threshold_secs: f64,
    ) -> Self {
        let traffic = if period_secs > 0.0 {
            calls * aht_secs / period_secs
        } else {
            0.0
        };
        Self {
            agents,
            traffic,
            aht_secs,
            threshold_secs,
            p_wait: p_wait(agents, traffic),
            service_level: service_level(agents, traffic, aht_secs, threshold_secs),
            asa_secs: asa_secs(agents, traffic, aht_secs),
            occupancy: if agents == 0 {
                1.0
            } else {
                (traffic / f64::from(agents)).min(1.0)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_the_planners_question_for_fourteen_agents() {
        // 100 calls per 30 minutes, 3-minute handle time: 10 Erlangs.
        let e = ErlangC::new(14, 100.0, 1800.0, 180.0, 20.0);
        assert!((e.traffic - 10.0).abs() < 1e-9);
        assert!((e.p_wait - 0.174).abs() < 0.002, "{}", e.p_wait);
        assert!(
            (e.service_level - 0.889).abs() < 0.003,
            "{}",
            e.service_level
        );
        assert!((e.asa_secs - 7.8).abs() < 0.1, "{}", e.asa_secs);
    }

    #[test]
    fn overloaded_queue_always_waits() {
        assert_eq!(p_wait(10, 10.0), 1.0);
        assert_eq!(service_level(10, 12.0, 180.0, 20.0), 0.0);
        assert!(asa_secs(10, 10.0, 180.0).is_infinite());
    }

    #[test]
    fn one_agent_waits_with_probability_equal_to_its_load() {
        // M/M/1: P(wait) = ρ.
        assert!((p_wait(1, 0.6) - 0.6).abs() < 1e-12);
    }
}
