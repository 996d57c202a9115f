//! Exponential backoff with jitter, capped by the remaining deadline.
//!
//! The delay before retry `n` (1-based) is drawn from
//! `[(1 − jitter) × d, d]` with `d = min(backoff_max, backoff_base × 2ⁿ⁻¹)` — with
//! `jitter = 1.0` that is AWS's "full jitter", which spreads the retries of many callers
//! that failed together. A retry whose delay would not end before the deadline is not
//! made at all: it could only fail, and would add load while doing so.
//!
//! The random source is a small seeded generator ([`SplitMix64`]) so tests are
//! reproducible; processes seed it from the standard library's per-process random keys.

use std::hash::{BuildHasher as _, Hasher as _};
use std::time::Duration;

use super::policy::RetryPolicy;

/// SplitMix64: a tiny, fast, seedable generator — jitter needs spread, not secrecy.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed` (same seed, same sequence).
    #[must_use]
    pub fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator seeded differently in every process (and every call).
    #[must_use]
    pub fn from_entropy() -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        Self(h.finish())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform number in `[0, 1)`.
    pub fn next_unit(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        #[allow(clippy::cast_precision_loss)]
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit
    }
}

/// The backoff of one target's retries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: f64,
}

impl Backoff {
    /// The backoff `policy` describes.
    #[must_use]
    pub fn new(policy: &RetryPolicy) -> Self {
        Self {
            base: policy.backoff_base,
            max: policy.backoff_max.max(policy.backoff_base),
            jitter: policy.jitter.clamp(0.0, 1.0),
        }
    }

    /// The ceiling of the delay before retry `retry` (1 = the first retry).
    #[must_use]
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry `retry`, or `None` when it would not end before
    /// `remaining` (the time left until the deadline, if there is one).
    pub fn delay(
        &self,
        retry: u32,
        remaining: Option<Duration>,
        rng: &mut SplitMix64,
    ) -> Option<Duration> {
        let ceiling = self.ceiling(retry);
        let floor = ceiling.mul_f64(1.0 - self.jitter);
        let delay = floor + (ceiling - floor).mul_f64(rng.next_unit());
        match remaining {
            Some(left) if delay >= left => None,
            _ => Some(delay),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn backoff(base_ms: u64, max_ms: u64, jitter: f64) -> Backoff {
        Backoff::new(&RetryPolicy {
            max_attempts: 5,
            backoff_base: Duration::from_millis(base_ms),
            backoff_max: Duration::from_millis(max_ms),
            jitter,
            ..RetryPolicy::default()
        })
    }

    #[test]
    fn ceilings_double_per_retry_up_to_the_maximum() {
        let b = backoff(20, 100, 1.0);
        let ceilings: Vec<u128> = (1..=5).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [20, 40, 80, 100, 100]);
        assert_eq!(b.ceiling(200), Duration::from_millis(100));
    }

    #[test]
    fn full_jitter_delays_stay_within_bounds_and_spread_out() {
        let b = backoff(20, 100, 1.0);
        let mut rng = SplitMix64::seeded(7);
        for retry in 1..=4 {
            let delays: Vec<Duration> = (0..1000)
                .map(|_| b.delay(retry, None, &mut rng).unwrap())
                .collect();
            let ceiling = b.ceiling(retry);
            assert!(delays.iter().all(|d| *d <= ceiling), "retry {retry}");
            // Spread: some in the lower and some in the upper quarter of the range.
            assert!(delays.iter().any(|d| *d < ceiling / 4));
            assert!(delays.iter().any(|d| *d > ceiling * 3 / 4));
        }
    }

    #[test]
    fn partial_jitter_keeps_the_floor_and_no_jitter_is_exact() {
        let mut rng = SplitMix64::seeded(1);
        let half = backoff(100, 1_000, 0.5);
        for _ in 0..1000 {
            let d = half.delay(1, None, &mut rng).unwrap();
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
                "{d:?}"
            );
        }
        let none = backoff(100, 1_000, 0.0);
        assert_eq!(
            none.delay(3, None, &mut rng),
            Some(Duration::from_millis(400))
        );
    }

    #[test]
    fn no_delay_reaches_past_the_remaining_deadline() {
        let b = backoff(100, 1_000, 0.0);
        let mut rng = SplitMix64::seeded(3);
        assert_eq!(
            b.delay(1, Some(Duration::from_millis(101)), &mut rng),
            Some(Duration::from_millis(100))
        );
        assert_eq!(b.delay(1, Some(Duration::from_millis(100)), &mut rng), None);
        let full = backoff(100, 1_000, 1.0);
        for _ in 0..1000 {
            if let Some(d) = full.delay(4, Some(Duration::from_millis(300)), &mut rng) {
                assert!(d < Duration::from_millis(300));
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let b = backoff(20, 100, 1.0);
        let run = |seed| {
            let mut rng = SplitMix64::seeded(seed);
            (1..=4)
                .map(|n| b.delay(n, None, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }
}
