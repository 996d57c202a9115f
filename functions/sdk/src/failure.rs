//! Constructors for [`Failure`], the three ways a handler declines an event, and the
//! mapping of capability errors onto them (so `?` does the sensible thing).

use crate::bus::BusError;
use crate::kv::KvError;
use crate::{Failure, Retry};

/// Delay suggested when a capability error looks transient.
const TRANSIENT_RETRY_MS: u64 = 1_000;

impl Failure {
    /// Transient failure: deliver the event again after `after_ms` (the runtime may wait
    /// longer, never shorter) until the trigger's max deliveries.
    #[must_use]
    pub fn retry(after_ms: u64, reason: impl Into<String>) -> Self {
        Self::Retry(Retry {
            after_ms,
            reason: reason.into(),
        })
    }

    /// Permanent failure: park the event in the dead-letter stream with `reason`.
    #[must_use]
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Self::DeadLetter(reason.into())
    }

    /// The event is not worth keeping: acknowledge it and count it as dropped.
    #[must_use]
    pub fn drop(reason: impl Into<String>) -> Self {
        Self::Drop(reason.into())
    }

    /// The reason given, whichever the kind.
    #[must_use]
    pub fn reason(&self) -> &str {
        match self {
            Self::Retry(retry) => &retry.reason,
            Self::DeadLetter(reason) | Self::Drop(reason) => reason,
        }
    }
}

/// Timeouts, missing responders and unknown bus failures may pass: retry. A forbidden
/// subject or an oversized event will fail the same way every time: dead-letter.
impl From<BusError> for Failure {
    fn from(err: BusError) -> Self {
        let reason = format!("bus: {}", crate::bus::describe(&err));
        match err {
            BusError::Timeout | BusError::NoResponders | BusError::Other(_) => {
                Self::retry(TRANSIENT_RETRY_MS, reason)
            }
            BusError::Forbidden(_) | BusError::TooLarge(_) => Self::dead_letter(reason),
        }
    }
}

/// An invalid key or an oversized value is permanent: dead-letter. Other bucket failures
/// may pass: retry.
impl From<KvError> for Failure {
    fn from(err: KvError) -> Self {
        let reason = format!("kv: {}", crate::kv::describe(&err));
        match err {
            KvError::Other(_) => Self::retry(TRANSIENT_RETRY_MS, reason),
            KvError::InvalidKey(_) | KvError::TooLarge(_) => Self::dead_letter(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_build_each_kind_with_its_reason() {
        assert!(matches!(
            Failure::retry(250, "busy"),
            Failure::Retry(Retry { after_ms: 250, ref reason }) if reason == "busy"
        ));
        assert!(matches!(Failure::dead_letter("bad"), Failure::DeadLetter(ref r) if r == "bad"));
        assert!(matches!(Failure::drop("dup"), Failure::Drop(ref r) if r == "dup"));
        assert_eq!(Failure::retry(1, "why").reason(), "why");
    }

    #[test]
    fn transient_bus_errors_retry_and_permanent_ones_dead_letter() {
        assert!(matches!(
            Failure::from(BusError::Timeout),
            Failure::Retry(_)
        ));
        assert!(matches!(
            Failure::from(BusError::NoResponders),
            Failure::Retry(_)
        ));
        let forbidden = Failure::from(BusError::Forbidden("x.y".into()));
        assert!(matches!(forbidden, Failure::DeadLetter(_)));
        assert_eq!(forbidden.reason(), "bus: forbidden subject x.y");
    }

    #[test]
    fn invalid_kv_keys_dead_letter_and_other_kv_errors_retry() {
        assert!(matches!(
            Failure::from(KvError::InvalidKey("a b".into())),
            Failure::DeadLetter(_)
        ));
        assert!(matches!(
            Failure::from(KvError::Other("down".into())),
            Failure::Retry(_)
        ));
    }
}
