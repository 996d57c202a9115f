//! Resilience on the request side: timeouts, retries with backoff, retry budgets, circuit
//! breakers and concurrency limits per target, out of application code.
//!
//! * [`policy`] — `deploy/resilience.toml`, validation, the stored form in the
//!   `patchbay-resilience` bucket;
//! * [`breaker`], [`budget`], [`backoff`] — the mechanisms, each on an injected
//!   [`Clock`] so they are tested as counts and states;
//! * [`Resilient`] — one target's mechanisms together, making the decisions for a call:
//!   may it start, how long may an attempt take, retry or give up, after what delay;
//! * [`watch`] — [`ResilienceWatch`], the live policies of every process;
//! * [`registry`] — [`Resilience`], a process's mechanisms per configured target with
//!   their metrics, and [`Resilience::call`], the attempt/backoff/retry loop;
//! * [`request`] — [`crate::Bus::request_resilient`], that loop around bus requests.
//!
//! Wiring the policies into routing, the function host and the gateway belongs to those
//! crates.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod policy;
pub mod registry;
pub mod request;
pub mod watch;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

pub use backoff::{Backoff, SplitMix64};
pub use breaker::{BreakerState, CallOutcome, CircuitBreaker, Open, Permit};
pub use budget::RetryBudgetBucket;
pub use policy::{
    BreakerPolicy, FailureKind, PolicyError, PolicyOrigin, RESILIENCE_BUCKET, ResiliencePolicy,
    RetryBudget, RetryPolicy, StoredTarget, Target, TargetPolicy,
};
pub use registry::{AttemptFailed, CallError, Resilience, ResilienceMetrics};
pub use request::{AttemptError, ResilientResult};
pub use watch::{ResilienceWatch, WatchError};

use crate::deadline::{Clock, Deadline};

/// Why a call (or a retry) was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Rejected {
    /// The circuit breaker is open.
    #[error("circuit open; retry after {retry_after:?}")]
    Open {
        /// Time until probes are let through.
        retry_after: Duration,
    },
    /// The concurrency limit is reached (and the policy sheds, or the wait ran out).
    #[error("concurrency limit of {limit} reached")]
    Full {
        /// The limit.
        limit: u32,
    },
    /// The deadline has passed: the work is not started.
    #[error("deadline passed")]
    DeadlinePassed,
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The target answered.
    Success,
    /// The attempt failed.
    Failure(FailureKind),
}

/// Why a failed call is not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The policy does not retry this kind of failure.
    NotRetryable,
    /// `retry.max_attempts` attempts were made.
    AttemptsExhausted,
    /// The retry budget is spent.
    BudgetSpent,
    /// The backoff would not end before the deadline.
    DeadlineTooClose,
    /// The breaker opened: further attempts would be refused anyway.
    BreakerOpen,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The call succeeded.
    Done,
    /// Wait `after`, then [`Call::begin_retry`].
    Retry {
        /// The backoff delay.
        after: Duration,
    },
    /// Return the last failure to the caller.
    GiveUp(GiveUp),
}

/// One target's mechanisms: breaker, retry budget, backoff, concurrency limit.
pub struct Resilient {
    target: Target,
    policy: Arc<TargetPolicy>,
    clock: Arc<dyn Clock>,
    breaker: CircuitBreaker,
    budget: RetryBudgetBucket,
    backoff: Backoff,
    rng: Mutex<SplitMix64>,
    slots: Option<Arc<Semaphore>>,
}

impl std::fmt::Debug for Resilient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resilient")
            .field("target", &self.target)
            .field("breaker", &self.breaker.state())
            .finish_non_exhaustive()
    }
}

impl Resilient {
    /// The mechanisms of `target` under `policy`, on `clock`.
    #[must_use]
    pub fn new(target: Target, policy: Arc<TargetPolicy>, clock: Arc<dyn Clock>) -> Self {
        Self {
            breaker: CircuitBreaker::new(policy.breaker.clone(), Arc::clone(&clock)),
            budget: RetryBudgetBucket::new(&policy.budget, Arc::clone(&clock)),
            backoff: Backoff::new(&policy.retry),
            rng: Mutex::new(SplitMix64::from_entropy()),
            slots: policy
                .concurrency
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            target,
            policy,
            clock,
        }
    }

    /// Use a seeded jitter source (tests, simulations).
    #[must_use]
    pub fn with_seed(self, seed: u64) -> Self {
        Self {
            rng: Mutex::new(SplitMix64::seeded(seed)),
            ..self
        }
    }

    /// The target.
    #[must_use]
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The policy in force.
    #[must_use]
    pub fn policy(&self) -> &Arc<TargetPolicy> {
        &self.policy
    }

    /// The breaker (state for metrics).
    #[must_use]
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The retry budget (balance for metrics).
    #[must_use]
    pub fn budget(&self) -> &RetryBudgetBucket {
        &self.budget
    }

    /// The clock decisions are made on.
    #[must_use]
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// Start a call under the caller's deadline (if any), without waiting: refused when the
    /// deadline has passed, the breaker is open, or the concurrency limit is reached.
    pub fn try_start(&self, deadline: Option<Deadline>) -> Result<Call<'_>, Rejected> {
        let slot = match &self.slots {
            None => None,
            Some(slots) => match Arc::clone(slots).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => {
                    return Err(Rejected::Full {
                        limit: self.policy.concurrency.unwrap_or(0),
                    });
                }
            },
        };
        self.start_with(deadline, slot)
    }

    /// Start a call, waiting for a concurrency slot unless the policy sheds — but never
    /// past the deadline.
    pub async fn start(&self, deadline: Option<Deadline>) -> Result<Call<'_>, Rejected> {
        let Some(slots) = self.slots.as_ref().filter(|_| !self.policy.shed_when_full) else {
            return self.try_start(deadline);
        };
        let full = Rejected::Full {
            limit: self.policy.concurrency.unwrap_or(0),
        };
        let acquire = Arc::clone(slots).acquire_owned();
        let slot = match deadline {
            None => acquire.await.map_err(|_| full)?,
            Some(d) => {
                let left = d.remaining(self.clock()).ok_or(Rejected::DeadlinePassed)?;
                tokio::time::timeout(left, acquire)
                    .await
                    .map_err(|_| Rejected::DeadlinePassed)?
                    .map_err(|_| full)?
            }
        };
        self.start_with(deadline, Some(slot))
    }

    fn start_with(
        &self,
        deadline: Option<Deadline>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Call<'_>, Rejected> {
        if deadline.is_some_and(|d| d.has_passed(self.clock())) {
            return Err(Rejected::DeadlinePassed);
        }
        let permit = self
            .breaker
            .allow()
            .map_err(|Open { retry_after }| Rejected::Open { retry_after })?;
        self.budget.deposit();
        Ok(Call {
            resilient: self,
            deadline,
            attempts: 1,
            permit: Some(permit),
            _slot: slot,
        })
    }
}

/// One call in progress: attempts, deadline, the breaker permit of the current attempt and
/// the concurrency slot (released on drop).
#[derive(Debug)]
pub struct Call<'a> {
    resilient: &'a Resilient,
    deadline: Option<Deadline>,
    attempts: u32,
    permit: Option<Permit>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Call<'_> {
    /// Attempts started so far (1 after start).
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The caller's deadline, if any.
    #[must_use]
    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    /// The timeout of the current attempt: the policy's, cut to the deadline; `None` when
    /// the deadline has passed.
    #[must_use]
    pub fn attempt_timeout(&self) -> Option<Duration> {
        let own = self.resilient.policy.timeout;
        match self.deadline {
            None => Some(own),
            Some(d) => d
                .remaining(self.resilient.clock())
                .map(|left| left.min(own)),
        }
    }

    /// Record how the current attempt ended and decide what follows.
    pub fn record(&mut self, outcome: Outcome) -> Next {
        let r = self.resilient;
        let kind = match outcome {
            Outcome::Success => {
                if let Some(p) = self.permit.take() {
                    r.breaker.record(p, CallOutcome::Success);
                }
                return Next::Done;
            }
            Outcome::Failure(kind) => kind,
        };
        if let Some(p) = self.permit.take() {
            r.breaker.record(p, CallOutcome::Failure);
        }
        let retry = &r.policy.retry;
        if !retry.retry_on.contains(&kind) {
            return Next::GiveUp(GiveUp::NotRetryable);
        }
        if self.attempts >= retry.max_attempts {
            return Next::GiveUp(GiveUp::AttemptsExhausted);
        }
        let remaining = match self.deadline {
            None => None,
            Some(d) => match d.remaining(r.clock()) {
                Some(left) => Some(left),
                None => return Next::GiveUp(GiveUp::DeadlineTooClose),
            },
        };
        let delay = {
            let mut rng = r.rng.lock().unwrap_or_else(PoisonError::into_inner);
            r.backoff.delay(self.attempts, remaining, &mut rng)
        };
        let Some(after) = delay else {
            return Next::GiveUp(GiveUp::DeadlineTooClose);
        };
        if r.breaker.state() == BreakerState::Open {
            return Next::GiveUp(GiveUp::BreakerOpen);
        }
        // Last, so a retry that would not happen anyway costs no budget.
        if !r.budget.try_withdraw() {
            return Next::GiveUp(GiveUp::BudgetSpent);
        }
        Next::Retry { after }
    }

    /// Start the next attempt after the backoff: returns its timeout, or why it may not
    /// start (deadline passed, breaker open).
    pub fn begin_retry(&mut self) -> Result<Duration, Rejected> {
        let timeout = self.attempt_timeout().ok_or(Rejected::DeadlinePassed)?;
        let permit = self
            .resilient
            .breaker
            .allow()
            .map_err(|Open { retry_after }| Rejected::Open { retry_after })?;
        self.permit = Some(permit);
        self.attempts += 1;
        Ok(timeout)
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        // An attempt abandoned without an outcome (the caller was cancelled). A half-open
        // probe must still be answered, or the breaker would wait for it forever: count it
        // as failed, which re-opens and probes again after the cool-down.
        if let Some(p) = self.permit.take()
            && p.is_probe()
        {
            self.resilient.breaker.record(p, CallOutcome::Failure);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::deadline::ManualClock;

    fn lookup_policy() -> TargetPolicy {
        TargetPolicy {
            timeout: Duration::from_millis(250),
            retry: RetryPolicy {
                max_attempts: 2,
                backoff_base: Duration::from_millis(20),
                backoff_max: Duration::from_millis(100),
                jitter: 1.0,
                retry_on: vec![FailureKind::Timeout, FailureKind::NoResponders],
            },
            budget: RetryBudget {
                ratio: 0.2,
                min_per_sec: 1.0,
            },
            // The defaults: 5 consecutive failures or 50 % of ≥ 20 over 10 s, 5 s cool-down,
            // one probe.
            breaker: BreakerPolicy::default(),
            concurrency: None,
            shed_when_full: false,
        }
    }

    fn resilient(policy: TargetPolicy) -> (Resilient, ManualClock) {
        let clock = ManualClock::at(1_000_000);
        let r = Resilient::new(
            "subject:cc.v1.customers.lookup".parse().unwrap(),
            Arc::new(policy),
            Arc::new(clock.clone()),
        )
        .with_seed(9);
        (r, clock)
    }

    /// Drive one call against a target that fails every attempt with `kind`; returns the
    /// attempts that reached the target (0 when refused).
    fn failing_call(
        r: &Resilient,
        clock: &ManualClock,
        deadline: Option<Deadline>,
        kind: FailureKind,
    ) -> u32 {
        let Ok(mut call) = r.try_start(deadline) else {
            return 0;
        };
        loop {
            match call.record(Outcome::Failure(kind)) {
                Next::Retry { after } => {
                    clock.advance(after);
                    if call.begin_retry().is_err() {
                        return call.attempts();
                    }
                }
                Next::Done | Next::GiveUp(_) => return call.attempts(),
            }
        }
    }

    #[test]
    fn a_target_failing_every_call_opens_the_breaker_then_gets_nothing_until_the_probe() {
        let (r, clock) = resilient(lookup_policy());
        // Exactly five failed attempts reach the target, then the breaker is open.
        let mut reached = 0;
        while r.breaker().state() == BreakerState::Closed {
            reached += failing_call(&r, &clock, None, FailureKind::Timeout);
            assert!(reached <= 5, "{reached} attempts reached the target");
        }
        assert_eq!(reached, 5);
        assert_eq!(r.breaker().state(), BreakerState::Open);
        for _ in 0..200 {
            assert!(matches!(r.try_start(None), Err(Rejected::Open { .. })));
            clock.advance(Duration::from_millis(20));
        }
        clock.advance(Duration::from_secs(1));
        // After the cool-down: one probe; it succeeds and closes the breaker.
        let mut probe = r.try_start(None).unwrap();
        assert!(matches!(r.try_start(None), Err(Rejected::Open { .. })));
        assert_eq!(probe.record(Outcome::Success), Next::Done);
        drop(probe);
        assert_eq!(r.breaker().state(), BreakerState::Closed);
        assert!(r.try_start(None).is_ok());
    }

    #[test]
    fn retries_under_a_total_outage_stay_within_the_budget() {
        // Breaker off, so every request tries; 3 attempts each wanted.
        let mut policy = lookup_policy();
        policy.retry.max_attempts = 3;
        policy.breaker.consecutive_failures = 0;
        policy.breaker.failure_rate = 0.0;
        let (r, clock) = resilient(policy);
        let mut attempts = 0;
        for _ in 0..1000 {
            attempts += failing_call(&r, &clock, None, FailureKind::Timeout);
            clock.advance(Duration::from_millis(10));
        }
        let retries = f64::from(attempts - 1000);
        let seconds = clock.now_millis().saturating_sub(1_000_000) as f64 / 1000.0;
        let bound = 0.2 * 1000.0 + 1.0 * (seconds + 1.0) + 1.0;
        assert!(retries <= bound, "{retries} retries > budget {bound}");
        assert!(retries >= 190.0, "{retries}");
    }

    #[test]
    fn failures_outside_retry_on_are_not_retried() {
        let (r, clock) = resilient(lookup_policy());
        assert_eq!(failing_call(&r, &clock, None, FailureKind::Error), 1);
        let mut call = r.try_start(None).unwrap();
        assert_eq!(
            call.record(Outcome::Failure(FailureKind::Error)),
            Next::GiveUp(GiveUp::NotRetryable)
        );
    }

    #[test]
    fn no_work_starts_or_retries_past_the_deadline() {
        let (r, clock) = resilient(lookup_policy());
        let passed = Deadline::at_millis(clock.now_millis());
        assert!(matches!(
            r.try_start(Some(passed)),
            Err(Rejected::DeadlinePassed)
        ));

        // 300 ms left: the first attempt gets 250 ms (its own timeout)…
        let deadline = Deadline::after(&clock, Duration::from_millis(300));
        let mut call = r.try_start(Some(deadline)).unwrap();
        assert_eq!(call.attempt_timeout(), Some(Duration::from_millis(250)));
        clock.advance(Duration::from_millis(250));
        // …the retry only what is left after the backoff, and never past the deadline.
        match call.record(Outcome::Failure(FailureKind::Timeout)) {
            Next::Retry { after } => {
                assert!(after < Duration::from_millis(50), "{after:?}");
                clock.advance(after);
                let timeout = call.begin_retry().unwrap();
                assert!(clock.now_millis() + timeout.as_millis() as u64 <= deadline.epoch_millis());
            }
            other => panic!("{other:?}"),
        }

        // With 10 ms left and a 20 ms backoff floor, a retry would only fail: give up.
        let mut policy = lookup_policy();
        policy.retry.jitter = 0.0;
        let (r, clock) = resilient(policy);
        let deadline = Deadline::after(&clock, Duration::from_millis(260));
        let mut call = r.try_start(Some(deadline)).unwrap();
        clock.advance(Duration::from_millis(250));
        assert_eq!(
            call.record(Outcome::Failure(FailureKind::Timeout)),
            Next::GiveUp(GiveUp::DeadlineTooClose)
        );
        clock.advance(Duration::from_millis(10));
        assert_eq!(call.attempt_timeout(), None);
        assert_eq!(call.begin_retry(), Err(Rejected::DeadlinePassed));
    }

    #[test]
    fn a_full_target_sheds_calls_and_frees_the_slot_when_a_call_ends() {
        let mut policy = lookup_policy();
        policy.concurrency = Some(2);
        policy.shed_when_full = true;
        let (r, _clock) = resilient(policy);
        let a = r.try_start(None).unwrap();
        let b = r.try_start(None).unwrap();
        assert_eq!(r.try_start(None).unwrap_err(), Rejected::Full { limit: 2 });
        drop(a);
        assert!(r.try_start(None).is_ok());
        drop(b);
    }

    #[test]
    fn an_abandoned_probe_reopens_the_breaker_instead_of_blocking_it() {
        let mut policy = lookup_policy();
        policy.breaker.consecutive_failures = 1;
        let (r, clock) = resilient(policy);
        let mut call = r.try_start(None).unwrap();
        let _ = call.record(Outcome::Failure(FailureKind::Error));
        drop(call);
        clock.advance(Duration::from_secs(5));
        drop(r.try_start(None).unwrap());
        assert_eq!(r.breaker().state(), BreakerState::Open);
        clock.advance(Duration::from_secs(5));
        assert!(r.try_start(None).is_ok());
    }
}
