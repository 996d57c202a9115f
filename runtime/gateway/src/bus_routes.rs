//! The `/v1` routes onto the bus: publish an event, send a request, invoke a function.
//!
//! Every route authenticates first (no body is read for a refused caller), bounds the body,
//! turns the HTTP request into a CloudEvent (both content modes of the CloudEvents HTTP
//! binding), derives the bus deadline from `Request-Timeout` (or the default), and maps
//! what the bus says into a status and an RFC 9457 problem.
//!
//! **The gateway's own permissions.** Before anything is published the subject is checked
//! against what the gateway's bus identity may publish ([`BusGrants`]): the host rules of
//! the `gateway` group that the admin bootstrap renders from deploy/access.toml and stores
//! in the `patchbay-access` bucket, read at start and watched (a new bootstrap applies
//! without a restart). A subject outside them is answered `403` problem `bus-permission`
//! naming what the identity may publish, or who owns the subject — instead of `202`: NATS
//! drops a refused core publish without telling the publisher. When no rules are stored
//! (a bus bootstrapped before they were, or none at all) the gateway says so in its log and
//! works as before: refused stream publishes and requests are still caught from the
//! server's `Permissions Violation` notice, refused core publishes are not.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use http::{HeaderMap, StatusCode};
use patchbay_bus::client::{PublishError, RequestError, RequestErrorKind};
use patchbay_bus::event::STRUCTURED_CONTENT_TYPE;
use patchbay_bus::reply::{ErrorKind, FailureReply, InvokeReply, OUTCOME_HEADER};
use patchbay_bus::resilience::{AttemptError, AttemptFailed, CallError, FailureKind, Target};
use patchbay_bus::subject::SubjectError;
use patchbay_bus::{BusNotice, CloudEvent, Deadline, EventError, Token};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::body::BodyTimeout;
use crate::problem::{Problem, ProblemBody};
use crate::server::Shared;

/// Header giving the caller's deadline in milliseconds from now.
pub const REQUEST_TIMEOUT_HEADER: &str = "request-timeout";
/// Media type of CloudEvents batches, which the gateway does not accept (one event per
/// request keeps acknowledgements exact).
const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// Event type given to a request or invocation body sent without CloudEvents headers.
pub const DEFAULT_REQUEST_TYPE: &str = "patchbay.http.request.v1";

/// The answer to a published event.
#[derive(Debug, Serialize, ToSchema)]
pub struct Published {
    /// The event id (`ce-id`).
    pub id: String,
    /// The subject it was published on (without the installation prefix).
    pub subject: String,
    /// The stream that stored it (durable subjects only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Its sequence number in that stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// True when the stream had already stored an event with this id (de-duplicated).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// A CloudEvent in structured mode (`Content-Type: application/cloudevents+json`), as
/// documented in the OpenAPI document. The handlers read it with
/// [`CloudEvent::from_structured`], which also takes `time`, `subject`, `dataschema`,
/// `data_base64` and extension attributes; the schema names the common part and closes the
/// object, so that everything it describes is accepted.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StructuredCloudEvent {
    /// The CloudEvents version: `1.0`.
    #[schema(pattern = r"^1\.0$")]
    pub specversion: String,
    /// Unique within `source`; a retried event keeps its id (streams de-duplicate by it).
    #[schema(
        min_length = 1,
        max_length = 4096,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    pub id: String,
    /// Who produced the event (a URI reference such as `/pbx/eu-1`).
    #[schema(
        min_length = 1,
        max_length = 4096,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    pub source: String,
    /// The event type, such as `cc.call.incoming.v1`.
    #[serde(rename = "type")]
    #[schema(
        min_length = 1,
        max_length = 4096,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    pub ty: String,
    /// The media type of `data` (JSON when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(
        min_length = 1,
        max_length = 4096,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    pub datacontenttype: Option<String>,
    /// The payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// Publish a CloudEvent on a subject.
///
/// Structured mode (`Content-Type: application/cloudevents+json`, the whole event as JSON)
/// or binary mode (`ce-id`, `ce-source`, `ce-type`, `ce-specversion` headers; the body is
/// the data, `Content-Type` its media type). Subjects stored by a JetStream stream answer
/// 201 once the stream acknowledged; other subjects 202 (at most once).
#[utoipa::path(
    post,
    path = "/v1/events/{subject}",
    tag = "bus",
    params(
        ("subject" = String, Path, description = "NATS subject: dot-separated tokens of ASCII letters, digits, `-` and `_`, not in the `$` or `_INBOX` namespaces (e.g. cc.v1.calls.c-1.incoming)", pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", max_length = 512),
        ("Request-Timeout" = Option<u64>, Header, nullable = false, description = "Deadline in milliseconds (at least 1; longer than the gateway's maximum is cut to it)", minimum = 1, maximum = 9_223_372_036_854_775_807_u64),
    ),
    request_body(description = "The whole event in structured mode. Binary mode (the CloudEvents HTTP binding's other mode) is accepted as well and is what most producers send: `ce-specversion`, `ce-id`, `ce-source` and `ce-type` headers (plus optional `ce-*` attributes and extensions) with the data as the body in any media type; it is not part of this machine-readable description because OpenAPI cannot say that those four headers are required exactly when the body is not `application/cloudevents+json`.",
        content(
            (StructuredCloudEvent = "application/cloudevents+json"),
        )),
    responses(
        (status = 201, description = "Stored by a stream", body = Published),
        (status = 202, description = "Published on a core subject (at most once)", body = Published),
        (status = 400, description = "Not a valid CloudEvent or subject, or a bad Request-Timeout", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "The token may not publish here, the subject is in a reserved namespace (`$`, `_INBOX`), or the gateway's bus identity may not publish it (problem type `bus-permission`, checked before anything is published)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 408, description = "The request body did not arrive in time", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Batch mode is not accepted", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited, or too many connections from this address", body = ProblemBody, content_type = "application/problem+json"),
        (status = 431, description = "Request headers (or the event's attributes, in binary mode) too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The bus is unavailable, the target's circuit is open, or the gateway holds its maximum of connections", body = ProblemBody, content_type = "application/problem+json"),
        (status = 504, description = "The stream did not acknowledge before the deadline", body = ProblemBody, content_type = "application/problem+json"),
        (status = 508, description = "The request's `patchbay-hops` chain is at the hop limit (problem type `hop-limit`, naming the chain)", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn publish_event(
    State(state): State<Shared>,
    Path(subject): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let hops = crate::functions::enter_hop(&state, &headers, "gateway")?;
    patchbay_bus::hops::scope(
        hops,
        publish_in_chain(state, subject, caller, headers, body),
    )
    .await
}

async fn publish_in_chain(
    state: Shared,
    subject: String,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    check_subject(&subject)?;
    caller.may_publish(&subject)?;
    state.grants.check(&subject)?;
    let deadline = deadline(&state, &headers)?;
    let data = read_body(&state, body, &headers).await?;
    let event = cloud_event(&headers, data)?;
    check_attributes_size(&state, &headers, &event)?;
    let full = state.bus.subjects().full(&subject);
    let stream = state.streams.stream_for(&state.bus, &full).await;
    let published = match stream {
        Some(stream) => {
            // A durable publish the server refuses is never acknowledged: watch for the
            // refusal instead of waiting out the deadline.
            let refused = refused_publish(state.bus.notices(), &full);
            let ack = tokio::select! {
                ack = publish_durable(&state, &subject, &full, &event, deadline) => ack?,
                () = refused => return Err(bus_forbidden(&subject)),
            };
            let answer = Published {
                id: event.id,
                subject,
                stream: Some(stream),
                sequence: Some(ack.sequence),
                duplicate: ack.duplicate,
            };
            (StatusCode::CREATED, Json(answer)).into_response()
        }
        None => {
            state
                .bus
                .publish(&full, &event, Some(deadline))
                .await
                .map_err(publish_problem)?;
            let answer = Published {
                id: event.id,
                subject,
                stream: None,
                sequence: None,
                duplicate: false,
            };
            (StatusCode::ACCEPTED, Json(answer)).into_response()
        }
    };
    Ok(published)
}

/// Send a request on a subject and return the reply.
///
/// The body becomes a CloudEvent as for `/v1/events` — or, without any `ce-*` header, the
/// data of a new event of type `patchbay.http.request.v1`. The reply's data is the
/// response body, its CloudEvents attributes `ce-*` response headers.
#[utoipa::path(
    post,
    path = "/v1/request/{subject}",
    tag = "bus",
    params(
        ("subject" = String, Path, description = "NATS subject: dot-separated tokens of ASCII letters, digits, `-` and `_`, not in the `$` or `_INBOX` namespaces (e.g. cc.v1.calls.c-1.incoming)", pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", max_length = 512),
        ("Request-Timeout" = Option<u64>, Header, nullable = false, description = "Deadline in milliseconds (at least 1; longer than the gateway's maximum is cut to it)", minimum = 1, maximum = 9_223_372_036_854_775_807_u64),
    ),
    request_body(description = "Request data (it becomes the data of a new event of type `patchbay.http.request.v1`), or a CloudEvent: structured mode, or binary mode with `ce-*` headers",
        content(
            (String = "application/json"),
            (Vec<u8> = "application/octet-stream"),
            (StructuredCloudEvent = "application/cloudevents+json"),
        )),
    responses(
        (status = 200, description = "The reply"),
        (status = 400, description = "Not a valid subject or CloudEvent, a bad Request-Timeout, or the responder refused the input", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "The token may not publish here, the subject is in a reserved namespace (`$`, `_INBOX`), or the gateway's bus identity may not publish it (problem type `bus-permission`, checked before anything is published)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "A runtime node answered that no such function is deployed", body = ProblemBody, content_type = "application/problem+json"),
        (status = 408, description = "The request body did not arrive in time", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Batch mode is not accepted", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "A function declined the event (retry, dead-letter or drop)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited, or too many connections from this address", body = ProblemBody, content_type = "application/problem+json"),
        (status = 431, description = "Request headers (or the event's attributes, in binary mode) too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, description = "The responder failed", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "No responders, the target's circuit is open, or the gateway holds its maximum of connections", body = ProblemBody, content_type = "application/problem+json"),
        (status = 504, description = "Deadline passed", body = ProblemBody, content_type = "application/problem+json"),
        (status = 508, description = "The request's `patchbay-hops` chain is at the hop limit (problem type `hop-limit`, naming the chain)", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn request(
    State(state): State<Shared>,
    Path(subject): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    check_subject(&subject)?;
    caller.may_publish(&subject)?;
    state.grants.check(&subject)?;
    let full = state.bus.subjects().full(&subject);
    let hops = crate::functions::enter_hop(&state, &headers, "gateway")?;
    patchbay_bus::hops::scope(hops, forward(&state, &full, &headers, body)).await
}

/// Invoke a deployed event function with one event and return its outputs.
#[utoipa::path(
    post,
    path = "/v1/functions/{name}/invoke",
    tag = "functions",
    params(
        ("name" = String, Path, description = "Function name", pattern = r"^[A-Za-z0-9_-]+$", max_length = 128),
        ("Request-Timeout" = Option<u64>, Header, nullable = false, description = "Deadline in milliseconds (at least 1; longer than the gateway's maximum is cut to it)", minimum = 1, maximum = 9_223_372_036_854_775_807_u64),
    ),
    request_body(description = "Event data (it becomes the data of a new event of type `patchbay.http.request.v1`), or a CloudEvent: structured mode, or binary mode with `ce-*` headers",
        content(
            (String = "application/json"),
            (Vec<u8> = "application/octet-stream"),
            (StructuredCloudEvent = "application/cloudevents+json"),
        )),
    responses(
        (status = 200, description = "The function's outputs (`outcome: ok`)"),
        (status = 400, description = "Not a valid function name or event, a bad Request-Timeout, or the function refused the input", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "The token may not invoke this function, or the gateway's bus identity may not send invocations", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such function (or it is an HTTP function)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 408, description = "The request body did not arrive in time", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Batch mode is not accepted", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "The function declined the event", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited, or too many connections from this address", body = ProblemBody, content_type = "application/problem+json"),
        (status = 431, description = "Request headers (or the event's attributes, in binary mode) too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, description = "The function trapped or failed", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "No runtime node is serving, the function is at its concurrency limit or its circuit is open, or the gateway holds its maximum of connections", body = ProblemBody, content_type = "application/problem+json"),
        (status = 504, description = "Deadline passed", body = ProblemBody, content_type = "application/problem+json"),
        (status = 508, description = "The request's `patchbay-hops` chain is at the hop limit (problem type `hop-limit`, naming the chain)", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn invoke(
    State(state): State<Shared>,
    Path(name): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let function = Token::new(name.as_str())
        .map_err(|e| Problem::bad_request(format!("function name {name:?}: {e}")))?;
    caller.may_invoke(function.as_str())?;
    if state.functions.route_of(function.as_str()).is_some() {
        return Err(Problem::not_found().with_detail(format!(
            "{name:?} is an HTTP function: call its route instead"
        )));
    }
    let subject = state.bus.subjects().fn_invoke(&function);
    state
        .grants
        .check(state.bus.subjects().strip(&subject).unwrap_or(&subject))?;
    let hops = crate::functions::enter_hop(&state, &headers, "gateway")?;
    patchbay_bus::hops::scope(hops, forward(&state, &subject, &headers, body)).await
}

/// Send the request, map the reply.
async fn forward(
    state: &Shared,
    subject: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let deadline = deadline(state, headers)?;
    let data = read_body(state, body, headers).await?;
    let event = request_event(state, headers, data)?;
    check_attributes_size(state, headers, &event)?;
    // A request the server refuses to forward gets no reply: watch for the refusal
    // instead of waiting out the deadline.
    let refused = refused_publish(state.bus.notices(), subject);
    let request = state.bus.request_resilient(
        &state.resilience,
        subject,
        &event,
        state.config.max_timeout,
        Some(deadline),
    );
    let result = tokio::select! {
        result = request => result,
        () = refused => {
            let tail = state.bus.subjects().strip(subject).unwrap_or(subject);
            return Err(bus_forbidden(tail));
        }
    };
    let reply = match result {
        Ok(reply) => reply,
        Err(CallError::Rejected(rejected)) => {
            let target = state.bus.request_target(subject).to_string();
            return Err(Problem::refused_by_policy(rejected, &target));
        }
        // The last attempt was answered with an error: map that answer as always.
        Err(CallError::Failed {
            error: AttemptError::Answered { reply, .. },
            ..
        }) => *reply,
        Err(CallError::Failed {
            error: AttemptError::Request(e),
            ..
        }) => return Err(request_problem(state, subject, &e)),
    };
    Ok(reply_response(reply))
}

/// Store `event` under the resilience policy of `subject`: each attempt waits for the
/// stream's acknowledgement within the attempt's timeout, and a retry is safe because the
/// stream de-duplicates by event id.
async fn publish_durable(
    state: &Shared,
    subject: &str,
    full: &str,
    event: &CloudEvent,
    deadline: Deadline,
) -> Result<async_nats::jetstream::publish::PublishAck, Problem> {
    let target = Target::Subject(subject.to_owned());
    let attempt = |timeout| async move {
        let publish = state.bus.publish_durable(full, event, Some(deadline));
        match tokio::time::timeout(timeout, publish).await {
            Ok(Ok(ack)) => Ok(ack),
            Ok(Err(e)) => Err(AttemptFailed {
                kind: match e {
                    PublishError::NoStream { .. } => FailureKind::NoResponders,
                    // The server did not acknowledge (timeout, lost connection).
                    PublishError::Nats { .. } => FailureKind::Timeout,
                    _ => FailureKind::Error,
                },
                error: Some(e),
            }),
            Err(_) => Err(AttemptFailed {
                kind: FailureKind::Timeout,
                error: None,
            }),
        }
    };
    let result = state
        .resilience
        .call(&target, Some(deadline), state.config.max_timeout, attempt)
        .await;
    result.map_err(|e| match e {
        CallError::Rejected(rejected) => Problem::refused_by_policy(rejected, &target.to_string()),
        CallError::Failed { error: Some(e), .. } => publish_problem(e),
        CallError::Failed { error: None, .. } => {
            Problem::gateway_timeout(format!("the stream did not acknowledge {subject} in time"))
        }
    })
}

/// What a failed bus request means to the HTTP caller.
fn request_problem(state: &Shared, subject: &str, e: &RequestError) -> Problem {
    match e.kind {
        RequestErrorKind::NoResponders => {
            Problem::service_unavailable(format!("nothing is serving {subject}"))
        }
        RequestErrorKind::TimedOut | RequestErrorKind::DeadlineExceeded => {
            Problem::gateway_timeout(format!("no reply from {subject} before the deadline"))
        }
        RequestErrorKind::TooLarge => Problem::payload_too_large(state.bus.max_payload() as u64),
        RequestErrorKind::Other => {
            tracing::warn!(error = %e, "request failed");
            Problem::internal()
        }
    }
}

/// A runtime node's reply (it carries `patchbay-outcome`) maps by outcome; any other
/// responder's reply is passed through as a CloudEvent in binary mode.
fn reply_response(reply: async_nats::Message) -> Response {
    let outcome = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(OUTCOME_HEADER))
        .map(|v| v.as_str().to_owned());
    if outcome.is_none() {
        return passthrough(reply);
    }
    match serde_json::from_slice::<InvokeReply>(&reply.payload) {
        Ok(InvokeReply::Ok { .. }) => (
            StatusCode::OK,
            [(http::header::CONTENT_TYPE, "application/json")],
            reply.payload,
        )
            .into_response(),
        Ok(InvokeReply::Failure {
            function, failure, ..
        }) => {
            let (kind, reason) = match &failure {
                FailureReply::Retry { reason, .. } => ("retry", reason),
                FailureReply::DeadLetter { reason } => ("dead-letter", reason),
                FailureReply::Drop { reason } => ("drop", reason),
            };
            Problem::unprocessable(format!("{function} declined the event ({kind}): {reason}"))
                .into_response()
        }
        Ok(InvokeReply::Error {
            function,
            kind,
            message,
            ..
        }) => error_problem(&function, kind, &message).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "unreadable reply from a runtime node");
            Problem::internal().into_response()
        }
    }
}

fn error_problem(function: &str, kind: ErrorKind, message: &str) -> Problem {
    match kind {
        ErrorKind::UnknownFunction => {
            Problem::not_found().with_detail(format!("no function named {function:?} is deployed"))
        }
        ErrorKind::BadInput => Problem::bad_request(message.to_owned()),
        ErrorKind::DeadlineExceeded | ErrorKind::Timeout => {
            Problem::gateway_timeout(format!("{function} did not finish before the deadline"))
        }
        ErrorKind::Overloaded => {
            Problem::service_unavailable(format!("{function} is at its concurrency limit"))
        }
        // Traps, memory, forbidden outputs, internal errors: details stay in the logs
        // and traces of the node, not in a response to an external caller.
        ErrorKind::OutOfMemory
        | ErrorKind::Trap
        | ErrorKind::ForbiddenOutput
        | ErrorKind::Internal => {
            tracing::warn!(function, ?kind, message, "function failed");
            Problem::internal()
        }
    }
}

fn passthrough(reply: async_nats::Message) -> Response {
    let mut response = Response::new(Body::from(reply.payload.clone()));
    if let Ok(event) = CloudEvent::from_message(reply.headers.as_ref(), &reply.payload) {
        let out = response.headers_mut();
        let mut ce = async_nats::HeaderMap::new();
        event.write_headers(&mut ce);
        for (name, values) in ce.iter() {
            let name: &str = name.as_ref();
            if let (Ok(name), Some(value)) = (
                http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()),
                values
                    .last()
                    .and_then(|v| http::HeaderValue::from_str(v.as_str()).ok()),
            ) {
                out.insert(name, value);
            }
        }
    }
    response
}

fn publish_problem(error: PublishError) -> Problem {
    match error {
        PublishError::TooLarge { max, .. } => Problem::payload_too_large(max as u64),
        PublishError::Event(e) => Problem::bad_request(e.to_string()),
        other => {
            tracing::warn!(error = %other, "publish failed");
            Problem::service_unavailable("the bus did not take the event; retry")
        }
    }
}

/// A literal subject a caller may publish to: well-formed (400 naming what is wrong) and
/// outside the NATS namespaces (`$…`, `_INBOX…`: 403 whatever the token's scopes, since
/// no caller of the gateway has business there and NATS would drop it silently).
fn check_subject(subject: &str) -> Result<(), Problem> {
    match patchbay_bus::subject::validate_publish_subject(subject) {
        Ok(()) => Ok(()),
        Err(SubjectError::Reserved { namespace, .. }) => Err(Problem::typed(
            StatusCode::FORBIDDEN,
            "reserved-subject",
            "Subject in a reserved namespace",
        )
        .with_detail(format!(
            "{subject:?} is in the {namespace:?} namespace, which belongs to NATS \
             (JetStream and system APIs, reply inboxes); the gateway never publishes there"
        ))),
        Err(e) => Err(Problem::bad_request(e.to_string())),
    }
}

/// 403 for a publish the NATS server refused: the gateway's own bus identity may not
/// publish there (`deploy/access.toml`), so no token scope can help.
fn bus_forbidden(subject: &str) -> Problem {
    bus_permission().with_detail(format!(
        "the bus refused the gateway's publish to {subject}: its identity has no permission \
         for it (this is not a property of the API token)"
    ))
}

/// KV bucket (declared in deploy/streams.toml) where the admin bootstrap stores the host
/// rules of the access policy; the same name as `patchbay_cli::admission::ACCESS_BUCKET`.
pub const ACCESS_BUCKET: &str = "patchbay-access";
/// Key of the rules document in [`ACCESS_BUCKET`] (`patchbay_cli::admission::RULES_KEY`).
pub const RULES_KEY: &str = "host-rules";
/// The identity kind whose rules are the gateway's.
const GATEWAY_KIND: &str = "gateway";

/// What the gateway's bus identity may publish among application subjects (without the
/// subject prefix): the `gateway` entry of the stored rules document — the group's
/// `publish` patterns and the subjects other groups own. Read from the document
/// `patchbay_cli::admission::StoredRules` writes (whose test checks that this reading
/// agrees with the nats-server permissions rendered from the same policy).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BusGrants {
    /// The group in deploy/access.toml.
    pub group: String,
    /// Patterns the group may publish.
    pub publish: Vec<String>,
    /// Patterns other groups own, which the group may never publish.
    #[serde(default)]
    pub owned: Vec<OwnedBy>,
}

/// A subject pattern some other group owns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OwnedBy {
    /// The owning group.
    pub group: String,
    /// The pattern.
    pub subject: String,
}

/// Why the gateway's bus identity may not publish a subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotGranted {
    /// No `publish` pattern of the group matches.
    #[error(
        "the gateway's bus identity (group {group:?} of the access policy) may publish {allowed}; {subject:?} is not covered"
    )]
    NotCovered {
        /// The group.
        group: String,
        /// The subject.
        subject: String,
        /// The group's patterns, comma-separated.
        allowed: String,
    },
    /// Another group owns it.
    #[error(
        "{subject:?} is owned by {owner} ({pattern}): only {owner} may publish it, not the gateway's bus identity"
    )]
    Owned {
        /// The subject.
        subject: String,
        /// The owned pattern.
        pattern: String,
        /// The owning group.
        owner: String,
    },
}

#[derive(Deserialize)]
struct RulesDocument {
    hosts: BTreeMap<String, BusGrants>,
}

impl BusGrants {
    /// The gateway's grants in a stored rules document; `Ok(None)` when the document has
    /// no rules for gateways.
    pub fn from_document(document: &[u8]) -> Result<Option<Self>, serde_json::Error> {
        let mut doc: RulesDocument = serde_json::from_slice(document)?;
        Ok(doc.hosts.remove(GATEWAY_KIND))
    }

    /// Whether the gateway's identity may publish the literal `subject` (without the
    /// prefix), by the rule nats-server applies: an allow matches and no deny does.
    pub fn check(&self, subject: &str) -> Result<(), NotGranted> {
        use patchbay_bus::pattern::matches;
        if let Some(owned) = self.owned.iter().find(|o| matches(&o.subject, subject)) {
            return Err(NotGranted::Owned {
                subject: subject.to_owned(),
                pattern: owned.subject.clone(),
                owner: owned.group.clone(),
            });
        }
        if self.publish.iter().any(|p| matches(p, subject)) {
            return Ok(());
        }
        Err(NotGranted::NotCovered {
            group: self.group.clone(),
            subject: subject.to_owned(),
            allowed: self.publish.join(", "),
        })
    }
}

/// The gateway's [`BusGrants`] as currently stored, or none (then nothing is refused up
/// front; see the module docs).
#[derive(Debug, Clone, Default)]
pub struct GatewayGrants {
    current: Arc<RwLock<Option<Arc<BusGrants>>>>,
}

impl GatewayGrants {
    /// Grants fixed to `grants` (`None`: no up-front check), not watched.
    #[must_use]
    pub fn fixed(grants: Option<BusGrants>) -> Self {
        Self {
            current: Arc::new(RwLock::new(grants.map(Arc::new))),
        }
    }

    /// Read the stored rules from `bus` and keep following them; without a bucket or a
    /// document, log a warning and check nothing up front.
    pub async fn load(bus: &patchbay_bus::Bus) -> Self {
        let grants = Self::default();
        let store = match bus.jetstream().get_key_value(ACCESS_BUCKET).await {
            Ok(store) => store,
            Err(e) => {
                tracing::warn!(
                    bucket = ACCESS_BUCKET,
                    error = %e,
                    "no stored access policy: publishes the gateway's identity may not make are                      not refused up front (core publishes NATS refuses answer 202 and are                      dropped); run `patchbay bootstrap` and restart the gateway"
                );
                return grants;
            }
        };
        let next = match store.entry(RULES_KEY).await {
            Ok(entry) => {
                let entry =
                    entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put);
                match &entry {
                    Some(e) => grants.apply(&e.value),
                    None => tracing::warn!(
                        bucket = ACCESS_BUCKET,
                        key = RULES_KEY,
                        "no stored access policy: publishes the gateway's identity may not make                          are not refused up front until `patchbay bootstrap` stores it"
                    ),
                }
                entry.map_or(0, |e| e.revision) + 1
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the stored access policy; watching for it");
                0
            }
        };
        let watched = grants.clone();
        tokio::spawn(async move { watched.follow(store, next).await });
        grants
    }

    /// Apply every later change of the document (from revision `from`).
    async fn follow(&self, store: async_nats::jetstream::kv::Store, from: u64) {
        use async_nats::jetstream::kv::Operation;
        use futures::StreamExt as _;
        let watch = if from == 0 {
            store.watch_with_history(RULES_KEY).await
        } else {
            store.watch_from_revision(RULES_KEY, from).await
        };
        let mut watch = match watch {
            Ok(watch) => watch,
            Err(e) => {
                return tracing::warn!(error = %e, "cannot watch the stored access policy; keeping what was read");
            }
        };
        while let Some(entry) = watch.next().await {
            match entry {
                Ok(entry) if entry.operation == Operation::Put => self.apply(&entry.value),
                Ok(_) => {
                    tracing::warn!(
                        "the stored access policy was removed: no up-front check of publishes"
                    );
                    *self.current.write().unwrap_or_else(PoisonError::into_inner) = None;
                }
                Err(e) => tracing::warn!(error = %e, "watch of the stored access policy failed"),
            }
        }
    }

    fn apply(&self, document: &[u8]) {
        match BusGrants::from_document(document) {
            Ok(grants) => {
                if grants.is_none() {
                    tracing::warn!(
                        "the stored access policy has no rules for gateways: no up-front check of publishes"
                    );
                } else {
                    tracing::info!("publishes checked against the stored access policy");
                }
                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                    grants.map(Arc::new);
            }
            Err(e) => {
                tracing::warn!(error = %e, "unreadable stored access policy; keeping the previous one")
            }
        }
    }

    /// The grants in force, if any.
    #[must_use]
    pub fn current(&self) -> Option<Arc<BusGrants>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `403` problem `bus-permission` when the gateway's identity may not publish
    /// `subject` (without the prefix); `Ok` when it may, or when no grants are stored.
    pub(crate) fn check(&self, subject: &str) -> Result<(), Problem> {
        match self.current() {
            Some(grants) => grants.check(subject).map_err(|refusal| {
                bus_permission().with_detail(format!(
                    "{refusal} (this is not a property of the API token)"
                ))
            }),
            None => Ok(()),
        }
    }
}

fn bus_permission() -> Problem {
    Problem::typed(
        StatusCode::FORBIDDEN,
        "bus-permission",
        "The gateway may not publish to this subject",
    )
}

/// Resolves when the connection reports that the server refused a publish to `subject`
/// (`-ERR 'Permissions Violation for Publish to "<subject>"'`); never resolves otherwise.
/// Subscribe before publishing so the report cannot be missed.
async fn refused_publish(mut notices: tokio::sync::broadcast::Receiver<BusNotice>, subject: &str) {
    use tokio::sync::broadcast::error::RecvError;
    let quoted = format!("\"{subject}\"");
    loop {
        match notices.recv().await {
            Ok(BusNotice(text))
                if text
                    .to_ascii_lowercase()
                    .contains("permissions violation for publish to")
                    && text.contains(&quoted) =>
            {
                return;
            }
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return std::future::pending().await,
        }
    }
}

/// The event's attributes become NATS headers; refuse them when they are larger than the
/// gateway accepts as HTTP headers (JetStream refuses headers past 64 KiB, and that must
/// not look like an outage). 431 when they came as headers (binary mode), 400 when they
/// came in the body.
fn check_attributes_size(
    state: &Shared,
    headers: &HeaderMap,
    event: &CloudEvent,
) -> Result<(), Problem> {
    let limit = state.config.max_header_bytes;
    let size: usize = event
        .to_headers()
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    if size <= limit {
        return Ok(());
    }
    let detail = format!("the event's attributes take {size} bytes, more than the {limit} allowed");
    if headers.keys().any(|k| k.as_str().starts_with("ce-")) {
        Err(Problem::typed(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request headers too large",
        )
        .with_detail(detail))
    } else {
        Err(Problem::bad_request(detail))
    }
}

/// The caller's time budget: `Request-Timeout` (ms, capped at the configured maximum) or
/// the default timeout.
pub(crate) fn timeout(state: &Shared, headers: &HeaderMap) -> Result<Duration, Problem> {
    let Some(value) = headers.get(REQUEST_TIMEOUT_HEADER) else {
        return Ok(state.config.default_timeout);
    };
    let ms = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        // Within OpenAPI's int64, as the document says; the maximum cuts it anyway.
        .filter(|ms| (1..=i64::MAX.unsigned_abs()).contains(ms))
        .ok_or_else(|| {
            Problem::bad_request("Request-Timeout must be a positive number of milliseconds")
        })?;
    Ok(Duration::from_millis(ms).min(state.config.max_timeout))
}

/// The bus deadline of this request (`patchbay-deadline` on every message it causes).
fn deadline(state: &Shared, headers: &HeaderMap) -> Result<Deadline, Problem> {
    Ok(Deadline::after(state.bus.clock(), timeout(state, headers)?))
}

/// How much of a refused oversized body is read and discarded before answering 413, so a
/// client still sending gets to read the answer instead of a reset connection ("lingering
/// close", as nginx does). Beyond it the answer goes out at once.
const DRAIN_CAP: usize = 16 << 20;

/// The whole body, refused with 413 past `max_body_bytes` (at once when `Content-Length`
/// says so, after discarding up to [`DRAIN_CAP`] of what the client is still sending), and
/// with 408 when it is not complete within `body_read_timeout` or pauses for
/// `body_idle_timeout` (a body shorter than its `Content-Length` never completes).
pub(crate) async fn read_body(
    state: &Shared,
    body: Body,
    headers: &HeaderMap,
) -> Result<Bytes, Problem> {
    let total = state.config.body_read_timeout;
    let timed_out = || {
        Problem::request_timeout(format!(
            "the request body did not arrive within {}",
            humantime::format_duration(total)
        ))
    };
    let read = read_body_within_limit(body, headers, state.config.max_body_bytes);
    match tokio::time::timeout(total, read).await {
        Ok(read) => read,
        Err(_) => {
            state
                .metrics
                .refused
                .with_label_values(&["body-timeout"])
                .inc();
            Err(timed_out())
        }
    }
}

async fn read_body_within_limit(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, Problem> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || Problem::payload_too_large(limit as u64);
    if declared.is_some_and(|len| len > limit as u64) {
        drain(body).await;
        return Err(too_large());
    }
    let mut body = body.into_data_stream();
    let mut collected = bytes::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            if BodyTimeout::is_cause_of(&e) {
                Problem::request_timeout(e.to_string())
            } else {
                Problem::bad_request("the request body was cut short")
            }
        })?;
        if collected.len() + chunk.len() > limit {
            drain(Body::from_stream(body)).await;
            return Err(too_large());
        }
        collected.extend_from_slice(&chunk);
    }
    Ok(collected.freeze())
}

/// Read and discard up to [`DRAIN_CAP`] bytes of `body`.
async fn drain(body: Body) {
    let mut body = body.into_data_stream();
    let mut seen = 0;
    while seen < DRAIN_CAP {
        match body.next().await {
            Some(Ok(chunk)) => seen += chunk.len(),
            _ => return,
        }
    }
}

/// The CloudEvent of a `/v1/events` request, in either content mode.
fn cloud_event(headers: &HeaderMap, data: Bytes) -> Result<CloudEvent, EventProblem> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if media == BATCH_CONTENT_TYPE {
        return Err(EventProblem::Batch);
    }
    if media == STRUCTURED_CONTENT_TYPE {
        return CloudEvent::from_structured(&data).map_err(EventProblem::Event);
    }
    CloudEvent::from_message(Some(&nats_headers(headers)), &data).map_err(EventProblem::Event)
}

/// A request or invocation body: a CloudEvent when the caller sent one, else the body as
/// the data of a new event from this gateway.
fn request_event(state: &Shared, headers: &HeaderMap, data: Bytes) -> Result<CloudEvent, Problem> {
    let has_ce = headers.keys().any(|k| k.as_str().starts_with("ce-"));
    let structured = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with(STRUCTURED_CONTENT_TYPE));
    if has_ce || structured {
        return Ok(cloud_event(headers, data)?);
    }
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned();
    Ok(CloudEvent::new(state.bus.source(), DEFAULT_REQUEST_TYPE).data(content_type, data))
}

/// The HTTP headers a CloudEvent is read from, as NATS headers.
fn nats_headers(headers: &HeaderMap) -> async_nats::HeaderMap {
    let mut out = async_nats::HeaderMap::new();
    for (name, value) in headers {
        let name = name.as_str();
        if (name.starts_with("ce-") || name == "content-type")
            && let Ok(value) = value.to_str()
        {
            out.insert(name, value);
        }
    }
    out
}

/// Why a request is not a CloudEvent.
#[derive(Debug, thiserror::Error)]
enum EventProblem {
    #[error("{0}")]
    Event(EventError),
    #[error(
        "batched CloudEvents ({BATCH_CONTENT_TYPE}) are not accepted: send one event per request"
    )]
    Batch,
}

impl From<EventProblem> for Problem {
    fn from(e: EventProblem) -> Self {
        match e {
            EventProblem::Batch => Problem::typed(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            )
            .with_detail(e.to_string()),
            EventProblem::Event(_) => Problem::bad_request(e.to_string()),
        }
    }
}
