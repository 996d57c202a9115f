//! Discovery over the NATS micro protocol (ADR-32): every Patchbay component — core
//! services, runtime nodes, gateways — answers `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`
//! (also `.<name>` and `.<name>.<id>`), so `nats micro ls` and `patchbay status` list it.
//!
//! Naming: the service name is the component's binary name (`patchbay-runtime`,
//! `patchbay-gateway`, `patchbay-routing`, `patchbay-agents`); each process gets a fresh
//! id; the metadata always carries `identity` (`kind/name` of the bus certificate, e.g.
//! `runtime/node-1`) plus what the component adds.
//!
//! Why not `async_nats::service`: its statistics count only requests answered through its
//! own endpoints, and its metadata is fixed at start. A Patchbay component's work arrives
//! through triggers, stream consumers and HTTP routes instead, and what a runtime node
//! serves changes with every deploy. So [`register`] answers the three verbs itself and
//! builds INFO and STATS, at the moment they are asked, from a [`Report`] of the
//! component's own counters. The wire shapes are the protocol's, unchanged.
//!
//! An endpoint that does not work — a runtime node's function whose trigger subscription
//! the server refused — still answers, with metadata [`FAILED`] giving the reason and the
//! same text as the STATS `last_error`: a key in the map the protocol already has, so the
//! wire shapes stay the protocol's and a reader that does not know the key just shows it.
//!
//! Not here: what a component counts (each one's `discovery` module or adapter) and the
//! gathering side (`patchbay status` in the CLI, which uses [`gather`]).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;
use prometheus::core::Collector as _;
use prometheus::{HistogramVec, IntCounterVec};
use serde::{Deserialize, Deserializer, Serialize};
use tokio::task::JoinHandle;

use crate::client::Bus;

/// The subject prefix of the micro protocol.
pub const PREFIX: &str = "$SRV";
/// `type` of a PING response.
pub const PING_RESPONSE: &str = "io.nats.micro.v1.ping_response";
/// `type` of an INFO response.
pub const INFO_RESPONSE: &str = "io.nats.micro.v1.info_response";
/// `type` of a STATS response.
pub const STATS_RESPONSE: &str = "io.nats.micro.v1.stats_response";

/// Endpoint metadata key: why the endpoint does not work (e.g. the server refused the
/// subscription its work arrives on); absent while it works.
pub const FAILED: &str = "failed";

/// The verbs of the protocol answered here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Liveness.
    Ping,
    /// Description and endpoints.
    Info,
    /// Counters.
    Stats,
}

impl Verb {
    /// The verb as it appears in subjects.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ping => "PING",
            Self::Info => "INFO",
            Self::Stats => "STATS",
        }
    }

    /// `$SRV.<verb>`, or `$SRV.<verb>.<name>` when `name` is given: who asks.
    #[must_use]
    pub fn subject(self, name: Option<&str>) -> String {
        match name {
            Some(name) => format!("{PREFIX}.{}.{name}", self.as_str()),
            None => format!("{PREFIX}.{}", self.as_str()),
        }
    }
}

/// Who a component is.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Service name (`patchbay-runtime`); letters, digits, `-` and `_` only.
    pub name: String,
    /// Semantic version of the component.
    pub version: String,
    /// One line for humans.
    pub description: String,
    /// Fixed facts (node name, listen address); `identity` is added by [`register`].
    pub metadata: BTreeMap<String, String>,
}

impl Registration {
    /// A registration without metadata.
    #[must_use]
    pub fn new(
        name: impl Into<String>,
        version: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            description: description.into(),
            metadata: BTreeMap::new(),
        }
    }

    /// Add a metadata entry.
    #[must_use]
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// One endpoint's figures at the moment of asking: a unit of work the component does
/// (a function it serves, the calls it routes, an HTTP route family).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointReport {
    /// Endpoint name, unique within the component.
    pub name: String,
    /// The subject (or, for HTTP, the route) the work arrives on.
    pub subject: String,
    /// The queue group or durable consumer sharing the work, if any.
    pub queue_group: String,
    /// Fixed facts about the endpoint; function endpoints carry `function`, `version`
    /// and `trigger`, and [`FAILED`] when the endpoint does not work.
    pub metadata: BTreeMap<String, String>,
    /// Work items handled since the process started.
    pub requests: u64,
    /// Of those, how many failed.
    pub errors: u64,
    /// Total time spent on them.
    pub processing_time: Duration,
    /// Anything else (outcome breakdowns), shown by STATS as `data`.
    pub data: Option<serde_json::Value>,
}

/// What a component reports about its work; asked on every INFO and STATS request.
pub trait Report: Send + Sync + 'static {
    /// The endpoints with their counters now.
    fn endpoints(&self) -> Vec<EndpointReport>;
}

impl<F> Report for F
where
    F: Fn() -> Vec<EndpointReport> + Send + Sync + 'static,
{
    fn endpoints(&self) -> Vec<EndpointReport> {
        self()
    }
}

/// A component with no endpoints (it answers PING, INFO and empty STATS).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEndpoints;

impl Report for NoEndpoints {
    fn endpoints(&self) -> Vec<EndpointReport> {
        Vec::new()
    }
}

/// A registered component; dropping it (or [`Discovery::stop`]) stops answering.
#[derive(Debug)]
pub struct Discovery {
    id: String,
    task: JoinHandle<()>,
}

impl Discovery {
    /// This process's id (the last token of `$SRV.<verb>.<name>.<id>`).
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stop answering: the subscriptions end with the task.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `PING` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResponse {
    /// [`PING_RESPONSE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Service name.
    pub name: String,
    /// Instance id.
    pub id: String,
    /// Version.
    pub version: String,
    /// Metadata.
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: BTreeMap<String, String>,
}

/// `INFO` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoResponse {
    /// [`INFO_RESPONSE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Service name.
    pub name: String,
    /// Instance id.
    pub id: String,
    /// Version.
    pub version: String,
    /// Description.
    #[serde(default, deserialize_with = "null_as_default")]
    pub description: String,
    /// Metadata.
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: BTreeMap<String, String>,
    /// Endpoints.
    #[serde(default, deserialize_with = "null_as_default")]
    pub endpoints: Vec<EndpointInfo>,
}

/// One endpoint in an `INFO` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    /// Name.
    pub name: String,
    /// Subject.
    pub subject: String,
    /// Queue group.
    #[serde(default, deserialize_with = "null_as_default")]
    pub queue_group: String,
    /// Metadata.
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: BTreeMap<String, String>,
}

impl EndpointInfo {
    /// Why the endpoint does not work ([`FAILED`]), none while it works.
    #[must_use]
    pub fn failed(&self) -> Option<&str> {
        failure(&self.metadata)
    }
}

/// The [`FAILED`] entry of endpoint metadata; an empty one counts as none.
#[must_use]
pub fn failure(metadata: &BTreeMap<String, String>) -> Option<&str> {
    metadata
        .get(FAILED)
        .map(String::as_str)
        .filter(|why| !why.is_empty())
}

/// `STATS` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsResponse {
    /// [`STATS_RESPONSE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Service name.
    pub name: String,
    /// Instance id.
    pub id: String,
    /// Version.
    pub version: String,
    /// Metadata.
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: BTreeMap<String, String>,
    /// When the instance started (RFC 3339).
    pub started: String,
    /// Endpoint counters.
    #[serde(default, deserialize_with = "null_as_default")]
    pub endpoints: Vec<EndpointStats>,
}

/// One endpoint in a `STATS` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointStats {
    /// Name.
    pub name: String,
    /// Subject.
    pub subject: String,
    /// Queue group.
    #[serde(default, deserialize_with = "null_as_default")]
    pub queue_group: String,
    /// Requests handled.
    #[serde(default)]
    pub num_requests: u64,
    /// Requests failed.
    #[serde(default)]
    pub num_errors: u64,
    /// Total processing time, nanoseconds.
    #[serde(default)]
    pub processing_time: u64,
    /// Average processing time, nanoseconds.
    #[serde(default)]
    pub average_processing_time: u64,
    /// The last error, empty when none is known; why the endpoint does not work, when it
    /// does not ([`FAILED`]).
    #[serde(default, deserialize_with = "null_as_default")]
    pub last_error: String,
    /// Component-specific details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Why a component could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The name is not a valid micro service name.
    #[error("invalid service name {name:?}: only letters, digits, '-' and '_' are allowed")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// A verb subscription failed.
    #[error("cannot subscribe to {subject}: {reason}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        reason: String,
    },
}

/// The answers of one instance, built on demand.
struct Responder<R> {
    name: String,
    id: String,
    version: String,
    description: String,
    metadata: BTreeMap<String, String>,
    started: String,
    report: R,
}

impl<R: Report> Responder<R> {
    fn answer(&self, verb: Verb) -> serde_json::Result<Vec<u8>> {
        match verb {
            Verb::Ping => serde_json::to_vec(&PingResponse {
                kind: PING_RESPONSE.into(),
                name: self.name.clone(),
                id: self.id.clone(),
                version: self.version.clone(),
                metadata: self.metadata.clone(),
            }),
            Verb::Info => serde_json::to_vec(&InfoResponse {
                kind: INFO_RESPONSE.into(),
                name: self.name.clone(),
                id: self.id.clone(),
                version: self.version.clone(),
                description: self.description.clone(),
                metadata: self.metadata.clone(),
                endpoints: self
                    .report
                    .endpoints()
                    .into_iter()
                    .map(|e| EndpointInfo {
                        name: e.name,
                        subject: e.subject,
                        queue_group: e.queue_group,
                        metadata: e.metadata,
                    })
                    .collect(),
            }),
            Verb::Stats => serde_json::to_vec(&StatsResponse {
                kind: STATS_RESPONSE.into(),
                name: self.name.clone(),
                id: self.id.clone(),
                version: self.version.clone(),
                metadata: self.metadata.clone(),
                started: self.started.clone(),
                endpoints: self
                    .report
                    .endpoints()
                    .into_iter()
                    .map(endpoint_stats)
                    .collect(),
            }),
        }
    }
}

fn endpoint_stats(e: EndpointReport) -> EndpointStats {
    let total = u64::try_from(e.processing_time.as_nanos()).unwrap_or(u64::MAX);
    let last_error = failure(&e.metadata).unwrap_or_default().to_owned();
    EndpointStats {
        name: e.name,
        subject: e.subject,
        queue_group: e.queue_group,
        num_requests: e.requests,
        num_errors: e.errors,
        processing_time: total,
        average_processing_time: total.checked_div(e.requests).unwrap_or(0),
        last_error,
        data: e.data,
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Answer the micro protocol for this component until the returned handle is stopped or
/// dropped. `identity` (the bus certificate's `kind/name`) is added to the metadata.
pub async fn try_register(
    bus: &Bus,
    registration: Registration,
    report: impl Report,
) -> Result<Discovery, RegisterError> {
    let Registration {
        name,
        version,
        description,
        mut metadata,
    } = registration;
    if !valid_name(&name) {
        return Err(RegisterError::InvalidName { name });
    }
    if let Some(identity) = bus.identity() {
        metadata.insert(
            "identity".into(),
            format!("{}/{}", identity.kind, identity.name),
        );
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let client = bus.client().clone();
    let mut subscriptions = Vec::with_capacity(9);
    for verb in [Verb::Ping, Verb::Info, Verb::Stats] {
        for subject in [
            verb.subject(None),
            verb.subject(Some(&name)),
            format!("{}.{id}", verb.subject(Some(&name))),
        ] {
            let sub =
                client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| RegisterError::Subscribe {
                        subject,
                        reason: e.to_string(),
                    })?;
            subscriptions.push(sub.map(move |msg| (verb, msg)));
        }
    }
    let started = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let responder = Responder {
        name,
        id: id.clone(),
        version,
        description,
        metadata,
        started,
        report,
    };
    let mut requests = futures::stream::select_all(subscriptions);
    let task = tokio::spawn(async move {
        while let Some((verb, msg)) = requests.next().await {
            let Some(reply) = msg.reply else { continue };
            match responder.answer(verb) {
                Ok(body) => {
                    if let Err(e) = client.publish(reply, body.into()).await {
                        tracing::debug!(error = %e, verb = verb.as_str(), "cannot answer a discovery request");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot encode a discovery answer"),
            }
        }
    });
    Ok(Discovery { id, task })
}

/// [`try_register`], logging a warning instead of failing: discovery is a convenience and
/// must never stop the component's real work.
pub async fn register(
    bus: &Bus,
    registration: Registration,
    report: impl Report,
) -> Option<Discovery> {
    let name = registration.name.clone();
    match try_register(bus, registration, report).await {
        Ok(discovery) => {
            tracing::debug!(service = %name, id = discovery.id(), "answering $SRV discovery");
            Some(discovery)
        }
        Err(e) => {
            tracing::warn!(service = %name, error = %e, "cannot register for $SRV discovery");
            None
        }
    }
}

/// Ask every responder on `subject` (e.g. `$SRV.INFO`) and collect the answers that parse
/// as `T` until `window` has passed (scatter-gather: the number of responders is unknown).
/// Answers that do not parse are skipped.
pub async fn gather<T: serde::de::DeserializeOwned>(
    bus: &Bus,
    subject: &str,
    window: Duration,
) -> Result<Vec<T>, GatherError> {
    let client = bus.client();
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| GatherError {
            subject: subject.to_owned(),
            reason: e.to_string(),
        })?;
    client
        .publish_with_reply(subject.to_owned(), inbox, bytes::Bytes::new())
        .await
        .map_err(|e| GatherError {
            subject: subject.to_owned(),
            reason: e.to_string(),
        })?;
    let mut answers = Vec::new();
    let end = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(end, sub.next()).await {
        match serde_json::from_slice::<T>(&msg.payload) {
            Ok(answer) => answers.push(answer),
            Err(e) => {
                tracing::debug!(%subject, error = %e, "skipping an unreadable discovery answer")
            }
        }
    }
    Ok(answers)
}

/// A discovery request could not be sent.
#[derive(Debug, thiserror::Error)]
#[error("cannot ask {subject}: {reason}")]
pub struct GatherError {
    /// The subject asked.
    pub subject: String,
    /// Why.
    pub reason: String,
}

// ---------------------------------------------------------------------------------------
// Reading a component's own metrics into endpoint stats (runtime nodes, the gateway).

/// Labels of one metric child.
pub type Labels = BTreeMap<String, String>;

/// Every child of a counter vector with its labels and value.
#[must_use]
pub fn counter_children(vec: &IntCounterVec) -> Vec<(Labels, u64)> {
    vec.collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| {
            // Counters are integers kept as f64 by the exposition model.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let value = m.get_counter().get_value().max(0.0) as u64;
            (labels(m), value)
        })
        .collect()
}

/// Every child of a histogram vector with its labels and sum of observations, in seconds.
#[must_use]
pub fn histogram_sums(vec: &HistogramVec) -> Vec<(Labels, f64)> {
    vec.collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| (labels(m), m.get_histogram().get_sample_sum()))
        .collect()
}

fn labels(m: &prometheus::proto::Metric) -> Labels {
    m.get_label()
        .iter()
        .map(|l| (l.name().to_owned(), l.value().to_owned()))
        .collect()
}

/// Whether a child's `label` is `value`.
#[must_use]
pub fn has(labels: &Labels, label: &str, value: &str) -> bool {
    labels.get(label).is_some_and(|v| v == value)
}

/// Seconds as a duration, clamping what a histogram sum cannot mean (negative, NaN).
#[must_use]
pub fn seconds(total: f64) -> Duration {
    Duration::try_from_secs_f64(total).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stats_answers_carry_the_protocol_field_names_and_average_time() {
        let stats = endpoint_stats(EndpointReport {
            name: "echo".into(),
            subject: "patchbay.v1.fn.echo.invoke".into(),
            requests: 4,
            errors: 1,
            processing_time: Duration::from_millis(8),
            ..EndpointReport::default()
        });
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["num_requests"], 4);
        assert_eq!(json["num_errors"], 1);
        assert_eq!(json["processing_time"], 8_000_000);
        assert_eq!(json["average_processing_time"], 2_000_000);
        assert_eq!(json["last_error"], "");
        assert!(json.get("data").is_none());
    }

    fn responder(report: impl Report) -> Responder<impl Report> {
        Responder {
            name: "patchbay-runtime".into(),
            id: "1".into(),
            version: "0.1.0".into(),
            description: String::new(),
            metadata: BTreeMap::new(),
            started: "2026-01-01T00:00:00Z".into(),
            report,
        }
    }

    fn endpoint(name: &str, failed: Option<&str>) -> EndpointReport {
        let mut metadata = BTreeMap::from([("function".to_owned(), name.to_owned())]);
        if let Some(why) = failed {
            metadata.insert(FAILED.to_owned(), why.to_owned());
        }
        EndpointReport {
            name: name.into(),
            subject: format!("patchbay.v1.fn.{name}.invoke"),
            metadata,
            ..EndpointReport::default()
        }
    }

    #[test]
    fn a_failed_endpoint_carries_its_reason_in_info_metadata_and_stats_last_error() {
        let why = "Permissions Violation for Subscription to \"crm.v1.in\"";
        let r = responder(move || vec![endpoint("refused", Some(why)), endpoint("fine", None)]);

        let info_json: serde_json::Value =
            serde_json::from_slice(&r.answer(Verb::Info).unwrap()).unwrap();
        // On the wire: one more metadata entry, nothing outside the protocol's shape.
        assert_eq!(info_json["endpoints"][0]["metadata"]["failed"], why);
        assert!(
            info_json["endpoints"][1]["metadata"]
                .get("failed")
                .is_none()
        );
        let info: InfoResponse = serde_json::from_value(info_json).unwrap();
        assert_eq!(info.endpoints[0].failed(), Some(why));
        assert_eq!(info.endpoints[1].failed(), None);

        let stats: StatsResponse = serde_json::from_slice(&r.answer(Verb::Stats).unwrap()).unwrap();
        assert_eq!(stats.endpoints[0].last_error, why);
        assert_eq!(stats.endpoints[1].last_error, "");
    }

    #[test]
    fn answers_without_the_failed_key_read_as_working_endpoints() {
        // An older node's INFO: no `failed` key; an empty one means nothing either.
        let info: InfoResponse = serde_json::from_str(
            r#"{"type":"io.nats.micro.v1.info_response","name":"patchbay-runtime","id":"1",
                "version":"0.1.0","endpoints":[
                  {"name":"a","subject":"s","metadata":{"function":"a"}},
                  {"name":"b","subject":"s","metadata":{"function":"b","failed":""}},
                  {"name":"c","subject":"s","metadata":null}]}"#,
        )
        .unwrap();
        assert!(
            info.endpoints.iter().all(|e| e.failed().is_none()),
            "{info:?}"
        );
    }

    #[test]
    fn answers_of_other_implementations_with_null_fields_parse() {
        // Go's micro package sends `null` for empty metadata and endpoint lists.
        let info: InfoResponse = serde_json::from_str(
            r#"{"type":"io.nats.micro.v1.info_response","name":"x","id":"1","version":"1.0.0",
                "description":"","metadata":null,"endpoints":null}"#,
        )
        .unwrap();
        assert!(info.metadata.is_empty() && info.endpoints.is_empty());
    }

    #[test]
    fn only_micro_service_names_are_accepted() {
        assert!(valid_name("patchbay-runtime"));
        assert!(valid_name("a_b9"));
        assert!(!valid_name(""));
        assert!(!valid_name("a.b"));
        assert!(!valid_name("a b"));
    }

    #[test]
    fn verbs_address_all_or_one_service() {
        assert_eq!(Verb::Info.subject(None), "$SRV.INFO");
        assert_eq!(
            Verb::Stats.subject(Some("patchbay-gateway")),
            "$SRV.STATS.patchbay-gateway"
        );
    }
}
