//! Property tests of the routing rules: a rules file an operator edits by hand, and calls
//! whose every field comes from a telephony adapter. Whatever the file says, loading it
//! either succeeds or names the problem — never a panic — and a loaded rule set decides
//! every call, whatever the call carries, at any time of any day.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use patchbay_protocol::payload::{CallIncoming, Channel, CustomerInfo};
use patchbay_routing::Rules;
use proptest::prelude::*;

/// The shipped rules file, the starting point every mutation departs from.
const SHIPPED: &str = include_str!("../../../deploy/routing.toml");

/// A line of the shipped file replaced, dropped or duplicated, or a value garbled.
fn mutated_rules() -> impl Strategy<Value = String> {
    let lines: Vec<String> = SHIPPED.lines().map(str::to_owned).collect();
    let n = lines.len();
    (
        prop::collection::vec((0..n, 0u8..4, "[ -~]{0,24}"), 0..4),
        Just(lines),
    )
        .prop_map(|(edits, mut lines)| {
            for (at, how, text) in edits {
                let at = at.min(lines.len().saturating_sub(1));
                match how {
                    0 => {
                        if !lines.is_empty() {
                            lines.remove(at);
                        }
                    }
                    1 => lines.insert(at, lines.get(at).cloned().unwrap_or_default()),
                    2 => {
                        if let Some(line) = lines.get_mut(at)
                            && let Some((key, _)) = line.split_once('=')
                        {
                            *line = format!("{key}= {text:?}");
                        }
                    }
                    _ => lines.insert(at, text),
                }
            }
            lines.join("\n")
        })
}

fn call() -> impl Strategy<Value = CallIncoming> {
    (
        "[a-zA-Z0-9_-]{1,16}",
        any::<String>(),
        any::<String>(),
        prop::option::of(any::<String>()),
        prop::option::of("[a-z]{2}|[ -~]{0,6}"),
        prop_oneof![
            Just(Channel::Voice),
            Just(Channel::Chat),
            Just(Channel::Email)
        ],
        prop::collection::btree_map("[a-z]{1,6}", any::<String>(), 0..3),
    )
        .prop_map(
            |(call_id, dialled, caller, ivr, language, channel, attributes)| CallIncoming {
                call_id,
                dialled,
                caller,
                ivr,
                language,
                channel,
                attributes: attributes.into_iter().collect::<BTreeMap<_, _>>(),
            },
        )
}

fn customer() -> impl Strategy<Value = Option<CustomerInfo>> {
    prop::option::of(
        ("[a-z]{0,10}", any::<bool>()).prop_map(|(tier, known)| CustomerInfo {
            customer_id: None,
            tier,
            name: None,
            language: None,
            known,
        }),
    )
}

proptest! {
    #[test]
    fn any_rules_file_loads_or_names_its_problem(text in mutated_rules()) {
        match Rules::parse(&text) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn loaded_rules_decide_every_call_at_any_time(
        text in mutated_rules(),
        call in call(),
        customer in customer(),
        // Any instant from 1970 to 2100.
        secs in 0i64..4_102_444_800,
        lookup_ok in any::<bool>(),
    ) {
        if let Ok(rules) = Rules::parse(&text) {
            let now: DateTime<Utc> = DateTime::from_timestamp(secs, 0).unwrap();
            let decision = rules.decide(&call, customer.as_ref(), now);
            let _ = decision.into_event(&call, lookup_ok, u64::try_from(secs).unwrap() * 1000);
        }
    }

    #[test]
    fn the_shipped_rules_decide_every_call(call in call(), customer in customer(), secs in 0i64..4_102_444_800) {
        let rules = Rules::parse(SHIPPED).unwrap();
        let now = DateTime::from_timestamp(secs, 0).unwrap();
        let _ = rules.decide(&call, customer.as_ref(), now);
    }
}
