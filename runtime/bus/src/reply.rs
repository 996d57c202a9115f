//! The reply a runtime node sends to a trigger message that carries a reply inbox
//! (direct invoke, or a request on a `subject` trigger).
//!
//! The body is JSON; the `patchbay-outcome` header repeats the outcome so a caller can
//! branch without parsing. The gateway maps outcomes to HTTP statuses (ok → 200, failure
//! → 422, error → 4xx/5xx by kind) and the CLI prints them.

use serde::{Deserialize, Serialize};

/// Header naming the outcome: `ok`, `failure` or `error`.
pub const OUTCOME_HEADER: &str = "patchbay-outcome";
/// Header naming the function version that handled the message.
pub const VERSION_HEADER: &str = "patchbay-fn-version";
/// Header naming the runtime node that handled the message, so a caller (or an operator
/// reading a trace-less reply) can tell which node of a shared queue group answered.
pub const NODE_HEADER: &str = "patchbay-node";

/// What the handler decided, when it decided something.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FailureReply {
    /// The function asked for a retry.
    Retry {
        /// Requested delay.
        after_ms: u64,
        /// Its reason.
        reason: String,
    },
    /// The function dead-lettered the event.
    DeadLetter {
        /// Its reason.
        reason: String,
    },
    /// The function dropped the event.
    Drop {
        /// Its reason.
        reason: String,
    },
}

/// Why the platform could not get an answer from the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// No such function is deployed.
    UnknownFunction,
    /// The message is not a valid CloudEvent (or otherwise unusable).
    BadInput,
    /// The deadline passed before the work could start.
    DeadlineExceeded,
    /// The function ran out of time.
    Timeout,
    /// The function exceeded its memory cap.
    OutOfMemory,
    /// The function trapped or panicked.
    Trap,
    /// The node is at its concurrency limit for the function, or shutting down.
    Overloaded,
    /// The function returned an event for a subject outside its `--publish` list.
    ForbiddenOutput,
    /// Anything else (the message says what).
    Internal,
}

/// The reply body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum InvokeReply {
    /// The handler returned these events (structured-mode CloudEvents JSON).
    Ok {
        /// The function.
        function: String,
        /// The version that ran.
        version: u32,
        /// The events returned.
        outputs: Vec<serde_json::Value>,
    },
    /// The handler declined the event.
    Failure {
        /// The function.
        function: String,
        /// The version that ran.
        version: u32,
        /// Its decision.
        failure: FailureReply,
    },
    /// The platform could not run the handler to completion.
    Error {
        /// The function.
        function: String,
        /// The version, when one was chosen.
        version: Option<u32>,
        /// What went wrong.
        kind: ErrorKind,
        /// Details for the caller.
        message: String,
    },
}

impl InvokeReply {
    /// The value of [`OUTCOME_HEADER`].
    #[must_use]
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Ok { .. } => "ok",
            Self::Failure { .. } => "failure",
            Self::Error { .. } => "error",
        }
    }

    /// The version that handled it, if any.
    #[must_use]
    pub fn version(&self) -> Option<u32> {
        match self {
            Self::Ok { version, .. } | Self::Failure { version, .. } => Some(*version),
            Self::Error { version, .. } => *version,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replies_round_trip_through_json_with_a_readable_shape() {
        let reply = InvokeReply::Failure {
            function: "f".into(),
            version: 2,
            failure: FailureReply::Retry {
                after_ms: 10,
                reason: "busy".into(),
            },
        };
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(json["outcome"], "failure");
        assert_eq!(json["failure"]["kind"], "retry");
        assert_eq!(serde_json::from_value::<InvokeReply>(json).unwrap(), reply);
        let err = InvokeReply::Error {
            function: "f".into(),
            version: None,
            kind: ErrorKind::UnknownFunction,
            message: "unknown function \"f\"".into(),
        };
        assert_eq!(
            serde_json::to_value(&err).unwrap()["kind"],
            "unknown-function"
        );
    }
}
