//! The routing rules file: its TOML schema, validation and the validated [`Rules`].
//!
//! The file declares schedules (business hours and holidays in a time zone), queues (with
//! overflow steps by task age), tier priority boosts, an ordered list of rules and a
//! default rule. Parsing is strict (unknown fields are errors, so a typo never silently
//! changes routing) and validation reports every problem at once, each naming where it
//! is: `rule 'vip': queue 'gold-line' is not declared`. See `deploy/routing.toml` for an
//! annotated example.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use chrono_tz::Tz;
use patchbay_protocol::payload::{Channel, OverflowTarget, RelaxationStep, SkillRequirement};
use serde::Deserialize;
use thiserror::Error;

use crate::schedule::{Schedule, Window, parse_day, parse_minute};

/// Lowest and highest skill proficiency (as in `patchbay-protocol`).
pub const SKILL_LEVELS: std::ops::RangeInclusive<u8> = 1..=10;
/// The name the default rule is reported under.
pub const DEFAULT_RULE: &str = "default";

/// Why a rules file cannot be used.
#[derive(Debug, Error)]
pub enum RulesError {
    /// The file cannot be read.
    #[error("cannot read rules file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (unknown or missing field,
    /// wrong type); the message carries line and column.
    #[error("routing rules do not parse: {message}")]
    Syntax {
        /// The parser's message.
        message: String,
    },
    /// The file parses but contradicts itself.
    #[error("invalid routing rules: {}", join(problems))]
    Invalid {
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

/// One validation problem: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where, e.g. `rule 'vip'`, `queue 'support'`, `schedule 'uk'`, `default rule`.
    pub at: String,
    /// What is wrong, naming the field.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------------------
// The file as written

/// A value or a list of values (any of them matches).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(v) => vec![v],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default = "default_tier")]
    default_tier: String,
    #[serde(default)]
    tier_boost: BTreeMap<String, u32>,
    #[serde(default)]
    schedules: Vec<RawSchedule>,
    #[serde(default)]
    queues: Vec<RawQueue>,
    #[serde(default)]
    rules: Vec<RawRule>,
    default: RawAction,
}

fn default_tier() -> String {
    "standard".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    name: String,
    tz: String,
    #[serde(default)]
    hours: Vec<RawHours>,
    #[serde(default)]
    holidays: Vec<RawHoliday>,
    #[serde(default)]
    closed_treatment: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHours {
    days: Vec<String>,
    open: String,
    close: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHoliday {
    date: String,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    name: String,
    #[serde(default)]
    overflow: Vec<RawOverflow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverflow {
    after_secs: u64,
    queue: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(rename = "match", default)]
    conditions: RawMatch,
    // The action fields again, not `#[serde(flatten)]`: serde cannot combine flatten with
    // deny_unknown_fields, and a typo must stay an error.
    queue: String,
    #[serde(default)]
    priority: u32,
    #[serde(default)]
    skills: BTreeMap<String, u8>,
    #[serde(default)]
    relax: Vec<RawRelax>,
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default)]
    closed_treatment: Option<String>,
}

impl RawRule {
    fn split(self) -> (String, RawMatch, RawAction) {
        let action = RawAction {
            queue: self.queue,
            priority: self.priority,
            skills: self.skills,
            relax: self.relax,
            schedule: self.schedule,
            closed_treatment: self.closed_treatment,
        };
        (self.name, self.conditions, action)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    dialled: Option<OneOrMany>,
    ivr: Option<OneOrMany>,
    language: Option<OneOrMany>,
    tier: Option<OneOrMany>,
    channel: Option<OneOrMany>,
    #[serde(default)]
    attributes: BTreeMap<String, OneOrMany>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    queue: String,
    #[serde(default)]
    priority: u32,
    #[serde(default)]
    skills: BTreeMap<String, u8>,
    #[serde(default)]
    relax: Vec<RawRelax>,
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default)]
    closed_treatment: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelax {
    after_secs: u64,
    skills: BTreeMap<String, u8>,
}

// ---------------------------------------------------------------------------------------
// Validated rules

/// What a rule matches; every condition given must hold, and a list matches any of its
/// values. No condition at all matches every call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conditions {
    /// Dialled numbers, compared exactly (write them as the telephony adapter sends them).
    pub dialled: Option<Vec<String>>,
    /// IVR selections.
    pub ivr: Option<Vec<String>>,
    /// Languages, lower-case; `fr` also matches `fr-CA`. The call's language, else the
    /// customer's preferred language.
    pub language: Option<Vec<String>>,
    /// Customer tiers (the looked-up tier, or the default tier when the lookup failed).
    pub tier: Option<Vec<String>>,
    /// Media channels.
    pub channel: Option<Vec<Channel>>,
    /// Call attributes that must equal one of the values.
    pub attributes: BTreeMap<String, Vec<String>>,
}

/// What a matching rule decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// The queue (declared in `queues`).
    pub queue: String,
    /// Base priority (higher is served first); the tier boost is added to it.
    pub priority: u32,
    /// Required skills at the start.
    pub requirements: Vec<SkillRequirement>,
    /// Relaxation steps by routing age, increasing.
    pub relaxation: Vec<RelaxationStep>,
    /// The schedule whose hours apply, if any (no schedule: always open).
    pub schedule: Option<String>,
    /// What closed calls get (the rule's own, else the schedule's).
    pub closed_treatment: Option<String>,
}

/// One named rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its name (unique), reported in `CallRouted::rule` and in metrics.
    pub name: String,
    /// What it matches.
    pub conditions: Conditions,
    /// What it decides.
    pub action: Action,
}

/// A queue and its overflow steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// Its name.
    pub name: String,
    /// Overflow targets by task age, increasing.
    pub overflow: Vec<OverflowTarget>,
}

/// A validated rules file: every queue and schedule a rule names exists, levels and
/// steps are in range and in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Tier used when the customer lookup failed or named none.
    pub default_tier: String,
    /// Priority added per customer tier.
    pub tier_boost: BTreeMap<String, u32>,
    /// Schedules by name.
    pub schedules: BTreeMap<String, Schedule>,
    /// Queues by name.
    pub queues: BTreeMap<String, Queue>,
    /// Rules in evaluation order (first match wins).
    pub rules: Vec<Rule>,
    /// The rule applied when none matches (named [`DEFAULT_RULE`]).
    pub default: Rule,
}

impl std::str::FromStr for Rules {
    type Err = RulesError;

    fn from_str(text: &str) -> Result<Self, RulesError> {
        Self::parse(text)
    }
}

impl Rules {
    /// Parse and validate a rules file's text.
    pub fn parse(text: &str) -> Result<Self, RulesError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| RulesError::Syntax {
            message: e.to_string().trim_end().to_owned(),
        })?;
        Validator::default().validate(raw)
    }

    /// Read, parse and validate the rules file at `path`.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn problem(&mut self, at: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            at: at.to_owned(),
            message: message.into(),
        });
    }

    fn validate(mut self, raw: RawFile) -> Result<Rules, RulesError> {
        if raw.default_tier.trim().is_empty() {
            self.problem("default_tier", "must not be empty");
        }
        let schedules = self.schedules(raw.schedules);
        let queues = self.queues(raw.queues);
        let mut rules = Vec::new();
        let mut names = BTreeSet::new();
        for raw_rule in raw.rules {
            let (name, raw_match, raw_action) = raw_rule.split();
            let at = format!("rule '{name}'");
            if name.trim().is_empty() {
                self.problem("rule ''", "name must not be empty");
            } else if name == DEFAULT_RULE {
                self.problem(&at, "the name 'default' is reserved for [default]");
            } else if !names.insert(name.clone()) {
                self.problem(&at, "is declared more than once");
            }
            let conditions = self.conditions(&at, raw_match);
            let action = self.action(&at, raw_action, &schedules, &queues);
            rules.push(Rule {
                name,
                conditions,
                action,
            });
        }
        let default = Rule {
            name: DEFAULT_RULE.into(),
            conditions: Conditions::default(),
            action: self.action("default rule", raw.default, &schedules, &queues),
        };
        if self.problems.is_empty() {
            Ok(Rules {
                default_tier: raw.default_tier,
                tier_boost: raw.tier_boost,
                schedules,
                queues,
                rules,
                default,
            })
        } else {
            Err(RulesError::Invalid {
                problems: self.problems,
            })
        }
    }

    fn schedules(&mut self, raw: Vec<RawSchedule>) -> BTreeMap<String, Schedule> {
        let mut out = BTreeMap::new();
        for s in raw {
            let at = format!("schedule '{}'", s.name);
            if s.name.trim().is_empty() {
                self.problem("schedule ''", "name must not be empty");
            }
            let tz = match s.tz.parse::<Tz>() {
                Ok(tz) => tz,
                Err(_) => {
                    self.problem(
                        &at,
                        format!(
                            "tz '{}' is not an IANA time zone (e.g. 'Europe/London', 'UTC')",
                            s.tz
                        ),
                    );
                    Tz::UTC
                }
            };
            let mut windows = Vec::new();
            for hours in s.hours {
                let open = parse_minute(&hours.open);
                let close = parse_minute(&hours.close);
                if open.is_none() {
                    self.problem(&at, format!("open '{}' is not HH:MM", hours.open));
                }
                if close.is_none() {
                    self.problem(&at, format!("close '{}' is not HH:MM", hours.close));
                }
                let (Some(open), Some(close)) = (open, close) else {
                    continue;
                };
                if open >= close {
                    self.problem(
                        &at,
                        format!(
                            "open {} is not before close {} (use 24:00 for midnight)",
                            hours.open, hours.close
                        ),
                    );
                }
                if hours.days.is_empty() {
                    self.problem(&at, "hours entry with no days");
                }
                for day in &hours.days {
                    match parse_day(day) {
                        Some(day) => windows.push(Window {
                            day,
                            open_minute: open,
                            close_minute: close,
                        }),
                        None => self.problem(&at, format!("day '{day}' is not mon … sun")),
                    }
                }
            }
            let mut holidays = BTreeMap::new();
            for h in s.holidays {
                match NaiveDate::parse_from_str(&h.date, "%Y-%m-%d") {
                    Ok(date) => {
                        if h.name.trim().is_empty() {
                            self.problem(&at, format!("holiday {} has an empty name", h.date));
                        }
                        if holidays.insert(date, h.name).is_some() {
                            self.problem(&at, format!("holiday {} is listed twice", h.date));
                        }
                    }
                    Err(_) => {
                        self.problem(&at, format!("holiday date '{}' is not YYYY-MM-DD", h.date));
                    }
                }
            }
            let schedule = Schedule {
                name: s.name.clone(),
                tz,
                windows,
                holidays,
                closed_treatment: s.closed_treatment,
            };
            if out.insert(s.name, schedule).is_some() {
                self.problem(&at, "is declared more than once");
            }
        }
        out
    }

    fn queues(&mut self, raw: Vec<RawQueue>) -> BTreeMap<String, Queue> {
        let declared: BTreeSet<String> = raw.iter().map(|q| q.name.clone()).collect();
        let mut out = BTreeMap::new();
        for q in raw {
            let at = format!("queue '{}'", q.name);
            if patchbay_bus::Token::new(q.name.as_str()).is_err() {
                self.problem(
                    &at,
                    "name must be letters, digits, '-' or '_' (it labels metrics and subjects)",
                );
            }
            let mut last = 0;
            let mut overflow = Vec::new();
            for step in q.overflow {
                if !declared.contains(&step.queue) {
                    self.problem(
                        &at,
                        format!("overflow queue '{}' is not declared", step.queue),
                    );
                } else if step.queue == q.name {
                    self.problem(&at, "overflows into itself");
                }
                if step.after_secs == 0 || step.after_secs <= last {
                    self.problem(
                        &at,
                        format!(
                            "overflow after_secs {} must be positive and increasing",
                            step.after_secs
                        ),
                    );
                }
                last = step.after_secs;
                overflow.push(OverflowTarget {
                    after_secs: step.after_secs,
                    queue: step.queue,
                });
            }
            let queue = Queue {
                name: q.name.clone(),
                overflow,
            };
            if out.insert(q.name, queue).is_some() {
                self.problem(&at, "is declared more than once");
            }
        }
        out
    }

    fn conditions(&mut self, at: &str, raw: RawMatch) -> Conditions {
        let mut list = |field: &str, v: Option<OneOrMany>| {
            let v = v.map(OneOrMany::into_vec);
            if v.as_ref().is_some_and(Vec::is_empty) {
                self.problem(
                    at,
                    format!("match.{field} is an empty list (matches nothing)"),
                );
            }
            v
        };
        let dialled = list("dialled", raw.dialled);
        let ivr = list("ivr", raw.ivr);
        let language =
            list("language", raw.language).map(|l| l.iter().map(|s| s.to_lowercase()).collect());
        let tier = list("tier", raw.tier);
        let channel_names = list("channel", raw.channel);
        let channel = channel_names.map(|names| {
            names
                .iter()
                .filter_map(|name| {
                    let parsed = serde_json::from_value::<Channel>(name.as_str().into()).ok();
                    if parsed.is_none() {
                        self.problem(
                            at,
                            format!("match.channel '{name}' is not voice, chat or email"),
                        );
                    }
                    parsed
                })
                .collect()
        });
        let mut attributes = BTreeMap::new();
        for (key, values) in raw.attributes {
            let values = values.into_vec();
            if values.is_empty() {
                self.problem(at, format!("match.attributes.{key} is an empty list"));
            }
            attributes.insert(key, values);
        }
        Conditions {
            dialled,
            ivr,
            language,
            tier,
            channel,
            attributes,
        }
    }

    fn action(
        &mut self,
        at: &str,
        raw: RawAction,
        schedules: &BTreeMap<String, Schedule>,
        queues: &BTreeMap<String, Queue>,
    ) -> Action {
        if !queues.contains_key(&raw.queue) {
            self.problem(at, format!("queue '{}' is not declared", raw.queue));
        }
        let requirements = self.skills(at, "skills", raw.skills);
        let mut relaxation = Vec::new();
        let mut last = 0;
        for step in raw.relax {
            if step.after_secs == 0 || step.after_secs <= last {
                self.problem(
                    at,
                    format!(
                        "relax after_secs {} must be positive and increasing",
                        step.after_secs
                    ),
                );
            }
            last = step.after_secs;
            let field = format!("relax[after_secs = {}].skills", step.after_secs);
            relaxation.push(RelaxationStep {
                after_secs: step.after_secs,
                requirements: self.skills(at, &field, step.skills),
            });
        }
        let mut closed_treatment = raw.closed_treatment;
        if let Some(name) = &raw.schedule {
            match schedules.get(name) {
                None => self.problem(at, format!("schedule '{name}' is not declared")),
                Some(s) => {
                    if closed_treatment.is_none() {
                        closed_treatment.clone_from(&s.closed_treatment);
                    }
                    if closed_treatment.is_none() {
                        self.problem(
                            at,
                            format!(
                                "schedule '{name}' has no closed_treatment and the rule sets none"
                            ),
                        );
                    }
                }
            }
        } else if closed_treatment.is_some() {
            self.problem(at, "closed_treatment without a schedule is never used");
        }
        Action {
            queue: raw.queue,
            priority: raw.priority,
            requirements,
            relaxation,
            schedule: raw.schedule,
            closed_treatment,
        }
    }

    fn skills(
        &mut self,
        at: &str,
        field: &str,
        raw: BTreeMap<String, u8>,
    ) -> Vec<SkillRequirement> {
        raw.into_iter()
            .map(|(skill, min_level)| {
                if !SKILL_LEVELS.contains(&min_level) {
                    self.problem(
                        at,
                        format!("{field}.{skill} level {min_level} is outside 1..=10"),
                    );
                }
                if skill.trim().is_empty() {
                    self.problem(at, format!("{field} has an empty skill name"));
                }
                SkillRequirement { skill, min_level }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const VALID: &str = r#"
        [[schedules]]
        name = "uk"
        tz = "Europe/London"
        closed_treatment = "closed"
        hours = [{ days = ["mon"], open = "08:00", close = "24:00" }]

        [[queues]]
        name = "general"

        [[rules]]
        name = "vip"
        match = { tier = "gold" }
        queue = "general"
        schedule = "uk"

        [default]
        queue = "general"
    "#;

    /// The messages of every problem in `text`.
    fn problems(text: &str) -> Vec<String> {
        match Rules::parse(text) {
            Err(RulesError::Invalid { problems }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    fn assert_problem(text: &str, expected: &str) {
        let found = problems(text);
        assert!(
            found.iter().any(|p| p == expected),
            "expected {expected:?} among {found:?}"
        );
    }

    #[test]
    fn a_valid_file_parses_with_defaults() {
        let rules = Rules::parse(VALID).unwrap();
        assert_eq!(rules.default_tier, "standard");
        assert_eq!(rules.rules[0].conditions.tier, Some(vec!["gold".into()]));
        assert_eq!(rules.default.name, DEFAULT_RULE);
        assert_eq!(rules.schedules["uk"].windows[0].close_minute, 1440);
    }

    #[test]
    fn an_undeclared_queue_is_named_with_its_rule() {
        assert_problem(
            &VALID.replace(
                "queue = \"general\"\n        schedule",
                "queue = \"gold-line\"\n        schedule",
            ),
            "rule 'vip': queue 'gold-line' is not declared",
        );
    }

    #[test]
    fn an_undeclared_schedule_and_overflow_queue_are_reported() {
        assert_problem(
            &VALID.replace("schedule = \"uk\"", "schedule = \"us\""),
            "rule 'vip': schedule 'us' is not declared",
        );
        let text = VALID.replace(
            "name = \"general\"",
            "name = \"general\"\n        overflow = [{ after_secs = 60, queue = \"nowhere\" }]",
        );
        assert_problem(
            &text,
            "queue 'general': overflow queue 'nowhere' is not declared",
        );
    }

    #[test]
    fn bad_time_zone_hours_and_dates_name_the_schedule() {
        let text = VALID
            .replace("Europe/London", "Europe/Londres")
            .replace("open = \"08:00\"", "open = \"8am\"")
            .replace(
                "hours = [",
                "holidays = [{ date = \"25/12/2026\", name = \"xmas\" }]\n        hours = [",
            );
        let found = problems(&text);
        for expected in [
            "schedule 'uk': tz 'Europe/Londres' is not an IANA time zone (e.g. 'Europe/London', 'UTC')",
            "schedule 'uk': open '8am' is not HH:MM",
            "schedule 'uk': holiday date '25/12/2026' is not YYYY-MM-DD",
        ] {
            assert!(
                found.iter().any(|p| p == expected),
                "{expected:?} not in {found:?}"
            );
        }
        assert_problem(
            &VALID.replace("close = \"24:00\"", "close = \"07:00\""),
            "schedule 'uk': open 08:00 is not before close 07:00 (use 24:00 for midnight)",
        );
        assert_problem(
            &VALID.replace("days = [\"mon\"]", "days = [\"mon\", \"caturday\"]"),
            "schedule 'uk': day 'caturday' is not mon … sun",
        );
    }

    #[test]
    fn skill_levels_and_step_order_are_checked() {
        let text = VALID.replace(
            "schedule = \"uk\"",
            "schedule = \"uk\"\n        skills = { billing = 11 }\n        relax = [{ after_secs = 60, skills = { billing = 0 } }, { after_secs = 30, skills = {} }]",
        );
        let found = problems(&text);
        for expected in [
            "rule 'vip': skills.billing level 11 is outside 1..=10",
            "rule 'vip': relax[after_secs = 60].skills.billing level 0 is outside 1..=10",
            "rule 'vip': relax after_secs 30 must be positive and increasing",
        ] {
            assert!(
                found.iter().any(|p| p == expected),
                "{expected:?} not in {found:?}"
            );
        }
    }

    #[test]
    fn duplicate_names_and_a_schedule_without_treatment_are_refused() {
        let text = format!(
            "{}\n[[rules]]\nname = \"vip\"\nqueue = \"general\"\n",
            VALID.replace("[default]\n        queue = \"general\"", "")
        ) + "[default]\nqueue = \"general\"\n";
        assert_problem(&text, "rule 'vip': is declared more than once");
        assert_problem(
            &VALID.replace("closed_treatment = \"closed\"", ""),
            "rule 'vip': schedule 'uk' has no closed_treatment and the rule sets none",
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = VALID
            .replace(
                "queue = \"general\"\n        schedule",
                "queue = \"a\"\n        schedule",
            )
            .replace(
                "[default]\n        queue = \"general\"",
                "[default]\n        queue = \"b\"",
            );
        let err = Rules::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("rule 'vip': queue 'a' is not declared"),
            "{err}"
        );
        assert!(
            err.contains("default rule: queue 'b' is not declared"),
            "{err}"
        );
    }

    #[test]
    fn typos_and_missing_fields_are_syntax_errors_with_a_position() {
        let err = Rules::parse(&VALID.replace("match = {", "macth = {")).unwrap_err();
        assert!(
            matches!(&err, RulesError::Syntax { message } if message.contains("macth") && message.contains("line")),
            "{err}"
        );
        let err = Rules::parse("[[queues]]\nname = \"q\"\n").unwrap_err();
        assert!(err.to_string().contains("missing field `default`"), "{err}");
        let err = Rules::parse(&VALID.replace("tier = \"gold\"", "tier = 3")).unwrap_err();
        assert!(matches!(err, RulesError::Syntax { .. }), "{err}");
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = Rules::load(Path::new("/nonexistent/routing.toml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/routing.toml"),
            "{err}"
        );
    }
}
