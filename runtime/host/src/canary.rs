//! Canary judging on a runtime node: each node serves the canary version beside the stable
//! one, routes each event by the registry's pure choice ([`patchbay_registry::canary`]),
//! counts outcomes per version and applies (and shares) the automatic-rollback verdict.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt as _;
pub use patchbay_registry::canary::*;
use patchbay_registry::{AutoRollback, FunctionSpec};

use crate::node::{Deployed, Node, Outcome};

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
