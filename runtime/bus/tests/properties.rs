//! Property tests over what reaches the bus from outside: CloudEvents in both content
//! modes, NATS header blocks, hop chains and platform subjects. Each one states what must
//! hold for *any* input — no panic, and whatever is accepted survives the trip onto the
//! wire unchanged — so a class of input found once (a CR in an id, a header line without
//! a colon) stays fixed.
//!
//! `make test` runs the default number of cases; `make fuzz` runs many more
//! (`PROPTEST_CASES`).

#![allow(clippy::unwrap_used, missing_docs)]

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use bytes::Bytes;
use patchbay_bus::hops::{HOPS_HEADER, HopChain};
use patchbay_bus::subject::PlatformSubject;
use patchbay_bus::{CloudEvent, Subjects, Token};
use proptest::prelude::*;
use serde_json::{Map, Value};

/// Text that includes what broke things before: line breaks, NUL, other controls, long
/// runs and non-ASCII.
fn nasty_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9/._:-]{1,24}",
        2 => any::<String>(),
        1 => "[a-z]{0,4}[\r\n\u{0}\u{7f}\t][a-z]{0,4}",
        1 => Just("x".repeat(5000)),
        1 => Just(String::new()),
    ]
}

fn attribute_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("id".to_owned()),
        Just("source".to_owned()),
        Just("type".to_owned()),
        Just("specversion".to_owned()),
        Just("time".to_owned()),
        Just("datacontenttype".to_owned()),
        Just("dataschema".to_owned()),
        Just("subject".to_owned()),
        Just("data".to_owned()),
        Just("data_base64".to_owned()),
        "[a-z0-9]{1,24}",
        "[A-Za-z_ -]{1,8}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => nasty_text().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(serde_json::json!({"nested": [1, 2]})),
    ]
}

/// A structured-mode body: mostly close to valid, so decoding gets past the first check.
fn structured_body() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec((attribute_name(), json_value()), 0..8),
        any::<bool>(),
    )
        .prop_map(|(attributes, base)| {
            let mut obj = Map::new();
            if base {
                obj.insert("specversion".into(), "1.0".into());
                obj.insert("id".into(), "e1".into());
                obj.insert("source".into(), "/s".into());
                obj.insert("type".into(), "t".into());
            }
            for (name, value) in attributes {
                obj.insert(name, value);
            }
            Value::Object(obj).to_string().into_bytes()
        })
}

/// The headers a publisher could put on a message (values cannot hold CR or LF: the
/// header block itself is tested separately below).
fn binary_headers() -> impl Strategy<Value = HeaderMap> {
    let name = prop_oneof![
        Just("ce-id".to_owned()),
        Just("ce-source".to_owned()),
        Just("ce-type".to_owned()),
        Just("ce-specversion".to_owned()),
        Just("ce-time".to_owned()),
        Just("Content-Type".to_owned()),
        Just(HOPS_HEADER.to_owned()),
        "ce-[a-zA-Z0-9_]{1,24}",
    ];
    (
        prop::collection::vec((name, nasty_text()), 0..10),
        any::<bool>(),
    )
        .prop_map(|(pairs, base)| {
            let mut headers = HeaderMap::new();
            if base {
                headers.insert("ce-specversion", "1.0");
                headers.insert("ce-id", "e1");
                headers.insert("ce-source", "/s");
                headers.insert("ce-type", "t");
            }
            for (name, value) in pairs {
                if let (Ok(name), Ok(value)) =
                    (name.parse::<HeaderName>(), value.parse::<HeaderValue>())
                {
                    headers.insert(name, value);
                }
            }
            headers
        })
}

/// The parts of an event that must survive the headers.
fn essence(e: &CloudEvent) -> impl PartialEq + std::fmt::Debug + use<> {
    (
        e.id.clone(),
        e.source.clone(),
        e.ty.clone(),
        e.time,
        e.data_content_type.clone(),
        e.data_schema.clone(),
        e.subject.clone(),
        e.extensions.clone(),
        e.data.clone(),
    )
}

proptest! {
    #[test]
    fn structured_events_decode_without_panic_and_what_is_accepted_survives_binary_mode(
        body in structured_body()
    ) {
        if let Ok(event) = CloudEvent::from_structured(&body) {
            prop_assert!(event.validate().is_ok());
            let headers = event.to_headers();
            let back = CloudEvent::from_message(Some(&headers), &event.data);
            prop_assert!(back.is_ok(), "accepted event refused after encoding: {back:?}");
            prop_assert_eq!(essence(&back.unwrap()), essence(&event));
        }
    }

    #[test]
    fn binary_events_decode_without_panic_and_re_encode_unchanged(
        headers in binary_headers(),
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let data = Bytes::from(data);
        if let Ok(event) = CloudEvent::from_message(Some(&headers), &data) {
            let back = CloudEvent::from_message(Some(&event.to_headers()), &event.data).unwrap();
            prop_assert_eq!(essence(&back), essence(&event));
        }
    }

    #[test]
    fn no_event_the_validator_refuses_is_published_and_none_it_accepts_breaks_a_header(
        id in nasty_text(),
        source in nasty_text(),
        ty in nasty_text(),
        extension in nasty_text(),
    ) {
        let event = CloudEvent::new(source, ty).id(id).extension("ext", extension);
        // Writing headers never panics, valid or not…
        let headers = event.to_headers();
        // …and a valid event's headers carry exactly its attributes.
        if event.validate().is_ok() {
            let back = CloudEvent::from_message(Some(&headers), &event.data).unwrap();
            prop_assert_eq!(essence(&back), essence(&event));
        }
    }

    #[test]
    fn de_duplication_ids_differ_whenever_source_or_id_differ(
        a in ("[a-z/]{0,6}", "[a-z0-9:]{0,6}"),
        b in ("[a-z/]{0,6}", "[a-z0-9:]{0,6}"),
        index in 0usize..4,
    ) {
        let ea = CloudEvent::new(a.0.clone(), "t").id(a.1.clone());
        let eb = CloudEvent::new(b.0.clone(), "t").id(b.1.clone());
        prop_assert_eq!(ea.dedup_id() == eb.dedup_id(), a == b);
        prop_assert_eq!(
            ea.output_dedup_id("f", index) == eb.output_dedup_id("f", index),
            a == b
        );
        prop_assert_ne!(ea.output_dedup_id("f", index), ea.output_dedup_id("g", index));
        prop_assert_ne!(ea.output_dedup_id("f", index), ea.output_dedup_id("f", index + 1));
    }

    #[test]
    fn a_header_block_never_fails_the_connection_and_valid_lines_are_kept(
        lines in prop::collection::vec(
            prop_oneof![
                "[A-Za-z-]{1,12}: [ -~]{0,16}",
                "[ -~]{0,20}",
                prop::collection::vec(any::<u8>(), 0..20)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ],
            0..8,
        ),
        invalid_utf8 in any::<bool>(),
    ) {
        let mut block = b"NATS/1.0\r\n".to_vec();
        for line in &lines {
            block.extend_from_slice(line.replace(['\r', '\n'], "").as_bytes());
            block.extend_from_slice(b"\r\n");
        }
        if invalid_utf8 {
            block.extend_from_slice(b"X-Bad: \xff\xfe\r\n");
        }
        block.extend_from_slice(b"\r\n");
        let (headers, _, _) = async_nats::connection::parse_header_block(&block);
        let malformed = headers.get(async_nats::connection::MALFORMED_HEADERS).is_some();
        if invalid_utf8 {
            prop_assert!(malformed);
            // And an event decoder refuses it, naming why.
            let refused = CloudEvent::from_message(Some(&headers), &Bytes::new());
            prop_assert!(refused.is_err());
        }
        // Valid: empty lines, `name: value` lines, and lines that start with white space
        // right after a header (its continuation); a continuation of nothing is not.
        let mut after_header = false;
        let all_valid = !invalid_utf8
            && lines.iter().all(|l| {
                let l = l.replace(['\r', '\n'], "");
                if l.is_empty() {
                    after_header = false;
                    true
                } else if l.starts_with(char::is_whitespace) {
                    after_header
                } else {
                    after_header = l
                        .split_once(':')
                        .is_some_and(|(n, _)| n.parse::<HeaderName>().is_ok());
                    after_header
                }
            });
        if all_valid {
            prop_assert!(!malformed, "a valid block was marked malformed: {lines:?}");
        }
    }

    #[test]
    fn hop_chains_read_from_any_header_value_round_trip(value in nasty_text()) {
        let mut headers = HeaderMap::new();
        if let Ok(v) = value.parse::<HeaderValue>() {
            headers.insert(HOPS_HEADER, v);
        }
        let chain = HopChain::from_headers(Some(&headers));
        let mut again = HeaderMap::new();
        chain.write(&mut again);
        prop_assert_eq!(HopChain::from_headers(Some(&again)), chain);
    }

    #[test]
    fn platform_subjects_parse_without_panic_and_builders_round_trip(
        subject in "[a-z.*>_ -]{0,40}",
        name in "[A-Za-z0-9_-]{1,20}",
    ) {
        let subjects = Subjects::default();
        let _ = subjects.parse(&subject);
        let token = Token::new(name).unwrap();
        prop_assert_eq!(
            subjects.parse(&subjects.fn_invoke(&token)).unwrap(),
            PlatformSubject::FnInvoke { function: token.clone() }
        );
        prop_assert_eq!(
            subjects.parse(&subjects.dlq(&token)).unwrap(),
            PlatformSubject::Dlq { function: token }
        );
    }
}

/// Found by the property above: a continuation line with no header before it is a
/// malformed line, not a valid empty continuation.
#[test]
fn a_continuation_of_nothing_is_malformed_and_a_continuation_of_a_header_is_not() {
    let parse = |block: &[u8]| {
        let (headers, _, _) = async_nats::connection::parse_header_block(block);
        headers
            .get(async_nats::connection::MALFORMED_HEADERS)
            .is_some()
    };
    assert!(parse(b"NATS/1.0\r\n \r\n\r\n"));
    assert!(!parse(b"NATS/1.0\r\nA: b\r\n c\r\n\r\n"));
}
