//! The assignment engine: agents, queues, reservations, wrap-up and the events they produce.
//!
//! Owns the whole state machine of calls (queued → offered → assigned → ended, or
//! abandoned / overflowed on the way) and of agents (offline, available, reserved, busy,
//! wrap-up, not-responding, break). It never reads the clock, never does I/O and never
//! publishes: callers pass `now_ms` to [`Engine::apply`] and [`Engine::tick`] and publish
//! the returned [`Output`]s themselves. Statistics types live in [`crate::stats`].
//!
//! Invariant kept after every `apply` / `tick`: no waiting call has a free agent eligible
//! for it. Each change therefore only needs a local search — a call that became waiting
//! (or more eligible through relaxation / queue delays / overflow) looks for the best free
//! agent; an agent that became free looks for the best waiting call.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use patchbay_protocol::payload::{
    AgentMissed, AgentProfile, AgentState, AgentStateChanged, CallClosed, CallHangup, CallIncoming,
    CallRouted, CallUpdate, Channel, OfferAnswer, SetAgentState, SkillRequirement, WrapupDone,
};
use patchbay_protocol::{AgentEvent, CallEvent};
use serde::{Deserialize, Serialize};

use crate::stats::{AgentsByState, QueueCounters, QueueStats};

/// Result alias of the engine.
pub type Result<T> = std::result::Result<T, EngineError>;

/// How the engine picks among several free agents eligible for one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentSelection {
    /// The agent idle longest (idle since the end of wrap-up, or since becoming
    /// available); on multichannel work, the least loaded first. Proficiency only matters
    /// through the call's requirements and their relaxation.
    #[default]
    LongestIdle,
    /// The agent with the highest summed proficiency on the call's current required
    /// skills; longest idle breaks ties. Costs a scan of the queue's free agents.
    MostProficient,
}

/// Engine settings (loaded from TOML by the adapter and by scenarios).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// How long an agent has to accept an offer before it times out (0: never).
    pub offer_timeout_ms: u64,
    /// Wrap-up (after-call work) after each conversation, one timer per agent (0: none).
    pub wrap_up_ms: u64,
    /// The aging rule: one priority step is worth this many seconds of waiting (a call
    /// of priority `p` is ordered as if it had been queued `p × aging` seconds earlier).
    /// 0 disables aging: strict priority, then FIFO.
    pub aging_secs_per_priority: u64,
    /// Service-level threshold T (answered within T seconds).
    pub service_level_threshold_secs: u64,
    /// Selection among eligible free agents.
    pub selection: AgentSelection,
    /// What-if switch: keep every call at its initial requirements, ignoring
    /// `CallRouted.relaxation`. Only for simulations that measure what relaxation buys.
    pub ignore_relaxation: bool,
    /// How long a finished call is remembered so redelivered inputs about it are ignored.
    pub finished_call_retention_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            offer_timeout_ms: 15_000,
            wrap_up_ms: 30_000,
            aging_secs_per_priority: 60,
            service_level_threshold_secs: 20,
            selection: AgentSelection::LongestIdle,
            ignore_relaxation: false,
            finished_call_retention_ms: 3_600_000,
        }
    }
}

/// One input to the engine: the payload of a consumed event or command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Input {
    /// `cc.v1.calls.<call>.routed`: queue the call.
    Routed(CallRouted),
    /// `cc.v1.calls.<call>.hangup`: the caller hung up (abandon or end).
    Hangup(CallHangup),
    /// `cc.v1.agents.<agent>.cmd.state`: log in / break / log out.
    SetState(SetAgentState),
    /// `cc.v1.agents.<agent>.cmd.accept`.
    Accept(OfferAnswer),
    /// `cc.v1.agents.<agent>.cmd.reject`.
    Reject(OfferAnswer),
    /// `cc.v1.agents.<agent>.cmd.wrapup-done`.
    WrapupDone(WrapupDone),
}

/// One event the engine produced; the adapter publishes each on its subject.
///
/// Serialisable so that a persisted state can carry the outputs it decided and that may
/// not be published yet (the adapter's outbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Output {
    /// `cc.v1.calls.<call>.<event>`.
    Call {
        /// Which call event (queued, offered, assigned, abandoned, overflowed, ended).
        #[serde(with = "call_event_token")]
        event: CallEvent,
        /// The data.
        update: CallUpdate,
    },
    /// `cc.v1.agents.<agent>.evt.state-changed`.
    AgentState(AgentStateChanged),
    /// `cc.v1.agents.<agent>.evt.missed`.
    AgentMissed(AgentMissed),
}

/// A [`CallEvent`] as its subject token (`offered`, `assigned`, …).
mod call_event_token {
    use patchbay_protocol::CallEvent;
    use serde::de::Error as _;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(event: &CallEvent, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(event.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CallEvent, D::Error> {
        let token = String::deserialize(d)?;
        CallEvent::ALL
            .into_iter()
            .find(|e| e.as_str() == token)
            .ok_or_else(|| D::Error::custom(format!("unknown call event {token:?}")))
    }
}

/// The aggregate an output is about (its subject token and sequence space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate<'a> {
    /// A call id.
    Call(&'a str),
    /// An agent id.
    Agent(&'a str),
}

impl Output {
    /// A deterministic id (`call-<call>-<seq>` / `agent-<agent>-<seq>`), used as CloudEvent
    /// id and `Nats-Msg-Id`, so a re-publish after a crash is de-duplicated.
    #[must_use]
    pub fn id(&self) -> String {
        match self.aggregate() {
            Aggregate::Call(call) => format!("call-{call}-{}", self.seq()),
            Aggregate::Agent(agent) => format!("agent-{agent}-{}", self.seq()),
        }
    }

    /// The CloudEvent type (the `TYPE` constants of `patchbay_protocol::payload`).
    #[must_use]
    pub fn type_(&self) -> &'static str {
        match self {
            Self::Call { event, .. } => match event {
                CallEvent::Offered => CallUpdate::OFFERED,
                CallEvent::Assigned => CallUpdate::ASSIGNED,
                CallEvent::Abandoned => CallUpdate::ABANDONED,
                CallEvent::Overflowed => CallUpdate::OVERFLOWED,
                CallEvent::Ended => CallUpdate::ENDED,
                CallEvent::Queued => CallUpdate::QUEUED,
                // Not emitted by this engine; mapped for completeness.
                CallEvent::Incoming => CallIncoming::TYPE,
                CallEvent::Hangup => CallHangup::TYPE,
                CallEvent::Routed => CallRouted::TYPE,
                CallEvent::Closed => CallClosed::TYPE,
            },
            Self::AgentState(_) => AgentStateChanged::TYPE,
            Self::AgentMissed(_) => AgentMissed::TYPE,
        }
    }

    /// The aggregate (call or agent) this output is about.
    #[must_use]
    pub fn aggregate(&self) -> Aggregate<'_> {
        match self {
            Self::Call { update, .. } => Aggregate::Call(&update.call_id),
            Self::AgentState(e) => Aggregate::Agent(&e.agent_id),
            Self::AgentMissed(e) => Aggregate::Agent(&e.agent_id),
        }
    }

    /// The per-aggregate sequence number.
    #[must_use]
    pub fn seq(&self) -> u64 {
        match self {
            Self::Call { update, .. } => update.seq,
            Self::AgentState(e) => e.seq,
            Self::AgentMissed(e) => e.seq,
        }
    }

    /// The call event, for call outputs.
    #[must_use]
    pub fn call_event(&self) -> Option<CallEvent> {
        match self {
            Self::Call { event, .. } => Some(*event),
            _ => None,
        }
    }

    /// The agent event, for agent outputs.
    #[must_use]
    pub fn agent_event(&self) -> Option<AgentEvent> {
        match self {
            Self::Call { .. } => None,
            Self::AgentState(_) => Some(AgentEvent::StateChanged),
            Self::AgentMissed(_) => Some(AgentEvent::Missed),
        }
    }

    /// The CloudEvent data (JSON).
    ///
    /// # Errors
    /// Only if serde_json fails, which the payload types do not provoke.
    pub fn data_json(&self) -> serde_json::Result<Vec<u8>> {
        match self {
            Self::Call { update, .. } => serde_json::to_vec(update),
            Self::AgentState(e) => serde_json::to_vec(e),
            Self::AgentMissed(e) => serde_json::to_vec(e),
        }
    }
}

/// Why an input changed nothing (redelivery, races): not an error, just nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// `routed` for a call the engine already knows (queued, handled or finished).
    DuplicateCall,
    /// The call already ended or was abandoned.
    CallFinished,
    /// A hangup for a call the engine never queued (e.g. closed treatment).
    UnknownCall,
    /// A second accept (or a reject after accept) of an assigned call.
    AlreadyAccepted,
    /// An answer to an offer that already timed out or was rejected by this agent.
    OfferExpired,
    /// The agent is already in the requested state.
    NoChange,
    /// `wrapup-done` while not in wrap-up.
    NotInWrapUp,
}

/// What one [`Engine::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events to publish, in order (timers that were due at `now_ms` fire first).
    pub outputs: Vec<Output>,
    /// Set when the input itself changed nothing.
    pub ignored: Option<Ignored>,
}

/// A genuinely invalid command or event (the input changed nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A command from an agent that never logged in.
    #[error("agent {agent:?} is unknown (never logged in)")]
    UnknownAgent {
        /// The agent id.
        agent: String,
    },
    /// The first log-in must carry a profile (skills, queues, capacity).
    #[error("agent {agent:?} must send a profile when logging in for the first time")]
    ProfileRequired {
        /// The agent id.
        agent: String,
    },
    /// Agents may request available, break or offline only.
    #[error("agent {agent:?} cannot request state {state:?}: the engine owns it")]
    EngineOwnedState {
        /// The agent id.
        agent: String,
        /// The requested state.
        state: &'static str,
    },
    /// An answer about a call the engine does not know.
    #[error("agent {agent:?} answered unknown call {call:?}")]
    UnknownCall {
        /// The agent id.
        agent: String,
        /// The call id.
        call: String,
    },
    /// An answer from an agent that never held the offer.
    #[error("agent {agent:?} holds no offer of call {call:?}")]
    NotOffered {
        /// The agent id.
        agent: String,
        /// The call id.
        call: String,
    },
    /// A routed call without id or queue.
    #[error("routed call {call:?} is invalid: {reason}")]
    InvalidCall {
        /// The call id.
        call: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The serialisable state of an engine (see [`Engine::snapshot`]). Indexes and timers
/// are derived from it on [`Engine::restore`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Format version, bumped on incompatible changes.
    pub format: u32,
    agents: Vec<AgentRecord>,
    calls: Vec<CallRecord>,
    finished: Vec<FinishedCall>,
    counters: BTreeMap<String, QueueCounters>,
    clock_ms: u64,
}

impl Snapshot {
    /// The format this build writes.
    pub const FORMAT: u32 = 1;

    /// Calls waiting or being handled.
    #[must_use]
    pub fn active_calls(&self) -> usize {
        self.calls.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AgentRecord {
    id: String,
    profile: AgentProfile,
    /// What the agent asked for (available / break / offline) or not-responding after a
    /// miss; the published state is derived from it and the work in hand.
    presence: AgentState,
    /// Last per-agent sequence number used.
    seq: u64,
    /// When the agent last became idle (end of wrap-up, log-in): longest idle = smallest.
    idle_since_ms: u64,
    /// The call offered to the agent (at most one offer at a time).
    offer: Option<String>,
    /// Conversations in progress.
    active: BTreeMap<String, Channel>,
    /// The one wrap-up timer, shared across all the agent's queues.
    wrapup_until_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Offer {
    agent: String,
    expires_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum CallStatus {
    Waiting { offer: Option<Offer> },
    Assigned { agent: String, at_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CallRecord {
    routed: CallRouted,
    /// Last per-call sequence number used.
    seq: u64,
    /// The current queue.
    queue: String,
    /// When the call was first queued: metrics' wait and the queue order use it.
    enqueued_at_ms: u64,
    /// When the call entered its current queue: routing age (relaxation, queue delays).
    queue_entered_at_ms: u64,
    /// How many overflow targets were applied.
    overflows_done: usize,
    status: CallStatus,
    /// Agents that rejected it or let it time out (late answers from them are ignored).
    missed_by: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FinishedCall {
    call_id: String,
    at_ms: u64,
}

/// Queue order key: (aged rank, first enqueue time, call id) — smallest first.
type CallKey = (i128, u64, String);
/// Free-agent order key: (load on the channel, idle since, agent id) — smallest first.
/// The id is shared (`Arc`): an agent sits in up to queues × channels sets.
type AgentKey = (u32, u64, Arc<str>);
type ChannelSets = [BTreeSet<AgentKey>; 3];

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Agent(String),
    Call(String),
}

const CHANNELS: [Channel; 3] = [Channel::Voice, Channel::Chat, Channel::Email];

fn channel_index(channel: Channel) -> usize {
    match channel {
        Channel::Voice => 0,
        Channel::Chat => 1,
        Channel::Email => 2,
    }
}

fn secs(s: u64) -> u64 {
    s.saturating_mul(1000)
}

impl AgentRecord {
    fn state(&self) -> AgentState {
        if !self.active.is_empty() {
            AgentState::Busy
        } else if self.offer.is_some() {
            AgentState::Reserved
        } else if self.wrapup_until_ms.is_some() {
            AgentState::WrapUp
        } else {
            self.presence
        }
    }

    fn capacity(&self, channel: Channel) -> u32 {
        self.profile
            .capacity
            .get(&channel)
            .copied()
            .unwrap_or(match channel {
                Channel::Chat => 3,
                Channel::Voice | Channel::Email => 1,
            })
    }

    fn load(&self, channel: Channel) -> u32 {
        let n = self.active.values().filter(|c| **c == channel).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Whether a new offer on `channel` may go to this agent now. Voice is exclusive: no
    /// voice offer beside other work, no other work beside a voice call.
    fn free_for(&self, channel: Channel) -> bool {
        if self.presence != AgentState::Available
            || self.offer.is_some()
            || self.wrapup_until_ms.is_some()
            || self.load(channel) >= self.capacity(channel)
        {
            return false;
        }
        if channel == Channel::Voice {
            self.active.is_empty()
        } else {
            self.load(Channel::Voice) == 0
        }
    }

    /// `Some(delay_secs)` when the agent serves `queue`.
    fn membership(&self, queue: &str) -> Option<u64> {
        if self.profile.queues.is_empty() {
            return Some(0);
        }
        self.profile
            .queues
            .iter()
            .find(|m| m.queue == queue)
            .map(|m| m.delay_secs)
    }

    fn level(&self, skill: &str) -> u8 {
        self.profile
            .skills
            .iter()
            .find(|s| s.skill == skill)
            .map_or(0, |s| s.level)
    }

    fn meets(&self, requirements: &[SkillRequirement]) -> bool {
        requirements
            .iter()
            .all(|r| self.level(&r.skill) >= r.min_level)
    }

    fn score(&self, requirements: &[SkillRequirement]) -> u32 {
        requirements
            .iter()
            .map(|r| u32::from(self.level(&r.skill)))
            .sum()
    }
}

impl CallRecord {
    fn offer(&self) -> Option<&Offer> {
        match &self.status {
            CallStatus::Waiting { offer } => offer.as_ref(),
            CallStatus::Assigned { .. } => None,
        }
    }

    fn is_waiting_unoffered(&self) -> bool {
        matches!(self.status, CallStatus::Waiting { offer: None })
    }

    fn routing_age_ms(&self, now: u64) -> u64 {
        now.saturating_sub(self.queue_entered_at_ms)
    }

    /// The requirements in force at `now`: the last relaxation step whose routing age
    /// has been reached, else the initial ones.
    fn requirements(&self, now: u64, ignore_relaxation: bool) -> &[SkillRequirement] {
        if ignore_relaxation {
            return &self.routed.requirements;
        }
        let age = self.routing_age_ms(now);
        self.routed
            .relaxation
            .iter()
            .rev()
            .find(|step| secs(step.after_secs) <= age)
            .map_or(&self.routed.requirements, |step| &step.requirements)
    }
}

/// The assignment engine. See the crate documentation for the rules it applies.
#[derive(Debug, Clone)]
pub struct Engine {
    config: EngineConfig,
    agents: BTreeMap<String, AgentRecord>,
    calls: BTreeMap<String, CallRecord>,
    finished: BTreeMap<String, u64>,
    counters: BTreeMap<String, QueueCounters>,
    /// The latest `now_ms` seen: boundaries up to it are already in force.
    clock_ms: u64,

    // Everything below is derived from the fields above (rebuilt by `restore`).
    /// Per queue: waiting calls without an offer, in service order.
    waiting: BTreeMap<String, BTreeSet<CallKey>>,
    /// Per queue and channel: free agents serving the queue explicitly, idle order.
    free: BTreeMap<String, ChannelSets>,
    /// Per channel: free agents serving every queue (empty membership list).
    free_any: ChannelSets,
    /// Keys under which each agent is in `free` / `free_any`.
    indexed: BTreeMap<String, Vec<(Channel, AgentKey)>>,
    /// Per queue: how many agent memberships carry each delay (for delay timers).
    queue_delays: BTreeMap<String, BTreeMap<u64, u32>>,
    timers: BTreeSet<(u64, Timer)>,
    timer_due: BTreeMap<Timer, u64>,
    finished_order: BTreeSet<(u64, String)>,
    pending_calls: BTreeSet<CallKey>,
    pending_agents: BTreeSet<(u64, String)>,
}

impl Engine {
    /// An empty engine.
    #[must_use]
    pub fn new(config: EngineConfig) -> Self {
        Self {
            config,
            agents: BTreeMap::new(),
            calls: BTreeMap::new(),
            finished: BTreeMap::new(),
            counters: BTreeMap::new(),
            clock_ms: 0,
            waiting: BTreeMap::new(),
            free: BTreeMap::new(),
            free_any: Default::default(),
            indexed: BTreeMap::new(),
            queue_delays: BTreeMap::new(),
            timers: BTreeSet::new(),
            timer_due: BTreeMap::new(),
            finished_order: BTreeSet::new(),
            pending_calls: BTreeSet::new(),
            pending_agents: BTreeSet::new(),
        }
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Apply one input at `now_ms`. Timers due at `now_ms` fire first (their events come
    /// first in the outputs), then the input, then assignment.
    ///
    /// # Errors
    /// [`EngineError`] for a genuinely invalid input; the engine is then unchanged (due
    /// timers did not fire either). Redeliveries and races are `Ok` with
    /// [`Applied::ignored`] set.
    pub fn apply(&mut self, now_ms: u64, input: Input) -> Result<Applied> {
        self.check(&input)?;
        let now = now_ms;
        self.clock_ms = self.clock_ms.max(now);
        let mut out = Vec::new();
        self.fire_due(now, &mut out);
        let ignored = match input {
            Input::Routed(routed) => self.on_routed(now, routed, &mut out),
            Input::Hangup(hangup) => self.on_hangup(now, &hangup.call_id, &mut out),
            Input::SetState(cmd) => self.on_set_state(now, cmd, &mut out),
            Input::Accept(answer) => self.on_accept(now, &answer, &mut out),
            Input::Reject(answer) => self.on_reject(now, &answer, &mut out),
            Input::WrapupDone(cmd) => self.on_wrapup_done(now, &cmd.agent_id, &mut out),
        };
        self.assign(now, &mut out);
        self.prune(now);
        Ok(Applied {
            outputs: out,
            ignored,
        })
    }

    /// Fire everything due at `now_ms` (offer timeouts, wrap-up ends, overflow,
    /// relaxation, queue delays) and assign.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        self.clock_ms = self.clock_ms.max(now_ms);
        self.fire_due(now_ms, &mut out);
        self.assign(now_ms, &mut out);
        self.prune(now_ms);
        out
    }

    /// When [`Engine::tick`] must next be called (`None`: nothing pending).
    #[must_use]
    pub fn next_due(&self) -> Option<u64> {
        self.timers.first().map(|(due, _)| *due)
    }

    /// Real-time statistics per queue (every queue seen in a call or a membership).
    #[must_use]
    pub fn stats(&self, now_ms: u64) -> Vec<QueueStats> {
        let mut queues: BTreeMap<&str, QueueStats> = BTreeMap::new();
        let threshold = self.config.service_level_threshold_secs;
        let mut names: BTreeSet<&str> = self.counters.keys().map(String::as_str).collect();
        names.extend(self.calls.values().map(|c| c.queue.as_str()));
        for agent in self.agents.values() {
            names.extend(agent.profile.queues.iter().map(|m| m.queue.as_str()));
        }
        for name in &names {
            queues.insert(name, QueueStats::empty(name, threshold));
        }
        for call in self.calls.values() {
            if let (Some(s), CallStatus::Waiting { .. }) =
                (queues.get_mut(call.queue.as_str()), &call.status)
            {
                s.waiting += 1;
                s.longest_wait_ms = s
                    .longest_wait_ms
                    .max(now_ms.saturating_sub(call.enqueued_at_ms));
            }
        }
        for agent in self.agents.values() {
            let state = agent.state();
            if agent.profile.queues.is_empty() {
                for s in queues.values_mut() {
                    s.agents.add(state);
                }
            } else {
                for m in &agent.profile.queues {
                    if let Some(s) = queues.get_mut(m.queue.as_str()) {
                        s.agents.add(state);
                    }
                }
            }
        }
        queues
            .into_values()
            .map(|mut s| {
                if let Some(c) = self.counters.get(&s.queue) {
                    s.set_counters(*c);
                }
                s.occupancy = s.agents.occupancy();
                s
            })
            .collect()
    }

    /// Agents by state over the whole centre.
    #[must_use]
    pub fn agents_by_state(&self) -> AgentsByState {
        let mut by = AgentsByState::default();
        for agent in self.agents.values() {
            by.add(agent.state());
        }
        by
    }

    /// The state of one agent, if known.
    #[must_use]
    pub fn agent_state(&self, agent: &str) -> Option<AgentState> {
        self.agents.get(agent).map(AgentRecord::state)
    }

    /// Cumulative counters summed over all queues.
    #[must_use]
    pub fn total_counters(&self) -> QueueCounters {
        let mut total = QueueCounters::default();
        for c in self.counters.values() {
            total.merge(c);
        }
        total
    }

    /// Zero the cumulative counters (a new statistics interval; used by simulations to
    /// drop their warm-up). Live figures (waiting, agents) are unaffected.
    pub fn reset_counters(&mut self) {
        self.counters.clear();
    }

    /// Calls queued or in progress.
    #[must_use]
    pub fn active_calls(&self) -> usize {
        self.calls.len()
    }

    /// The whole state, to persist (e.g. in the `cc-agents` KV bucket).
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            format: Snapshot::FORMAT,
            agents: self.agents.values().cloned().collect(),
            calls: self.calls.values().cloned().collect(),
            finished: self
                .finished
                .iter()
                .map(|(call_id, at_ms)| FinishedCall {
                    call_id: call_id.clone(),
                    at_ms: *at_ms,
                })
                .collect(),
            counters: self.counters.clone(),
            clock_ms: self.clock_ms,
        }
    }

    /// Rebuild an engine from a snapshot: queued calls, offers with their deadlines,
    /// wrap-up deadlines and counters are all kept; indexes and timers are derived.
    #[must_use]
    pub fn restore(config: EngineConfig, snapshot: Snapshot) -> Self {
        let mut engine = Self::new(config);
        for agent in snapshot.agents {
            engine.agents.insert(agent.id.clone(), agent);
        }
        for call in snapshot.calls {
            engine.calls.insert(call.routed.call_id.clone(), call);
        }
        for f in snapshot.finished {
            engine.finished_order.insert((f.at_ms, f.call_id.clone()));
            engine.finished.insert(f.call_id, f.at_ms);
        }
        engine.counters = snapshot.counters;
        engine.clock_ms = snapshot.clock_ms;
        let agent_ids: Vec<String> = engine.agents.keys().cloned().collect();
        for id in &agent_ids {
            engine.register_delays(id, true);
            engine.index_agent(id);
            let due = engine.agents.get(id).and_then(|a| a.wrapup_until_ms);
            engine.set_timer(Timer::Agent(id.clone()), due);
        }
        let call_ids: Vec<String> = engine.calls.keys().cloned().collect();
        for id in &call_ids {
            engine.insert_waiting(id);
            engine.reschedule_call(id);
        }
        // The snapshot was taken between inputs, when nothing could be matched; the
        // pending marks from indexing are therefore spurious, but harmless to keep clear.
        engine.pending_agents.clear();
        engine.pending_calls.clear();
        engine
    }

    // ---- validation -------------------------------------------------------------------

    /// Errors that do not depend on timers, checked before anything changes.
    fn check(&self, input: &Input) -> Result<()> {
        match input {
            Input::Routed(r) => {
                if r.call_id.is_empty() {
                    return Err(EngineError::InvalidCall {
                        call: r.call_id.clone(),
                        reason: "empty call id",
                    });
                }
                if r.queue.is_empty() {
                    return Err(EngineError::InvalidCall {
                        call: r.call_id.clone(),
                        reason: "empty queue",
                    });
                }
            }
            Input::Hangup(_) => {}
            Input::SetState(cmd) => {
                match cmd.state {
                    AgentState::Available | AgentState::Break | AgentState::Offline => {}
                    other => {
                        return Err(EngineError::EngineOwnedState {
                            agent: cmd.agent_id.clone(),
                            state: other.as_str(),
                        });
                    }
                }
                if !self.agents.contains_key(&cmd.agent_id)
                    && cmd.state != AgentState::Offline
                    && cmd.profile.is_none()
                {
                    return Err(EngineError::ProfileRequired {
                        agent: cmd.agent_id.clone(),
                    });
                }
            }
            Input::Accept(a) | Input::Reject(a) => {
                if !self.agents.contains_key(&a.agent_id) {
                    return Err(EngineError::UnknownAgent {
                        agent: a.agent_id.clone(),
                    });
                }
                if self.finished.contains_key(&a.call_id) {
                    return Ok(());
                }
                let Some(call) = self.calls.get(&a.call_id) else {
                    return Err(EngineError::UnknownCall {
                        agent: a.agent_id.clone(),
                        call: a.call_id.clone(),
                    });
                };
                let holds = match &call.status {
                    CallStatus::Assigned { agent, .. } => *agent == a.agent_id,
                    CallStatus::Waiting { offer } => {
                        offer.as_ref().is_some_and(|o| o.agent == a.agent_id)
                    }
                };
                if !holds && !call.missed_by.contains(&a.agent_id) {
                    return Err(EngineError::NotOffered {
                        agent: a.agent_id.clone(),
                        call: a.call_id.clone(),
                    });
                }
            }
            Input::WrapupDone(cmd) => {
                if !self.agents.contains_key(&cmd.agent_id) {
                    return Err(EngineError::UnknownAgent {
                        agent: cmd.agent_id.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    // ---- inputs -----------------------------------------------------------------------

    fn on_routed(
        &mut self,
        now: u64,
        routed: CallRouted,
        out: &mut Vec<Output>,
    ) -> Option<Ignored> {
        if self.calls.contains_key(&routed.call_id) || self.finished.contains_key(&routed.call_id) {
            return Some(Ignored::DuplicateCall);
        }
        let id = routed.call_id.clone();
        let call = CallRecord {
            seq: routed.seq,
            queue: routed.queue.clone(),
            enqueued_at_ms: now,
            queue_entered_at_ms: now,
            overflows_done: 0,
            status: CallStatus::Waiting { offer: None },
            missed_by: Vec::new(),
            routed,
        };
        self.counters_mut(&call.queue).entered += 1;
        self.calls.insert(id.clone(), call);
        self.emit_call(now, &id, CallEvent::Queued, None, None, out);
        self.insert_waiting(&id);
        self.refresh_call(now, &id, out);
        None
    }

    fn on_hangup(&mut self, now: u64, call_id: &str, out: &mut Vec<Output>) -> Option<Ignored> {
        if self.finished.contains_key(call_id) {
            return Some(Ignored::CallFinished);
        }
        let Some(call) = self.calls.get(call_id) else {
            return Some(Ignored::UnknownCall);
        };
        match call.status.clone() {
            CallStatus::Waiting { offer } => {
                let waited = now.saturating_sub(call.enqueued_at_ms);
                let short = waited <= secs(self.config.service_level_threshold_secs);
                let queue = call.queue.clone();
                if let Some(offer) = offer {
                    // The caller left while an agent was being offered the call: the
                    // reservation ends at once; the agent keeps its place in idle order.
                    self.with_agent(
                        now,
                        &offer.agent,
                        "offer-cancelled",
                        Some(call_id),
                        out,
                        |a| {
                            a.offer = None;
                        },
                    );
                } else {
                    self.remove_waiting(call_id);
                }
                let c = self.counters_mut(&queue);
                c.abandoned += 1;
                if short {
                    c.abandoned_within_threshold += 1;
                }
                self.emit_call(now, call_id, CallEvent::Abandoned, None, None, out);
            }
            CallStatus::Assigned { agent, .. } => {
                self.emit_call(
                    now,
                    call_id,
                    CallEvent::Ended,
                    Some(agent.clone()),
                    None,
                    out,
                );
                let wrap = self.config.wrap_up_ms;
                self.with_agent(now, &agent, "call-ended", Some(call_id), out, |a| {
                    a.active.remove(call_id);
                    if wrap > 0 && a.presence != AgentState::Offline {
                        // One timer per agent: a later end restarts it.
                        a.wrapup_until_ms = Some(now + wrap);
                    } else if a.active.is_empty() {
                        a.idle_since_ms = now;
                    }
                });
            }
        }
        self.finish_call(now, call_id);
        None
    }

    fn on_set_state(
        &mut self,
        now: u64,
        cmd: SetAgentState,
        out: &mut Vec<Output>,
    ) -> Option<Ignored> {
        let id = cmd.agent_id;
        let mut profile_changed = false;
        if !self.agents.contains_key(&id) {
            let Some(profile) = cmd.profile else {
                // An unknown agent logging out: nothing to do.
                return Some(Ignored::NoChange);
            };
            self.agents.insert(
                id.clone(),
                AgentRecord {
                    id: id.clone(),
                    profile,
                    presence: AgentState::Offline,
                    seq: 0,
                    idle_since_ms: now,
                    offer: None,
                    active: BTreeMap::new(),
                    wrapup_until_ms: None,
                },
            );
            self.register_delays(&id, true);
            profile_changed = true;
        } else if let Some(profile) = cmd.profile
            && self.agents.get(&id).is_some_and(|a| a.profile != profile)
        {
            self.unindex_agent(&id);
            self.register_delays(&id, false);
            if let Some(a) = self.agents.get_mut(&id) {
                a.profile = profile;
            }
            self.register_delays(&id, true);
            self.index_agent(&id);
            profile_changed = true;
        }
        let Some(agent) = self.agents.get(&id) else {
            return Some(Ignored::NoChange);
        };
        if agent.presence == cmd.state {
            return (!profile_changed).then_some(Ignored::NoChange);
        }
        let cancelled = if cmd.state == AgentState::Available {
            None
        } else {
            agent.offer.clone()
        };
        let target = cmd.state;
        self.with_agent(now, &id, "command", None, out, |a| {
            let was_idle_capable = a.presence == AgentState::Available;
            a.presence = target;
            match target {
                AgentState::Offline => {
                    a.offer = None;
                    a.wrapup_until_ms = None;
                }
                AgentState::Break => a.offer = None,
                _ => {
                    if !was_idle_capable && a.active.is_empty() && a.wrapup_until_ms.is_none() {
                        a.idle_since_ms = now;
                    }
                }
            }
        });
        if let Some(call) = cancelled {
            // Logging out / going on break cancels the reservation at once; this is
            // not a miss, so the call just goes back to its place in the queue.
            self.requeue(now, &call, out);
        }
        None
    }

    fn on_accept(
        &mut self,
        now: u64,
        answer: &OfferAnswer,
        out: &mut Vec<Output>,
    ) -> Option<Ignored> {
        let (agent_id, call_id) = (&answer.agent_id, &answer.call_id);
        if self.finished.contains_key(call_id) {
            return Some(Ignored::CallFinished);
        }
        let Some(call) = self.calls.get_mut(call_id) else {
            return Some(Ignored::CallFinished);
        };
        match &call.status {
            CallStatus::Assigned { .. } => return Some(Ignored::AlreadyAccepted),
            CallStatus::Waiting { offer: Some(o) } if o.agent == *agent_id => {}
            CallStatus::Waiting { .. } => return Some(Ignored::OfferExpired),
        }
        call.status = CallStatus::Assigned {
            agent: agent_id.clone(),
            at_ms: now,
        };
        let channel = call.routed.channel;
        let waited = now.saturating_sub(call.enqueued_at_ms);
        let queue = call.queue.clone();
        let threshold = secs(self.config.service_level_threshold_secs);
        let c = self.counters_mut(&queue);
        c.answered += 1;
        c.answer_wait_ms_total += waited;
        if waited <= threshold {
            c.answered_within_threshold += 1;
        }
        self.set_timer(Timer::Call(call_id.clone()), None);
        self.emit_call(
            now,
            call_id,
            CallEvent::Assigned,
            Some(agent_id.clone()),
            None,
            out,
        );
        self.with_agent(now, agent_id, "accepted", Some(call_id), out, |a| {
            a.offer = None;
            a.active.insert(call_id.clone(), channel);
        });
        None
    }

    fn on_reject(
        &mut self,
        now: u64,
        answer: &OfferAnswer,
        out: &mut Vec<Output>,
    ) -> Option<Ignored> {
        let (agent_id, call_id) = (&answer.agent_id, &answer.call_id);
        if self.finished.contains_key(call_id) {
            return Some(Ignored::CallFinished);
        }
        let Some(call) = self.calls.get(call_id) else {
            return Some(Ignored::CallFinished);
        };
        match &call.status {
            CallStatus::Assigned { .. } => Some(Ignored::AlreadyAccepted),
            CallStatus::Waiting { offer: Some(o) } if o.agent == *agent_id => {
                self.miss(now, call_id, agent_id, "rejected", out);
                None
            }
            CallStatus::Waiting { .. } => Some(Ignored::OfferExpired),
        }
    }

    fn on_wrapup_done(
        &mut self,
        now: u64,
        agent_id: &str,
        out: &mut Vec<Output>,
    ) -> Option<Ignored> {
        if self
            .agents
            .get(agent_id)
            .is_none_or(|a| a.wrapup_until_ms.is_none())
        {
            return Some(Ignored::NotInWrapUp);
        }
        self.end_wrapup(now, agent_id, "wrap-up-done", out);
        None
    }

    // ---- transitions ------------------------------------------------------------------

    /// The agent rejected the offer or let it time out: not-responding + missed, and the
    /// call goes back to its place (original enqueue time) to be offered to someone else.
    fn miss(
        &mut self,
        now: u64,
        call_id: &str,
        agent_id: &str,
        reason: &str,
        out: &mut Vec<Output>,
    ) {
        if let Some(call) = self.calls.get_mut(call_id) {
            call.missed_by.push(agent_id.to_string());
        }
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.seq += 1;
            out.push(Output::AgentMissed(AgentMissed {
                agent_id: agent_id.to_string(),
                seq: agent.seq,
                call_id: call_id.to_string(),
                reason: reason.to_string(),
                at_ms: now,
            }));
        }
        self.with_agent(now, agent_id, "missed", Some(call_id), out, |a| {
            a.offer = None;
            a.presence = AgentState::NotResponding;
        });
        self.requeue(now, call_id, out);
    }

    /// Put an offered call back in its queue, at its original place.
    fn requeue(&mut self, now: u64, call_id: &str, out: &mut Vec<Output>) {
        let Some(call) = self.calls.get_mut(call_id) else {
            return;
        };
        call.status = CallStatus::Waiting { offer: None };
        self.insert_waiting(call_id);
        self.refresh_call(now, call_id, out);
    }

    fn end_wrapup(&mut self, now: u64, agent_id: &str, reason: &str, out: &mut Vec<Output>) {
        self.with_agent(now, agent_id, reason, None, out, |a| {
            a.wrapup_until_ms = None;
            // Idle time counts from the end of wrap-up.
            a.idle_since_ms = now;
        });
    }

    /// Apply due overflows, mark the call for assignment and set its timer.
    fn refresh_call(&mut self, now: u64, call_id: &str, out: &mut Vec<Output>) {
        loop {
            let Some(call) = self.calls.get(call_id) else {
                return;
            };
            if !call.is_waiting_unoffered() {
                break;
            }
            let Some(target) = call.routed.overflow.get(call.overflows_done) else {
                break;
            };
            if call.enqueued_at_ms + secs(target.after_secs) > now {
                break;
            }
            let to = target.queue.clone();
            let from = call.queue.clone();
            if to == from {
                if let Some(call) = self.calls.get_mut(call_id) {
                    call.overflows_done += 1;
                }
                continue;
            }
            self.remove_waiting(call_id);
            if let Some(call) = self.calls.get_mut(call_id) {
                call.overflows_done += 1;
                call.queue = to.clone();
                // Routing age restarts in the new queue; the enqueue time stays.
                call.queue_entered_at_ms = now;
            }
            self.counters_mut(&from).overflowed_out += 1;
            self.counters_mut(&to).entered += 1;
            self.insert_waiting(call_id);
            self.emit_call(now, call_id, CallEvent::Overflowed, None, Some(from), out);
        }
        if let Some(call) = self.calls.get(call_id)
            && call.is_waiting_unoffered()
        {
            let key = self.call_key(call);
            self.pending_calls.insert(key);
        }
        self.reschedule_call(call_id);
    }

    fn reschedule_call(&mut self, call_id: &str) {
        let floor = self.clock_ms;
        let due = self
            .calls
            .get(call_id)
            .and_then(|c| self.call_due(c, floor));
        self.set_timer(Timer::Call(call_id.to_string()), due);
    }

    /// When the call next needs attention: offer expiry, or the next overflow,
    /// relaxation step or queue-delay boundary.
    /// `floor` is the latest time already handled: boundaries up to it are in force.
    fn call_due(&self, call: &CallRecord, floor: u64) -> Option<u64> {
        match &call.status {
            CallStatus::Assigned { .. } => None,
            CallStatus::Waiting { offer: Some(o) } => o.expires_ms,
            CallStatus::Waiting { offer: None } => {
                let entered = call.queue_entered_at_ms;
                let overflow = call
                    .routed
                    .overflow
                    .get(call.overflows_done)
                    .map(|o| call.enqueued_at_ms + secs(o.after_secs));
                let relax = if self.config.ignore_relaxation {
                    None
                } else {
                    call.routed
                        .relaxation
                        .iter()
                        .map(|s| entered + secs(s.after_secs))
                        .find(|t| *t > floor)
                };
                let delay = self.queue_delays.get(&call.queue).and_then(|delays| {
                    delays
                        .keys()
                        .map(|d| entered + secs(*d))
                        .find(|t| *t > floor)
                });
                [overflow, relax, delay].into_iter().flatten().min()
            }
        }
    }

    fn finish_call(&mut self, now: u64, call_id: &str) {
        self.set_timer(Timer::Call(call_id.to_string()), None);
        self.calls.remove(call_id);
        self.finished.insert(call_id.to_string(), now);
        self.finished_order.insert((now, call_id.to_string()));
    }

    fn prune(&mut self, now: u64) {
        let keep = self.config.finished_call_retention_ms;
        while let Some((at, _)) = self.finished_order.first() {
            if at.saturating_add(keep) > now {
                break;
            }
            if let Some((_, id)) = self.finished_order.pop_first() {
                self.finished.remove(&id);
            }
        }
    }

    // ---- timers -----------------------------------------------------------------------

    fn set_timer(&mut self, timer: Timer, due: Option<u64>) {
        if let Some(old) = self.timer_due.remove(&timer) {
            self.timers.remove(&(old, timer.clone()));
        }
        if let Some(due) = due {
            self.timers.insert((due, timer.clone()));
            self.timer_due.insert(timer, due);
        }
    }

    fn fire_due(&mut self, now: u64, out: &mut Vec<Output>) {
        while let Some((due, _)) = self.timers.first() {
            if *due > now {
                break;
            }
            let Some((_, timer)) = self.timers.pop_first() else {
                break;
            };
            self.timer_due.remove(&timer);
            match timer {
                Timer::Agent(id) => {
                    if self
                        .agents
                        .get(&id)
                        .and_then(|a| a.wrapup_until_ms)
                        .is_some_and(|t| t <= now)
                    {
                        self.end_wrapup(now, &id, "wrap-up-timeout", out);
                    }
                }
                Timer::Call(id) => {
                    let expired =
                        self.calls.get(&id).and_then(|c| c.offer()).and_then(|o| {
                            o.expires_ms.filter(|t| *t <= now).map(|_| o.agent.clone())
                        });
                    if let Some(agent) = expired {
                        self.miss(now, &id, &agent, "timeout", out);
                    } else {
                        self.refresh_call(now, &id, out);
                    }
                }
            }
        }
    }

    // ---- assignment -------------------------------------------------------------------

    fn assign(&mut self, now: u64, out: &mut Vec<Output>) {
        loop {
            if let Some((_, agent)) = self.pending_agents.pop_first() {
                self.assign_agent(now, &agent, out);
            } else if let Some((_, _, call)) = self.pending_calls.pop_first() {
                self.assign_call(now, &call, out);
            } else {
                break;
            }
        }
    }

    fn eligible(&self, agent: &AgentRecord, call: &CallRecord, now: u64) -> bool {
        agent
            .membership(&call.queue)
            .is_some_and(|delay| call.routing_age_ms(now) >= secs(delay))
            && agent.meets(call.requirements(now, self.config.ignore_relaxation))
    }

    /// A call became assignable: offer it to the best free eligible agent, if any.
    fn assign_call(&mut self, now: u64, call_id: &str, out: &mut Vec<Output>) {
        let Some(call) = self.calls.get(call_id) else {
            return;
        };
        if !call.is_waiting_unoffered() {
            return;
        }
        let ch = channel_index(call.routed.channel);
        let sets = [
            self.free.get(&call.queue).map(|s| &s[ch]),
            Some(&self.free_any[ch]),
        ];
        let requirements = call.requirements(now, self.config.ignore_relaxation);
        let mut best: Option<(u32, &AgentKey)> = None;
        for set in sets.into_iter().flatten() {
            for key in set {
                let Some(agent) = self.agents.get(&*key.2) else {
                    continue;
                };
                if !self.eligible(agent, call, now) {
                    continue;
                }
                let score = match self.config.selection {
                    AgentSelection::LongestIdle => 0,
                    AgentSelection::MostProficient => agent.score(requirements),
                };
                let better = best.is_none_or(|(s, k)| score > s || (score == s && key < k));
                if better {
                    best = Some((score, key));
                }
                if self.config.selection == AgentSelection::LongestIdle {
                    // Sets are in idle order: the first eligible one is this set's best.
                    break;
                }
            }
        }
        if let Some((_, key)) = best {
            let agent = key.2.to_string();
            self.make_offer(now, call_id, &agent, out);
        }
    }

    /// An agent became free: offer it the best waiting call it is eligible for, taking
    /// its queues in membership priority order (1 first).
    fn assign_agent(&mut self, now: u64, agent_id: &str, out: &mut Vec<Output>) {
        let Some(agent) = self.agents.get(agent_id) else {
            return;
        };
        if agent.presence != AgentState::Available
            || agent.offer.is_some()
            || agent.wrapup_until_ms.is_some()
        {
            return;
        }
        let groups: Vec<Vec<&str>> = if agent.profile.queues.is_empty() {
            vec![self.waiting.keys().map(String::as_str).collect()]
        } else {
            let mut by_priority: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
            for m in &agent.profile.queues {
                by_priority.entry(m.priority).or_default().push(&m.queue);
            }
            by_priority.into_values().collect()
        };
        let mut chosen: Option<String> = None;
        for group in groups {
            let mut best: Option<&CallKey> = None;
            for queue in group {
                let Some(set) = self.waiting.get(queue) else {
                    continue;
                };
                for key in set {
                    let Some(call) = self.calls.get(&key.2) else {
                        continue;
                    };
                    if agent.free_for(call.routed.channel) && self.eligible(agent, call, now) {
                        if best.is_none_or(|b| key < b) {
                            best = Some(key);
                        }
                        break;
                    }
                }
            }
            if let Some(key) = best {
                chosen = Some(key.2.clone());
                break;
            }
        }
        if let Some(call) = chosen {
            self.make_offer(now, &call, agent_id, out);
        }
    }

    fn make_offer(&mut self, now: u64, call_id: &str, agent_id: &str, out: &mut Vec<Output>) {
        let timeout = self.config.offer_timeout_ms;
        let expires = (timeout > 0).then(|| now + timeout);
        self.remove_waiting(call_id);
        if let Some(call) = self.calls.get_mut(call_id) {
            call.status = CallStatus::Waiting {
                offer: Some(Offer {
                    agent: agent_id.to_string(),
                    expires_ms: expires,
                }),
            };
        }
        self.set_timer(Timer::Call(call_id.to_string()), expires);
        self.emit_call(
            now,
            call_id,
            CallEvent::Offered,
            Some(agent_id.to_string()),
            None,
            out,
        );
        let call = call_id.to_string();
        self.with_agent(now, agent_id, "offer", Some(call_id), out, |a| {
            a.offer = Some(call)
        });
    }

    // ---- indexes ----------------------------------------------------------------------

    fn call_key(&self, call: &CallRecord) -> CallKey {
        let priority = i128::from(call.routed.priority);
        let enqueued = i128::from(call.enqueued_at_ms);
        let aging_ms = i128::from(secs(self.config.aging_secs_per_priority));
        let rank = if aging_ms == 0 {
            // Strict priority: priority dominates, enqueue time breaks ties.
            -(priority << 64) + enqueued
        } else {
            // Aging: one priority step is worth `aging` of waiting.
            enqueued - priority * aging_ms
        };
        (rank, call.enqueued_at_ms, call.routed.call_id.clone())
    }

    fn insert_waiting(&mut self, call_id: &str) {
        let Some(call) = self.calls.get(call_id) else {
            return;
        };
        if !call.is_waiting_unoffered() {
            return;
        }
        let key = self.call_key(call);
        let queue = call.queue.clone();
        self.waiting.entry(queue).or_default().insert(key);
    }

    fn remove_waiting(&mut self, call_id: &str) {
        let Some(call) = self.calls.get(call_id) else {
            return;
        };
        let key = self.call_key(call);
        if let Some(set) = self.waiting.get_mut(&call.queue) {
            set.remove(&key);
            if set.is_empty() {
                self.waiting.remove(&call.queue);
            }
        }
    }

    fn index_agent(&mut self, agent_id: &str) {
        let Some(agent) = self.agents.get(agent_id) else {
            return;
        };
        let mut keys = Vec::new();
        let id: Arc<str> = Arc::from(agent.id.as_str());
        for channel in CHANNELS {
            if !agent.free_for(channel) {
                continue;
            }
            let key: AgentKey = (agent.load(channel), agent.idle_since_ms, id.clone());
            let ch = channel_index(channel);
            if agent.profile.queues.is_empty() {
                self.free_any[ch].insert(key.clone());
            } else {
                for m in &agent.profile.queues {
                    // Look up before `entry`: the queue name is cloned only once per queue.
                    if let Some(sets) = self.free.get_mut(&m.queue) {
                        sets[ch].insert(key.clone());
                    } else {
                        self.free.entry(m.queue.clone()).or_default()[ch].insert(key.clone());
                    }
                }
            }
            keys.push((channel, key));
        }
        if !keys.is_empty() {
            self.pending_agents
                .insert((agent.idle_since_ms, agent.id.clone()));
            self.indexed.insert(agent_id.to_string(), keys);
        }
    }

    fn unindex_agent(&mut self, agent_id: &str) {
        let Some(keys) = self.indexed.remove(agent_id) else {
            return;
        };
        let Some(agent) = self.agents.get(agent_id) else {
            return;
        };
        for (channel, key) in keys {
            let ch = channel_index(channel);
            if agent.profile.queues.is_empty() {
                self.free_any[ch].remove(&key);
            } else {
                for m in &agent.profile.queues {
                    if let Some(sets) = self.free.get_mut(&m.queue) {
                        sets[ch].remove(&key);
                    }
                }
            }
        }
    }

    /// Count (or uncount) the agent's queue delays; a new delay value re-arms the timers
    /// of the calls waiting in that queue so the boundary is not missed.
    fn register_delays(&mut self, agent_id: &str, add: bool) {
        let Some(agent) = self.agents.get(agent_id) else {
            return;
        };
        let mut new_boundaries = Vec::new();
        for m in &agent.profile.queues {
            if m.delay_secs == 0 {
                continue;
            }
            let delays = self.queue_delays.entry(m.queue.clone()).or_default();
            let count = delays.entry(m.delay_secs).or_insert(0);
            if add {
                *count += 1;
                if *count == 1 {
                    new_boundaries.push(m.queue.clone());
                }
            } else {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    delays.remove(&m.delay_secs);
                }
            }
        }
        for queue in new_boundaries {
            let ids: Vec<String> = self
                .waiting
                .get(&queue)
                .map(|s| s.iter().map(|k| k.2.clone()).collect())
                .unwrap_or_default();
            for id in ids {
                self.reschedule_call(&id);
            }
        }
    }

    // ---- events -----------------------------------------------------------------------

    /// Run `f` on the agent, keeping indexes, the wrap-up timer and the assignment marks
    /// in step, and emit a state change when the published state changed.
    fn with_agent(
        &mut self,
        now: u64,
        agent_id: &str,
        reason: &str,
        call: Option<&str>,
        out: &mut Vec<Output>,
        f: impl FnOnce(&mut AgentRecord),
    ) {
        self.unindex_agent(agent_id);
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        let before = agent.state();
        f(agent);
        let after = agent.state();
        if before != after {
            agent.seq += 1;
            out.push(Output::AgentState(AgentStateChanged {
                agent_id: agent_id.to_string(),
                seq: agent.seq,
                from: before,
                to: after,
                reason: reason.to_string(),
                call_id: call.map(str::to_string),
                at_ms: now,
            }));
        }
        let wrap = agent.wrapup_until_ms;
        self.set_timer(Timer::Agent(agent_id.to_string()), wrap);
        self.index_agent(agent_id);
    }

    fn emit_call(
        &mut self,
        now: u64,
        call_id: &str,
        event: CallEvent,
        agent: Option<String>,
        from_queue: Option<String>,
        out: &mut Vec<Output>,
    ) {
        let Some(call) = self.calls.get_mut(call_id) else {
            return;
        };
        call.seq += 1;
        let offer_expires_ms = match (&call.status, event) {
            (CallStatus::Waiting { offer: Some(o) }, CallEvent::Offered) => o.expires_ms,
            _ => None,
        };
        out.push(Output::Call {
            event,
            update: CallUpdate {
                call_id: call_id.to_string(),
                seq: call.seq,
                queue: call.queue.clone(),
                agent,
                from_queue,
                offer_expires_ms,
                enqueued_at_ms: call.enqueued_at_ms,
                at_ms: now,
            },
        });
    }

    fn counters_mut(&mut self, queue: &str) -> &mut QueueCounters {
        self.counters.entry(queue.to_string()).or_default()
    }
}

#[cfg(test)]
impl Engine {
    /// Check every structural invariant; used by the tests after every step.
    pub(crate) fn check_invariants(&self) -> std::result::Result<(), String> {
        let mut offered_to: BTreeMap<&str, &str> = BTreeMap::new();
        let mut in_queues: BTreeMap<&str, usize> = BTreeMap::new();
        for (queue, set) in &self.waiting {
            for key in set {
                *in_queues.entry(key.2.as_str()).or_default() += 1;
                let call = self
                    .calls
                    .get(&key.2)
                    .ok_or(format!("queued call {} unknown", key.2))?;
                if call.queue != *queue {
                    return Err(format!(
                        "call {} indexed in {queue} but is in {}",
                        key.2, call.queue
                    ));
                }
            }
        }
        for (id, call) in &self.calls {
            match &call.status {
                CallStatus::Waiting { offer: None } => {
                    if in_queues.get(id.as_str()) != Some(&1) {
                        return Err(format!(
                            "waiting call {id} is in {:?} queues",
                            in_queues.get(id.as_str())
                        ));
                    }
                }
                CallStatus::Waiting { offer: Some(o) } => {
                    if in_queues.contains_key(id.as_str()) {
                        return Err(format!("offered call {id} still queued"));
                    }
                    let agent = self.agents.get(&o.agent).ok_or("offer to unknown agent")?;
                    if agent.offer.as_deref() != Some(id.as_str()) {
                        return Err(format!(
                            "call {id} offered to {} who holds {:?}",
                            o.agent, agent.offer
                        ));
                    }
                    offered_to.insert(id, &o.agent);
                }
                CallStatus::Assigned { agent, .. } => {
                    let a = self.agents.get(agent).ok_or("assigned to unknown agent")?;
                    if !a.active.contains_key(id) {
                        return Err(format!("call {id} assigned to {agent} who lacks it"));
                    }
                }
            }
        }
        for (id, agent) in &self.agents {
            if let Some(call) = &agent.offer
                && offered_to.get(call.as_str()) != Some(&id.as_str())
            {
                return Err(format!(
                    "agent {id} holds offer {call} the call does not know"
                ));
            }
            for (call, channel) in &agent.active {
                match self.calls.get(call).map(|c| &c.status) {
                    Some(CallStatus::Assigned { agent: a, .. }) if a == id => {}
                    other => {
                        return Err(format!("agent {id} handles {call} but call is {other:?}"));
                    }
                }
                let used = agent.load(*channel)
                    + u32::from(
                        agent
                            .offer
                            .as_ref()
                            .and_then(|c| self.calls.get(c))
                            .is_some_and(|c| c.routed.channel == *channel),
                    );
                if used > agent.capacity(*channel) {
                    return Err(format!("agent {id} over capacity on {channel:?}"));
                }
            }
            let voice = agent.load(Channel::Voice);
            if voice > 0 && agent.active.len() > usize::try_from(voice).unwrap_or(0) {
                return Err(format!("agent {id} mixes voice with other work"));
            }
        }
        // Matched out: no waiting call has a free eligible agent.
        for (id, call) in &self.calls {
            if !call.is_waiting_unoffered() {
                continue;
            }
            for agent in self.agents.values() {
                if agent.free_for(call.routed.channel) && self.eligible(agent, call, self.clock_ms)
                {
                    return Err(format!(
                        "call {id} waits while {} is free and eligible",
                        agent.id
                    ));
                }
            }
        }
        // Every free agent is indexed, every indexed agent is free.
        for (id, agent) in &self.agents {
            let free = CHANNELS.iter().any(|c| agent.free_for(*c));
            if free != self.indexed.contains_key(id) {
                return Err(format!("agent {id} free={free} but indexed={}", !free));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
