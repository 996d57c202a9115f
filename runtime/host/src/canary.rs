//! Canary traffic: which version of a function handles an event while a canary runs, and
//! the node-side automatic rollback.
//!
//! * **Choice** ([`choose`]): pure and deterministic across nodes and processes. The
//!   interaction key — the CloudEvent `partitionkey` extension, else the event `id` — is
//!   hashed (FNV-1a 64 with a murmur3 finaliser, frozen: changing it would move live
//!   interactions between versions) onto 10,000 basis points; keys below `percent × 100`
//!   go to the canary. So every event of one call lands on one version on every node, and
//!   the share is proportional to the number of interactions, not of events.
//! * **Routing** ([`Canaries`]): each node serves the canary version beside the stable one
//!   (two loaded versions, one shared trigger subscription); the trigger call sites ask
//!   [`Node::function_for`] per message.
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
//! Not here: the spec fields ([`crate::registry::Canary`]) and their commands (CLI).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_nats::HeaderMap;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt as _;
use patchbay_bus::CloudEvent;
use serde::{Deserialize, Serialize};

use crate::node::{Deployed, Node, Outcome};
use crate::registry::{AutoRollback, FunctionSpec};

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

/// Events handled and failed by one version.
#[derive(Debug, Default)]
struct Tally {
    events: AtomicU64,
    errors: AtomicU64,
}

impl Tally {
    fn record(&self, failed: bool) {
        self.events.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read(&self) -> (u64, u64) {
        (
            self.events.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

fn rate((events, errors): (u64, u64)) -> f64 {
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

/// Whether `outcome` counts against a version: anything but `ok` and `drop` (a function
/// dropping an event it does not want is a decision, not a failure).
fn failed(outcome: &Outcome) -> bool {
    !matches!(outcome.label(), "ok" | "drop")
}

/// A canary as one node routes it.
pub(crate) struct CanaryRoute {
    /// The canary version, loaded.
    pub deployed: Arc<Deployed>,
    stable_version: u32,
    percent: f64,
    rule: Option<AutoRollback>,
    stable: Tally,
    canary: Tally,
    /// Set when a verdict (this node's or another's) stopped routing to the canary.
    stopped: AtomicBool,
    /// Set once this node has judged, so it writes one verdict.
    judged: AtomicBool,
}

/// Every canary a node routes, and the verdicts it has seen.
#[derive(Default)]
pub(crate) struct Canaries {
    routes: RwLock<HashMap<String, Arc<CanaryRoute>>>,
    /// Keys of [`VERDICTS_BUCKET`] present now.
    verdicts: Mutex<HashSet<String>>,
    /// The verdicts bucket; `None` when it does not exist (auto rollback then only stops
    /// routing on the judging node) or before it was opened.
    store: tokio::sync::OnceCell<Option<kv::Store>>,
}

impl Canaries {
    fn route(&self, name: &str) -> Option<Arc<CanaryRoute>> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// The canary version `name` routes a share to now (none when stopped by a verdict).
    pub(crate) fn routing_version(&self, name: &str) -> Option<u32> {
        self.route(name)
            .filter(|r| !r.stopped.load(Ordering::Relaxed))
            .map(|r| r.deployed.spec.version)
    }
}

impl Node {
    /// The version of `name` that handles `msg`: the canary for the interactions its share
    /// covers, otherwise (and when no canary runs) the active version.
    pub(crate) fn function_for(
        &self,
        name: &str,
        msg: &async_nats::Message,
    ) -> Option<Arc<Deployed>> {
        let stable = self.function(name)?;
        let Some(route) = self.canaries.route(name) else {
            return Some(stable);
        };
        if route.stopped.load(Ordering::Relaxed) {
            return Some(stable);
        }
        match routing_key(msg.headers.as_ref(), &msg.payload).map(|key| choose(route.percent, &key))
        {
            Some(Route::Canary) => Some(Arc::clone(&route.deployed)),
            _ => Some(stable),
        }
    }

    /// Route to the canary of `spec` (loading it), or stop routing to one it no longer has.
    pub(crate) async fn apply_canary(self: &Arc<Self>, spec: &FunctionSpec) {
        let name = spec.name.as_str();
        // Only beside the stable version this node serves (so never for HTTP functions).
        let stable = self
            .function(name)
            .filter(|f| f.spec.version == spec.active);
        let (Some(canary), Some(stable)) = (spec.canary.as_ref(), stable) else {
            return self.clear_canary(name);
        };
        let Ok(version) = spec.version(canary.version) else {
            tracing::error!(
                function = name,
                version = canary.version,
                "canary version missing; not routing to it"
            );
            return self.clear_canary(name);
        };
        if let Some(current) = self.canaries.route(name)
            && current.deployed.spec == *version
            && current.percent.to_bits() == canary.percent.to_bits()
            && current.rule == canary.auto_rollback
            && current.stable_version == spec.active
        {
            return;
        }
        let Some(deployed) = self.deploy_version(&stable.name, version).await else {
            return self.clear_canary(name);
        };
        let key = verdict_key(name, version.version);
        let stopped = self
            .canaries
            .verdicts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&key);
        let route = Arc::new(CanaryRoute {
            deployed,
            stable_version: spec.active,
            percent: canary.percent,
            rule: canary.auto_rollback,
            stable: Tally::default(),
            canary: Tally::default(),
            stopped: AtomicBool::new(stopped),
            judged: AtomicBool::new(stopped),
        });
        let old = self
            .canaries
            .routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), Arc::clone(&route));
        if let Some(old) = old {
            self.forget_canary_metrics(name, &old);
        }
        let version_label = version.version.to_string();
        self.metrics
            .loaded
            .with_label_values(&[name, &version_label])
            .set(1.0);
        self.metrics
            .canary_percent
            .with_label_values(&[name, &version_label])
            .set(if stopped { 0.0 } else { canary.percent });
        tracing::info!(
            function = name,
            version = version.version,
            percent = canary.percent,
            stopped,
            "routing a canary share"
        );
    }

    /// Stop routing to the canary of `name`, if any.
    pub(crate) fn clear_canary(&self, name: &str) {
        let old = self
            .canaries
            .routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        if let Some(old) = old {
            self.forget_canary_metrics(name, &old);
            tracing::info!(
                function = name,
                version = old.deployed.spec.version,
                "canary ended"
            );
        }
    }

    fn forget_canary_metrics(&self, name: &str, route: &CanaryRoute) {
        let version = route.deployed.spec.version.to_string();
        let _ = self
            .metrics
            .canary_percent
            .remove_label_values(&[name, &version]);
        // The version may have become the stable one (promote): keep its `loaded` then.
        if self
            .function(name)
            .is_none_or(|f| f.spec.version != route.deployed.spec.version)
        {
            let _ = self.metrics.loaded.remove_label_values(&[name, &version]);
        }
    }

    /// Count `outcome` of `f` toward its function's canary, and judge the canary.
    pub(crate) fn observe_canary(self: &Arc<Self>, f: &Deployed, outcome: &Outcome) {
        let Some(route) = self.canaries.route(f.name.as_str()) else {
            return;
        };
        let version = f.spec.version;
        if version == route.deployed.spec.version {
            route.canary.record(failed(outcome));
        } else if version == route.stable_version {
            route.stable.record(failed(outcome));
        } else {
            return;
        }
        let Some(rule) = route.rule else { return };
        let (stable, canary) = (route.stable.read(), route.canary.read());
        if !breached(&rule, stable, canary) || route.judged.swap(true, Ordering::SeqCst) {
            return;
        }
        // Fail safe at once here; the verdict tells the other nodes.
        self.stop_canary(&route);
        let verdict = Verdict {
            function: f.name.to_string(),
            version: route.deployed.spec.version,
            stable_version: route.stable_version,
            canary_error_rate: rate(canary),
            stable_error_rate: rate(stable),
            canary_events: canary.0,
            stable_events: stable.0,
            margin: rule.margin,
            node: self.name.clone(),
            time_ms: self.bus.clock().now_millis(),
        };
        tracing::warn!(
            ?verdict,
            "canary fails more than the stable version: rolling it back"
        );
        let node = Arc::clone(self);
        tokio::spawn(async move { node.write_verdict(&verdict).await });
    }

    fn stop_canary(&self, route: &CanaryRoute) {
        if route.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let name = route.deployed.name.as_str();
        self.metrics
            .canary_percent
            .with_label_values(&[name, &route.deployed.spec.version.to_string()])
            .set(0.0);
        tracing::warn!(
            function = name,
            version = route.deployed.spec.version,
            "stopped routing to the canary (auto-rollback verdict)"
        );
    }

    async fn verdict_store(&self) -> Option<&kv::Store> {
        self.canaries
            .store
            .get_or_init(|| async {
                match self.bus.jetstream().get_key_value(VERDICTS_BUCKET).await {
                    Ok(store) => Some(store),
                    Err(e) => {
                        tracing::warn!(bucket = VERDICTS_BUCKET, error = %e, "no canary verdicts bucket: auto rollback stays local to the judging node");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    async fn write_verdict(&self, verdict: &Verdict) {
        let Some(store) = self.verdict_store().await else {
            return;
        };
        let key = verdict_key(&verdict.function, verdict.version);
        let value = match serde_json::to_vec(verdict) {
            Ok(v) => Bytes::from(v),
            Err(e) => return tracing::error!(error = %e, "cannot encode the canary verdict"),
        };
        // `create`: the first node's verdict stands; a later one changes nothing.
        match store.create(&key, value).await {
            Ok(_) => tracing::info!(%key, "canary verdict written"),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => tracing::error!(%key, error = %e, "cannot write the canary verdict"),
        }
    }

    /// Read the verdicts present now, so a node (re)starting mid-canary never routes to a
    /// canary already judged, not even until its watch catches up.
    pub(crate) async fn load_verdicts(&self) {
        let Some(store) = self.verdict_store().await else {
            return;
        };
        let keys = match store.keys().await {
            Ok(keys) => {
                keys.filter_map(|k| async move { k.ok() })
                    .collect::<Vec<_>>()
                    .await
            }
            Err(e) => {
                return tracing::warn!(bucket = VERDICTS_BUCKET, error = %e, "cannot list canary verdicts");
            }
        };
        self.canaries
            .verdicts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(keys);
    }

    /// Watch [`VERDICTS_BUCKET`] until the node shuts down: a verdict on a canary this node
    /// routes to stops that routing at once.
    pub(crate) async fn watch_verdicts(self: Arc<Self>) {
        let Some(store) = self.verdict_store().await.cloned() else {
            return;
        };
        let mut watch = match store.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                return tracing::error!(bucket = VERDICTS_BUCKET, error = %e, "cannot watch canary verdicts");
            }
        };
        while let Some(entry) = watch.next().await {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(error = %e, "canary verdict watch error");
                    continue;
                }
            };
            let mut verdicts = self
                .canaries
                .verdicts
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if entry.operation != kv::Operation::Put {
                verdicts.remove(&entry.key);
                continue;
            }
            verdicts.insert(entry.key.clone());
            drop(verdicts);
            let Some((function, version)) = entry.key.rsplit_once('.') else {
                continue;
            };
            if let Some(route) = self.canaries.route(function)
                && route.deployed.spec.version.to_string() == version
            {
                route.judged.store(true, Ordering::SeqCst);
                self.stop_canary(&route);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::registry::{Canary, RegistryError, VersionSpec};

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
        let spec = crate::registry::decode("f", old.to_string().as_bytes()).unwrap();
        assert!(spec.canary.is_none());
    }
}
