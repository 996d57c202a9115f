//! RFC 9457 problem details: the one shape every gateway error takes on the wire
//! (`application/problem+json`, `{type, title, status, detail?, instance?}`), with the
//! headers some statuses require (`WWW-Authenticate` on 401, `Retry-After` on 429).
//!
//! This module decides how an error *looks*; it does not decide which error a request
//! deserves (the handlers and middleware do) and it never logs. [`Problem::internal`]
//! deliberately carries no detail: internal causes are logged once by middleware, never
//! sent to callers.

use std::fmt;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use patchbay_bus::resilience::Rejected;
use serde::{Deserialize, Serialize};

/// The media type of a problem body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Where problem types specific to Patchbay are documented; `type` is this plus a slug.
pub const PROBLEM_TYPE_BASE: &str = "https://patchbay.dev/problems/";

/// The generic problem type: the status code says it all (RFC 9457 §4.2.1).
pub const ABOUT_BLANK: &str = "about:blank";

/// A problem to report to an HTTP caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The HTTP status.
    pub status: StatusCode,
    /// A short, human-readable summary of the problem type (the same for every
    /// occurrence).
    pub title: String,
    /// What went wrong in this occurrence, for the caller; never internal details.
    pub detail: Option<String>,
    /// [`ABOUT_BLANK`] or `https://patchbay.dev/problems/<slug>`.
    pub type_uri: String,
    /// A reference to this occurrence (for example the request path or a trace id).
    pub instance: Option<String>,
    /// When to try again (429 and, optionally, 503); sent as `Retry-After`.
    retry_after: Option<Duration>,
    /// Send `Connection: close` (the rest of the request is not worth reading).
    close: bool,
}

impl Problem {
    /// A problem of the generic type [`ABOUT_BLANK`], titled with the status's reason
    /// phrase.
    #[must_use]
    pub fn new(status: StatusCode) -> Self {
        Self {
            status,
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            detail: None,
            type_uri: ABOUT_BLANK.to_owned(),
            instance: None,
            retry_after: None,
            close: false,
        }
    }

    /// A Patchbay-specific problem type: `type` becomes
    /// `https://patchbay.dev/problems/<slug>` and `title` its summary.
    #[must_use]
    pub fn typed(status: StatusCode, slug: &str, title: impl Into<String>) -> Self {
        Self {
            type_uri: format!("{PROBLEM_TYPE_BASE}{slug}"),
            title: title.into(),
            ..Self::new(status)
        }
    }

    /// 401: no valid API token. The response carries `WWW-Authenticate: Bearer`.
    #[must_use]
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::typed(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing or invalid API token",
        )
        .with_detail(detail)
    }

    /// 403: a valid token whose scopes do not allow this request.
    #[must_use]
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::typed(
            StatusCode::FORBIDDEN,
            "insufficient-scope",
            "The API token's scopes do not allow this request",
        )
        .with_detail(detail)
    }

    /// 404.
    #[must_use]
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND)
    }

    /// 413: the request body is larger than `limit_bytes`.
    #[must_use]
    pub fn payload_too_large(limit_bytes: u64) -> Self {
        Self::typed(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Request body too large",
        )
        .with_detail(format!(
            "the request body exceeds the limit of {limit_bytes} bytes"
        ))
    }

    /// 408: the client stopped sending its request body. The connection is closed after
    /// the answer (`Connection: close`): what is left of the body may never come.
    #[must_use]
    pub fn request_timeout(detail: impl Into<String>) -> Self {
        let mut problem = Self::typed(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            "Request body not received in time",
        )
        .with_detail(detail);
        problem.close = true;
        problem
    }

    /// 400: a request the gateway cannot make sense of.
    #[must_use]
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST).with_detail(detail)
    }

    /// 429: the token's request rate is exhausted; `Retry-After` says when to come back
    /// (whole seconds, rounded up, at least 1).
    #[must_use]
    pub fn too_many_requests(retry_after: Duration) -> Self {
        let mut problem = Self::typed(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Request rate limit exceeded",
        )
        .with_detail(format!(
            "the API token's request rate is exhausted; retry after {} s",
            retry_after_secs(retry_after)
        ));
        problem.retry_after = Some(retry_after);
        problem
    }

    /// 422: a well-formed request whose content is refused (for example an event that
    /// fails validation).
    #[must_use]
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY).with_detail(detail)
    }

    /// 503: a dependency (the bus, the token store, a function) is unavailable.
    #[must_use]
    pub fn service_unavailable(detail: impl Into<String>) -> Self {
        Self::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
        )
        .with_detail(detail)
    }

    /// 503 for a refusal by a resilience policy: the target's circuit breaker is open or
    /// its concurrency limit shed the request; `Retry-After` says when to come back.
    #[must_use]
    pub fn refused_by_policy(rejected: Rejected, target: &str) -> Self {
        match rejected {
            Rejected::Open { retry_after } => {
                let mut problem = Self::typed(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "circuit-open",
                    "Circuit open",
                )
                .with_detail(format!(
                    "{target} has been failing; calls are paused for {} s",
                    retry_after_secs(retry_after)
                ));
                problem.retry_after = Some(retry_after);
                problem
            }
            Rejected::Full { limit } => {
                let mut problem =
                    Self::typed(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "Overloaded")
                        .with_detail(format!(
                            "{target} has {limit} calls in flight from this gateway; retry shortly"
                        ));
                problem.retry_after = Some(Duration::from_secs(1));
                problem
            }
            Rejected::DeadlinePassed => {
                Self::gateway_timeout(format!("the deadline passed before {target} was called"))
            }
        }
    }

    /// 504: the bus or a function did not answer in time.
    #[must_use]
    pub fn gateway_timeout(detail: impl Into<String>) -> Self {
        Self::typed(StatusCode::GATEWAY_TIMEOUT, "timeout", "Upstream timeout").with_detail(detail)
    }

    /// 500 with a generic message: whatever happened is logged, not sent.
    #[must_use]
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR)
            .with_detail("the gateway failed to handle the request; the error has been logged")
    }

    /// Replace the detail.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Set the instance (for example the request path or a trace id).
    #[must_use]
    pub fn with_instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = Some(instance.into());
        self
    }

    /// Ask the caller to come back after `after` (sent as `Retry-After`; useful on 503).
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// When the caller should try again, if the problem says.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The JSON body.
    #[must_use]
    pub fn body(&self) -> ProblemBody {
        ProblemBody {
            type_uri: self.type_uri.clone(),
            title: self.title.clone(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            instance: self.instance.clone(),
        }
    }
}

/// `Retry-After` in whole seconds: rounded up so a caller never comes back too early, and
/// at least 1 because 0 invites an immediate retry storm.
fn retry_after_secs(after: Duration) -> u64 {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    secs.max(1)
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.title)?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problem {}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        // Serialising a struct of strings and a number cannot fail; the fallback keeps
        // the status even if it somehow did.
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 9110 §11.6.1: a 401 must say which scheme to use.
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(after) = self.retry_after {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(after)),
            );
        }
        if self.close {
            // HTTP/1 only; hyper leaves it off HTTP/2 answers, where it is not allowed.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// The `application/problem+json` body (RFC 9457), as documented in the OpenAPI schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(
    example = json!({
        "type": "https://patchbay.dev/problems/rate-limited",
        "title": "Request rate limit exceeded",
        "status": 429,
        "detail": "the API token's request rate is exhausted; retry after 1 s"
    })
)]
pub struct ProblemBody {
    /// A URI identifying the problem type: `about:blank` (the status says it all) or
    /// `https://patchbay.dev/problems/<slug>`.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong in this occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A reference to this occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    async fn render(problem: Problem) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        let response = problem.into_response();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn unauthorized_is_problem_json_with_bearer_challenge() {
        let (status, headers, body) = render(Problem::unauthorized("no API token")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(
            body,
            serde_json::json!({
                "type": "https://patchbay.dev/problems/unauthorized",
                "title": "Missing or invalid API token",
                "status": 401,
                "detail": "no API token",
            })
        );
    }

    #[tokio::test]
    async fn generic_problems_are_about_blank_titled_by_reason_phrase_without_empty_fields() {
        let (status, headers, body) = render(Problem::not_found()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(headers.get(header::WWW_AUTHENTICATE).is_none());
        assert!(headers.get(header::RETRY_AFTER).is_none());
        assert_eq!(
            body,
            serde_json::json!({"type": "about:blank", "title": "Not Found", "status": 404})
        );
    }

    #[tokio::test]
    async fn too_many_requests_rounds_retry_after_up_to_whole_seconds_at_least_one() {
        for (after, expected) in [
            (Duration::from_millis(1), "1"),
            (Duration::ZERO, "1"),
            (Duration::from_millis(1000), "1"),
            (Duration::from_millis(1001), "2"),
            (Duration::from_secs(7), "7"),
        ] {
            let (status, headers, body) = render(Problem::too_many_requests(after)).await;
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(headers[header::RETRY_AFTER], expected, "for {after:?}");
            assert_eq!(body["type"], "https://patchbay.dev/problems/rate-limited");
            assert_eq!(body["status"], 429);
        }
    }

    #[tokio::test]
    async fn every_constructor_has_its_status_and_instance_is_carried() {
        let cases = [
            (Problem::forbidden("x"), 403),
            (Problem::request_timeout("x"), 408),
            (Problem::payload_too_large(1024), 413),
            (Problem::bad_request("x"), 400),
            (Problem::unprocessable("x"), 422),
            (Problem::service_unavailable("x"), 503),
            (Problem::gateway_timeout("x"), 504),
            (Problem::internal(), 500),
        ];
        for (problem, code) in cases {
            let (status, headers, body) =
                render(problem.with_instance("/events/cc.v1.calls.c1.incoming")).await;
            assert_eq!(status.as_u16(), code);
            assert_eq!(headers[header::CONTENT_TYPE], PROBLEM_JSON);
            assert_eq!(body["status"], code);
            assert_eq!(body["instance"], "/events/cc.v1.calls.c1.incoming");
            assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
        }
    }

    #[tokio::test]
    async fn payload_too_large_names_the_limit() {
        let (_, _, body) = render(Problem::payload_too_large(1_048_576)).await;
        assert!(
            body["detail"].as_str().unwrap().contains("1048576 bytes"),
            "{body}"
        );
    }

    #[test]
    fn internal_problem_says_nothing_about_the_cause() {
        let problem = Problem::internal();
        assert_eq!(problem.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(problem.type_uri, ABOUT_BLANK);
        assert_eq!(
            problem.detail.as_deref(),
            Some("the gateway failed to handle the request; the error has been logged")
        );
    }

    #[test]
    fn request_timeout_closes_the_connection() {
        let response = Problem::request_timeout("body stalled").into_response();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(response.headers()[header::CONNECTION], "close");
        let other = Problem::bad_request("x").into_response();
        assert!(other.headers().get(header::CONNECTION).is_none());
    }

    #[test]
    fn service_unavailable_can_ask_for_a_retry() {
        let problem = Problem::service_unavailable("token store unreachable")
            .with_retry_after(Duration::from_secs(2));
        assert_eq!(problem.retry_after(), Some(Duration::from_secs(2)));
        let response = problem.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn problem_body_round_trips_through_json() {
        let body = Problem::forbidden("publish to cc.v1.calls.c1.routed is not allowed")
            .with_instance("req-1")
            .body();
        let json = serde_json::to_string(&body).unwrap();
        let back: ProblemBody = serde_json::from_str(&json).unwrap();
        assert_eq!(back, body);
    }
}
