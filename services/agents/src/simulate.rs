//! Simulation: the real [`Engine`] under a simulated clock, for planners and for replaying
//! recorded days.
//!
//! Owns the scenario format (TOML), the discrete-event driver, the statistics over
//! replications (mean and 95 % confidence interval, Student t) and the replay of a
//! recorded input log. It drives the engine only through its public API (`apply`,
//! `tick`, `next_due`, `stats`) — the same calls the NATS adapter makes — so what it
//! measures is the engine's real selection, not a model of it. It does not own the
//! formulas of [`crate::erlang`], which it prints beside its own figures.
//!
//! A scenario: Poisson arrivals at a rate per interval (piecewise constant), call types
//! (queue, priority, requirements, relaxation, overflow, channel) chosen by weight, handle
//! time and patience drawn from exponential, fixed or recorded distributions, agent groups
//! (skills, queues, capacity) with a head count per interval, the interval plan repeated
//! `cycles` times, `replications` independent runs from `seed`. Offered agents accept
//! after `answer_delay_secs`. Counters are reset after `warmup_secs` so the figures are
//! those of the steady state; calls still waiting at the end are not counted.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;
use std::io::BufRead;

use patchbay_protocol::CallEvent;
use patchbay_protocol::payload::{
    AgentProfile, AgentSkill, AgentState, CallHangup, CallRouted, Channel, OfferAnswer,
    OverflowTarget, QueueMembership, RelaxationStep, SetAgentState, SkillRequirement,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineConfig, EngineError, Input, Output};
use crate::erlang::ErlangC;
use crate::stats::{QueueCounters, QueueStats};

/// What can go wrong loading or running a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The scenario is not valid TOML for [`Scenario`].
    #[error("scenario is not valid: {0}")]
    Toml(#[from] toml::de::Error),
    /// The scenario parses but makes no sense.
    #[error("scenario is not valid: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
    /// The engine refused an input the simulator produced (a simulator or engine bug).
    #[error("engine refused a simulated input at {at_ms} ms")]
    Engine {
        /// Simulated time.
        at_ms: u64,
        /// The engine's error.
        source: EngineError,
    },
    /// A line of a recorded log is not a `{"at_ms":…, "input":…}` object.
    #[error("recorded log line {line} is invalid")]
    LogLine {
        /// 1-based line number.
        line: usize,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A recorded log line goes back in time.
    #[error("recorded log line {line} goes back in time ({at_ms} ms < {previous_ms} ms)")]
    LogOrder {
        /// 1-based line number.
        line: usize,
        /// Its time.
        at_ms: u64,
        /// The time of the line before.
        previous_ms: u64,
    },
    /// The recorded log could not be read.
    #[error("recorded log could not be read")]
    Io(#[from] std::io::Error),
}

/// A random duration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Distribution {
    /// Exponential with this mean.
    Exponential {
        /// Mean, seconds.
        mean_secs: f64,
    },
    /// Always this long.
    Fixed {
        /// Seconds.
        secs: f64,
    },
    /// Drawn uniformly (with replacement) from recorded values.
    Recorded {
        /// Recorded durations, seconds.
        secs: Vec<f64>,
    },
}

impl Distribution {
    /// The mean, seconds.
    #[must_use]
    pub fn mean_secs(&self) -> f64 {
        match self {
            Self::Exponential { mean_secs } => *mean_secs,
            Self::Fixed { secs } => *secs,
            Self::Recorded { secs } if !secs.is_empty() => {
                secs.iter().sum::<f64>() / secs.len() as f64
            }
            Self::Recorded { .. } => 0.0,
        }
    }

    fn sample_ms(&self, rng: &mut SmallRng) -> u64 {
        let secs = match self {
            Self::Exponential { mean_secs } => exponential(rng, *mean_secs),
            Self::Fixed { secs } => *secs,
            Self::Recorded { secs } if !secs.is_empty() => secs[rng.random_range(0..secs.len())],
            Self::Recorded { .. } => 0.0,
        };
        to_ms(secs)
    }

    fn validate(&self, what: &str) -> Result<(), SimError> {
        let ok = match self {
            Self::Exponential { mean_secs } => *mean_secs > 0.0 && mean_secs.is_finite(),
            Self::Fixed { secs } => *secs >= 0.0 && secs.is_finite(),
            Self::Recorded { secs } => {
                !secs.is_empty() && secs.iter().all(|s| *s >= 0.0 && s.is_finite())
            }
        };
        if ok {
            Ok(())
        } else {
            Err(SimError::Invalid {
                reason: format!("{what}: durations must be finite, non-negative and present"),
            })
        }
    }
}

fn exponential(rng: &mut SmallRng, mean: f64) -> f64 {
    // Inverse transform; 1 − U is in (0, 1], so the log is finite.
    let u: f64 = rng.random();
    -mean * (1.0 - u).ln()
}

fn to_ms(secs: f64) -> u64 {
    // Durations are validated finite and non-negative; `as` saturates anyway.
    (secs * 1000.0).round() as u64
}

/// A group of identical simulated agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentGroup {
    /// Group name; agents are `<name>-<n>`.
    pub name: String,
    /// Skills.
    #[serde(default)]
    pub skills: Vec<AgentSkill>,
    /// Queues served (empty: all).
    #[serde(default)]
    pub queues: Vec<QueueMembership>,
    /// Capacity per channel.
    #[serde(default)]
    pub capacity: BTreeMap<Channel, u32>,
}

/// A kind of call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallType {
    /// The queue routing sends it to.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Share of arrivals (relative to the other types).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Priority (higher first).
    #[serde(default)]
    pub priority: u32,
    /// Channel.
    #[serde(default)]
    pub channel: Channel,
    /// Required skills.
    #[serde(default)]
    pub requirements: Vec<SkillRequirement>,
    /// Relaxation steps.
    #[serde(default)]
    pub relaxation: Vec<RelaxationStep>,
    /// Overflow targets.
    #[serde(default)]
    pub overflow: Vec<OverflowTarget>,
    /// Handle time (talk + hold, from accept to hangup).
    pub handle: Distribution,
    /// How long a caller waits before hanging up (absent: never abandons).
    #[serde(default)]
    pub patience: Option<Distribution>,
}

fn default_queue() -> String {
    "default".to_string()
}

fn default_weight() -> f64 {
    1.0
}

/// Agents logged in during an interval: a count (for the only or first group) or a count
/// per group name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Staffing {
    /// Agents of the first group.
    Count(u32),
    /// Agents per group.
    ByGroup(BTreeMap<String, u32>),
}

/// One planning interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interval {
    /// Length, seconds.
    pub duration_secs: u64,
    /// Expected arrivals in the interval (Poisson).
    pub calls: f64,
    /// Agents logged in.
    pub agents: Staffing,
}

/// A simulation scenario (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A name for reports.
    #[serde(default)]
    pub name: String,
    /// Seed of replication 0 (replication `r` uses a seed derived from `seed` and `r`).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Independent runs.
    #[serde(default = "default_replications")]
    pub replications: u32,
    /// Simulated time discarded before counting.
    #[serde(default)]
    pub warmup_secs: u64,
    /// How many times the interval plan runs back to back.
    #[serde(default = "default_cycles")]
    pub cycles: u32,
    /// How long an offered agent takes to accept.
    #[serde(default)]
    pub answer_delay_secs: f64,
    /// Engine settings.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Agent groups (default: one group `agent` serving every queue, no skills).
    #[serde(default)]
    pub groups: Vec<AgentGroup>,
    /// Call types.
    pub call_types: Vec<CallType>,
    /// The interval plan.
    pub intervals: Vec<Interval>,
}

fn default_seed() -> u64 {
    1
}

fn default_replications() -> u32 {
    10
}

fn default_cycles() -> u32 {
    1
}

impl Scenario {
    /// Parse and validate a TOML scenario.
    ///
    /// # Errors
    /// [`SimError::Toml`] or [`SimError::Invalid`].
    pub fn from_toml(text: &str) -> Result<Self, SimError> {
        let mut scenario: Self = toml::from_str(text)?;
        scenario.normalise()?;
        Ok(scenario)
    }

    /// Fill defaults and check consistency (called by [`Scenario::from_toml`] and [`run`]).
    ///
    /// # Errors
    /// [`SimError::Invalid`] naming the problem.
    pub fn normalise(&mut self) -> Result<(), SimError> {
        let invalid = |reason: String| Err(SimError::Invalid { reason });
        if self.groups.is_empty() {
            self.groups.push(AgentGroup {
                name: "agent".to_string(),
                skills: Vec::new(),
                queues: Vec::new(),
                capacity: BTreeMap::new(),
            });
        }
        if self.call_types.is_empty() {
            return invalid("at least one [[call_types]] is needed".to_string());
        }
        if self.intervals.is_empty() || self.intervals.iter().all(|i| i.duration_secs == 0) {
            return invalid("at least one [[intervals]] with a duration is needed".to_string());
        }
        if self.replications == 0 || self.cycles == 0 {
            return invalid("replications and cycles must be at least 1".to_string());
        }
        if !(self.answer_delay_secs >= 0.0 && self.answer_delay_secs.is_finite()) {
            return invalid("answer_delay_secs must be finite and non-negative".to_string());
        }
        for (i, t) in self.call_types.iter().enumerate() {
            if !(t.weight > 0.0 && t.weight.is_finite()) {
                return invalid(format!("call_types[{i}].weight must be positive"));
            }
            t.handle.validate(&format!("call_types[{i}].handle"))?;
            if let Some(p) = &t.patience {
                p.validate(&format!("call_types[{i}].patience"))?;
            }
        }
        for (i, interval) in self.intervals.iter().enumerate() {
            if !(interval.calls >= 0.0 && interval.calls.is_finite()) {
                return invalid(format!("intervals[{i}].calls must be non-negative"));
            }
            if let Staffing::ByGroup(groups) = &interval.agents {
                for name in groups.keys() {
                    if !self.groups.iter().any(|g| g.name == *name) {
                        return invalid(format!("intervals[{i}] staffs unknown group {name:?}"));
                    }
                }
            }
        }
        Ok(())
    }

    fn cycle_ms(&self) -> u64 {
        self.intervals.iter().map(|i| i.duration_secs * 1000).sum()
    }

    fn horizon_ms(&self) -> u64 {
        self.cycle_ms() * u64::from(self.cycles)
    }

    fn staffing(&self, interval: &Interval) -> Vec<(usize, u32)> {
        match &interval.agents {
            Staffing::Count(n) => vec![(0, *n)],
            Staffing::ByGroup(by) => self
                .groups
                .iter()
                .enumerate()
                .map(|(i, g)| (i, by.get(&g.name).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// The Erlang C figures when every interval has the same load and staffing.
    #[must_use]
    pub fn erlang(&self) -> Option<ErlangC> {
        let first = self.intervals.first()?;
        let rate = |i: &Interval| i.calls / i.duration_secs.max(1) as f64;
        let agents = |i: &Interval| self.staffing(i).iter().map(|(_, n)| n).sum::<u32>();
        let steady = self
            .intervals
            .iter()
            .all(|i| (rate(i) - rate(first)).abs() < 1e-12 && agents(i) == agents(first));
        if !steady {
            return None;
        }
        let weight: f64 = self.call_types.iter().map(|t| t.weight).sum();
        let aht = self
            .call_types
            .iter()
            .map(|t| t.weight * t.handle.mean_secs())
            .sum::<f64>()
            / weight;
        Some(ErlangC::new(
            agents(first),
            first.calls,
            first.duration_secs as f64,
            aht,
            self.engine.service_level_threshold_secs as f64,
        ))
    }
}

/// A mean with the half-width of its 95 % confidence interval (Student t over
/// replications).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// Mean over the replications that had a value.
    pub mean: f64,
    /// Half-width of the 95 % confidence interval (0 with one replication).
    pub half_width: f64,
    /// Replications that had a value.
    pub n: usize,
}

impl Estimate {
    /// From per-replication values (`None`s are left out).
    #[must_use]
    pub fn from_samples(values: impl IntoIterator<Item = Option<f64>>) -> Self {
        let values: Vec<f64> = values.into_iter().flatten().collect();
        let n = values.len();
        if n == 0 {
            return Self {
                mean: f64::NAN,
                half_width: f64::NAN,
                n,
            };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        if n == 1 {
            return Self {
                mean,
                half_width: 0.0,
                n,
            };
        }
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let half_width = t_975(n - 1) * (var / n as f64).sqrt();
        Self {
            mean,
            half_width,
            n,
        }
    }

    /// Whether `value` lies inside the confidence interval.
    #[must_use]
    pub fn contains(&self, value: f64) -> bool {
        (value - self.mean).abs() <= self.half_width
    }
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom.
fn t_975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        31..=60 => 2.000,
        61..=120 => 1.980,
        _ => 1.960,
    }
}

/// The figures of one replication (after warm-up).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replication {
    /// Engine counters summed over queues.
    pub counters: QueueCounters,
    /// Per-queue statistics at the end.
    pub queues: Vec<QueueStats>,
    /// Share of answered calls that waited at all.
    pub p_wait: Option<f64>,
    /// Time-averaged occupancy (reserved + busy + wrap-up over staffed agents).
    pub occupancy: Option<f64>,
}

/// Statistics over replications.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimulationReport {
    /// Scenario name.
    pub scenario: String,
    /// Replications run.
    pub replications: u32,
    /// Service-level threshold.
    pub threshold_secs: u64,
    /// Calls whose wait ended (answered + abandoned) per replication.
    pub offered: Estimate,
    /// Answered calls per replication.
    pub answered: Estimate,
    /// P(wait): answered calls that waited / answered.
    pub p_wait: Estimate,
    /// Answered within T / offered.
    pub service_level_of_offered: Estimate,
    /// Answered within T / answered.
    pub service_level_of_answered: Estimate,
    /// Answered within T / (offered − abandoned within T).
    pub service_level_less_short_abandons: Estimate,
    /// Average speed of answer, seconds.
    pub asa_secs: Estimate,
    /// Abandoned / offered.
    pub abandon_rate: Estimate,
    /// Time-averaged occupancy.
    pub occupancy: Estimate,
    /// Erlang C for the same question, when load and staffing are steady.
    pub erlang: Option<ErlangC>,
    /// Each replication.
    pub runs: Vec<Replication>,
}

/// Run every replication of `scenario`.
///
/// # Errors
/// [`SimError::Invalid`] for a bad scenario, [`SimError::Engine`] if the engine refuses
/// a simulated input.
pub fn run(scenario: &Scenario) -> Result<SimulationReport, SimError> {
    let mut scenario = scenario.clone();
    scenario.normalise()?;
    let runs = (0..scenario.replications)
        .map(|r| run_replication(&scenario, r))
        .collect::<Result<Vec<_>, _>>()?;
    let threshold = scenario.engine.service_level_threshold_secs;
    let est = |f: &dyn Fn(&Replication) -> Option<f64>| Estimate::from_samples(runs.iter().map(f));
    Ok(SimulationReport {
        scenario: scenario.name.clone(),
        replications: scenario.replications,
        threshold_secs: threshold,
        offered: est(&|r| Some(r.counters.offered() as f64)),
        answered: est(&|r| Some(r.counters.answered as f64)),
        p_wait: est(&|r| r.p_wait),
        service_level_of_offered: est(&|r| r.counters.service_level(threshold).of_offered),
        service_level_of_answered: est(&|r| r.counters.service_level(threshold).of_answered),
        service_level_less_short_abandons: est(&|r| {
            r.counters
                .service_level(threshold)
                .of_offered_less_short_abandons
        }),
        asa_secs: est(&|r| r.counters.asa_secs()),
        abandon_rate: est(&|r| r.counters.abandon_rate()),
        occupancy: est(&|r| r.occupancy),
        erlang: scenario.erlang(),
        runs,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Staff { interval: usize },
    Arrival,
    Accept { agent: String, call: String },
    Abandon { call: String },
    End { call: String },
}

struct SimCall {
    handle_ms: u64,
    patience_ms: Option<u64>,
    assigned: bool,
}

struct Driver<'a> {
    scenario: &'a Scenario,
    engine: Engine,
    rng: SmallRng,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    order: u64,
    calls: HashMap<String, SimCall>,
    next_call: u64,
    logged_in: Vec<Vec<String>>,
    agent_states: HashMap<String, AgentState>,
    staffed: u64,
    occupied: u64,
    last_ms: u64,
    warmup_ms: u64,
    staffed_ms: u128,
    occupied_ms: u128,
    answered: u64,
    waited: u64,
}

/// Run one replication.
///
/// # Errors
/// As [`run`].
pub fn run_replication(scenario: &Scenario, replication: u32) -> Result<Replication, SimError> {
    let seed = scenario
        .seed
        .wrapping_add(u64::from(replication).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let d = Driver {
        scenario,
        engine: Engine::new(scenario.engine.clone()),
        rng: SmallRng::seed_from_u64(seed),
        events: BinaryHeap::new(),
        order: 0,
        calls: HashMap::new(),
        next_call: 0,
        logged_in: vec![Vec::new(); scenario.groups.len()],
        agent_states: HashMap::new(),
        staffed: 0,
        occupied: 0,
        last_ms: 0,
        warmup_ms: scenario.warmup_secs * 1000,
        staffed_ms: 0,
        occupied_ms: 0,
        answered: 0,
        waited: 0,
    };
    d.run()
}

impl Driver<'_> {
    fn schedule(&mut self, at: u64, event: Event) {
        self.order += 1;
        self.events.push(Reverse((at, self.order, event)));
    }

    /// The interval index and its end at time `t`.
    fn interval_at(&self, t: u64) -> (usize, u64) {
        let cycle = self.scenario.cycle_ms();
        let base = t - t % cycle;
        let mut end = base;
        for (i, interval) in self.scenario.intervals.iter().enumerate() {
            end += interval.duration_secs * 1000;
            if t < end {
                return (i, end);
            }
        }
        (0, base + cycle)
    }

    /// The next Poisson arrival after `t` (piecewise-constant rate), before the horizon.
    fn next_arrival(&mut self, mut t: u64) -> Option<u64> {
        let horizon = self.scenario.horizon_ms();
        while t < horizon {
            let (i, end) = self.interval_at(t);
            let interval = &self.scenario.intervals[i];
            if interval.calls > 0.0 {
                let mean_gap_secs = interval.duration_secs as f64 / interval.calls;
                let at = t + to_ms(exponential(&mut self.rng, mean_gap_secs));
                if at < end {
                    return (at < horizon).then_some(at);
                }
            }
            // Memoryless: restart at the next interval's rate.
            t = end;
        }
        None
    }

    fn run(mut self) -> Result<Replication, SimError> {
        let horizon = self.scenario.horizon_ms();
        let mut start = 0;
        for _ in 0..self.scenario.cycles {
            for (i, interval) in self.scenario.intervals.iter().enumerate() {
                self.order += 1;
                self.events
                    .push(Reverse((start, self.order, Event::Staff { interval: i })));
                start += interval.duration_secs * 1000;
            }
        }
        if let Some(at) = self.next_arrival(0) {
            self.schedule(at, Event::Arrival);
        }
        let mut warm = false;
        loop {
            let event_at = self.events.peek().map(|Reverse((t, _, _))| *t);
            let due = self.engine.next_due();
            let t = match (event_at, due) {
                (None, None) => break,
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
            };
            if t >= horizon {
                break;
            }
            self.integrate(t);
            if !warm && t >= self.warmup_ms {
                self.engine.reset_counters();
                warm = true;
            }
            let outputs = if due.is_some_and(|d| event_at.is_none_or(|e| d <= e)) {
                self.engine.tick(t)
            } else {
                let Some(Reverse((_, _, event))) = self.events.pop() else {
                    break;
                };
                self.handle(t, event)?
            };
            self.observe(t, &outputs);
        }
        self.integrate(horizon);
        let counters = self.engine.total_counters();
        Ok(Replication {
            counters,
            queues: self.engine.stats(horizon),
            p_wait: (self.answered > 0).then(|| self.waited as f64 / self.answered as f64),
            occupancy: (self.staffed_ms > 0)
                .then(|| self.occupied_ms as f64 / self.staffed_ms as f64),
        })
    }

    fn apply(&mut self, t: u64, input: Input) -> Result<Vec<Output>, SimError> {
        self.engine
            .apply(t, input)
            .map(|a| a.outputs)
            .map_err(|source| SimError::Engine { at_ms: t, source })
    }

    fn handle(&mut self, t: u64, event: Event) -> Result<Vec<Output>, SimError> {
        match event {
            Event::Arrival => {
                if let Some(at) = self.next_arrival(t) {
                    self.schedule(at, Event::Arrival);
                }
                let call_type = self.pick_call_type().clone();
                self.next_call += 1;
                let id = format!("c{}", self.next_call);
                let handle_ms = call_type.handle.sample_ms(&mut self.rng);
                let patience_ms = call_type
                    .patience
                    .as_ref()
                    .map(|p| p.sample_ms(&mut self.rng));
                self.calls.insert(
                    id.clone(),
                    SimCall {
                        handle_ms,
                        patience_ms,
                        assigned: false,
                    },
                );
                self.apply(
                    t,
                    Input::Routed(CallRouted {
                        call_id: id,
                        seq: 1,
                        queue: call_type.queue,
                        priority: call_type.priority,
                        requirements: call_type.requirements,
                        relaxation: call_type.relaxation,
                        overflow: call_type.overflow,
                        channel: call_type.channel,
                        customer_tier: "standard".to_string(),
                        customer_id: None,
                        rule: "simulated".to_string(),
                        lookup_ok: true,
                        routed_at_ms: t,
                    }),
                )
            }
            Event::Accept { agent, call } => {
                match self.engine.apply(
                    t,
                    Input::Accept(OfferAnswer {
                        agent_id: agent,
                        call_id: call,
                    }),
                ) {
                    Ok(applied) => Ok(applied.outputs),
                    // The offer was withdrawn meanwhile (the agent logged out at an
                    // interval boundary): a stale accept, as on a real desktop.
                    Err(EngineError::NotOffered { .. }) => Ok(Vec::new()),
                    Err(source) => Err(SimError::Engine { at_ms: t, source }),
                }
            }
            Event::Abandon { call } => {
                if self.calls.get(&call).is_some_and(|c| !c.assigned) {
                    self.apply(
                        t,
                        Input::Hangup(CallHangup {
                            call_id: call,
                            reason: Some("abandoned".to_string()),
                        }),
                    )
                } else {
                    Ok(Vec::new())
                }
            }
            Event::End { call } => self.apply(
                t,
                Input::Hangup(CallHangup {
                    call_id: call,
                    reason: None,
                }),
            ),
            Event::Staff { interval } => self.staff(t, interval),
        }
    }

    fn pick_call_type(&mut self) -> &CallType {
        let types = &self.scenario.call_types;
        let total: f64 = types.iter().map(|t| t.weight).sum();
        let mut x = self.rng.random::<f64>() * total;
        for t in types {
            if x < t.weight {
                return t;
            }
            x -= t.weight;
        }
        // Rounding at the top end.
        &types[types.len() - 1]
    }

    fn staff(&mut self, t: u64, interval: usize) -> Result<Vec<Output>, SimError> {
        let plan = self.scenario.staffing(&self.scenario.intervals[interval]);
        let mut outputs = Vec::new();
        for (g, target) in plan {
            let group = &self.scenario.groups[g];
            let target = usize::try_from(target).unwrap_or(usize::MAX);
            while self.logged_in[g].len() < target {
                let id = format!("{}-{}", group.name, self.logged_in[g].len() + 1);
                self.logged_in[g].push(id.clone());
                let profile = AgentProfile {
                    skills: group.skills.clone(),
                    queues: group.queues.clone(),
                    capacity: group.capacity.clone(),
                };
                outputs.extend(self.apply(
                    t,
                    Input::SetState(SetAgentState {
                        agent_id: id,
                        state: AgentState::Available,
                        profile: Some(profile),
                    }),
                )?);
            }
            while self.logged_in[g].len() > target {
                let Some(id) = self.logged_in[g].pop() else {
                    break;
                };
                outputs.extend(self.apply(
                    t,
                    Input::SetState(SetAgentState {
                        agent_id: id,
                        state: AgentState::Offline,
                        profile: None,
                    }),
                )?);
            }
        }
        Ok(outputs)
    }

    fn observe(&mut self, t: u64, outputs: &[Output]) {
        let answer_delay = to_ms(self.scenario.answer_delay_secs);
        for output in outputs {
            match output {
                Output::Call { event, update } => match event {
                    CallEvent::Queued => {
                        if let Some(p) = self.calls.get(&update.call_id).and_then(|c| c.patience_ms)
                        {
                            self.schedule(
                                t + p,
                                Event::Abandon {
                                    call: update.call_id.clone(),
                                },
                            );
                        }
                    }
                    CallEvent::Offered => {
                        if let Some(agent) = &update.agent {
                            self.schedule(
                                t + answer_delay,
                                Event::Accept {
                                    agent: agent.clone(),
                                    call: update.call_id.clone(),
                                },
                            );
                        }
                    }
                    CallEvent::Assigned => {
                        if let Some(call) = self.calls.get_mut(&update.call_id) {
                            call.assigned = true;
                            let handle = call.handle_ms;
                            self.schedule(
                                t + handle,
                                Event::End {
                                    call: update.call_id.clone(),
                                },
                            );
                        }
                        if t >= self.warmup_ms {
                            self.answered += 1;
                            if update.at_ms > update.enqueued_at_ms {
                                self.waited += 1;
                            }
                        }
                    }
                    CallEvent::Abandoned | CallEvent::Ended => {
                        self.calls.remove(&update.call_id);
                    }
                    _ => {}
                },
                Output::AgentState(change) => {
                    let staffed =
                        |s: AgentState| !matches!(s, AgentState::Offline | AgentState::Break);
                    let occupied = |s: AgentState| {
                        matches!(
                            s,
                            AgentState::Reserved | AgentState::Busy | AgentState::WrapUp
                        )
                    };
                    let before = self
                        .agent_states
                        .insert(change.agent_id.clone(), change.to)
                        .unwrap_or(AgentState::Offline);
                    self.staffed =
                        self.staffed + u64::from(staffed(change.to)) - u64::from(staffed(before));
                    self.occupied = self.occupied + u64::from(occupied(change.to))
                        - u64::from(occupied(before));
                }
                Output::AgentMissed(_) => {}
            }
        }
    }

    /// Accumulate agent-time from the last event to `t` (after warm-up only).
    fn integrate(&mut self, t: u64) {
        let from = self.last_ms.max(self.warmup_ms);
        if t > from {
            let dt = u128::from(t - from);
            self.staffed_ms += u128::from(self.staffed) * dt;
            self.occupied_ms += u128::from(self.occupied) * dt;
        }
        self.last_ms = self.last_ms.max(t);
    }
}

impl fmt::Display for SimulationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.scenario.is_empty() {
            "scenario"
        } else {
            &self.scenario
        };
        writeln!(
            f,
            "{name}: {} replications, 95% confidence intervals",
            self.replications
        )?;
        let t = self.threshold_secs;
        let pct = |e: &Estimate| format!("{:6.2}% ± {:.2}", e.mean * 100.0, e.half_width * 100.0);
        let num = |e: &Estimate, unit: &str| format!("{:7.2}{unit} ± {:.2}", e.mean, e.half_width);
        let erl = self.erlang;
        let col = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
        writeln!(f, "{:<34} {:<22} Erlang C", "metric", "simulated")?;
        let rows: [(String, String, Option<String>); 9] = [
            (
                "calls offered (answered+abandoned)".into(),
                num(&self.offered, ""),
                None,
            ),
            ("calls answered".into(), num(&self.answered, ""), None),
            (
                "P(wait)".into(),
                pct(&self.p_wait),
                erl.map(|e| format!("{:6.2}%", e.p_wait * 100.0)),
            ),
            (
                format!("SL {t}s of answered"),
                pct(&self.service_level_of_answered),
                erl.map(|e| format!("{:6.2}%", e.service_level * 100.0)),
            ),
            (
                format!("SL {t}s of offered"),
                pct(&self.service_level_of_offered),
                None,
            ),
            (
                format!("SL {t}s excl. short abandons"),
                pct(&self.service_level_less_short_abandons),
                None,
            ),
            (
                "ASA".into(),
                num(&self.asa_secs, "s"),
                erl.map(|e| format!("{:7.2}s", e.asa_secs)),
            ),
            ("abandon rate".into(), pct(&self.abandon_rate), None),
            (
                "occupancy".into(),
                pct(&self.occupancy),
                erl.map(|e| format!("{:6.2}%", e.occupancy * 100.0)),
            ),
        ];
        for (label, sim, erlang) in rows {
            writeln!(f, "{label:<34} {sim:<22} {}", col(erlang))?;
        }
        if let Some(e) = erl {
            writeln!(
                f,
                "Erlang C: {} agents, {:.2} Erlangs, AHT {:.0}s (assumes no abandonment, \
                 exponential handle times)",
                e.agents, e.traffic, e.aht_secs
            )?;
        }
        Ok(())
    }
}

/// One line of a recorded log: an input and when it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedInput {
    /// When (ms since epoch, or any origin).
    pub at_ms: u64,
    /// The input.
    pub input: Input,
}

/// What a replay did and the statistics at its end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Inputs applied.
    pub inputs: usize,
    /// Inputs the engine ignored (duplicates, races).
    pub ignored: usize,
    /// Inputs the engine refused, with their line number and error.
    pub refused: Vec<(usize, String)>,
    /// Events the engine emitted.
    pub outputs: usize,
    /// Time of the last input.
    pub end_ms: u64,
    /// Per-queue statistics at the end.
    pub queues: Vec<QueueStats>,
    /// Counters summed over queues.
    pub total: QueueCounters,
}

/// Replay a recorded log (JSON lines of [`RecordedInput`], in time order) through a fresh
/// engine, firing timers between inputs exactly as a live adapter would.
///
/// # Errors
/// [`SimError::LogLine`] / [`SimError::LogOrder`] for a bad log, [`SimError::Io`].
pub fn replay(config: EngineConfig, log: impl BufRead) -> Result<ReplayReport, SimError> {
    let mut engine = Engine::new(config);
    let mut report = ReplayReport {
        inputs: 0,
        ignored: 0,
        refused: Vec::new(),
        outputs: 0,
        end_ms: 0,
        queues: Vec::new(),
        total: QueueCounters::default(),
    };
    let mut previous = 0;
    for (i, line) in log.lines().enumerate() {
        let line = line?;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let record: RecordedInput =
            serde_json::from_str(trimmed).map_err(|source| SimError::LogLine {
                line: i + 1,
                source,
            })?;
        if record.at_ms < previous {
            return Err(SimError::LogOrder {
                line: i + 1,
                at_ms: record.at_ms,
                previous_ms: previous,
            });
        }
        previous = record.at_ms;
        while let Some(due) = engine.next_due().filter(|d| *d <= record.at_ms) {
            report.outputs += engine.tick(due).len();
        }
        report.inputs += 1;
        match engine.apply(record.at_ms, record.input) {
            Ok(applied) => {
                report.outputs += applied.outputs.len();
                report.ignored += usize::from(applied.ignored.is_some());
            }
            Err(e) => report.refused.push((i + 1, e.to_string())),
        }
    }
    report.end_ms = previous;
    report.queues = engine.stats(previous);
    report.total = engine.total_counters();
    Ok(report)
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "replayed {} inputs ({} ignored, {} refused), {} events emitted, ended at {} ms",
            self.inputs,
            self.ignored,
            self.refused.len(),
            self.outputs,
            self.end_ms
        )?;
        for (line, error) in self.refused.iter().take(10) {
            writeln!(f, "  line {line}: {error}")?;
        }
        let opt =
            |v: Option<f64>, scale: f64| v.map_or("-".to_string(), |v| format!("{:.2}", v * scale));
        writeln!(
            f,
            "{:<20} {:>8} {:>8} {:>9} {:>10} {:>8} {:>9} {:>10}",
            "queue",
            "waiting",
            "answered",
            "abandoned",
            "SL% offrd",
            "ASA s",
            "abandon%",
            "occupancy%"
        )?;
        for q in &self.queues {
            writeln!(
                f,
                "{:<20} {:>8} {:>8} {:>9} {:>10} {:>8} {:>9} {:>10}",
                q.queue,
                q.waiting,
                q.counters.answered,
                q.counters.abandoned,
                opt(q.service_level.of_offered, 100.0),
                opt(q.asa_secs, 1.0),
                opt(q.abandon_rate, 100.0),
                opt(q.occupancy, 100.0),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
