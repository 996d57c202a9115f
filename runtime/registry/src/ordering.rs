//! Per-key ordering for `stream` triggers: the partitioned copy of a function's input.
//!
//! NATS consumers cannot filter by a hash of a subject token, so an ordered trigger reads
//! a partitioned copy of its input instead of the input stream itself. `fn deploy` (admin)
//! makes the work-queue stream [`ORDERED_STREAM`] *source* the input stream with the
//! trigger's filter and a subject transform that prepends
//! `patchbay.v1.ordered.<function>.<partition>.` to each subject, where the server computes
//! `<partition>` as `partition(P, 1)` — a stable hash of the filter's first `*` token, the
//! interaction key (the call id in `cc.v1.calls.<call>.…`) — modulo P. Each partition has
//! one durable consumer `fn-<function>-p<i>` with `max_ack_pending = 1`: the server hands
//! out a partition's next message only after the previous one is acked or terminated and
//! redelivers an unacked one (a crashed node's) before anything later, so every key is
//! handled one event at a time, in order, by whichever node pulls — no coordination
//! between nodes. Different partitions run in parallel on any nodes.
//!
//! This module owns the names, subjects and transform of that scheme and their checks; the
//! CLI creates the source and consumers, the node's ordered trigger pulls from them. It
//! does not talk to NATS.

use patchbay_bus::{Subjects, Token};
use serde::{Deserialize, Serialize};

/// The work-queue stream holding the partitioned copies (declared in deploy/streams.toml).
pub const ORDERED_STREAM: &str = "PATCHBAY_ORDERED";
/// Partitions when the deploy does not say.
pub const DEFAULT_PARTITIONS: u32 = 16;
/// Most partitions one function may have (each is a consumer and a pull loop per node).
pub const MAX_PARTITIONS: u32 = 256;

/// Per-key ordering of a `stream` trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ordered {
    /// Number of partitions: the most keys handled at once across all nodes.
    pub partitions: u32,
}

impl Default for Ordered {
    fn default() -> Self {
        Self {
            partitions: DEFAULT_PARTITIONS,
        }
    }
}

impl Ordered {
    /// Check the partition count and that `filter` (the trigger's subject, without the
    /// prefix) has a `*` token to take the key from; the reason otherwise.
    pub fn validate(&self, filter: &str) -> Result<(), String> {
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return Err(format!(
                "an ordered trigger needs 1..={MAX_PARTITIONS} partitions, not {}",
                self.partitions
            ));
        }
        if !filter.split('.').any(|t| t == "*") {
            return Err(format!(
                "an ordered trigger takes its key from the first `*` token of its subject, \
                 and {filter:?} has none (write e.g. cc.v1.calls.*.> )"
            ));
        }
        Ok(())
    }
}

/// The durable consumer of partition `partition` of function `function`.
#[must_use]
pub fn partition_consumer(function: &Token, partition: u32) -> String {
    format!("fn-{function}-p{partition}")
}

/// The partition number of `consumer` if it is one of `function`'s partition consumers.
#[must_use]
pub fn parse_partition_consumer(function: &Token, consumer: &str) -> Option<u32> {
    let digits = consumer.strip_prefix(&format!("fn-{function}-p"))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `<prefix>patchbay.v1.ordered.<function>.` — what every copy of `function`'s input
/// starts with.
#[must_use]
pub fn function_prefix(subjects: &Subjects, function: &Token) -> String {
    subjects.full(&format!("patchbay.v1.ordered.{function}."))
}

/// `<prefix>patchbay.v1.ordered.<function>.>` — every copy of `function`'s input.
#[must_use]
pub fn function_filter(subjects: &Subjects, function: &Token) -> String {
    format!("{}>", function_prefix(subjects, function))
}

/// `<prefix>patchbay.v1.ordered.<function>.<partition>.>` — the filter of one partition
/// consumer.
#[must_use]
pub fn partition_filter(subjects: &Subjects, function: &Token, partition: u32) -> String {
    format!("{}{partition}.>", function_prefix(subjects, function))
}

/// The copy of `original` (a full, prefixed subject) in `partition`: what the server's
/// transform produces, built here for tests and tools.
#[must_use]
pub fn partition_subject(
    subjects: &Subjects,
    function: &Token,
    partition: u32,
    original: &str,
) -> String {
    format!(
        "{}{partition}.{original}",
        function_prefix(subjects, function)
    )
}

/// The subject an event was published on before it was copied into `function`'s
/// partitions (prefix kept); any other subject unchanged. The function sees this one, so
/// ordering changes nothing for its code, its outputs or its dead letters.
#[must_use]
pub fn original_subject<'a>(subjects: &Subjects, function: &Token, subject: &'a str) -> &'a str {
    subject
        .strip_prefix(function_prefix(subjects, function).as_str())
        .and_then(|rest| rest.split_once('.'))
        .filter(|(partition, original)| {
            !partition.is_empty()
                && partition.bytes().all(|b| b.is_ascii_digit())
                && !original.is_empty()
        })
        .map_or(subject, |(_, original)| original)
}

/// The source transform `(src, dest)` that copies the events `filter` (without the
/// prefix) selects into `function`'s partitions: every literal and `>` token is carried
/// through, each `*` as `{{wildcard(i)}}`, and the partition is the hash of the first `*`.
#[must_use]
pub fn source_transform(
    subjects: &Subjects,
    function: &Token,
    filter: &str,
    ordered: Ordered,
) -> (String, String) {
    let source = subjects.full(filter);
    let mut wildcard = 0;
    let carried: Vec<String> = source
        .split('.')
        .map(|token| {
            if token == "*" {
                wildcard += 1;
                format!("{{{{wildcard({wildcard})}}}}")
            } else {
                token.to_owned()
            }
        })
        .collect();
    let destination = format!(
        "{}{{{{partition({},1)}}}}.{}",
        function_prefix(subjects, function),
        ordered.partitions,
        carried.join(".")
    );
    (source, destination)
}

/// Whether a source transform destination copies into `function`'s partitions.
#[must_use]
pub fn is_function_destination(subjects: &Subjects, function: &Token, destination: &str) -> bool {
    destination.starts_with(&function_prefix(subjects, function))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tok(s: &str) -> Token {
        Token::new(s).unwrap()
    }

    #[test]
    fn partition_subjects_round_trip_to_the_original_with_and_without_prefix() {
        for prefix in ["", "acme.", "eu.acme."] {
            let s = Subjects::new(prefix).unwrap();
            let f = tok("call-analytics");
            let original = s.full("cc.v1.calls.c-17.routed");
            for p in [0, 7, 255] {
                let copied = partition_subject(&s, &f, p, &original);
                assert!(patchbay_bus::subject::matches(
                    &partition_filter(&s, &f, p),
                    &copied
                ));
                assert!(patchbay_bus::subject::matches(
                    &function_filter(&s, &f),
                    &copied
                ));
                assert_eq!(original_subject(&s, &f, &copied), original);
            }
            // Anything that is not one of this function's copies passes through.
            for other in [
                original.clone(),
                partition_subject(&s, &tok("other"), 3, &original),
                s.full("patchbay.v1.ordered.call-analytics.x.cc.v1.calls.c.routed"),
                s.full("patchbay.v1.ordered.call-analytics.3"),
            ] {
                assert_eq!(original_subject(&s, &f, &other), other);
            }
        }
    }

    #[test]
    fn the_transform_carries_every_token_and_hashes_the_first_wildcard() {
        let f = tok("f");
        let (src, dest) = source_transform(
            &Subjects::default(),
            &f,
            "cc.v1.calls.*.>",
            Ordered { partitions: 16 },
        );
        assert_eq!(src, "cc.v1.calls.*.>");
        assert_eq!(
            dest,
            "patchbay.v1.ordered.f.{{partition(16,1)}}.cc.v1.calls.{{wildcard(1)}}.>"
        );
        let s = Subjects::new("acme.").unwrap();
        let (src, dest) =
            source_transform(&s, &f, "cc.v1.agents.*.evt.*", Ordered { partitions: 4 });
        assert_eq!(src, "acme.cc.v1.agents.*.evt.*");
        assert_eq!(
            dest,
            "acme.patchbay.v1.ordered.f.{{partition(4,1)}}.acme.cc.v1.agents.{{wildcard(1)}}.evt.{{wildcard(2)}}"
        );
        assert!(is_function_destination(&s, &f, &dest));
        assert!(!is_function_destination(&s, &tok("g"), &dest));
    }

    #[test]
    fn ordering_needs_a_key_token_and_a_sane_partition_count() {
        let ok = Ordered::default();
        assert!(ok.validate("cc.v1.calls.*.>").is_ok());
        assert!(ok.validate("cc.v1.calls.*.routed").is_ok());
        let err = ok.validate("cc.v1.calls.>").unwrap_err();
        assert!(err.contains("first `*` token"), "{err}");
        assert!(ok.validate("cc.v1.calls.c1.routed").is_err());
        for bad in [0, MAX_PARTITIONS + 1] {
            assert!(Ordered { partitions: bad }.validate("a.*").is_err());
        }
    }

    #[test]
    fn partition_consumers_are_told_apart_from_other_functions() {
        let a = tok("a");
        assert_eq!(partition_consumer(&a, 3), "fn-a-p3");
        assert_eq!(parse_partition_consumer(&a, "fn-a-p3"), Some(3));
        // Function `a-p1`'s partition 0 is not function `a`'s.
        assert_eq!(parse_partition_consumer(&a, "fn-a-p1-p0"), None);
        assert_eq!(parse_partition_consumer(&a, "fn-a"), None);
        assert_eq!(parse_partition_consumer(&a, "fn-a-p"), None);
        assert_eq!(
            parse_partition_consumer(&tok("a-p1"), "fn-a-p1-p0"),
            Some(0)
        );
    }
}
