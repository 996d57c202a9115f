//! Per-token request rate limiting: one token bucket per key (the API token's id), refilled
//! continuously at `rate` requests per second up to `burst`.
//!
//! Time comes only from the injected [`Clock`], so the limiter is tested on a
//! [`patchbay_bus::ManualClock`] without sleeping. Memory is bounded: when the number of
//! buckets passes a cap, idle buckets (full again, so forgetting them changes nothing) are
//! dropped first, then the least recently used.
//!
//! This module does not decide what a key is or answer the caller; the gateway keys by
//! token id and turns a refusal into a 429 ([`crate::problem::Problem::too_many_requests`]).
//! Limits are per gateway process, not global across replicas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use patchbay_bus::Clock;
use thiserror::Error;

/// Default number of buckets kept before idle ones are evicted.
pub const DEFAULT_MAX_BUCKETS: usize = 10_000;

/// An invalid limiter setting.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RateLimitError {
    /// The rate must be a finite number of requests per second above zero.
    #[error("invalid rate {rate} per second: must be a finite number above zero")]
    InvalidRate {
        /// The refused rate.
        rate: f64,
    },
    /// The burst must allow at least one request.
    #[error("invalid burst {burst}: must be at least 1")]
    InvalidBurst {
        /// The refused burst.
        burst: u32,
    },
    /// The bucket cap must be at least one.
    #[error("invalid bucket cap {max_buckets}: must be at least 1")]
    InvalidCap {
        /// The refused cap.
        max_buckets: usize,
    },
}

/// One key's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Requests available at `updated_ms` (fractional while refilling).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated_ms: u64,
    /// The rate and burst of the last check, so eviction can tell a refilled bucket.
    rate: f64,
    burst: f64,
}

impl Bucket {
    /// Requests available at `now`.
    fn level(&self, now: u64) -> f64 {
        // `saturating_sub`: a clock that steps back refills nothing rather than panicking.
        #[allow(clippy::cast_precision_loss)] // milliseconds below 2^52 are exact
        let elapsed_secs = now.saturating_sub(self.updated_ms) as f64 / 1000.0;
        (self.tokens + elapsed_secs * self.rate).min(self.burst)
    }
}

/// Token buckets per key, with defaults a key may override (per-token `rate`/`burst`).
pub struct RateLimiter {
    clock: Arc<dyn Clock>,
    default_rate: f64,
    default_burst: u32,
    max_buckets: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("default_rate", &self.default_rate)
            .field("default_burst", &self.default_burst)
            .field("max_buckets", &self.max_buckets)
            .field("buckets", &self.len())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter allowing `default_rate` requests per second with bursts of
    /// `default_burst`, unless a key says otherwise.
    pub fn new(
        clock: Arc<dyn Clock>,
        default_rate: f64,
        default_burst: u32,
    ) -> Result<Self, RateLimitError> {
        validate(default_rate, default_burst)?;
        Ok(Self {
            clock,
            default_rate,
            default_burst,
            max_buckets: DEFAULT_MAX_BUCKETS,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Keep at most about `max_buckets` buckets (default [`DEFAULT_MAX_BUCKETS`]).
    pub fn max_buckets(mut self, max_buckets: usize) -> Result<Self, RateLimitError> {
        if max_buckets == 0 {
            return Err(RateLimitError::InvalidCap { max_buckets });
        }
        self.max_buckets = max_buckets;
        Ok(self)
    }

    /// Take one request from `key`'s bucket, with the key's own `rate` (per second) and
    /// `burst` if it has them (invalid overrides fall back to the defaults). `Err` carries
    /// how long until a request would be allowed.
    pub fn check(&self, key: &str, rate: Option<f64>, burst: Option<u32>) -> Result<(), Duration> {
        let rate = rate
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or(self.default_rate);
        let burst = f64::from(burst.filter(|b| *b > 0).unwrap_or(self.default_burst));
        let now = self.clock.now_millis();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if !buckets.contains_key(key) && buckets.len() >= self.max_buckets {
            evict(&mut buckets, self.max_buckets, now);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            updated_ms: now,
            rate,
            burst,
        });
        // Refill at the rate in force so far, then adopt the current settings; `min(burst)`
        // also shrinks a bucket whose token was given a smaller burst.
        bucket.tokens = bucket.level(now).min(burst);
        bucket.updated_ms = bucket.updated_ms.max(now);
        bucket.rate = rate;
        bucket.burst = burst;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / rate);
            // Whole milliseconds, rounded up: the clock has millisecond resolution, and a
            // caller coming back at exactly `wait` must be let in.
            let millis = wait.as_nanos().div_ceil(1_000_000);
            Err(Duration::from_millis(
                u64::try_from(millis).unwrap_or(u64::MAX),
            ))
        }
    }

    /// How many buckets are held (for metrics and tests).
    #[must_use]
    pub fn len(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no bucket is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn validate(rate: f64, burst: u32) -> Result<(), RateLimitError> {
    if !rate.is_finite() || rate <= 0.0 {
        return Err(RateLimitError::InvalidRate { rate });
    }
    if burst == 0 {
        return Err(RateLimitError::InvalidBurst { burst });
    }
    Ok(())
}

/// Make room below `max`: drop buckets that have refilled (forgetting them changes
/// nothing), then, if every key is busy, the least recently used — at least a quarter, so
/// the sort is not paid on every insert. Forgetting a busy bucket lets that key start from
/// a full burst again; that is the price of bounded memory.
fn evict(buckets: &mut HashMap<String, Bucket>, max: usize, now: u64) {
    buckets.retain(|_, b| b.level(now) < b.burst);
    if buckets.len() < max {
        return;
    }
    let mut by_age: Vec<(u64, String)> = buckets
        .iter()
        .map(|(k, b)| (b.updated_ms, k.clone()))
        .collect();
    by_age.sort_unstable();
    let drop = (buckets.len() + 1 - max).max(max / 4);
    for (_, key) in by_age.into_iter().take(drop) {
        buckets.remove(&key);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use patchbay_bus::ManualClock;

    fn limiter(rate: f64, burst: u32) -> (ManualClock, RateLimiter) {
        let clock = ManualClock::at(1_700_000_000_000);
        let limiter = RateLimiter::new(Arc::new(clock.clone()), rate, burst).unwrap();
        (clock, limiter)
    }

    #[test]
    fn allows_the_burst_then_refuses_with_the_time_to_the_next_request() {
        let (_clock, limiter) = limiter(2.0, 3);
        for i in 0..3 {
            assert_eq!(limiter.check("tok1", None, None), Ok(()), "request {i}");
        }
        // Empty bucket at 2/s: the next request is 500 ms away.
        assert_eq!(
            limiter.check("tok1", None, None),
            Err(Duration::from_millis(500))
        );
    }

    #[test]
    fn refills_over_time_up_to_the_burst() {
        let (clock, limiter) = limiter(2.0, 3);
        for _ in 0..3 {
            limiter.check("tok1", None, None).unwrap();
        }
        clock.advance(Duration::from_millis(200));
        // 0.4 requests refilled: 300 ms to go.
        assert_eq!(
            limiter.check("tok1", None, None),
            Err(Duration::from_millis(300))
        );
        clock.advance(Duration::from_millis(300));
        assert_eq!(limiter.check("tok1", None, None), Ok(()));
        assert!(limiter.check("tok1", None, None).is_err());

        // A long idle period refills to the burst, not beyond.
        clock.advance(Duration::from_secs(3600));
        for _ in 0..3 {
            assert_eq!(limiter.check("tok1", None, None), Ok(()));
        }
        assert!(limiter.check("tok1", None, None).is_err());
    }

    #[test]
    fn separate_keys_have_separate_buckets() {
        let (_clock, limiter) = limiter(1.0, 1);
        assert_eq!(limiter.check("a", None, None), Ok(()));
        assert!(limiter.check("a", None, None).is_err());
        assert_eq!(limiter.check("b", None, None), Ok(()));
        assert!(limiter.check("b", None, None).is_err());
    }

    #[test]
    fn a_token_override_replaces_the_defaults() {
        let (clock, limiter) = limiter(1.0, 1);
        for _ in 0..10 {
            assert_eq!(limiter.check("big", Some(100.0), Some(10)), Ok(()));
        }
        assert_eq!(
            limiter.check("big", Some(100.0), Some(10)),
            Err(Duration::from_millis(10))
        );
        clock.advance(Duration::from_millis(10));
        assert_eq!(limiter.check("big", Some(100.0), Some(10)), Ok(()));

        // Invalid overrides fall back to the defaults instead of blocking or panicking.
        assert_eq!(limiter.check("odd", Some(f64::NAN), Some(0)), Ok(()));
        assert_eq!(
            limiter.check("odd", Some(-1.0), None),
            Err(Duration::from_secs(1))
        );
    }

    #[test]
    fn retry_after_is_rounded_up_to_the_millisecond() {
        let (_clock, limiter) = limiter(3.0, 1);
        limiter.check("k", None, None).unwrap();
        // 1/3 s = 333.33 ms → 334 ms, so coming back then succeeds.
        assert_eq!(
            limiter.check("k", None, None),
            Err(Duration::from_millis(334))
        );
    }

    /// A clock that can be set anywhere, including backwards.
    struct SettableClock(std::sync::atomic::AtomicU64);

    impl Clock for SettableClock {
        fn now_millis(&self) -> u64 {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[test]
    fn a_clock_stepping_back_refills_nothing() {
        let clock = Arc::new(SettableClock(10_000.into()));
        let limiter = RateLimiter::new(Arc::clone(&clock) as Arc<dyn Clock>, 1.0, 1).unwrap();
        limiter.check("k", None, None).unwrap();
        clock.0.store(5_000, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(limiter.check("k", None, None), Err(Duration::from_secs(1)));
        clock.0.store(11_000, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(limiter.check("k", None, None), Ok(()));
    }

    #[test]
    fn memory_stays_bounded_evicting_idle_buckets_first() {
        let clock = ManualClock::at(0);
        let limiter = RateLimiter::new(Arc::new(clock.clone()), 1.0, 1)
            .unwrap()
            .max_buckets(4)
            .unwrap();
        for key in ["a", "b", "c"] {
            limiter.check(key, None, None).unwrap();
        }
        clock.advance(Duration::from_secs(120));
        limiter.check("busy", None, None).unwrap();
        assert_eq!(limiter.len(), 4);
        // a, b, c are idle and full again: they go, "busy" (just emptied) stays.
        limiter.check("new", None, None).unwrap();
        assert_eq!(limiter.len(), 2);
        assert!(limiter.check("busy", None, None).is_err());

        // With every bucket busy, the least recently used make room.
        for key in ["x", "y", "z"] {
            clock.advance(Duration::from_millis(1));
            limiter.check(key, None, None).unwrap();
        }
        assert!(limiter.len() <= 4, "{} buckets", limiter.len());
        for i in 0..100 {
            limiter.check(&format!("k{i}"), None, None).unwrap();
            assert!(limiter.len() <= 4, "{} buckets", limiter.len());
        }
    }

    #[test]
    fn refuses_invalid_defaults() {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::at(0));
        assert_eq!(
            RateLimiter::new(Arc::clone(&clock), 0.0, 1).err(),
            Some(RateLimitError::InvalidRate { rate: 0.0 })
        );
        assert_eq!(
            RateLimiter::new(Arc::clone(&clock), f64::INFINITY, 1)
                .err()
                .map(|e| e.to_string()),
            Some("invalid rate inf per second: must be a finite number above zero".to_owned())
        );
        assert_eq!(
            RateLimiter::new(clock, 1.0, 0).err(),
            Some(RateLimitError::InvalidBurst { burst: 0 })
        );
    }
}
