//! Contact-centre subjects, built and parsed side by side (see docs/architecture.md, "Subjects").

use patchbay_bus::subject::{Result, SubjectError, Subjects, Token};

/// Events in the life of a call: `cc.v1.calls.<call>.<event>`, all in stream CC_CALLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallEvent {
    /// A call arrived (gateway / telephony adapter → routing).
    Incoming,
    /// The caller hung up (gateway / telephony adapter → agents).
    Hangup,
    /// Routing chose a queue (routing → agents, functions).
    Routed,
    /// Closed treatment: outside business hours (routing → functions).
    Closed,
    /// The call waits in a queue (agents → functions, dashboards).
    Queued,
    /// The call was offered to an agent (agents → …).
    Offered,
    /// An agent accepted the call (agents → …).
    Assigned,
    /// The caller hung up while waiting (agents → …).
    Abandoned,
    /// The call moved to an overflow queue (agents → …).
    Overflowed,
    /// The call ended after being handled (agents → …).
    Ended,
}

impl CallEvent {
    /// Every call event.
    pub const ALL: [Self; 10] = [
        Self::Incoming,
        Self::Hangup,
        Self::Routed,
        Self::Closed,
        Self::Queued,
        Self::Offered,
        Self::Assigned,
        Self::Abandoned,
        Self::Overflowed,
        Self::Ended,
    ];

    /// The last subject token.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Incoming => "incoming",
            Self::Hangup => "hangup",
            Self::Routed => "routed",
            Self::Closed => "closed",
            Self::Queued => "queued",
            Self::Offered => "offered",
            Self::Assigned => "assigned",
            Self::Abandoned => "abandoned",
            Self::Overflowed => "overflowed",
            Self::Ended => "ended",
        }
    }

    fn parse(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == token)
    }
}

/// Commands to an agent: `cc.v1.agents.<agent>.cmd.<command>` (gateway → agents),
/// stream CC_AGENT_CMDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentCommand {
    /// Change state (available, break, offline…).
    State,
    /// Accept the offered call.
    Accept,
    /// Reject the offered call.
    Reject,
    /// End wrap-up early.
    WrapupDone,
}

impl AgentCommand {
    /// Every agent command.
    pub const ALL: [Self; 4] = [Self::State, Self::Accept, Self::Reject, Self::WrapupDone];

    /// The last subject token.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::State => "state",
            Self::Accept => "accept",
            Self::Reject => "reject",
            Self::WrapupDone => "wrapup-done",
        }
    }

    fn parse(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == token)
    }
}

/// Events about an agent: `cc.v1.agents.<agent>.evt.<event>` (agents → functions,
/// dashboards), stream CC_AGENTS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentEvent {
    /// The agent's state changed.
    StateChanged,
    /// The agent let an offer time out.
    Missed,
}

impl AgentEvent {
    /// Every agent event.
    pub const ALL: [Self; 2] = [Self::StateChanged, Self::Missed];

    /// The last subject token.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StateChanged => "state-changed",
            Self::Missed => "missed",
        }
    }

    fn parse(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == token)
    }
}

/// A parsed contact-centre subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CcSubject {
    /// `cc.v1.calls.<call>.<event>`
    Call {
        /// The call id.
        call: Token,
        /// What happened.
        event: CallEvent,
    },
    /// `cc.v1.agents.<agent>.cmd.<command>`
    AgentCommand {
        /// The agent id.
        agent: Token,
        /// The command.
        command: AgentCommand,
    },
    /// `cc.v1.agents.<agent>.evt.<event>`
    AgentEvent {
        /// The agent id.
        agent: Token,
        /// What happened.
        event: AgentEvent,
    },
    /// `cc.v1.customers.lookup`
    CustomerLookup,
    /// `cc.v1.recordings.<call>.completed`
    RecordingCompleted {
        /// The call recorded.
        call: Token,
    },
    /// `cc.v1.queues.stats`
    QueueStats,
}

/// Builders and the parser for contact-centre subjects in one installation's subject
/// space (its prefix).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CcSubjects {
    subjects: Subjects,
}

impl CcSubjects {
    /// Contact-centre subjects under `subjects`' prefix.
    #[must_use]
    pub fn new(subjects: Subjects) -> Self {
        Self { subjects }
    }

    /// `cc.v1.calls.<call>.<event>`.
    #[must_use]
    pub fn call(&self, call: &Token, event: CallEvent) -> String {
        self.subjects
            .full(&format!("cc.v1.calls.{call}.{}", event.as_str()))
    }

    /// Pattern for one call event of every call, e.g. `cc.v1.calls.*.incoming`.
    #[must_use]
    pub fn call_all(&self, event: CallEvent) -> String {
        self.subjects
            .full(&format!("cc.v1.calls.*.{}", event.as_str()))
    }

    /// `cc.v1.agents.<agent>.cmd.<command>`.
    #[must_use]
    pub fn agent_command(&self, agent: &Token, command: AgentCommand) -> String {
        self.subjects
            .full(&format!("cc.v1.agents.{agent}.cmd.{}", command.as_str()))
    }

    /// Pattern for every agent command: `cc.v1.agents.*.cmd.*`.
    #[must_use]
    pub fn agent_commands_all(&self) -> String {
        self.subjects.full("cc.v1.agents.*.cmd.*")
    }

    /// `cc.v1.agents.<agent>.evt.<event>`.
    #[must_use]
    pub fn agent_event(&self, agent: &Token, event: AgentEvent) -> String {
        self.subjects
            .full(&format!("cc.v1.agents.{agent}.evt.{}", event.as_str()))
    }

    /// `cc.v1.customers.lookup` — request-reply (routing → customer-lookup function).
    #[must_use]
    pub fn customer_lookup(&self) -> String {
        self.subjects.full("cc.v1.customers.lookup")
    }

    /// `cc.v1.recordings.<call>.completed` (recorder adapter → recording-index function).
    #[must_use]
    pub fn recording_completed(&self, call: &Token) -> String {
        self.subjects
            .full(&format!("cc.v1.recordings.{call}.completed"))
    }

    /// `cc.v1.queues.stats` — request-reply (dashboards, CLI → agents): the reply's data is
    /// the JSON array of every queue's real-time statistics (`patchbay_agents::QueueStats`).
    /// Core NATS only (no stream): statistics are only worth having fresh.
    #[must_use]
    pub fn queue_stats(&self) -> String {
        self.subjects.full("cc.v1.queues.stats")
    }

    /// Parse any contact-centre subject built by this type.
    pub fn parse(&self, subject: &str) -> Result<CcSubject> {
        let unrecognised = || SubjectError::Unrecognised {
            subject: subject.to_owned(),
            expected: "contact-centre",
        };
        let tail = self.subjects.strip(subject).map_err(|_| unrecognised())?;
        let parts: Vec<&str> = tail.split('.').collect();
        let token = |t: &str| Token::new(t).map_err(|_| unrecognised());
        let parsed = match parts.as_slice() {
            ["cc", "v1", "calls", call, event] => CcSubject::Call {
                call: token(call)?,
                event: CallEvent::parse(event).ok_or_else(unrecognised)?,
            },
            ["cc", "v1", "agents", agent, "cmd", command] => CcSubject::AgentCommand {
                agent: token(agent)?,
                command: AgentCommand::parse(command).ok_or_else(unrecognised)?,
            },
            ["cc", "v1", "agents", agent, "evt", event] => CcSubject::AgentEvent {
                agent: token(agent)?,
                event: AgentEvent::parse(event).ok_or_else(unrecognised)?,
            },
            ["cc", "v1", "customers", "lookup"] => CcSubject::CustomerLookup,
            ["cc", "v1", "queues", "stats"] => CcSubject::QueueStats,
            ["cc", "v1", "recordings", call, "completed"] => {
                CcSubject::RecordingCompleted { call: token(call)? }
            }
            _ => return Err(unrecognised()),
        };
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use patchbay_bus::subject::matches;

    fn every_subject(s: &CcSubjects) -> Vec<(String, CcSubject)> {
        let call = Token::new("call-1").unwrap();
        let agent = Token::new("agent_7").unwrap();
        let mut all = vec![
            (s.customer_lookup(), CcSubject::CustomerLookup),
            (s.queue_stats(), CcSubject::QueueStats),
            (
                s.recording_completed(&call),
                CcSubject::RecordingCompleted { call: call.clone() },
            ),
        ];
        for event in CallEvent::ALL {
            all.push((
                s.call(&call, event),
                CcSubject::Call {
                    call: call.clone(),
                    event,
                },
            ));
        }
        for command in AgentCommand::ALL {
            all.push((
                s.agent_command(&agent, command),
                CcSubject::AgentCommand {
                    agent: agent.clone(),
                    command,
                },
            ));
        }
        for event in AgentEvent::ALL {
            all.push((
                s.agent_event(&agent, event),
                CcSubject::AgentEvent {
                    agent: agent.clone(),
                    event,
                },
            ));
        }
        all
    }

    #[test]
    fn every_contact_centre_subject_round_trips_with_and_without_prefix() {
        for prefix in ["", "acme."] {
            let s = CcSubjects::new(Subjects::new(prefix).unwrap());
            for (subject, parsed) in every_subject(&s) {
                assert_eq!(s.parse(&subject), Ok(parsed), "{subject}");
            }
        }
    }

    #[test]
    fn commands_and_events_never_share_a_subject() {
        let s = CcSubjects::default();
        let agent = Token::new("a").unwrap();
        for command in AgentCommand::ALL {
            let subject = s.agent_command(&agent, command);
            assert!(!matches("cc.v1.agents.*.evt.*", &subject));
            assert!(matches(&s.agent_commands_all(), &subject));
        }
        for event in AgentEvent::ALL {
            assert!(!matches(
                &s.agent_commands_all(),
                &s.agent_event(&agent, event)
            ));
        }
    }

    #[test]
    fn unknown_events_and_bad_ids_are_refused() {
        let s = CcSubjects::default();
        for bad in [
            "cc.v1.calls.c1.exploded",
            "cc.v1.calls.*.incoming",
            "cc.v2.calls.c1.incoming",
            "cc.v1.agents.a.cmd.fly",
            "cc.v1.customers",
            "cc.v1.queues.stats.extra",
        ] {
            assert!(s.parse(bad).is_err(), "{bad} parsed");
        }
    }
}
