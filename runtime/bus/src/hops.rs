//! Hop chains: which handlers an event has passed through, so a loop is cut.
//!
//! A function whose output lands on its own trigger (directly, or through a ring of
//! functions and services) would otherwise run forever from one event. Every message the
//! platform sends while handling another carries the `patchbay-hops` header: the
//! handlers that led to it, oldest first (`service/routing,fn/enrich,fn/enrich`). A
//! handler that receives a message reads the chain, appends itself and refuses the
//! message when the chain would grow past the configured maximum
//! ([`BusConfig::max_hops`](crate::BusConfig)); stream triggers dead-letter it with the
//! chain as the reason, core triggers answer an error.
//!
//! The chain travels implicitly, like trace context: a handler runs its work inside
//! [`scope`], and every publish and request made inside that scope (by the handler or by
//! the function it runs) carries the chain. A message sent outside any scope — the gateway,
//! a CLI, an outside client — starts a new chain. Outside clients can set the header
//! themselves; the worst they can do is get their own message refused sooner.

use std::fmt;

use async_nats::HeaderMap;
use async_nats::header::HeaderValue;
use thiserror::Error;

/// The header carrying the chain, comma-separated handler names, oldest first.
pub const HOPS_HEADER: &str = "patchbay-hops";

/// Hops allowed by default: a contact-centre call passes about six handlers (gateway,
/// routing, agents, two or three functions), so 32 leaves room for real pipelines and
/// still stops a loop within a fraction of a second.
pub const DEFAULT_MAX_HOPS: usize = 32;

/// Longest handler name kept in a chain; a longer one is cut (names are identities and
/// function names, far shorter).
const MAX_NAME_LEN: usize = 160;

/// The handlers an event has passed through, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HopChain(Vec<String>);

/// A message whose chain is already as long as allowed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("hop limit of {max} exceeded (a loop?): {chain}")]
pub struct HopLimitExceeded {
    /// The configured maximum.
    pub max: usize,
    /// The chain including the refusing handler.
    pub chain: HopChain,
}

impl HopChain {
    /// The chain a message carries (empty when it has none).
    #[must_use]
    pub fn from_headers(headers: Option<&HeaderMap>) -> Self {
        let Some(value) = headers.and_then(|h| h.get(HOPS_HEADER)) else {
            return Self::default();
        };
        Self(
            value
                .as_str()
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    /// How many handlers the message has passed through.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for a message no handler has touched yet.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The handlers, oldest first.
    #[must_use]
    pub fn handlers(&self) -> &[String] {
        &self.0
    }

    /// This chain with `handler` appended, or the refusal when that makes it longer
    /// than `max`.
    pub fn enter(&self, handler: &str, max: usize) -> Result<Self, HopLimitExceeded> {
        let name: String = handler
            .chars()
            .filter(|c| *c != ',' && !c.is_control())
            .take(MAX_NAME_LEN)
            .collect();
        let mut chain = self.0.clone();
        chain.push(name);
        let chain = Self(chain);
        if chain.len() > max {
            return Err(HopLimitExceeded { max, chain });
        }
        Ok(chain)
    }

    /// Write the chain into `headers` (nothing for an empty chain).
    pub fn write(&self, headers: &mut HeaderMap) {
        if self.is_empty() {
            return;
        }
        // Names are filtered on entry (no commas, no control characters), so the value
        // is always a valid header value; `from_str` keeps that a checked fact.
        if let Ok(value) = self.to_string().parse::<HeaderValue>() {
            headers.insert(HOPS_HEADER, value);
        }
    }
}

impl fmt::Display for HopChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

tokio::task_local! {
    static CURRENT: HopChain;
}

/// Run `work` with `chain` as the chain every message it sends carries.
pub async fn scope<F: Future>(chain: HopChain, work: F) -> F::Output {
    CURRENT.scope(chain, work).await
}

/// The chain of the work running now, if it runs inside [`scope`].
#[must_use]
pub fn current() -> Option<HopChain> {
    CURRENT.try_with(Clone::clone).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_chain_round_trips_through_its_header_and_grows_by_one_per_handler() {
        let first = HopChain::default().enter("service/routing", 4).unwrap();
        let second = first.enter("fn/enrich", 4).unwrap();
        let mut headers = HeaderMap::new();
        second.write(&mut headers);
        assert_eq!(
            headers.get(HOPS_HEADER).map(HeaderValue::as_str),
            Some("service/routing,fn/enrich")
        );
        assert_eq!(HopChain::from_headers(Some(&headers)), second);
        assert_eq!(second.len(), 2);
    }

    #[test]
    fn the_handler_past_the_maximum_is_refused_with_the_whole_chain() {
        let mut chain = HopChain::default();
        for _ in 0..3 {
            chain = chain.enter("fn/loop", 3).unwrap();
        }
        let refused = chain.enter("fn/loop", 3).unwrap_err();
        assert_eq!(refused.max, 3);
        assert_eq!(refused.chain.len(), 4);
        assert!(
            refused
                .to_string()
                .contains("fn/loop,fn/loop,fn/loop,fn/loop"),
            "{refused}"
        );
    }

    #[test]
    fn names_cannot_smuggle_separators_or_line_breaks_into_the_header() {
        let chain = HopChain::default().enter("fn/a,b\r\nX: y", 8).unwrap();
        let mut headers = HeaderMap::new();
        chain.write(&mut headers);
        let back = HopChain::from_headers(Some(&headers));
        assert_eq!(back.handlers(), ["fn/abX: y"]);
    }

    #[tokio::test]
    async fn work_inside_a_scope_sees_its_chain_and_work_outside_sees_none() {
        assert_eq!(current(), None);
        let chain = HopChain::default().enter("fn/a", 8).unwrap();
        let seen = scope(chain.clone(), async { current() }).await;
        assert_eq!(seen, Some(chain));
    }
}
