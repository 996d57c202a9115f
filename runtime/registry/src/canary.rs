//! Canary decisions: which version of a function handles an event while a canary runs,
//! and when a canary has failed (the node-side judging that applies them is the runtime
//! node's).
//!
//! * **Choice** ([`choose`]): pure and deterministic across nodes and processes. The
//!   interaction key — the CloudEvent `partitionkey` extension, else the event `id` — is
//!   hashed (FNV-1a 64 with a murmur3 finaliser, frozen: changing it would move live
//!   interactions between versions) onto 10,000 basis points; keys below `percent × 100`
//!   go to the canary. So every event of one call lands on one version on every node, and
//!   the share is proportional to the number of interactions, not of events.
//! * **Routing** ([`Canaries`]): each node serves the canary version beside the stable one
//!   (two loaded versions, one shared trigger subscription); the trigger call sites ask
//!   `Node::function_for` per message.
//! * **Auto rollback**: each node counts, per function, the events each version handled
//!   since the canary started on that node and how many ended neither `ok` nor `drop`.
//!   Once the canary has handled `min_events` here and its error rate exceeds the stable
//!   one's by more than `margin`, the node stops routing to it and writes a [`Verdict`]
//!   into [`VERDICTS_BUCKET`] (key `<function>.<canary version>`). Every node watches that
//!   bucket and stops routing to a canary with a verdict at once. Only in that direction:
//!   a verdict never sends traffic *to* a canary, and only `fn promote`/`fn rollback` (the
//!   admin, who may write the registry) end the canary for good. Judging is local: each
//!   node judges from its own share, which sticky hashing makes a fair sample of both
//!   versions; the first node to see enough evidence decides for all.
//!
//! Not here: the spec fields ([`crate::Canary`]) and their commands (CLI).

use async_nats::HeaderMap;
use bytes::Bytes;
use patchbay_bus::CloudEvent;
use serde::{Deserialize, Serialize};

use crate::AutoRollback;

/// KV bucket holding auto-rollback verdicts, key `<function>.<canary version>`. Created by
/// the admin bootstrap (deploy/streams.toml); runtime nodes may read and write its keys.
pub const VERDICTS_BUCKET: &str = "patchbay-canary-verdicts";

/// Basis points the key space is divided into.
const BASIS_POINTS: u64 = 10_000;

/// The key of the verdict on `version` of `function`.
#[must_use]
pub fn verdict_key(function: &str, version: u32) -> String {
    format!("{function}.{version}")
}

/// Which version handles an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The active version.
    Stable,
    /// The canary.
    Canary,
}

/// The basis point in `[0, 10000)` of interaction `key`.
#[must_use]
pub fn basis_point(key: &str) -> u64 {
    // FNV-1a 64: tiny, dependency-free, the same everywhere.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // murmur3's fmix64: FNV's low bits vary little between keys like `call-17`/`call-18`,
    // and the modulo below uses exactly those.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    hash % BASIS_POINTS
}

/// Where the interaction `key` goes while a canary takes `percent` % of the traffic.
#[must_use]
pub fn choose(percent: f64, key: &str) -> Route {
    // `as` saturates; percent is validated to (0, 100) anyway.
    let threshold = (percent * 100.0).round() as u64;
    if basis_point(key) < threshold {
        Route::Canary
    } else {
        Route::Stable
    }
}

/// The interaction key of a message: its `partitionkey` extension, else its event id;
/// `None` when the message is no CloudEvent (it then goes to the stable version, which
/// refuses it as usual).
#[must_use]
pub fn routing_key(headers: Option<&HeaderMap>, payload: &Bytes) -> Option<String> {
    let header = |name: &str| {
        headers.and_then(|h| {
            h.iter()
                .find(|(k, _)| {
                    let k: &str = k.as_ref();
                    k.eq_ignore_ascii_case(name)
                })
                .and_then(|(_, v)| v.first())
                .map(|v| v.as_str().to_owned())
        })
    };
    if let Some(key) = header("ce-partitionkey").or_else(|| header("ce-id")) {
        return Some(key);
    }
    // Structured mode keeps the attributes in the body: decode (rare path).
    let event = CloudEvent::from_message(headers, payload).ok()?;
    Some(
        event
            .extensions
            .get(patchbay_bus::event::PARTITION_KEY)
            .cloned()
            .unwrap_or(event.id),
    )
}

/// An auto-rollback decision, as stored in [`VERDICTS_BUCKET`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The function.
    pub function: String,
    /// The canary version judged.
    pub version: u32,
    /// The stable version it was compared with.
    pub stable_version: u32,
    /// The canary's error rate on the judging node (0..=1).
    pub canary_error_rate: f64,
    /// The stable version's error rate on the judging node.
    pub stable_error_rate: f64,
    /// Events the canary handled on that node.
    pub canary_events: u64,
    /// Events the stable version handled on that node.
    pub stable_events: u64,
    /// The margin that was exceeded.
    pub margin: f64,
    /// The node that judged.
    pub node: String,
    /// When, ms since the Unix epoch.
    pub time_ms: u64,
}

/// The error rate of `(events, errors)` (0 with no events).
#[must_use]
pub fn rate((events, errors): (u64, u64)) -> f64 {
    if events == 0 {
        0.0
    } else {
        errors as f64 / events as f64
    }
}

/// Whether `(events, errors)` of the canary against the stable version breach `rule`: the
/// canary has at least `min_events` and its error rate exceeds the stable one's by more
/// than `margin`.
#[must_use]
pub fn breached(rule: &AutoRollback, stable: (u64, u64), canary: (u64, u64)) -> bool {
    canary.0 >= rule.min_events && rate(canary) - rate(stable) > rule.margin
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{Canary, FunctionSpec, RegistryError, VersionSpec};

    #[test]
    fn an_interaction_key_always_gets_the_same_version() {
        for i in 0..1_000 {
            let key = format!("call-{i}");
            let first = choose(10.0, &key);
            for _ in 0..3 {
                assert_eq!(choose(10.0, &key), first, "{key} moved");
            }
        }
    }

    #[test]
    fn the_hash_is_frozen_so_every_node_and_release_agrees() {
        // Changing these moves live interactions between versions: do not.
        let pinned: Vec<u64> = ["call-1", "call-2", "a", ""]
            .iter()
            .map(|k| basis_point(k))
            .collect();
        assert_eq!(pinned, vec![3328, 9743, 8315, 4342]);
    }

    #[test]
    fn the_canary_gets_its_share_of_sequential_and_random_keys() {
        for percent in [1.0, 10.0, 50.0, 90.0] {
            for keys in [
                (0..20_000).map(|i| format!("call-{i}")).collect::<Vec<_>>(),
                (0..20_000)
                    .map(|_| uuid::Uuid::new_v4().to_string())
                    .collect(),
            ] {
                let canary = keys
                    .iter()
                    .filter(|k| choose(percent, k) == Route::Canary)
                    .count();
                let share = canary as f64 / keys.len() as f64 * 100.0;
                assert!(
                    (share - percent).abs() < 1.0,
                    "{percent}% canary got {share:.2}%"
                );
            }
        }
    }

    #[test]
    fn a_bigger_share_keeps_every_interaction_of_the_smaller_one() {
        // Raising the percentage only moves stable interactions to the canary.
        for i in 0..5_000 {
            let key = format!("k{i}");
            if choose(10.0, &key) == Route::Canary {
                assert_eq!(choose(25.0, &key), Route::Canary);
            }
        }
    }

    #[test]
    fn the_routing_key_is_the_partition_key_else_the_event_id() {
        let keyed = CloudEvent::new("/t", "t").partition_key("call-7");
        assert_eq!(
            routing_key(Some(&keyed.to_headers()), &Bytes::new()).as_deref(),
            Some("call-7")
        );
        let plain = CloudEvent::new("/t", "t");
        assert_eq!(
            routing_key(Some(&plain.to_headers()), &Bytes::new()),
            Some(plain.id.clone())
        );
        let structured = Bytes::from(serde_json::to_vec(&keyed.to_structured()).unwrap());
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", patchbay_bus::event::STRUCTURED_CONTENT_TYPE);
        assert_eq!(
            routing_key(Some(&headers), &structured).as_deref(),
            Some("call-7")
        );
        assert_eq!(routing_key(None, &Bytes::from_static(b"junk")), None);
    }

    #[test]
    fn a_canary_is_judged_only_after_min_events_and_beyond_the_margin() {
        let rule = AutoRollback {
            margin: 0.05,
            min_events: 50,
        };
        // 100 % failing, but too few events yet.
        assert!(!breached(&rule, (100, 0), (49, 49)));
        assert!(breached(&rule, (100, 0), (50, 50)));
        // Within the margin of the stable rate.
        assert!(!breached(&rule, (1000, 100), (100, 15)));
        assert!(breached(&rule, (1000, 100), (100, 16)));
        // No stable traffic yet counts as a 0 % stable rate.
        assert!(breached(&rule, (0, 0), (50, 3)));
    }

    fn version(trigger: &str, tag: &str) -> VersionSpec {
        VersionSpec::for_test(trigger, tag)
    }

    fn canary(percent: f64) -> Canary {
        Canary {
            version: 0,
            percent,
            auto_rollback: None,
            started_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn spec_with_stable() -> FunctionSpec {
        let mut spec = FunctionSpec {
            name: "f".into(),
            active: 0,
            versions: vec![],
            canary: None,
        };
        spec.push(version("subject:a.b", "v1"));
        spec
    }

    #[test]
    fn a_canary_runs_beside_the_stable_version_until_promoted() {
        let mut spec = spec_with_stable();
        assert_eq!(
            spec.start_canary(version("subject:a.b", "v2"), canary(10.0))
                .unwrap(),
            2
        );
        assert_eq!(spec.active, 1);
        assert_eq!(spec.canary.as_ref().unwrap().version, 2);
        // A second canary replaces the first.
        assert_eq!(
            spec.start_canary(version("subject:a.b", "v3"), canary(20.0))
                .unwrap(),
            3
        );
        assert_eq!(spec.canary.as_ref().unwrap().version, 3);
        assert_eq!(spec.promote().unwrap(), 3);
        assert_eq!((spec.active, spec.canary.is_none()), (3, true));
        assert!(matches!(
            spec.promote(),
            Err(RegistryError::NoCanary { .. })
        ));
    }

    #[test]
    fn rollback_with_a_canary_drops_the_canary_and_keeps_the_stable_version() {
        let mut spec = spec_with_stable();
        spec.start_canary(version("subject:a.b", "v2"), canary(10.0))
            .unwrap();
        assert_eq!(spec.rollback(None).unwrap(), 1);
        assert!(spec.canary.is_none());
        assert_eq!(spec.active, 1);
        // Without a canary, rollback steps back to the version deployed before as usual.
        spec.push(version("subject:a.b", "v3"));
        assert_eq!(spec.rollback(None).unwrap(), 2);
    }

    #[test]
    fn a_plain_deploy_during_a_canary_ends_the_canary() {
        let mut spec = spec_with_stable();
        spec.start_canary(version("subject:a.b", "v2"), canary(10.0))
            .unwrap();
        assert_eq!(spec.push(version("subject:a.b", "v3")), 3);
        assert!(spec.canary.is_none());
    }

    #[test]
    fn a_canary_with_another_trigger_or_a_bad_share_is_refused() {
        let mut spec = spec_with_stable();
        assert!(matches!(
            spec.start_canary(version("subject:other", "v2"), canary(10.0)),
            Err(RegistryError::CanaryTrigger { .. })
        ));
        for bad in [0.0, 100.0, -1.0, f64::NAN, 150.0] {
            assert!(
                spec.start_canary(version("subject:a.b", "v2"), canary(bad))
                    .is_err(),
                "{bad} accepted"
            );
        }
        let mut bad_rule = canary(10.0);
        bad_rule.auto_rollback = Some(AutoRollback {
            margin: 0.05,
            min_events: 0,
        });
        assert!(
            spec.start_canary(version("subject:a.b", "v2"), bad_rule)
                .is_err()
        );
        // Nothing refused was stored.
        assert_eq!((spec.versions.len(), spec.canary.is_none()), (1, true));
        let mut empty = FunctionSpec {
            name: "g".into(),
            active: 0,
            versions: vec![],
            canary: None,
        };
        assert!(
            empty
                .start_canary(version("invoke", "v1"), canary(10.0))
                .is_err()
        );
    }

    #[test]
    fn specs_stored_before_canaries_existed_still_decode() {
        let old = serde_json::json!({ "name": "f", "active": 1, "versions": [] });
        let spec = crate::decode("f", old.to_string().as_bytes()).unwrap();
        assert!(spec.canary.is_none());
    }
}
