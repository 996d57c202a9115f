//! The NATS adapter: consume `cc.v1.calls.<call>.incoming` from the durable consumer,
//! look the customer up, ask the engine, store the decision, ack.
//!
//! At least once, stored once: the decision event's id — which doubles as its
//! `Nats-Msg-Id` — is derived from the incoming event's id, so a redelivery after a crash
//! (decision stored, ack lost) is de-duplicated by the stream, and so is a redelivered
//! call that would now be decided differently (rules reloaded, hours over): the first
//! decision stands. The message is acked only after the decision is stored; a failed
//! store naks it with a growing delay.
//!
//! Bad input (not a CloudEvent, not JSON, no or invalid `call_id`, subject and body
//! disagreeing) is dead-lettered to `patchbay.v1.dlq.routing` with the reason, the stream
//! position and the trace id (`patchbay fn dlq ls routing` shows it), terminated, and
//! counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use patchbay_bus::dlq::{self, DeadLetter};
use patchbay_bus::pull::{Ended, Next};
use patchbay_bus::reply::{InvokeReply, OUTCOME_HEADER};
use patchbay_bus::resilience::{AttemptError, CallError, FailureKind, Rejected, Resilience};
use patchbay_bus::{Bus, CloudEvent, Deadline, Token};
use patchbay_protocol::payload::{
    CallClosed, CallIncoming, CallRouted, CustomerInfo, CustomerLookup,
};
use patchbay_protocol::{CallEvent, CcSubject, CcSubjects};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::SERVICE_NAME;
use crate::engine::DecisionEvent;
use crate::metrics::RoutingMetrics;
use crate::reload::RulesHandle;

/// Why an incoming message cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadInput {
    /// The subject is not `cc.v1.calls.<call>.incoming`.
    Subject(String),
    /// The message is not a CloudEvent.
    Envelope(String),
    /// The data is not a JSON call.
    Json(String),
    /// The body has no `call_id`.
    MissingCallId,
    /// The body's `call_id` cannot be a subject token.
    InvalidCallId(String),
    /// The subject names another call than the body.
    Mismatch {
        /// Call id in the subject.
        subject: String,
        /// Call id in the body.
        body: String,
    },
    /// Handling the call panicked (a bug): the call is dead-lettered with the panic
    /// message rather than redelivered until the server gives up on it.
    Panicked(String),
    /// The call has passed through more handlers than the hop limit allows (a loop).
    HopLimit(String),
}

impl BadInput {
    /// The metrics label.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Subject(_) => "subject",
            Self::Envelope(_) => "envelope",
            Self::Json(_) => "json",
            Self::MissingCallId => "missing-call-id",
            Self::InvalidCallId(_) => "invalid-call-id",
            Self::Mismatch { .. } => "mismatch",
            Self::Panicked(_) => "panic",
            Self::HopLimit(_) => "hop-limit",
        }
    }
}

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Subject(s) => write!(f, "not an incoming-call subject: {s}"),
            Self::Envelope(e) => write!(f, "not a CloudEvent: {e}"),
            Self::Panicked(reason) | Self::HopLimit(reason) => f.write_str(reason),
            Self::Json(e) => write!(f, "data is not a JSON call: {e}"),
            Self::MissingCallId => f.write_str("data has no call_id"),
            Self::InvalidCallId(e) => write!(f, "call_id is not a valid subject token: {e}"),
            Self::Mismatch { subject, body } => write!(
                f,
                "subject names call {subject:?} but the data names call {body:?}"
            ),
        }
    }
}

/// A well-formed incoming call.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The envelope.
    pub event: CloudEvent,
    /// The call.
    pub call: CallIncoming,
    /// Its id as a subject token.
    pub token: Token,
}

/// Check and decode one incoming-call message.
pub fn decode(
    cc: &CcSubjects,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Result<Incoming, BadInput> {
    let subject_call = match cc.parse(subject) {
        Ok(CcSubject::Call {
            call,
            event: CallEvent::Incoming,
        }) => call,
        _ => return Err(BadInput::Subject(subject.to_owned())),
    };
    let event = CloudEvent::from_message(headers, payload)
        .map_err(|e| BadInput::Envelope(e.to_string()))?;
    let value: serde_json::Value = event
        .data_json()
        .map_err(|e| BadInput::Json(e.to_string()))?;
    match value.get("call_id") {
        None | Some(serde_json::Value::Null) => return Err(BadInput::MissingCallId),
        Some(serde_json::Value::String(s)) if s.is_empty() => return Err(BadInput::MissingCallId),
        Some(_) => {}
    }
    let call: CallIncoming =
        serde_json::from_value(value).map_err(|e| BadInput::Json(e.to_string()))?;
    let token =
        Token::new(call.call_id.as_str()).map_err(|e| BadInput::InvalidCallId(e.to_string()))?;
    if token != subject_call {
        return Err(BadInput::Mismatch {
            subject: subject_call.to_string(),
            body: call.call_id,
        });
    }
    Ok(Incoming { event, call, token })
}

/// The id of the decision event for the incoming event `input` (also its
/// `Nats-Msg-Id`): the same whatever the decision and whichever routing instance makes
/// it, so only the first one is stored; and unique per input (source and id), so two
/// telephony adapters that reuse an id never shadow each other's calls.
#[must_use]
pub fn decision_id(input: &CloudEvent) -> String {
    input.output_dedup_id("routing", 0)
}

/// How the customer lookup went.
#[derive(Debug, Clone, PartialEq)]
pub enum LookupOutcome {
    /// The function answered.
    Ok(CustomerInfo),
    /// No answer in time (own timeout or the incoming deadline).
    Timeout,
    /// Nobody serves `cc.v1.customers.lookup`.
    NoResponders,
    /// An answer that is a failure, an error or unreadable.
    Error(String),
    /// Not asked: the circuit breaker is open (the function has been failing), or the
    /// resilience policy's concurrency limit shed the lookup.
    NotAsked(&'static str),
    /// The call has no caller number to look up.
    Skipped,
}

impl LookupOutcome {
    /// The metrics label.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Ok(_) => "ok",
            Self::Timeout => "timeout",
            Self::NoResponders => "no-responders",
            Self::Error(_) => "error",
            Self::NotAsked(why) => why,
            Self::Skipped => "skipped",
        }
    }
}

/// Read a lookup reply: a Patchbay function reply whose first output's data is a
/// [`CustomerInfo`], or (any other responder) a CloudEvent whose data is one.
pub fn parse_lookup_reply(
    headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Result<CustomerInfo, String> {
    let header_outcome = headers
        .and_then(|h| h.get(OUTCOME_HEADER))
        .map(|v| v.as_str().to_owned());
    let reply = serde_json::from_slice::<InvokeReply>(payload);
    if header_outcome.is_some() || reply.is_ok() {
        let reply = reply.map_err(|e| format!("unreadable function reply: {e}"))?;
        let InvokeReply::Ok { outputs, .. } = reply else {
            let body = String::from_utf8_lossy(payload);
            let body: String = body.chars().take(300).collect();
            return Err(format!("lookup answered {}: {body}", reply.outcome()));
        };
        let first = outputs
            .into_iter()
            .next()
            .ok_or("lookup answered ok without an output")?;
        let bytes = serde_json::to_vec(&first).map_err(|e| e.to_string())?;
        let event = CloudEvent::from_structured(&bytes)
            .map_err(|e| format!("lookup output is not a CloudEvent: {e}"))?;
        return event
            .data_json()
            .map_err(|e| format!("lookup output is not customer info: {e}"));
    }
    let event = CloudEvent::from_message(headers, payload)
        .map_err(|e| format!("lookup reply is not a CloudEvent: {e}"))?;
    event
        .data_json()
        .map_err(|e| format!("lookup reply is not customer info: {e}"))
}

/// Everything a handler needs, shared by all in-flight calls.
pub(crate) struct Router {
    pub bus: Bus,
    /// `routing`: dead letters go to `patchbay.v1.dlq.routing`.
    pub dlq_owner: Token,
    pub cc: CcSubjects,
    pub rules: RulesHandle,
    pub metrics: RoutingMetrics,
    pub lookup_timeout: Duration,
    /// Resilience policies (timeouts, retries, breaker) for the lookup.
    pub resilience: Resilience,
}

impl Router {
    /// Pull from `consumer` until `stop`, handling up to `max_in_flight` calls at once
    /// on `tasks`. Returns when `stop` fires (in-flight calls keep running on `tasks`).
    pub async fn consume(
        self: Arc<Self>,
        consumer: PullConsumer,
        max_in_flight: usize,
        tasks: TaskTracker,
        stop: CancellationToken,
        on_bound: impl FnOnce(),
    ) -> anyhow::Result<()> {
        let mut messages = patchbay_bus::pull::messages(&consumer, max_in_flight)
            .await
            .map_err(|e| anyhow::anyhow!("cannot pull from the routing consumer: {e}"))?;
        on_bound();
        let ended = patchbay_bus::pull::serve(
            "routing",
            &mut messages,
            max_in_flight,
            &stop,
            || std::future::ready(()),
            |msg, slot| {
                let router = Arc::clone(&self);
                tasks.spawn(async move {
                    router.handle(msg).await;
                    drop(slot);
                });
                std::future::ready(Next::Continue)
            },
        )
        .await;
        if ended == Ended::StreamEnded {
            anyhow::bail!("the routing consumer's message stream ended");
        }
        Ok(())
    }

    async fn handle(&self, msg: async_nats::jetstream::Message) {
        let started = Instant::now();
        let (delivered, position) = match msg.info() {
            Ok(info) => (
                u64::try_from(info.delivered).unwrap_or(1),
                format!("{}:{}", info.stream, info.stream_sequence),
            ),
            Err(_) => (1, String::new()),
        };
        let subject = msg.subject.to_string();
        let span = self.bus.process_delivery(&msg);
        let chain = match self.bus.enter_hop(msg.headers.as_ref(), "service/routing") {
            Ok(chain) => chain,
            Err(refused) => {
                let bad = BadInput::HopLimit(refused.to_string());
                return self.reject(&msg, &bad, &position).instrument(span).await;
            }
        };
        let handled = patchbay_bus::pull::contain_panic(patchbay_bus::hops::scope(
            chain,
            self.decide(&msg, delivered, &subject, &position, started)
                .instrument(span.clone()),
        ))
        .await;
        if let Err(reason) = handled {
            tracing::error!(parent: &span, %reason, "routing a call panicked; dead-lettering it");
            self.reject(&msg, &BadInput::Panicked(reason), &position)
                .await;
        }
    }

    /// Route one delivered call: decode, look up, decide, publish, ack (or retry/reject).
    async fn decide(
        &self,
        msg: &async_nats::jetstream::Message,
        delivered: u64,
        subject: &str,
        position: &str,
        started: Instant,
    ) {
        let incoming = match decode(&self.cc, subject, msg.headers.as_ref(), &msg.payload) {
            Ok(incoming) => incoming,
            Err(bad) => return self.reject(msg, &bad, position).await,
        };
        // A garbled deadline does not stop a call from being routed: it only bounds
        // the lookup, which then gets its own timeout.
        let deadline = Deadline::from_headers(msg.headers.as_ref()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring an invalid deadline header");
            None
        });
        let lookup = self.lookup(&incoming.call, deadline).await;
        let customer = match &lookup {
            LookupOutcome::Ok(info) => Some(info),
            _ => None,
        };
        let lookup_ok = customer.is_some();
        let rules = self.rules.current();
        let at_ms = self.bus.clock().now_millis();
        let now = i64::try_from(at_ms)
            .ok()
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or_else(Utc::now);
        let decision = rules.decide(&incoming.call, customer, now);
        let (outcome, rule) = (decision.outcome(), decision.rule().to_owned());
        if !lookup_ok {
            self.metrics
                .lookup_fallbacks
                .with_label_values::<&str>(&[])
                .inc();
        }
        let (event, output) = match decision.into_event(&incoming.call, lookup_ok, at_ms) {
            DecisionEvent::Routed(routed) => (
                CloudEvent::new(self.bus.source(), CallRouted::TYPE).json(&routed),
                CallEvent::Routed,
            ),
            DecisionEvent::Closed(closed) => (
                CloudEvent::new(self.bus.source(), CallClosed::TYPE).json(&closed),
                CallEvent::Closed,
            ),
        };
        let event = match event {
            Ok(event) => event
                .id(decision_id(&incoming.event))
                .partition_key(incoming.call.call_id.as_str()),
            Err(e) => {
                // Serialising plain structs cannot fail; if it ever did, retrying
                // would not help, but losing the call is worse: leave it to redelivery.
                tracing::error!(error = %e, "cannot encode the decision");
                return self.retry(msg, delivered, "encode").await;
            }
        };
        let out_subject = self.cc.call(&incoming.token, output);
        match self
            .bus
            .publish_durable_with_id(&out_subject, &event, &event.id, None)
            .await
        {
            Ok(_) => {
                if let Err(e) = msg.double_ack().await {
                    tracing::warn!(error = %e, "ack not confirmed; a redelivery will be de-duplicated");
                }
                self.metrics
                    .decisions
                    .with_label_values(&[outcome, rule.as_str()])
                    .inc();
                self.metrics
                    .decision_duration
                    .with_label_values(&[outcome])
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    call = %incoming.token,
                    outcome,
                    rule = %rule,
                    lookup = lookup.label(),
                    subject = %out_subject,
                    "call decided"
                );
            }
            Err(e) => {
                self.metrics
                    .publish_errors
                    .with_label_values::<&str>(&[])
                    .inc();
                tracing::warn!(error = %e, subject = %out_subject, "cannot store the decision");
                self.retry(msg, delivered, "publish").await;
            }
        }
    }

    /// Nak with a delay growing per delivery (100 ms doubling, at most 30 s).
    async fn retry(&self, msg: &async_nats::jetstream::Message, delivered: u64, what: &str) {
        let delay = patchbay_bus::pull::redelivery_backoff(delivered, Duration::ZERO);
        tracing::info!(attempt = delivered, ?delay, what, "will retry the call");
        if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(error = %e, "nak failed; the call will be redelivered after ack_wait");
        }
    }

    /// Dead-letter a malformed incoming call with the reason (terminated once stored).
    async fn reject(&self, msg: &async_nats::jetstream::Message, bad: &BadInput, position: &str) {
        self.metrics
            .bad_input
            .with_label_values(&[bad.label()])
            .inc();
        self.metrics
            .decisions
            .with_label_values(&["rejected", ""])
            .inc();
        tracing::warn!(
            reason = %bad,
            subject = %msg.subject,
            stream_position = position,
            "rejected a malformed incoming call; dead-lettering it"
        );
        let attempts = msg
            .info()
            .map_or(1, |i| u64::try_from(i.delivered).unwrap_or(1));
        let reason = bad.to_string();
        let record = DeadLetter {
            function: SERVICE_NAME,
            version: None,
            digest: None,
            attempts,
            error: &reason,
            subject: &msg.subject,
            source: (!position.is_empty()).then(|| position.to_owned()),
            node: SERVICE_NAME,
            time_millis: self.bus.clock().now_millis(),
        };
        dlq::dead_letter(&self.bus, &self.dlq_owner, msg, &record).await;
    }

    async fn lookup(&self, call: &CallIncoming, deadline: Option<Deadline>) -> LookupOutcome {
        if call.caller.trim().is_empty() {
            self.metrics.lookups.with_label_values(&["skipped"]).inc();
            return LookupOutcome::Skipped;
        }
        let started = Instant::now();
        let request = CloudEvent::new(self.bus.source(), CustomerLookup::TYPE)
            .json(&CustomerLookup {
                phone: call.caller.clone(),
            })
            .map(|e| e.partition_key(call.call_id.as_str()));
        let outcome = match request {
            Err(e) => LookupOutcome::Error(e.to_string()),
            Ok(request) => {
                let result = self
                    .bus
                    .request_resilient(
                        &self.resilience,
                        &self.cc.customer_lookup(),
                        &request,
                        self.lookup_timeout,
                        deadline,
                    )
                    .await;
                match result {
                    Ok(reply) => match parse_lookup_reply(reply.headers.as_ref(), &reply.payload) {
                        Ok(info) => LookupOutcome::Ok(info),
                        Err(e) => LookupOutcome::Error(e),
                    },
                    Err(CallError::Rejected(Rejected::Open { .. })) => {
                        LookupOutcome::NotAsked("circuit-open")
                    }
                    Err(CallError::Rejected(Rejected::Full { .. })) => {
                        LookupOutcome::NotAsked("shed")
                    }
                    Err(CallError::Rejected(Rejected::DeadlinePassed)) => LookupOutcome::Timeout,
                    Err(CallError::Failed { kind, error, .. }) => match (kind, error) {
                        (_, AttemptError::Answered { reply, .. }) => {
                            match parse_lookup_reply(reply.headers.as_ref(), &reply.payload) {
                                Ok(info) => LookupOutcome::Ok(info),
                                Err(e) => LookupOutcome::Error(e),
                            }
                        }
                        (FailureKind::Timeout, _) => LookupOutcome::Timeout,
                        (FailureKind::NoResponders, _) => LookupOutcome::NoResponders,
                        (FailureKind::Error, AttemptError::Request(e)) => {
                            LookupOutcome::Error(e.to_string())
                        }
                    },
                }
            }
        };
        let label = outcome.label();
        self.metrics.lookups.with_label_values(&[label]).inc();
        self.metrics
            .lookup_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        match &outcome {
            LookupOutcome::Ok(_) | LookupOutcome::Skipped => {}
            LookupOutcome::Error(reason) => {
                tracing::warn!(%reason, "customer lookup failed; routing with the default tier");
            }
            other => {
                tracing::warn!(
                    outcome = other.label(),
                    "customer lookup did not answer; routing with the default tier"
                );
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn incoming(subject_call: &str, data: &str) -> Result<Incoming, BadInput> {
        let event = CloudEvent::new("/test", CallIncoming::TYPE)
            .id("in-1")
            .data("application/json", data.to_owned());
        decode(
            &CcSubjects::default(),
            &format!("cc.v1.calls.{subject_call}.incoming"),
            Some(&event.to_headers()),
            &event.data,
        )
    }

    #[test]
    fn a_well_formed_call_decodes() {
        let ok = incoming("c-1", r#"{"call_id":"c-1","caller":"+44","ivr":"2"}"#).unwrap();
        assert_eq!(ok.token.as_str(), "c-1");
        assert_eq!(ok.call.ivr.as_deref(), Some("2"));
        assert_eq!(ok.event.id, "in-1");
    }

    #[test]
    fn bad_input_is_classified() {
        assert_eq!(incoming("c-1", "{not json").unwrap_err().label(), "json");
        assert_eq!(
            incoming("c-1", r#"{"caller":"+44"}"#).unwrap_err(),
            BadInput::MissingCallId
        );
        assert_eq!(
            incoming("c-1", r#"{"call_id":""}"#).unwrap_err(),
            BadInput::MissingCallId
        );
        assert_eq!(
            incoming("c-1", r#"{"call_id":"c.1"}"#).unwrap_err().label(),
            "invalid-call-id"
        );
        assert_eq!(
            incoming("c-1", r#"{"call_id":"c-2"}"#).unwrap_err(),
            BadInput::Mismatch {
                subject: "c-1".into(),
                body: "c-2".into()
            }
        );
        assert_eq!(
            incoming("c-1", r#"{"call_id":7}"#).unwrap_err().label(),
            "json"
        );
        let no_envelope = decode(
            &CcSubjects::default(),
            "cc.v1.calls.c-1.incoming",
            None,
            &Bytes::from_static(br#"{"call_id":"c-1"}"#),
        );
        assert_eq!(no_envelope.unwrap_err().label(), "envelope");
        let wrong_subject = decode(
            &CcSubjects::default(),
            "cc.v1.calls.c-1.routed",
            None,
            &Bytes::new(),
        );
        assert_eq!(wrong_subject.unwrap_err().label(), "subject");
    }

    #[test]
    fn decision_ids_depend_only_on_the_input() {
        let input = |source: &str, id: &str| CloudEvent::new(source, "t").id(id);
        assert_eq!(
            decision_id(&input("/a", "abc")),
            decision_id(&input("/a", "abc"))
        );
        assert_ne!(
            decision_id(&input("/a", "abc")),
            decision_id(&input("/a", "abd"))
        );
        assert_ne!(
            decision_id(&input("/a", "abc")),
            decision_id(&input("/b", "abc"))
        );
    }

    fn function_reply(body: serde_json::Value, outcome: &str) -> (HeaderMap, Bytes) {
        let mut headers = HeaderMap::new();
        headers.insert(OUTCOME_HEADER, outcome);
        (headers, Bytes::from(body.to_string()))
    }

    #[test]
    fn a_function_reply_yields_the_customer_of_its_first_output() {
        let output = CloudEvent::new("/fn/customer-lookup", CustomerInfo::TYPE)
            .json(&serde_json::json!({
                "customer_id": "cu-1", "tier": "gold", "name": "Ada", "language": "en", "known": true
            }))
            .unwrap()
            .to_structured();
        let (h, body) = function_reply(
            serde_json::json!({"outcome": "ok", "function": "customer-lookup", "version": 1, "outputs": [output]}),
            "ok",
        );
        let info = parse_lookup_reply(Some(&h), &body).unwrap();
        assert_eq!(info.tier, "gold");
        assert_eq!(info.customer_id.as_deref(), Some("cu-1"));
    }

    #[test]
    fn failures_errors_and_garbage_are_lookup_errors() {
        let (h, body) = function_reply(
            serde_json::json!({"outcome": "error", "function": "customer-lookup", "version": null, "kind": "timeout", "message": "slow"}),
            "error",
        );
        let err = parse_lookup_reply(Some(&h), &body).unwrap_err();
        assert!(err.contains("error") && err.contains("slow"), "{err}");
        let (h, body) = function_reply(serde_json::json!({"outcome": "ok", "outputs": []}), "ok");
        assert!(parse_lookup_reply(Some(&h), &body).is_err());
        assert!(parse_lookup_reply(None, &Bytes::from_static(b"hello")).is_err());
    }

    #[test]
    fn a_plain_cloudevent_reply_is_accepted_too() {
        let event = CloudEvent::new("/other", CustomerInfo::TYPE)
            .json(&serde_json::json!({"tier": "platinum"}))
            .unwrap();
        let info = parse_lookup_reply(Some(&event.to_headers()), &event.data).unwrap();
        assert_eq!(info.tier, "platinum");
        assert!(!info.known);
    }
}
