//! A circuit breaker (closed → open → half-open → closed) on an injected [`Clock`].
//!
//! Closed: every call goes through; the breaker opens after
//! [`BreakerPolicy::consecutive_failures`] failures in a row, or when the failure rate over
//! the sliding [`BreakerPolicy::window`] reaches [`BreakerPolicy::failure_rate`] with at
//! least [`BreakerPolicy::min_requests`] calls in it. Open: no call goes through until
//! [`BreakerPolicy::cool_down`] has passed. Half-open: exactly
//! [`BreakerPolicy::half_open_probes`] calls go through as probes; when all of them succeed
//! the breaker closes, the first failure re-opens it for another cool-down.
//!
//! Each allowed call holds a [`Permit`] that must be given back to [`CircuitBreaker::record`];
//! a permit from an earlier phase (a slow call that started before the breaker opened) is
//! ignored, so stale outcomes never decide a probe.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::policy::BreakerPolicy;
use crate::deadline::Clock;

/// The breaker's state, for decisions and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// A limited number of probe calls go through.
    HalfOpen,
}

impl BreakerState {
    /// Lowercase name for labels and logs.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }

    /// Gauge value: 0 closed, 1 half-open, 2 open.
    #[must_use]
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

/// A call refused by the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit open; retry after {retry_after:?}")]
pub struct Open {
    /// Time until the breaker lets probes through (zero while half-open probes are out).
    pub retry_after: Duration,
}

/// Permission for one call; give it back with its outcome.
#[must_use = "record the outcome of the call with CircuitBreaker::record"]
#[derive(Debug)]
pub struct Permit {
    generation: u64,
    probe: bool,
}

impl Permit {
    /// Whether this call is a half-open probe.
    #[must_use]
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// Outcome of one call as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The target answered.
    Success,
    /// The target failed (timeout, no responders, error reply).
    Failure,
}

/// Buckets of the failure-rate window (each `window / BUCKETS` long).
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    index: u64,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until_ms: u64 },
    HalfOpen { out: u32, succeeded: u32 },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Bumped on every transition; permits of older generations are ignored.
    generation: u64,
    consecutive: u32,
    buckets: [Bucket; BUCKETS],
}

/// A circuit breaker for one target.
pub struct CircuitBreaker {
    policy: BreakerPolicy,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("policy", &self.policy)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl CircuitBreaker {
    /// A closed breaker following `policy` on `clock`.
    #[must_use]
    pub fn new(policy: BreakerPolicy, clock: Arc<dyn Clock>) -> Self {
        Self {
            policy,
            clock,
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                generation: 0,
                consecutive: 0,
                buckets: [Bucket::default(); BUCKETS],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counters, never a broken invariant.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Move an open breaker whose cool-down is over to half-open.
    fn settle(&self, inner: &mut Inner, now: u64) {
        if let Phase::Open { until_ms } = inner.phase
            && now >= until_ms
        {
            inner.phase = Phase::HalfOpen {
                out: 0,
                succeeded: 0,
            };
            inner.generation += 1;
        }
    }

    /// The current state.
    #[must_use]
    pub fn state(&self) -> BreakerState {
        let mut inner = self.lock();
        self.settle(&mut inner, self.clock.now_millis());
        match inner.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Ask to make a call.
    pub fn allow(&self) -> Result<Permit, Open> {
        let now = self.clock.now_millis();
        let mut inner = self.lock();
        self.settle(&mut inner, now);
        let generation = inner.generation;
        match &mut inner.phase {
            Phase::Closed => Ok(Permit {
                generation,
                probe: false,
            }),
            Phase::Open { until_ms } => Err(Open {
                retry_after: Duration::from_millis(until_ms.saturating_sub(now)),
            }),
            Phase::HalfOpen { out, succeeded } => {
                if *out + *succeeded < self.policy.half_open_probes {
                    *out += 1;
                    Ok(Permit {
                        generation,
                        probe: true,
                    })
                } else {
                    Err(Open {
                        retry_after: Duration::ZERO,
                    })
                }
            }
        }
    }

    /// Record the outcome of the call `permit` allowed.
    pub fn record(&self, permit: Permit, outcome: CallOutcome) {
        let now = self.clock.now_millis();
        let mut inner = self.lock();
        self.settle(&mut inner, now);
        if permit.generation != inner.generation {
            return;
        }
        match (&mut inner.phase, outcome) {
            (Phase::Closed, outcome) => self.count(&mut inner, now, outcome),
            (Phase::HalfOpen { out, succeeded }, CallOutcome::Success) => {
                *out = out.saturating_sub(1);
                *succeeded += 1;
                if *succeeded >= self.policy.half_open_probes {
                    self.transition(&mut inner, Phase::Closed);
                }
            }
            (Phase::HalfOpen { .. }, CallOutcome::Failure) => self.open(&mut inner, now),
            // An open breaker hands out no permits of its own generation.
            (Phase::Open { .. }, _) => {}
        }
    }

    fn count(&self, inner: &mut Inner, now: u64, outcome: CallOutcome) {
        let failed = outcome == CallOutcome::Failure;
        inner.consecutive = if failed { inner.consecutive + 1 } else { 0 };
        let bucket_ms = (millis(self.policy.window) / BUCKETS as u64).max(1);
        let index = now / bucket_ms;
        let slot = &mut inner.buckets[(index % BUCKETS as u64) as usize];
        if slot.index != index {
            *slot = Bucket {
                index,
                ..Bucket::default()
            };
        }
        slot.calls += 1;
        slot.failures += u32::from(failed);
        if !failed {
            return;
        }
        let p = &self.policy;
        if p.consecutive_failures > 0 && inner.consecutive >= p.consecutive_failures {
            return self.open(inner, now);
        }
        if p.failure_rate > 0.0 {
            let (calls, failures) = inner
                .buckets
                .iter()
                .filter(|b| b.index + (BUCKETS as u64) > index)
                .fold((0u32, 0u32), |(c, f), b| (c + b.calls, f + b.failures));
            if calls >= p.min_requests && f64::from(failures) >= p.failure_rate * f64::from(calls) {
                self.open(inner, now);
            }
        }
    }

    fn open(&self, inner: &mut Inner, now: u64) {
        let until_ms = now.saturating_add(millis(self.policy.cool_down));
        self.transition(inner, Phase::Open { until_ms });
    }

    fn transition(&self, inner: &mut Inner, phase: Phase) {
        inner.phase = phase;
        inner.generation += 1;
        inner.consecutive = 0;
        inner.buckets = [Bucket::default(); BUCKETS];
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::deadline::ManualClock;

    fn breaker(policy: BreakerPolicy) -> (CircuitBreaker, ManualClock) {
        let clock = ManualClock::at(1_000_000);
        (CircuitBreaker::new(policy, Arc::new(clock.clone())), clock)
    }

    fn consecutive_only(n: u32, probes: u32) -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: n,
            failure_rate: 0.0,
            cool_down: Duration::from_secs(5),
            half_open_probes: probes,
            ..BreakerPolicy::default()
        }
    }

    fn call(b: &CircuitBreaker, outcome: CallOutcome) -> bool {
        match b.allow() {
            Ok(p) => {
                b.record(p, outcome);
                true
            }
            Err(_) => false,
        }
    }

    #[test]
    fn opens_after_the_configured_consecutive_failures_and_not_before() {
        let (b, _) = breaker(consecutive_only(5, 1));
        for _ in 0..4 {
            assert!(call(&b, CallOutcome::Failure));
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // A success resets the streak.
        assert!(call(&b, CallOutcome::Success));
        for _ in 0..4 {
            assert!(call(&b, CallOutcome::Failure));
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(call(&b, CallOutcome::Failure));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_target_failing_every_call_gets_no_calls_while_open_and_exactly_the_probes_after_cool_down()
    {
        let (b, clock) = breaker(consecutive_only(5, 1));
        let mut delivered = 0;
        for _ in 0..5 {
            delivered += u32::from(call(&b, CallOutcome::Failure));
        }
        assert_eq!(delivered, 5);
        // 100 attempts during the cool-down: none reaches the target.
        for _ in 0..100 {
            match b.allow() {
                Err(Open { retry_after }) => assert!(retry_after <= Duration::from_secs(5)),
                Ok(_) => panic!("a call went through an open breaker"),
            }
            clock.advance(Duration::from_millis(49));
        }
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(Duration::from_millis(100));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // Exactly one probe while it is out.
        let probe = b.allow().unwrap();
        assert!(probe.is_probe());
        assert_eq!(b.allow().unwrap_err().retry_after, Duration::ZERO);
        // It fails: open again for a full cool-down.
        b.record(probe, CallOutcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(Duration::from_millis(4_999));
        assert!(b.allow().is_err());
        clock.advance(Duration::from_millis(1));
        // Recovery: the probe succeeds and the breaker closes.
        let probe = b.allow().unwrap();
        b.record(probe, CallOutcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        for _ in 0..10 {
            assert!(call(&b, CallOutcome::Success));
        }
    }

    #[test]
    fn half_open_lets_exactly_the_configured_probes_through_and_needs_all_to_succeed() {
        let (b, clock) = breaker(consecutive_only(1, 3));
        assert!(call(&b, CallOutcome::Failure));
        clock.advance(Duration::from_secs(5));
        let probes: Vec<_> = std::iter::from_fn(|| b.allow().ok()).take(10).collect();
        assert_eq!(probes.len(), 3);
        let mut probes = probes.into_iter();
        b.record(probes.next().unwrap(), CallOutcome::Success);
        // A finished probe does not free a slot for a fourth.
        assert!(b.allow().is_err());
        b.record(probes.next().unwrap(), CallOutcome::Success);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.record(probes.next().unwrap(), CallOutcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn outcomes_of_calls_started_before_a_transition_are_ignored() {
        let (b, clock) = breaker(consecutive_only(1, 1));
        let slow = b.allow().unwrap();
        assert!(call(&b, CallOutcome::Failure));
        clock.advance(Duration::from_secs(5));
        let probe = b.allow().unwrap();
        // The slow call from the closed phase succeeds late: it is not the probe.
        b.record(slow, CallOutcome::Success);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.record(probe, CallOutcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn failure_rate_over_the_window_opens_only_with_enough_requests() {
        let policy = BreakerPolicy {
            consecutive_failures: 0,
            failure_rate: 0.5,
            window: Duration::from_secs(10),
            min_requests: 10,
            ..BreakerPolicy::default()
        };
        let (b, _clock) = breaker(policy);
        // Alternating success/failure: 50 %, but below min_requests until the tenth call.
        for i in 0..9 {
            let outcome = if i % 2 == 0 {
                CallOutcome::Success
            } else {
                CallOutcome::Failure
            };
            assert!(call(&b, outcome));
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(call(&b, CallOutcome::Failure));
        assert_eq!(b.state(), BreakerState::Open);

        // Old failures slide out of the window: 4 failures, then 11 s later 6 successes and
        // 4 failures is 40 % — stays closed.
        let (b, clock2) = breaker(BreakerPolicy {
            consecutive_failures: 0,
            failure_rate: 0.5,
            window: Duration::from_secs(10),
            min_requests: 10,
            ..BreakerPolicy::default()
        });
        for _ in 0..4 {
            assert!(call(&b, CallOutcome::Failure));
        }
        clock2.advance(Duration::from_secs(11));
        for _ in 0..6 {
            assert!(call(&b, CallOutcome::Success));
        }
        for _ in 0..4 {
            assert!(call(&b, CallOutcome::Failure));
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // One more failure makes it 5 of 11 (45 %) — still closed; a sixth makes 50 %.
        assert!(call(&b, CallOutcome::Failure));
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(call(&b, CallOutcome::Failure));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn states_have_stable_names_and_gauge_values() {
        assert_eq!(BreakerState::HalfOpen.as_str(), "half-open");
        assert_eq!(BreakerState::Open.gauge(), 2);
        assert_eq!(BreakerState::Closed.gauge(), 0);
    }
}
