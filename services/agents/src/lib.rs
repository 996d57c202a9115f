//! `patchbay-agents`: the agent-assignment core service of the contact centre.
//!
//! **Owns**: which agent gets which queued call, and when — agent states (offline,
//! available, reserved, busy, wrap-up, not-responding, break), queues, offers
//! (reservations) with timeouts, wrap-up, overflow, per-queue real-time statistics, and a
//! simulator plus Erlang C for planners. **Does not own**: where a call waits (routing
//! decides, in `patchbay-routing`, and sends `CallRouted`), telephony, or the bus — the
//! [`engine`] is plain Rust with an injected clock (`now_ms` on every call, it never reads
//! time), no I/O and no NATS; a thin [`adapter`] consumes the subjects of
//! `patchbay-protocol` ([`input`] decodes them), feeds [`engine::Input`]s, publishes
//! [`engine::Output`]s and persists [`engine::Snapshot`]s in the `cc-agents` KV bucket
//! ([`store`]) after applying every batch, before publishing its outputs or acknowledging
//! it, so a crash loses no queued call, reservation or wrap-up deadline and a restarted
//! engine never contradicts what the streams show — the order and what a crash at each
//! step does are documented in [`adapter`]. [`metrics`] lists what the service exports.
//!
//! # Queue order and the aging rule
//!
//! Within a queue, calls are served by *aged priority*, then by first enqueue time: a call
//! of priority `p` (higher first) is ordered as if it had been queued
//! `p × aging_secs_per_priority` seconds earlier. Equivalently, its effective priority
//! grows by one for every `aging_secs_per_priority` seconds it waits, so a low-priority
//! call waits at most `Δp × aging_secs_per_priority` behind calls of priority higher by
//! `Δp` that arrive after it — it cannot starve. The key is static (no re-sorting over
//! time). `aging_secs_per_priority = 0` means strict priority, then FIFO.
//!
//! Two clocks per call are kept apart: the **enqueue time** (when it was first queued)
//! drives queue order, overflow (task age) and every metric (wait, ASA, service level);
//! it survives re-offers and overflow. The **routing age** (time in the current queue)
//! drives relaxation steps and agents' queue delays, and restarts on overflow.
//!
//! # Agent selection
//!
//! An agent is *eligible* for a call when it serves the call's queue (its profile lists
//! the queue, or lists none = every queue) and the call's routing age has reached the
//! agent's `delay_secs` for that queue, and its skills meet the call's requirements in
//! force — the initial ones, or the last `CallRouted.relaxation` step reached (experts
//! first, then, as the call ages, less proficient agents). An agent is *free* for a
//! channel when it is available, holds no offer, is not in wrap-up and has capacity left
//! on that channel (voice 1, chat 3, email 1 unless the profile says otherwise; voice is
//! exclusive of other work).
//!
//! * A call that becomes assignable goes to the free eligible agent **idle longest**
//!   (least loaded first on multichannel work; idle time counts from the end of wrap-up,
//!   or from becoming available) — or, with `AgentSelection::MostProficient`, to the one
//!   with the highest proficiency on the required skills.
//! * An agent that becomes free takes the best call it is eligible for, looking at its
//!   queues by membership priority (1 first; a higher number only when lower ones have
//!   nothing eligible), and within that by queue order.
//!
//! Selection is indexed: per queue, an ordered set of waiting calls; per queue and
//! channel, an idle-ordered set of free agents (and one for agents serving every queue).
//! A decision scans the free agents of one queue (calls side) or the head of the waiting
//! calls of the agent's queues (agent side) — never all agents.
//!
//! # Offers, wrap-up, overflow
//!
//! An offer reserves the agent until accept, reject or timeout. Reject or timeout emits
//! `missed`, makes the agent not-responding (no more work until it sets itself available)
//! and offers the call to the next agent at its original place in the queue. A caller
//! hanging up, or the agent going offline or on break, cancels the reservation at once
//! (the agent keeps its idle position). After each conversation the agent's single
//! wrap-up timer (re)starts; `wrapup-done` ends it early. Overflow targets fire on task
//! age (`overflowed`, same enqueue time) — postponed while an offer is outstanding.
//!
//! # Idempotence
//!
//! Inputs are at-least-once. A redelivered input that is already reflected in the state
//! — a duplicate `routed`, a second accept, a hangup of a finished call, a state the agent
//! is already in — changes nothing, emits nothing and returns
//! [`engine::Applied::ignored`] rather than an error. Finished calls are remembered for
//! `finished_call_retention_ms`. Every output carries a per-aggregate sequence number
//! (per call continuing from `CallRouted.seq + 1`, per agent from 1) and a deterministic id
//! ([`engine::Output::id`]) for JetStream de-duplication of re-publishes.
//!
//! # Statistics and service level
//!
//! See [`stats`]: waiting, longest wait, agents by state, service level by three formulas
//! (answered within T / offered; / answered; / (offered − abandoned within T), with
//! offered = answered + abandoned), ASA, abandon rate, occupancy. [`simulate`] drives the
//! real engine with a simulated clock and reports the same figures with confidence
//! intervals beside [`erlang`] C.

pub mod adapter;
pub mod batch;
pub mod engine;
pub mod erlang;
pub mod input;
pub mod metrics;
pub mod service;
pub mod simulate;
pub mod stats;
pub mod store;

pub use adapter::{AgentsConfig, run};

pub use engine::{
    AgentSelection, Aggregate, Applied, Engine, EngineConfig, EngineError, Ignored, Input, Output,
    Snapshot,
};
pub use stats::{AgentsByState, QueueCounters, QueueStats, ServiceLevel};
