//! Dead letters: what a PATCHBAY_DLQ record carries.
//!
//! A record is the original message — body and every original header, trace context
//! included — plus `patchbay-dlq-*` headers saying which function and version gave up on
//! it, after how many attempts, why, and on which subject it first arrived, so
//! `patchbay fn dlq replay` can put it back exactly where it came from.
//!
//! [`dead_letter`] is the one way a stream consumer — a runtime node's trigger or a core
//! service — moves a message it gives up on to `patchbay.v1.dlq.<owner>`.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::Message;

use crate::{Bus, Token};

/// Function that dead-lettered the message.
pub const FUNCTION: &str = "patchbay-dlq-function";
/// Its version.
pub const VERSION: &str = "patchbay-dlq-version";
/// The component digest of that version.
pub const DIGEST: &str = "patchbay-dlq-digest";
/// Deliveries attempted.
pub const ATTEMPTS: &str = "patchbay-dlq-attempts";
/// The last error or the function's reason.
pub const ERROR: &str = "patchbay-dlq-error";
/// The trace id of the message (also still in `traceparent`).
pub const TRACE_ID: &str = "patchbay-dlq-trace-id";
/// The subject the message originally arrived on.
pub const SUBJECT: &str = "patchbay-dlq-subject";
/// The stream and sequence it came from, `STREAM:seq`, when it came from a stream.
pub const SOURCE: &str = "patchbay-dlq-source";
/// The node that gave up.
pub const NODE: &str = "patchbay-dlq-node";
/// When (ms since the Unix epoch).
pub const TIME: &str = "patchbay-dlq-time";

/// Everything recorded about why a message was dead-lettered.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// Function name.
    pub function: &'a str,
    /// Version, if one was chosen.
    pub version: Option<u32>,
    /// Digest of that version.
    pub digest: Option<&'a str>,
    /// Deliveries attempted.
    pub attempts: u64,
    /// Why.
    pub error: &'a str,
    /// The subject it arrived on.
    pub subject: &'a str,
    /// `STREAM:seq` when it came from a stream.
    pub source: Option<String>,
    /// This node.
    pub node: &'a str,
    /// Now, ms since the Unix epoch.
    pub time_millis: u64,
}

impl DeadLetter<'_> {
    /// The original headers plus the dead-letter headers (header values cannot hold
    /// line breaks, so the error is flattened).
    #[must_use]
    pub fn headers(&self, original: Option<&HeaderMap>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(original) = original {
            for (name, values) in original.iter() {
                let n: &str = name.as_ref();
                // The original de-duplication id must not block the dead letter, nor
                // later a replay, so it is not copied; nor is the `Nats-Stream-Source`
                // the server puts on sourced copies (PATCHBAY_ORDERED): a publish that
                // sets it is refused.
                if n.eq_ignore_ascii_case("Nats-Msg-Id")
                    || n.eq_ignore_ascii_case("Nats-Stream-Source")
                {
                    continue;
                }
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        headers.insert(FUNCTION, self.function);
        if let Some(v) = self.version {
            headers.insert(VERSION, v.to_string().as_str());
        }
        if let Some(d) = self.digest {
            headers.insert(DIGEST, d);
        }
        headers.insert(ATTEMPTS, self.attempts.to_string().as_str());
        headers.insert(ERROR, self.error.replace(['\r', '\n'], " ").as_str());
        if let Some(t) = crate::trace::trace_id(original) {
            headers.insert(TRACE_ID, t.as_str());
        }
        headers.insert(SUBJECT, self.subject);
        if let Some(s) = &self.source {
            headers.insert(SOURCE, s.as_str());
        }
        headers.insert(NODE, self.node);
        headers.insert(TIME, self.time_millis.to_string().as_str());
        headers
    }
}

/// Store `msg` in PATCHBAY_DLQ (subject `patchbay.v1.dlq.<owner>`) as `record` says,
/// then terminate it. A message that arrived without trace context gets the trace id of
/// the current span (the root it was processed in), so every dead letter leads to a
/// trace. When the record cannot be stored the message is nak'ed instead (redelivered in
/// a second), so it is never lost. Returns whether the dead letter was stored.
pub async fn dead_letter(bus: &Bus, owner: &Token, msg: &Message, record: &DeadLetter<'_>) -> bool {
    let mut headers = record.headers(msg.headers.as_ref());
    if headers.get(TRACE_ID).is_none()
        && let Some(trace_id) = crate::trace::span_trace_id(&tracing::Span::current())
    {
        headers.insert(TRACE_ID, trace_id.as_str());
    }
    // The owner and the stream position identify the dead letter (two functions fed the
    // same message each keep theirs); without a position, the message's bytes do.
    let dedup = match &record.source {
        Some(source) => format!("dlq:{owner}:{source}"),
        None => format!("dlq:{owner}:{}", payload_digest(&msg.payload)),
    };
    headers.insert(async_nats::header::NATS_MESSAGE_ID, dedup.as_str());
    let subject = bus.subjects().dlq(owner);
    let stored = async {
        bus.jetstream()
            .publish_with_headers(subject, headers, msg.payload.clone())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match stored {
        Ok(_) => {
            if let Err(e) = msg.ack_with(AckKind::Term).await {
                tracing::warn!(error = %e, "term failed after dead-lettering");
            }
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot store dead letter; will retry the message");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            false
        }
    }
}

/// A short stable digest of a payload (FNV-1a, hex) for de-duplication keys.
fn payload_digest(payload: &[u8]) -> String {
    let hash = payload.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The headers to re-publish a dead letter with: the original ones, without the
/// `patchbay-dlq-*` additions.
#[must_use]
pub fn original_headers(record: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in record.iter() {
        let n: &str = name.as_ref();
        if n.to_ascii_lowercase().starts_with("patchbay-dlq-") {
            continue;
        }
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_keep_the_original_headers_and_replay_strips_the_additions() {
        let mut original = HeaderMap::new();
        original.insert("ce-id", "e1");
        original.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        original.insert("Nats-Msg-Id", "e1");
        original.insert("Nats-Stream-Source", "CC_CALLS 7 > >");
        let dl = DeadLetter {
            function: "f",
            version: Some(3),
            digest: Some("abc"),
            attempts: 5,
            error: "boom\nagain",
            subject: "cc.v1.x",
            source: Some("CC_CALLS:9".into()),
            node: "node-1",
            time_millis: 1,
        };
        let h = dl.headers(Some(&original));
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_owned());
        assert_eq!(
            get(TRACE_ID).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(get(ERROR).as_deref(), Some("boom again"));
        assert_eq!(get(VERSION).as_deref(), Some("3"));
        assert_eq!(get("ce-id").as_deref(), Some("e1"));
        assert_eq!(get("Nats-Msg-Id"), None);
        assert_eq!(get("Nats-Stream-Source"), None);
        let back = original_headers(&h);
        assert_eq!(back.get("ce-id").map(|v| v.as_str()), Some("e1"));
        assert!(back.get(FUNCTION).is_none() && back.get(ERROR).is_none());
    }
}
