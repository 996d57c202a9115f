//! Contact-centre payloads: the JSON `data` of every call, agent and customer message.
//!
//! Each type names its CloudEvent `type` (`TYPE`), so publishers and consumers agree on it
//! in one place. Events published by the core services carry `seq`, a per-aggregate
//! sequence number (per call, per agent) that starts at 1 and rises by one with every
//! event about that aggregate, so consumers can order and de-duplicate. Times are
//! milliseconds since the Unix epoch. Unknown fields are ignored on receipt so producers
//! can add fields without breaking older consumers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A media channel; agents have a capacity per channel.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Channel {
    /// A phone call (agents usually take one at a time).
    #[default]
    Voice,
    /// A chat conversation (agents often take several).
    Chat,
    /// An email or other deferred task.
    Email,
}

/// A required skill with the lowest acceptable proficiency (1 = novice … 10 = expert).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SkillRequirement {
    /// Skill name, e.g. `billing`, `lang-fr`.
    pub skill: String,
    /// Lowest proficiency that qualifies.
    pub min_level: u8,
}

/// One relaxation step: once the call has waited `after_secs` in its queue, the
/// requirements become `requirements` (usually the same skills at lower levels, or fewer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelaxationStep {
    /// Routing age (seconds in the current queue) at which this step applies.
    pub after_secs: u64,
    /// The requirements from then on.
    pub requirements: Vec<SkillRequirement>,
}

/// One overflow target: once the call has waited `after_secs` (task age since it was
/// first queued), it moves to `queue`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverflowTarget {
    /// Task age (seconds since first queued) at which the call overflows.
    pub after_secs: u64,
    /// The queue it moves to.
    pub queue: String,
}

/// `cc.v1.calls.<call>.incoming`: a call arrived (telephony adapter or gateway → routing).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CallIncoming {
    /// The call id (also the subject token).
    pub call_id: String,
    /// The number the caller dialled.
    #[serde(default)]
    pub dialled: String,
    /// The caller's number (ANI), used to look the customer up.
    #[serde(default)]
    pub caller: String,
    /// The IVR menu choice, if any.
    #[serde(default)]
    pub ivr: Option<String>,
    /// The language the caller chose, if any (e.g. `fr`).
    #[serde(default)]
    pub language: Option<String>,
    /// The media channel.
    #[serde(default)]
    pub channel: Channel,
    /// Anything else the adapter knows (campaign, queue hint, …).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl CallIncoming {
    /// CloudEvent type.
    pub const TYPE: &'static str = "cc.call.incoming.v1";
}

/// `cc.v1.calls.<call>.routed`: routing decided where the call waits (routing → agents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRouted {
    /// The call id.
    pub call_id: String,
    /// Per-call sequence number.
    pub seq: u64,
    /// The queue.
    pub queue: String,
    /// Priority: higher is served first (before aging).
    pub priority: u32,
    /// Required skills at the start.
    pub requirements: Vec<SkillRequirement>,
    /// Relaxation steps by routing age, in increasing `after_secs`.
    #[serde(default)]
    pub relaxation: Vec<RelaxationStep>,
    /// Overflow targets by task age, in increasing `after_secs`.
    #[serde(default)]
    pub overflow: Vec<OverflowTarget>,
    /// The media channel.
    pub channel: Channel,
    /// The customer's tier (from the lookup, or the default when it failed).
    pub customer_tier: String,
    /// The customer id, when known.
    #[serde(default)]
    pub customer_id: Option<String>,
    /// The rule that matched.
    pub rule: String,
    /// Whether the customer lookup answered (false: routed with the fallback tier).
    pub lookup_ok: bool,
    /// When routing decided.
    pub routed_at_ms: u64,
}

impl CallRouted {
    /// CloudEvent type.
    pub const TYPE: &'static str = "cc.call.routed.v1";
}

/// `cc.v1.calls.<call>.closed`: closed treatment (outside business hours, holiday).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallClosed {
    /// The call id.
    pub call_id: String,
    /// Per-call sequence number.
    pub seq: u64,
    /// The rule that matched.
    pub rule: String,
    /// Why: `outside-hours`, `holiday:<name>`.
    pub reason: String,
    /// What to play or do (e.g. a message id), from the rules.
    pub treatment: String,
}

impl CallClosed {
    /// CloudEvent type.
    pub const TYPE: &'static str = "cc.call.closed.v1";
}

/// `cc.v1.calls.<call>.hangup`: the caller hung up (telephony adapter → agents).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CallHangup {
    /// The call id.
    pub call_id: String,
    /// Optional reason from the adapter.
    #[serde(default)]
    pub reason: Option<String>,
}

impl CallHangup {
    /// CloudEvent type.
    pub const TYPE: &'static str = "cc.call.hangup.v1";
}

/// What the assignment service says about a call:
/// `cc.v1.calls.<call>.queued|offered|assigned|abandoned|overflowed|ended`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallUpdate {
    /// The call id.
    pub call_id: String,
    /// Per-call sequence number.
    pub seq: u64,
    /// The queue the call is (or was last) in.
    pub queue: String,
    /// The agent, for offered / assigned / ended.
    #[serde(default)]
    pub agent: Option<String>,
    /// For overflowed: the queue it left.
    #[serde(default)]
    pub from_queue: Option<String>,
    /// For offered: when the reservation times out.
    #[serde(default)]
    pub offer_expires_ms: Option<u64>,
    /// When the call first entered a queue (metrics' wait time starts here).
    pub enqueued_at_ms: u64,
    /// When this happened.
    pub at_ms: u64,
}

impl CallUpdate {
    /// CloudEvent type of `queued`.
    pub const QUEUED: &'static str = "cc.call.queued.v1";
    /// CloudEvent type of `offered`.
    pub const OFFERED: &'static str = "cc.call.offered.v1";
    /// CloudEvent type of `assigned`.
    pub const ASSIGNED: &'static str = "cc.call.assigned.v1";
    /// CloudEvent type of `abandoned`.
    pub const ABANDONED: &'static str = "cc.call.abandoned.v1";
    /// CloudEvent type of `overflowed`.
    pub const OVERFLOWED: &'static str = "cc.call.overflowed.v1";
    /// CloudEvent type of `ended`.
    pub const ENDED: &'static str = "cc.call.ended.v1";
}

/// An agent's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    /// Logged out.
    Offline,
    /// Ready for work.
    Available,
    /// Holding an offer, waiting for accept / reject.
    Reserved,
    /// Handling at least one conversation.
    Busy,
    /// After-call work.
    WrapUp,
    /// Missed or rejected an offer; not offered work until they change state.
    NotResponding,
    /// On a break.
    Break,
}

impl AgentState {
    /// The kebab-case name used on the wire and in metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Offline => "offline",
            Self::Available => "available",
            Self::Reserved => "reserved",
            Self::Busy => "busy",
            Self::WrapUp => "wrap-up",
            Self::NotResponding => "not-responding",
            Self::Break => "break",
        }
    }
}

/// An agent's skill with proficiency.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AgentSkill {
    /// Skill name.
    pub skill: String,
    /// Proficiency (1 = novice … 10 = expert).
    pub level: u8,
}

/// An agent's profile, sent with the first `state` command (log in) or to update it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentProfile {
    /// Skills with proficiency.
    pub skills: Vec<AgentSkill>,
    /// Queues the agent serves, with the delay (seconds of routing age) before the agent
    /// is considered for that queue — routing-profile style queue priority/delay.
    /// Empty: every queue without delay.
    #[serde(default)]
    pub queues: Vec<QueueMembership>,
    /// Concurrent capacity per channel; channels not listed get the default (voice 1,
    /// chat 3, email 1).
    #[serde(default)]
    pub capacity: BTreeMap<Channel, u32>,
}

/// An agent serves a queue at a priority (lower number first) after a delay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMembership {
    /// The queue.
    pub queue: String,
    /// 1 is served first; the agent takes work from a higher number only when lower
    /// numbers have none eligible.
    #[serde(default = "default_queue_priority")]
    pub priority: u32,
    /// Seconds a call must have waited in the queue before this agent is considered.
    #[serde(default)]
    pub delay_secs: u64,
}

fn default_queue_priority() -> u32 {
    1
}

/// `cc.v1.agents.<agent>.cmd.state`: change state (log in with a profile, break, log out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAgentState {
    /// The agent id.
    pub agent_id: String,
    /// Requested state: `available`, `break` or `offline` (the engine owns the others).
    pub state: AgentState,
    /// A new profile (required when logging in for the first time).
    #[serde(default)]
    pub profile: Option<AgentProfile>,
}

impl SetAgentState {
    /// CloudEvent type.
    pub const TYPE: &'static str = "cc.agent.set-state.v1";
}

/// `cc.v1.agents.<agent>.cmd.accept|reject`: answer an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferAnswer {
    /// The agent id.
    pub agent_id: String,
    /// The offered call.
    pub call_id: String,
}

impl OfferAnswer {
    /// CloudEvent type of accept.
    pub const ACCEPT: &'static str = "cc.agent.accept.v1";
    /// CloudEvent type of reject.
    pub const REJECT: &'static str = "cc.agent.reject.v1";
}

/// `cc.v1.agents.<agent>.cmd.wrapup-done`: end wrap-up early.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrapupDone {
    /// The agent id.
    pub agent_id: String,
}

impl WrapupDone {
    /// CloudEvent type.
    pub const TYPE: &'static str = "cc.agent.wrapup-done.v1";
}

/// `cc.v1.agents.<agent>.evt.state-changed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStateChanged {
    /// The agent id.
    pub agent_id: String,
    /// Per-agent sequence number.
    pub seq: u64,
    /// The previous state.
    pub from: AgentState,
    /// The new state.
    pub to: AgentState,
    /// Why (`command`, `offer`, `accepted`, `call-ended`, `wrap-up-timeout`, `missed`, …).
    pub reason: String,
    /// The call involved, if any.
    #[serde(default)]
    pub call_id: Option<String>,
    /// When.
    pub at_ms: u64,
}

impl AgentStateChanged {
    /// CloudEvent type.
    pub const TYPE: &'static str = "cc.agent.state-changed.v1";
}

/// `cc.v1.agents.<agent>.evt.missed`: the agent rejected or let an offer time out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMissed {
    /// The agent id.
    pub agent_id: String,
    /// Per-agent sequence number.
    pub seq: u64,
    /// The call.
    pub call_id: String,
    /// `rejected` or `timeout`.
    pub reason: String,
    /// When.
    pub at_ms: u64,
}

impl AgentMissed {
    /// CloudEvent type.
    pub const TYPE: &'static str = "cc.agent.missed.v1";
}

/// `cc.v1.customers.lookup` request data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerLookup {
    /// The caller's number.
    pub phone: String,
}

impl CustomerLookup {
    /// CloudEvent type.
    pub const TYPE: &'static str = "cc.customer.lookup.v1";
}

/// `cc.v1.customers.lookup` answer (the `data` of the function's one output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerInfo {
    /// The customer id, when known.
    #[serde(default)]
    pub customer_id: Option<String>,
    /// The tier (`standard`, `gold`, `platinum`, …).
    pub tier: String,
    /// The customer's name, when known.
    #[serde(default)]
    pub name: Option<String>,
    /// Preferred language.
    #[serde(default)]
    pub language: Option<String>,
    /// Whether the number matched a customer.
    #[serde(default)]
    pub known: bool,
}

impl CustomerInfo {
    /// CloudEvent type.
    pub const TYPE: &'static str = "cc.customer.found.v1";
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn incoming_call_accepts_a_minimal_body() {
        let call: CallIncoming = serde_json::from_str(r#"{"call_id":"c1"}"#).unwrap();
        assert_eq!(call.call_id, "c1");
        assert_eq!(call.channel, Channel::Voice);
    }

    #[test]
    fn agent_states_use_their_wire_names() {
        for state in [AgentState::WrapUp, AgentState::NotResponding] {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
    }

    #[test]
    fn profile_capacity_is_keyed_by_channel_name() {
        let profile: AgentProfile = serde_json::from_str(
            r#"{"skills":[{"skill":"billing","level":7}],"capacity":{"chat":4}}"#,
        )
        .unwrap();
        assert_eq!(profile.capacity.get(&Channel::Chat), Some(&4));
        assert!(profile.queues.is_empty());
    }
}
