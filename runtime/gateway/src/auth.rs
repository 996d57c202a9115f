//! The caller of a request: its bearer token, checked against the token store and the
//! per-token rate limit before any handler runs or any body is read.

use axum::extract::FromRequestParts;
use http::request::Parts;

use crate::problem::Problem;
use crate::server::Shared;
use crate::token::{AuthError, TokenRecord, bearer_token};

/// An authenticated caller within its rate limit.
#[derive(Debug, Clone)]
pub struct Caller(pub TokenRecord);

impl Caller {
    /// 403 unless the token may publish (or request) on `subject`.
    pub fn may_publish(&self, subject: &str) -> Result<(), Problem> {
        if self.0.allows_publish(subject) {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "token {:?} has no scope publish:{subject} (or a pattern matching it)",
                self.0.name
            )))
        }
    }

    /// 403 unless the token may invoke `function`.
    pub fn may_invoke(&self, function: &str) -> Result<(), Problem> {
        if self.0.allows_invoke(function) {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "token {:?} has no scope invoke:{function}",
                self.0.name
            )))
        }
    }
}

impl FromRequestParts<Shared> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Problem> {
        let refused = |reason: &str| {
            state.metrics.refused.with_label_values(&[reason]).inc();
        };
        let now_ms = state.bus.clock().now_millis();
        let authenticated = match bearer_token(&parts.headers) {
            Ok(token) => state.tokens.authenticate(token, now_ms).await,
            Err(e) => Err(e),
        };
        let record = authenticated.map_err(|e| {
            if let AuthError::Store { reason } = &e {
                tracing::warn!(reason, "token store unavailable");
                refused("token-store");
            } else {
                refused("unauthenticated");
            }
            e.problem()
        })?;
        if let Err(retry_after) = state
            .limiter
            .check(&record.id, record.rate_per_sec, record.burst)
        {
            refused("rate-limited");
            return Err(Problem::too_many_requests(retry_after));
        }
        Ok(Self(record))
    }
}
