//! Per-invocation resource limits — how long, how much memory, how much fuel, how many
//! log records — and the node-wide memory budget they are reserved from.
//!
//! [`Limits`] is the plain value a function version is deployed with; [`CallLimiter`] is
//! the wasmtime `ResourceLimiter` that enforces the memory part inside one store and
//! remembers whether it refused memory, so that the trap a guest raises after an
//! allocation failure (Rust aborts) is reported as out-of-memory rather than as a generic
//! trap. Time is enforced by the engine (epoch deadline + async timeout), not here.
//!
//! [`MemoryBudget`] is the node's total: every invocation reserves its version's whole
//! memory limit ([`MemoryReservation`], in MiB) before its instance exists and gives it
//! back when the instance is gone, so the guests of one node together can never hold more
//! linear memory than the budget, however many of them run out of memory at once. What
//! does not fit waits, first come first served, until a deadline; then it is refused.
//! Reserving the limit rather than what a guest actually touches is deliberately
//! conservative: a limit is a promise the host has to be able to keep.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// The most linear memory one instance may be given (all its memories together), and so
/// the largest `--memory` a deploy accepts: 512 MiB. Also the pooling allocator's
/// per-memory ceiling by default (`EngineConfig::max_memory_bytes`).
pub const MAX_INSTANCE_MEMORY_BYTES: usize = 512 << 20;

/// [`MAX_INSTANCE_MEMORY_BYTES`] in MiB, the unit of `fn deploy --memory`.
pub const MAX_INSTANCE_MEMORY_MIB: u64 = (MAX_INSTANCE_MEMORY_BYTES >> 20) as u64;

/// A node's default memory budget: 4 GiB, so that one version deployed with the default
/// limits (64 MiB × 64 concurrent invocations) is served in full. Size it to the host.
pub const DEFAULT_MEMORY_BUDGET_BYTES: u64 = 4 << 30;

const MIB: u64 = 1 << 20;

/// A limit outside what a runtime node can honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A per-instance memory limit of zero, above [`MAX_INSTANCE_MEMORY_MIB`], or too large
    /// to count in bytes at all.
    #[error("memory limit of {mib} MiB is out of range: an instance may have 1 to {max_mib} MiB")]
    MemoryOutOfRange {
        /// The limit asked for, MiB.
        mib: u64,
        /// The largest allowed, MiB.
        max_mib: u64,
    },
    /// A memory size that is not a number of bytes with an optional unit.
    #[error(
        "invalid memory size {text:?}: expected a number of MiB, or a number with a unit (KiB, MiB, GiB, TiB)"
    )]
    InvalidSize {
        /// What was given.
        text: String,
    },
}

/// The per-instance memory limit `--memory <mib>` stands for, in bytes; refuses 0,
/// anything above [`MAX_INSTANCE_MEMORY_MIB`] and (so) anything whose byte count would
/// overflow.
pub fn instance_memory_bytes(mib: u64) -> Result<u64, LimitError> {
    let out_of_range = || LimitError::MemoryOutOfRange {
        mib,
        max_mib: MAX_INSTANCE_MEMORY_MIB,
    };
    if !(1..=MAX_INSTANCE_MEMORY_MIB).contains(&mib) {
        return Err(out_of_range());
    }
    mib.checked_mul(MIB).ok_or_else(out_of_range)
}

/// Parse a memory size: a bare number is MiB (as `fn deploy --memory`), otherwise a number
/// followed by `K`, `M`, `G` or `T` with optional `i` and `B` (`512MiB`, `4GiB`, `4G`;
/// binary multiples throughout). Returns bytes.
pub fn parse_memory_size(text: &str) -> Result<u64, LimitError> {
    let invalid = || LimitError::InvalidSize {
        text: text.to_owned(),
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let unit = unit.trim().to_ascii_lowercase();
    let shift = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" if unit.is_empty() => 20,
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(invalid()),
    };
    number.checked_mul(1 << shift).ok_or_else(invalid)
}

/// The limits one invocation runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one invocation, from the moment it starts; a deadline carried
    /// by the event can only shorten it. Default 1 s.
    pub timeout: Duration,
    /// Total linear memory (all memories of the component instance together) the guest
    /// may hold; growth beyond it fails as it would on a full machine. Capped by the
    /// engine's `max_memory_bytes`. Default 64 MiB.
    pub max_memory_bytes: usize,
    /// Fuel (roughly, wasm instructions) per invocation when the engine meters fuel;
    /// `None` uses the engine's default. Ignored by an engine without fuel metering.
    pub fuel: Option<u64>,
    /// Log records (explicit `log` calls plus captured stdout/stderr lines) kept per
    /// invocation; the rest are counted and dropped. Default 1000.
    pub max_log_records: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(1),
            max_memory_bytes: 64 << 20,
            fuel: None,
            max_log_records: 1000,
        }
    }
}

/// Enforces [`Limits::max_memory_bytes`] inside one store and records refusals.
#[derive(Debug)]
pub(crate) struct CallLimiter {
    max_memory_bytes: usize,
    memory_bytes: usize,
    peak_memory_bytes: usize,
    /// The growth approved last, taken back if the grow then fails.
    last_growth: usize,
    /// The total the guest asked for when memory was last refused (by this limiter or by
    /// the pool's own ceiling).
    refused_at: Option<usize>,
}

impl CallLimiter {
    pub(crate) fn new(max_memory_bytes: usize) -> Self {
        Self {
            max_memory_bytes,
            memory_bytes: 0,
            peak_memory_bytes: 0,
            last_growth: 0,
            refused_at: None,
        }
    }

    /// The total memory asked for when growth was refused, if it ever was.
    pub(crate) fn refused_at(&self) -> Option<usize> {
        self.refused_at
    }

    /// The most linear memory the instance held at once.
    pub(crate) fn peak_memory_bytes(&self) -> usize {
        self.peak_memory_bytes
    }

    pub(crate) fn max_memory_bytes(&self) -> usize {
        self.max_memory_bytes
    }
}

impl wasmtime::ResourceLimiter for CallLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Creation counts as growth from 0, so the running total covers every memory of
        // every core instance in the component, not just the largest one.
        let growth = desired.saturating_sub(current);
        let total = self.memory_bytes.saturating_add(growth);
        if total > self.max_memory_bytes {
            self.refused_at = Some(total);
            return Ok(false);
        }
        self.memory_bytes = total;
        self.last_growth = growth;
        self.peak_memory_bytes = self.peak_memory_bytes.max(total);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // The pool's per-memory ceiling (or the OS) said no after we said yes. To the guest
        // it is the same as our refusal, and so it is to the caller.
        self.refused_at = Some(self.memory_bytes);
        self.memory_bytes -= self.last_growth;
        self.last_growth = 0;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables are bounded by the pool's `table_elements`; a few hundred KiB at most.
        Ok(true)
    }
}

/// The linear memory all invocations on a node may hold at once, handed out in whole MiB.
///
/// Cheap to clone; clones share one budget. Waiters are served in arrival order, so a
/// large reservation is not starved by a stream of small ones (it holds back those behind
/// it instead).
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    free: Arc<Semaphore>,
    total_mib: u32,
}

/// Memory held from a [`MemoryBudget`] until dropped.
#[derive(Debug)]
pub struct MemoryReservation {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
}

impl MemoryReservation {
    /// How much is held, bytes (whole MiB).
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Why a reservation was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The reservation is larger than the whole budget: it can never be made.
    #[error("{} MiB does not fit in the node's {} MiB memory budget at all", requested_bytes >> 20, budget_bytes >> 20)]
    TooLarge {
        /// What was asked for (rounded up to MiB).
        requested_bytes: u64,
        /// The budget.
        budget_bytes: u64,
    },
    /// The budget stayed too full until the deadline.
    #[error("node memory budget exhausted: {} MiB of {} MiB free after waiting {waited:?} for {} MiB", available_bytes >> 20, budget_bytes >> 20, requested_bytes >> 20)]
    Exhausted {
        /// What was asked for (rounded up to MiB).
        requested_bytes: u64,
        /// The budget.
        budget_bytes: u64,
        /// What was free when the wait ended.
        available_bytes: u64,
        /// How long it waited.
        waited: Duration,
    },
}

impl MemoryBudget {
    /// A budget of `total_bytes`, rounded down to whole MiB.
    #[must_use]
    pub fn new(total_bytes: u64) -> Self {
        let max_mib = u64::try_from(Semaphore::MAX_PERMITS)
            .unwrap_or(u64::MAX)
            .min(u64::from(u32::MAX));
        let total_mib = u32::try_from((total_bytes / MIB).min(max_mib)).unwrap_or(u32::MAX);
        Self {
            free: Arc::new(Semaphore::new(total_mib as usize)),
            total_mib,
        }
    }

    /// The whole budget, bytes.
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_mib) * MIB
    }

    /// What is free now, bytes.
    #[must_use]
    pub fn available_bytes(&self) -> u64 {
        self.free.available_permits() as u64 * MIB
    }

    /// What is reserved now, bytes.
    #[must_use]
    pub fn reserved_bytes(&self) -> u64 {
        self.total_bytes().saturating_sub(self.available_bytes())
    }

    /// How many reservations of `bytes` each fit in the budget at once (0: not even one).
    #[must_use]
    pub fn instances(&self, bytes: u64) -> u32 {
        self.total_mib / Self::mib(bytes)
    }

    /// Reserve `bytes` (rounded up to whole MiB, at least 1) if they are free now.
    pub fn try_reserve(&self, bytes: u64) -> Result<MemoryReservation, BudgetError> {
        let mib = self.check(bytes)?;
        match Arc::clone(&self.free).try_acquire_many_owned(mib) {
            Ok(permit) => Ok(self.reservation(permit, mib)),
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => {
                Err(self.exhausted(mib, Duration::ZERO))
            }
        }
    }

    /// Reserve `bytes` (rounded up to whole MiB, at least 1), waiting in line for them at
    /// most until `until`.
    pub async fn reserve(
        &self,
        bytes: u64,
        until: tokio::time::Instant,
    ) -> Result<MemoryReservation, BudgetError> {
        let mib = self.check(bytes)?;
        // The common case takes no timer.
        if let Ok(permit) = Arc::clone(&self.free).try_acquire_many_owned(mib) {
            return Ok(self.reservation(permit, mib));
        }
        let started = tokio::time::Instant::now();
        match tokio::time::timeout_at(until, Arc::clone(&self.free).acquire_many_owned(mib)).await {
            Ok(Ok(permit)) => Ok(self.reservation(permit, mib)),
            // The semaphore is never closed; treat it as full if it ever is.
            Ok(Err(_)) | Err(_) => Err(self.exhausted(mib, started.elapsed())),
        }
    }

    /// Wait, in line with the reservations, until `bytes` are free, without keeping them:
    /// for a consumer that should not take work off its queue before it could start it.
    /// Returns at once when `bytes` could never fit (the reservation then says why).
    pub async fn wait_for_room(&self, bytes: u64) {
        let Ok(mib) = self.check(bytes) else {
            return;
        };
        drop(Arc::clone(&self.free).acquire_many_owned(mib).await);
    }

    fn mib(bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(MIB).max(1)).unwrap_or(u32::MAX)
    }

    fn check(&self, bytes: u64) -> Result<u32, BudgetError> {
        let mib = Self::mib(bytes);
        if mib > self.total_mib {
            return Err(BudgetError::TooLarge {
                requested_bytes: u64::from(mib) * MIB,
                budget_bytes: self.total_bytes(),
            });
        }
        Ok(mib)
    }

    fn reservation(&self, permit: OwnedSemaphorePermit, mib: u32) -> MemoryReservation {
        MemoryReservation {
            _permit: permit,
            bytes: u64::from(mib) * MIB,
        }
    }

    fn exhausted(&self, mib: u32, waited: Duration) -> BudgetError {
        BudgetError::Exhausted {
            requested_bytes: u64::from(mib) * MIB,
            budget_bytes: self.total_bytes(),
            available_bytes: self.available_bytes(),
            waited,
        }
    }
}

/// How many invocations of a version a node runs at once: what it was deployed with
/// (`wanted`, at least 1), capped by how many of its reservations (`memory_bytes` each)
/// fit in `budget`. `None` when not even one fits.
#[must_use]
pub fn effective_concurrency(budget: &MemoryBudget, memory_bytes: u64, wanted: u32) -> Option<u32> {
    match budget.instances(memory_bytes) {
        0 => None,
        fit => Some(wanted.max(1).min(fit)),
    }
}

/// `--memory-budget`: a memory size of at least 1 MiB.
pub fn parse_budget(text: &str) -> Result<u64, String> {
    let bytes = parse_memory_size(text).map_err(|e| e.to_string())?;
    if bytes < 1 << 20 {
        return Err(format!(
            "a memory budget must be at least 1 MiB, not {text:?}"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use wasmtime::ResourceLimiter;

    const PAGE: usize = 64 << 10;

    const MIB: u64 = 1 << 20;

    #[test]
    fn instance_memory_accepts_one_to_the_maximum_mib() {
        assert_eq!(instance_memory_bytes(1).unwrap(), MIB);
        assert_eq!(
            instance_memory_bytes(MAX_INSTANCE_MEMORY_MIB).unwrap(),
            MAX_INSTANCE_MEMORY_BYTES as u64
        );
    }

    #[test]
    fn instance_memory_refuses_zero_too_much_and_overflowing_values() {
        // 2^44 MiB is 2^64 bytes: shifted unchecked, it wrapped to a 0-byte limit.
        for mib in [0, MAX_INSTANCE_MEMORY_MIB + 1, 17_592_186_044_416, u64::MAX] {
            let err = instance_memory_bytes(mib).unwrap_err();
            assert_eq!(
                err,
                LimitError::MemoryOutOfRange {
                    mib,
                    max_mib: MAX_INSTANCE_MEMORY_MIB
                }
            );
            assert!(err.to_string().contains("1 to 512 MiB"), "{err}");
        }
    }

    #[test]
    fn memory_sizes_parse_with_and_without_units() {
        assert_eq!(parse_memory_size("512").unwrap(), 512 * MIB);
        assert_eq!(parse_memory_size("512MiB").unwrap(), 512 * MIB);
        assert_eq!(parse_memory_size("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_memory_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_memory_size("4 GB").unwrap(), 4 << 30);
        assert_eq!(parse_memory_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_memory_size("1048576B").unwrap(), MIB);
        for bad in ["", "MiB", "-1", "1.5GiB", "4XB", "99999999999TiB"] {
            assert!(parse_memory_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn budget_counts_in_whole_mib_rounding_reservations_up() {
        let budget = MemoryBudget::new(10 * MIB + 5);
        assert_eq!(budget.total_bytes(), 10 * MIB);
        let small = budget.try_reserve(1).unwrap();
        assert_eq!(small.bytes(), MIB);
        let zero = budget.try_reserve(0).unwrap();
        assert_eq!(zero.bytes(), MIB, "a reservation is never free");
        let odd = budget.try_reserve(3 * MIB + 1).unwrap();
        assert_eq!(odd.bytes(), 4 * MIB);
        assert_eq!(budget.reserved_bytes(), 6 * MIB);
        assert_eq!(budget.available_bytes(), 4 * MIB);
        drop((small, zero, odd));
        assert_eq!(budget.reserved_bytes(), 0);
    }

    #[test]
    fn budget_refuses_what_is_not_free_and_what_can_never_fit() {
        let budget = MemoryBudget::new(512 * MIB);
        let first = budget.try_reserve(256 * MIB).unwrap();
        let second = budget.try_reserve(256 * MIB).unwrap();
        assert!(matches!(
            budget.try_reserve(MIB),
            Err(BudgetError::Exhausted {
                available_bytes: 0,
                ..
            })
        ));
        drop(first);
        let third = budget.try_reserve(256 * MIB).unwrap();
        assert_eq!(
            budget.try_reserve(513 * MIB).unwrap_err(),
            BudgetError::TooLarge {
                requested_bytes: 513 * MIB,
                budget_bytes: 512 * MIB
            }
        );
        drop((second, third));
    }

    #[test]
    fn concurrency_is_capped_by_how_many_reservations_fit() {
        let budget = MemoryBudget::new(1 << 30);
        assert_eq!(effective_concurrency(&budget, 512 * MIB, 64), Some(2));
        assert_eq!(effective_concurrency(&budget, 64 * MIB, 4), Some(4));
        assert_eq!(effective_concurrency(&budget, 64 * MIB, 0), Some(1));
        assert_eq!(effective_concurrency(&budget, 300 * MIB, 64), Some(3));
        assert_eq!(effective_concurrency(&budget, 1025 * MIB, 1), None);
        let default = MemoryBudget::new(DEFAULT_MEMORY_BUDGET_BYTES);
        let defaults = Limits::default();
        assert_eq!(
            effective_concurrency(&default, defaults.max_memory_bytes as u64, 64),
            Some(64),
            "the default budget serves a version with default limits in full"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_waits_for_memory_to_be_released() {
        let budget = MemoryBudget::new(512 * MIB);
        let held = budget.try_reserve(512 * MIB).unwrap();
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let until = tokio::time::Instant::now() + Duration::from_secs(10);
                budget.reserve(256 * MIB, until).await
            })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!waiter.is_finished());
        drop(held);
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(got.bytes(), 256 * MIB);
        assert_eq!(budget.reserved_bytes(), 256 * MIB);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_that_cannot_start_in_time_is_refused_at_its_deadline() {
        let budget = MemoryBudget::new(512 * MIB);
        let _held = budget.try_reserve(400 * MIB).unwrap();
        let start = tokio::time::Instant::now();
        let err = budget
            .reserve(256 * MIB, start + Duration::from_millis(250))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            BudgetError::Exhausted {
                requested_bytes: 256 * MIB,
                budget_bytes: 512 * MIB,
                available_bytes: 112 * MIB,
                waited: Duration::from_millis(250),
            }
        );
        assert_eq!(start.elapsed(), Duration::from_millis(250));
        // Giving up takes nothing with it.
        assert_eq!(budget.available_bytes(), 112 * MIB);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_already_passed_only_takes_what_is_free_now() {
        let budget = MemoryBudget::new(64 * MIB);
        let now = tokio::time::Instant::now();
        assert!(budget.reserve(64 * MIB, now).await.is_ok());
        let _held = budget.try_reserve(64 * MIB).unwrap();
        assert!(matches!(
            budget.reserve(MIB, now).await,
            Err(BudgetError::Exhausted { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_arrival_order() {
        let budget = MemoryBudget::new(512 * MIB);
        let held = budget.try_reserve(512 * MIB).unwrap();
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        // A big one first, then small ones that would fit beside a partial release.
        for (i, mib) in [(0, 512), (1, 64), (2, 64)] {
            let (budget, order_tx) = (budget.clone(), order_tx.clone());
            waiters.push(tokio::spawn(async move {
                let got = budget.reserve(mib * MIB, until).await.unwrap();
                order_tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
                drop(got);
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        let mut seen = Vec::new();
        while let Ok(i) = order.try_recv() {
            seen.push(i);
        }
        assert_eq!(seen, [0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_room_keeps_nothing() {
        let budget = MemoryBudget::new(128 * MIB);
        let held = budget.try_reserve(128 * MIB).unwrap();
        let room = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.wait_for_room(64 * MIB).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!room.is_finished());
        drop(held);
        room.await.unwrap();
        assert_eq!(budget.reserved_bytes(), 0);
        // One that can never fit does not wait forever.
        budget.wait_for_room(129 * MIB).await;
    }

    #[test]
    fn limiter_counts_all_memories_together() {
        let mut limiter = CallLimiter::new(10 * PAGE);
        assert!(limiter.memory_growing(0, 6 * PAGE, None).unwrap());
        assert!(limiter.memory_growing(0, 3 * PAGE, None).unwrap());
        assert!(!limiter.memory_growing(3 * PAGE, 5 * PAGE, None).unwrap());
        assert_eq!(limiter.refused_at(), Some(11 * PAGE));
        assert_eq!(limiter.peak_memory_bytes(), 9 * PAGE);
    }

    #[test]
    fn limiter_allows_growth_up_to_the_limit_exactly() {
        let mut limiter = CallLimiter::new(4 * PAGE);
        assert!(limiter.memory_growing(0, 2 * PAGE, None).unwrap());
        assert!(limiter.memory_growing(2 * PAGE, 4 * PAGE, None).unwrap());
        assert_eq!(limiter.refused_at(), None);
    }

    #[test]
    fn failed_growth_after_approval_counts_as_refusal() {
        let mut limiter = CallLimiter::new(4 * PAGE);
        assert!(limiter.memory_growing(0, 2 * PAGE, None).unwrap());
        limiter
            .memory_grow_failed(wasmtime::format_err!("pool ceiling"))
            .unwrap();
        assert_eq!(limiter.refused_at(), Some(2 * PAGE));
    }
}
