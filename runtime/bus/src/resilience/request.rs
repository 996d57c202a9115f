//! [`Bus::request_resilient`]: a bus request under the resilience policy of its subject —
//! or of the function, for `patchbay.v1.fn.<name>.invoke` — with every attempt a real
//! request carrying the caller's deadline.

use std::time::Duration;

use async_nats::Message;
use thiserror::Error;

use super::registry::{AttemptFailed, CallError, Resilience};
use super::{FailureKind, Target};
use crate::client::{Bus, RequestError, RequestErrorKind, RequestOptions};
use crate::deadline::Deadline;
use crate::event::CloudEvent;
use crate::reply::OUTCOME_HEADER;

/// Why one attempt of a resilient request failed.
#[derive(Debug, Error)]
pub enum AttemptError {
    /// The request itself failed (timeout, no responders, too large…).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The responder answered with a Patchbay error or failure reply (`patchbay-outcome`
    /// other than `ok`); the reply is kept so the caller can read why.
    #[error("answered {outcome}")]
    Answered {
        /// The `patchbay-outcome` header.
        outcome: String,
        /// The reply.
        reply: Box<Message>,
    },
}

/// The outcome of a resilient request.
pub type ResilientResult = Result<Message, CallError<AttemptError>>;

/// How an attempt's result counts for retries and the breaker.
fn classify(result: Result<Message, RequestError>) -> Result<Message, AttemptFailed<AttemptError>> {
    match result {
        Ok(reply) => {
            let outcome = reply
                .headers
                .as_ref()
                .and_then(|h| h.get(OUTCOME_HEADER))
                .map(|v| v.as_str().to_owned());
            match outcome {
                Some(outcome) if outcome != "ok" => Err(AttemptFailed {
                    kind: FailureKind::Error,
                    error: AttemptError::Answered {
                        outcome,
                        reply: Box::new(reply),
                    },
                }),
                _ => Ok(reply),
            }
        }
        Err(e) => Err(AttemptFailed {
            kind: match e.kind {
                RequestErrorKind::TimedOut | RequestErrorKind::DeadlineExceeded => {
                    FailureKind::Timeout
                }
                RequestErrorKind::NoResponders => FailureKind::NoResponders,
                RequestErrorKind::TooLarge | RequestErrorKind::Other => FailureKind::Error,
            },
            error: AttemptError::Request(e),
        }),
    }
}

impl Bus {
    /// The resilience target of a request on `subject` (full, prefixed): the function for
    /// its invoke subject, else the subject without the installation prefix.
    #[must_use]
    pub fn request_target(&self, subject: &str) -> Target {
        let tail = self.subjects().strip(subject).unwrap_or(subject);
        match tail
            .strip_prefix("patchbay.v1.fn.")
            .and_then(|rest| rest.strip_suffix(".invoke"))
        {
            Some(function) if !function.contains('.') => Target::Function(function.to_owned()),
            _ => Target::Subject(tail.to_owned()),
        }
    }

    /// Send `event` as a request on `subject` under its resilience policy: attempts with
    /// the policy's timeout (or `default_timeout` when no policy covers the subject), retries
    /// with backoff inside the retry budget, refused at once while the breaker is open or
    /// the concurrency limit sheds, and never past `deadline`. A reply whose
    /// `patchbay-outcome` is not `ok` counts as a failed attempt.
    pub async fn request_resilient(
        &self,
        resilience: &Resilience,
        subject: &str,
        event: &CloudEvent,
        default_timeout: Duration,
        deadline: Option<Deadline>,
    ) -> ResilientResult {
        let target = self.request_target(subject);
        resilience
            .call(&target, deadline, default_timeout, |timeout| async move {
                let options = RequestOptions::timeout(timeout).deadline(deadline);
                classify(self.request(subject, event, options).await)
            })
            .await
    }
}
