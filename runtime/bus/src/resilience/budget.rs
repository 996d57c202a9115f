//! The retry budget (Finagle / Linkerd style): retries may add at most
//! [`RetryBudget::ratio`] extra load, plus [`RetryBudget::min_per_sec`] so a quiet target
//! can still retry.
//!
//! A token bucket on an injected [`Clock`]: every request deposits `ratio` tokens, every
//! second adds `min_per_sec`, every retry withdraws one whole token. The bucket starts with
//! one second's reserve and holds at most ten seconds' reserve plus ten tokens, so a long
//! healthy spell cannot bank a retry storm for the next outage. Over any run, therefore,
//! `retries ≤ ratio × requests + min_per_sec × (seconds + 1)` (plus at most one token
//! from rounding): under a total outage the extra load stays at the budget.

use std::sync::{Arc, Mutex, PoisonError};

use super::policy::RetryBudget;
use crate::deadline::Clock;

/// How many seconds of `min_per_sec` the bucket can hold (Finagle's 10 s TTL).
const RESERVE_SECS: f64 = 10.0;

#[derive(Debug)]
struct Bucket {
    balance: f64,
    refilled_at_ms: u64,
}

/// The retry budget of one target in one process.
pub struct RetryBudgetBucket {
    ratio: f64,
    min_per_sec: f64,
    cap: f64,
    clock: Arc<dyn Clock>,
    bucket: Mutex<Bucket>,
}

impl std::fmt::Debug for RetryBudgetBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudgetBucket")
            .field("ratio", &self.ratio)
            .field("min_per_sec", &self.min_per_sec)
            .field("balance", &self.balance())
            .finish_non_exhaustive()
    }
}

impl RetryBudgetBucket {
    /// A budget following `policy` on `clock`, holding one second's reserve.
    #[must_use]
    pub fn new(policy: &RetryBudget, clock: Arc<dyn Clock>) -> Self {
        let ratio = policy.ratio.clamp(0.0, 1.0);
        let min_per_sec = policy.min_per_sec.max(0.0);
        let now = clock.now_millis();
        Self {
            ratio,
            min_per_sec,
            cap: min_per_sec * RESERVE_SECS + 10.0 * ratio,
            clock,
            bucket: Mutex::new(Bucket {
                balance: min_per_sec,
                refilled_at_ms: now,
            }),
        }
    }

    fn refill(&self, bucket: &mut Bucket) {
        let now = self.clock.now_millis();
        let elapsed = now.saturating_sub(bucket.refilled_at_ms);
        if elapsed > 0 {
            // Milliseconds as f64 are exact far beyond any process lifetime.
            #[allow(clippy::cast_precision_loss)]
            let secs = elapsed as f64 / 1000.0;
            bucket.balance = (bucket.balance + self.min_per_sec * secs).min(self.cap);
            bucket.refilled_at_ms = now;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.bucket.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request (first attempt) was made: deposit `ratio` tokens.
    pub fn deposit(&self) {
        let mut bucket = self.lock();
        self.refill(&mut bucket);
        bucket.balance = (bucket.balance + self.ratio).min(self.cap);
    }

    /// Ask to retry: withdraws one token and returns true, or returns false when the
    /// budget is spent.
    #[must_use]
    pub fn try_withdraw(&self) -> bool {
        let mut bucket = self.lock();
        self.refill(&mut bucket);
        if bucket.balance >= 1.0 {
            bucket.balance -= 1.0;
            true
        } else {
            false
        }
    }

    /// Tokens available now (for metrics).
    #[must_use]
    pub fn balance(&self) -> f64 {
        let mut bucket = self.lock();
        self.refill(&mut bucket);
        bucket.balance
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::deadline::ManualClock;

    fn budget(ratio: f64, min_per_sec: f64) -> (RetryBudgetBucket, ManualClock) {
        let clock = ManualClock::at(5_000_000);
        let b =
            RetryBudgetBucket::new(&RetryBudget { ratio, min_per_sec }, Arc::new(clock.clone()));
        (b, clock)
    }

    /// Under 100 % failure, every request wants `max_attempts - 1` retries.
    fn outage(
        b: &RetryBudgetBucket,
        clock: &ManualClock,
        requests: u32,
        every: Duration,
        max_attempts: u32,
    ) -> u32 {
        let mut retries = 0;
        for _ in 0..requests {
            b.deposit();
            for _ in 1..max_attempts {
                if b.try_withdraw() {
                    retries += 1;
                } else {
                    break;
                }
            }
            clock.advance(every);
        }
        retries
    }

    #[test]
    fn retries_stop_at_the_budget_under_a_total_outage() {
        // 1000 requests over 10 s, each wanting 2 retries: 2000 without a budget.
        let (b, clock) = budget(0.2, 1.0);
        let retries = outage(&b, &clock, 1000, Duration::from_millis(10), 3);
        let seconds = 10.0;
        let bound = 0.2 * 1000.0 + 1.0 * (seconds + 1.0) + 1.0;
        assert!(f64::from(retries) <= bound, "{retries} > {bound}");
        // The budget is spent, not refused outright.
        assert!(f64::from(retries) >= 0.2 * 1000.0 - 1.0, "{retries}");
    }

    #[test]
    fn a_quiet_target_can_retry_at_min_per_sec() {
        // One request every 2 s for 100 s: the ratio alone would allow 10 retries in all;
        // min_per_sec = 1 allows each request its retry.
        let (b, clock) = budget(0.2, 1.0);
        let retries = outage(&b, &clock, 50, Duration::from_secs(2), 2);
        assert_eq!(retries, 50);
    }

    #[test]
    fn a_healthy_spell_banks_at_most_the_cap() {
        let (b, clock) = budget(0.2, 1.0);
        for _ in 0..100_000 {
            b.deposit();
        }
        clock.advance(Duration::from_secs(3_600));
        assert!(
            b.balance() <= 1.0 * RESERVE_SECS + 10.0 * 0.2 + 1e-9,
            "{}",
            b.balance()
        );
        let burst = std::iter::from_fn(|| b.try_withdraw().then_some(())).count();
        assert_eq!(burst, 12);
    }

    #[test]
    fn a_zero_budget_never_retries() {
        let (b, clock) = budget(0.0, 0.0);
        assert_eq!(outage(&b, &clock, 1000, Duration::from_millis(10), 5), 0);
    }
}
