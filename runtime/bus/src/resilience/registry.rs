//! [`Resilience`]: one process's resilience — the live policies ([`ResilienceWatch`]) and,
//! per configured target, the mechanisms ([`Resilient`]) with their metrics — and
//! [`Resilience::call`], the loop every caller shares: start (or be refused), attempt with
//! the attempt's timeout, record, back off, retry or give up.
//!
//! State is kept per *configured* target: a pattern such as `subject:cc.v1.calls.*.incoming`
//! has one breaker and one budget for every call id it covers, so the table is bounded by
//! the policy file, not by traffic. When `patchbay resilience apply` changes a target's
//! policy, its mechanisms are rebuilt (a changed breaker starts closed); an unchanged
//! policy keeps its state across unrelated changes.
//!
//! Unconfigured targets get no breaker, no retries and no limit: one attempt, with the
//! caller's default timeout cut to the deadline — and never started past the deadline.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use patchbay_telemetry::Metrics;
use prometheus::{GaugeVec, IntCounterVec};
use thiserror::Error;

use super::{
    BreakerState, FailureKind, GiveUp, Next, Outcome, Rejected, ResiliencePolicy, ResilienceWatch,
    Resilient, Target,
};
use crate::client::Bus;
use crate::deadline::{Clock, Deadline};

/// How a resilient call ended without success.
#[derive(Debug, Error)]
pub enum CallError<E> {
    /// Not started (or a retry not started): breaker open, limit reached, deadline passed.
    #[error("not attempted: {0}")]
    Rejected(Rejected),
    /// Every attempt made failed; `error` is the last one.
    #[error("failed after {attempts} attempt(s) ({kind:?}): {error}")]
    Failed {
        /// The last failure's kind.
        kind: FailureKind,
        /// Attempts made.
        attempts: u32,
        /// Why no further attempt was made (`None` for unconfigured targets).
        gave_up: Option<GiveUp>,
        /// The last attempt's error.
        error: E,
    },
}

/// One attempt's failure: its kind (for the retry and breaker decisions) and the error.
#[derive(Debug)]
pub struct AttemptFailed<E> {
    /// Timeout, no responders or an error answer.
    pub kind: FailureKind,
    /// What the caller gets back if this is the last attempt.
    pub error: E,
}

/// The resilience metrics of a process, labelled by configured target.
#[derive(Debug, Clone)]
pub struct ResilienceMetrics {
    calls: IntCounterVec,
    attempts: IntCounterVec,
    gave_up: IntCounterVec,
    breaker: GaugeVec,
}

impl ResilienceMetrics {
    /// Registers the `patchbay_resilience_*` families in `metrics`.
    pub fn register(metrics: &Metrics) -> patchbay_telemetry::Result<Self> {
        Ok(Self {
            calls: metrics.counter_vec(
                "patchbay_resilience_calls_total",
                "Calls under a resilience policy by how they ended: ok, failed (after its \
                 attempts), open (refused by the breaker), full (shed at the concurrency \
                 limit), deadline (not started past the caller's deadline).",
                &["target", "result"],
            )?,
            attempts: metrics.counter_vec(
                "patchbay_resilience_attempts_total",
                "Attempts that reached the target, by outcome (ok, timeout, no-responders, \
                 error); attempts minus calls is the extra load retries added.",
                &["target", "outcome"],
            )?,
            gave_up: metrics.counter_vec(
                "patchbay_resilience_retries_denied_total",
                "Failed calls not retried, by reason (not-retryable, attempts-exhausted, \
                 budget-spent, deadline-too-close, breaker-open).",
                &["target", "reason"],
            )?,
            breaker: metrics.gauge_vec(
                "patchbay_resilience_breaker_state",
                "Circuit breaker state per target: 0 closed, 1 half-open, 2 open.",
                &["target"],
            )?,
        })
    }
}

/// Labels of a [`Rejected`] in `patchbay_resilience_calls_total`.
fn rejected_label(rejected: Rejected) -> &'static str {
    match rejected {
        Rejected::Open { .. } => "open",
        Rejected::Full { .. } => "full",
        Rejected::DeadlinePassed => "deadline",
    }
}

fn kind_label(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Timeout => "timeout",
        FailureKind::NoResponders => "no-responders",
        FailureKind::Error => "error",
    }
}

fn give_up_label(why: GiveUp) -> &'static str {
    match why {
        GiveUp::NotRetryable => "not-retryable",
        GiveUp::AttemptsExhausted => "attempts-exhausted",
        GiveUp::BudgetSpent => "budget-spent",
        GiveUp::DeadlineTooClose => "deadline-too-close",
        GiveUp::BreakerOpen => "breaker-open",
    }
}

/// One process's live policies and per-target mechanisms.
pub struct Resilience {
    watch: ResilienceWatch,
    clock: Arc<dyn Clock>,
    live: Mutex<HashMap<Target, Arc<Resilient>>>,
    metrics: Option<ResilienceMetrics>,
}

impl std::fmt::Debug for Resilience {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resilience")
            .field("targets", &self.watch.targets())
            .finish_non_exhaustive()
    }
}

impl Resilience {
    /// The mechanisms for `watch`'s policies, on `clock`.
    #[must_use]
    pub fn new(watch: ResilienceWatch, clock: Arc<dyn Clock>) -> Self {
        Self {
            watch,
            clock,
            live: Mutex::default(),
            metrics: None,
        }
    }

    /// The live policies of `bus`'s `patchbay-resilience` bucket, counted in `metrics`.
    /// A bucket that cannot be watched (not bootstrapped, no grant) is not fatal: the
    /// process runs without policies — one attempt per call, no breaker — and says so.
    pub async fn start(bus: &Bus, metrics: &Metrics) -> patchbay_telemetry::Result<Self> {
        let watch = match ResilienceWatch::start(bus).await {
            Ok(watch) => watch,
            Err(e) => {
                tracing::warn!(error = %e, "no resilience policies: calls run without breakers or retries");
                ResilienceWatch::fixed(&ResiliencePolicy::default())
            }
        };
        Self::new(watch, bus.shared_clock()).with_metrics(metrics)
    }

    /// Also count calls, attempts and refusals, and export breaker states, in `metrics`.
    pub fn with_metrics(mut self, metrics: &Metrics) -> patchbay_telemetry::Result<Self> {
        self.metrics = Some(ResilienceMetrics::register(metrics)?);
        Ok(self)
    }

    /// The live policies.
    #[must_use]
    pub fn watch(&self) -> &ResilienceWatch {
        &self.watch
    }

    /// The clock the mechanisms run on.
    #[must_use]
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// The mechanisms of the configured target covering `target`, or `None` when no policy
    /// covers it. Rebuilt when that target's policy changed.
    #[must_use]
    pub fn get(&self, target: &Target) -> Option<Arc<Resilient>> {
        let (configured, policy) = self.watch.resolve(target)?;
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(current) = live.get(&configured)
            && **current.policy() == *policy
        {
            return Some(Arc::clone(current));
        }
        let fresh = Arc::new(Resilient::new(
            configured.clone(),
            policy,
            Arc::clone(&self.clock),
        ));
        live.insert(configured, Arc::clone(&fresh));
        self.observe_breaker(&fresh);
        Some(fresh)
    }

    /// The breaker state of the configured target covering `target` (closed when none).
    #[must_use]
    pub fn breaker_state(&self, target: &Target) -> BreakerState {
        self.get(target)
            .map_or(BreakerState::Closed, |r| r.breaker().state())
    }

    fn observe_breaker(&self, r: &Resilient) {
        if let Some(m) = &self.metrics {
            m.breaker
                .with_label_values(&[&r.target().to_string()])
                .set(r.breaker().state().gauge() as f64);
        }
    }

    fn count(&self, target: &str, family: fn(&ResilienceMetrics) -> &IntCounterVec, label: &str) {
        if let Some(m) = &self.metrics {
            family(m).with_label_values(&[target, label]).inc();
        }
    }

    /// Run `work` once under `target`'s breaker, concurrency limit and deadline — for
    /// calls that cannot be repeated (a streamed HTTP body): `work` returns its result and
    /// how it failed, if it did. Refused (with nothing run) like [`Self::call`].
    pub async fn once<T>(
        &self,
        target: &Target,
        deadline: Option<Deadline>,
        work: impl Future<Output = (T, Option<FailureKind>)>,
    ) -> Result<T, Rejected> {
        let Some(r) = self.get(target) else {
            if deadline.is_some_and(|d| d.has_passed(self.clock())) {
                return Err(Rejected::DeadlinePassed);
            }
            return Ok(work.await.0);
        };
        let label = r.target().to_string();
        let mut call = self.begin(&r, &label, deadline).await?;
        let (value, failed) = work.await;
        let (attempt, result) = match failed {
            None => ("ok", Outcome::Success),
            Some(kind) => (kind_label(kind), Outcome::Failure(kind)),
        };
        self.count(&label, |m| &m.attempts, attempt);
        // One attempt by construction: whatever the policy says about retries.
        let _ = call.record(result);
        drop(call);
        self.end(&r, &label, failed.is_none());
        Ok(value)
    }

    /// Start a call on `r`, counting a refusal.
    async fn begin<'r>(
        &self,
        r: &'r Resilient,
        label: &str,
        deadline: Option<Deadline>,
    ) -> Result<super::Call<'r>, Rejected> {
        r.start(deadline).await.inspect_err(|rejected| {
            self.count(label, |m| &m.calls, rejected_label(*rejected));
            self.observe_breaker(r);
        })
    }

    /// Count how a call on `r` ended (after its slot was released) and export the
    /// breaker's state.
    fn end(&self, r: &Resilient, label: &str, ok: bool) {
        self.count(label, |m| &m.calls, if ok { "ok" } else { "failed" });
        self.observe_breaker(r);
    }

    /// Run a call to `target` under its policy: `attempt(timeout)` makes one attempt within
    /// `timeout`. Retries follow the policy (backoff with jitter, retry budget, never past
    /// `deadline`); the breaker sees every attempt; the concurrency slot is held for the
    /// whole call. Without a policy: one attempt within `default_timeout`.
    pub async fn call<T, E, F, Fut>(
        &self,
        target: &Target,
        deadline: Option<Deadline>,
        default_timeout: Duration,
        mut attempt: F,
    ) -> Result<T, CallError<E>>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, AttemptFailed<E>>>,
    {
        let Some(r) = self.get(target) else {
            let timeout = match deadline {
                None => default_timeout,
                Some(d) => d
                    .remaining(self.clock())
                    .ok_or(CallError::Rejected(Rejected::DeadlinePassed))?
                    .min(default_timeout),
            };
            return attempt(timeout)
                .await
                .map_err(|AttemptFailed { kind, error }| CallError::Failed {
                    kind,
                    attempts: 1,
                    gave_up: None,
                    error,
                });
        };
        let label = r.target().to_string();
        let mut call = self
            .begin(&r, &label, deadline)
            .await
            .map_err(CallError::Rejected)?;
        let mut timeout = call.attempt_timeout().unwrap_or_default();
        let result = loop {
            let failed = match attempt(timeout).await {
                Ok(value) => {
                    self.count(&label, |m| &m.attempts, "ok");
                    call.record(Outcome::Success);
                    break Ok(value);
                }
                Err(failed) => failed,
            };
            self.count(&label, |m| &m.attempts, kind_label(failed.kind));
            let gave_up = match call.record(Outcome::Failure(failed.kind)) {
                Next::Done => None,
                Next::GiveUp(why) => Some(why),
                Next::Retry { after } => {
                    tokio::time::sleep(after).await;
                    match call.begin_retry() {
                        Ok(next) => {
                            timeout = next;
                            continue;
                        }
                        // Refused after the backoff (the breaker opened meanwhile, the
                        // deadline passed): the caller gets the failure it already has.
                        Err(Rejected::Open { .. }) => Some(GiveUp::BreakerOpen),
                        Err(_) => Some(GiveUp::DeadlineTooClose),
                    }
                }
            };
            if let Some(why) = gave_up {
                self.count(&label, |m| &m.gave_up, give_up_label(why));
            }
            break Err(CallError::Failed {
                kind: failed.kind,
                attempts: call.attempts(),
                gave_up,
                error: failed.error,
            });
        };
        drop(call);
        self.end(&r, &label, result.is_ok());
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::deadline::ManualClock;
    use crate::resilience::ResiliencePolicy;

    fn resilience(toml: &str) -> (Resilience, ManualClock) {
        let clock = ManualClock::at(1_000_000);
        let watch = ResilienceWatch::fixed(&ResiliencePolicy::from_toml(toml).unwrap());
        (Resilience::new(watch, Arc::new(clock.clone())), clock)
    }

    async fn failing(
        r: &Resilience,
        target: &Target,
        attempts: &std::cell::Cell<u32>,
    ) -> Result<(), CallError<&'static str>> {
        r.call(target, None, Duration::from_secs(1), |_| {
            attempts.set(attempts.get() + 1);
            async {
                Err(AttemptFailed {
                    kind: FailureKind::Error,
                    error: "down",
                })
            }
        })
        .await
    }

    #[tokio::test]
    async fn one_breaker_covers_every_subject_a_pattern_matches() {
        let (r, _clock) = resilience(
            r#"
            [targets."subject:cc.v1.calls.*.incoming"]
            breaker = { consecutive_failures = 2 }
            "#,
        );
        let attempts = std::cell::Cell::new(0);
        for call in ["c1", "c2", "c3", "c4"] {
            let target = Target::Subject(format!("cc.v1.calls.{call}.incoming"));
            let _ = failing(&r, &target, &attempts).await;
        }
        // Two failures on two different call ids opened the one breaker.
        assert_eq!(attempts.get(), 2);
        assert_eq!(
            r.breaker_state(&Target::Subject("cc.v1.calls.c9.incoming".into())),
            BreakerState::Open
        );
    }

    #[tokio::test]
    async fn unconfigured_targets_get_one_attempt_and_no_breaker() {
        let (r, _clock) = resilience("");
        let attempts = std::cell::Cell::new(0);
        let target = Target::Function("anything".into());
        for _ in 0..10 {
            let result = failing(&r, &target, &attempts).await;
            assert!(matches!(
                result,
                Err(CallError::Failed {
                    attempts: 1,
                    gave_up: None,
                    ..
                })
            ));
        }
        assert_eq!(attempts.get(), 10);
    }

    #[tokio::test]
    async fn no_attempt_starts_past_the_deadline() {
        let (r, clock) = resilience("");
        let deadline = Deadline::after(&clock, Duration::from_millis(10));
        clock.advance(Duration::from_millis(11));
        let attempts = std::cell::Cell::new(0);
        let result = r
            .call(
                &Target::Function("f".into()),
                Some(deadline),
                Duration::from_secs(1),
                |_| {
                    attempts.set(attempts.get() + 1);
                    async { Ok::<_, AttemptFailed<()>>(()) }
                },
            )
            .await;
        assert!(matches!(
            result,
            Err(CallError::Rejected(Rejected::DeadlinePassed))
        ));
        assert_eq!(attempts.get(), 0);
    }

    #[tokio::test]
    async fn an_unchanged_policy_keeps_its_mechanisms_and_their_state() {
        let (r, _clock) = resilience(
            r#"
            [targets."function:f"]
            breaker = { consecutive_failures = 1 }
            "#,
        );
        let target = Target::Function("f".into());
        let attempts = std::cell::Cell::new(0);
        let _ = failing(&r, &target, &attempts).await;
        assert_eq!(r.breaker_state(&target), BreakerState::Open);
        // Same policy: the same mechanisms, still open.
        let first = r.get(&target).unwrap();
        assert!(Arc::ptr_eq(&first, &r.get(&target).unwrap()));
        assert_eq!(r.breaker_state(&target), BreakerState::Open);
    }
}
