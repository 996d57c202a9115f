//! Topologies: which services run in which process.
//!
//! `deploy/topology.toml` names each topology and, in it, each process and the services
//! it runs:
//!
//! ```toml
//! [monolith]
//! node = ["gateway", "routing", "agents", "runtime"]
//!
//! [split]
//! gateway = ["gateway"]
//! routing = ["routing"]
//! agents = ["agents"]
//! runtime = ["runtime"]
//! ```
//!
//! A topology must run every service somewhere, and the agents service exactly once (its
//! engine is a single writer). Subjects stay the only contract between services, so
//! moving a service between processes changes nothing on the wire.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use thiserror::Error;

/// A service a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// The HTTP gateway (and the HTTP functions it serves).
    Gateway,
    /// Call routing.
    Routing,
    /// Agent assignment.
    Agents,
    /// A runtime node (the function host).
    Runtime,
}

impl ServiceKind {
    /// Every service, in start order (the gateway last, so it answers once the others
    /// are on their way).
    pub const ALL: [Self; 4] = [Self::Runtime, Self::Routing, Self::Agents, Self::Gateway];

    /// The name used in flags, topology files, metric labels and readiness checks.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Routing => "routing",
            Self::Agents => "agents",
            Self::Runtime => "runtime",
        }
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ServiceKind {
    type Err = TopologyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| TopologyError::UnknownService(s.to_owned()))
    }
}

/// What is wrong with a topology file or a service list.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TopologyError {
    /// Not one of `gateway`, `routing`, `agents`, `runtime`.
    #[error("unknown service {0:?} (the services are gateway, routing, agents, runtime)")]
    UnknownService(String),
    /// A process lists a service twice.
    #[error("process {process:?} lists {service} twice")]
    Repeated {
        /// The process.
        process: String,
        /// The service.
        service: ServiceKind,
    },
    /// A process that runs nothing.
    #[error("process {0:?} runs no service")]
    Empty(String),
    /// A topology leaves a service out.
    #[error("topology {topology:?} runs no {service} service")]
    Missing {
        /// The topology.
        topology: String,
        /// The service left out.
        service: ServiceKind,
    },
    /// The agents engine is a single writer: one instance per topology.
    #[error("topology {topology:?} runs the agents service {count} times; it must run once")]
    AgentsNotOnce {
        /// The topology.
        topology: String,
        /// How many processes run it.
        count: usize,
    },
    /// No such topology or process in the file.
    #[error("no {what} {name:?} (there are: {known})")]
    NotFound {
        /// `topology` or `process`.
        what: &'static str,
        /// The name asked for.
        name: String,
        /// The names there are.
        known: String,
    },
    /// The file is not TOML of the expected shape.
    #[error("invalid topology file: {0}")]
    Parse(String),
}

/// Every topology of a file: topology → process → services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topologies(BTreeMap<String, BTreeMap<String, Vec<ServiceKind>>>);

impl Topologies {
    /// Load and check a topology file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read topology file {}: {e}", path.display()))?;
        Ok(Self::from_toml(&text)?)
    }

    /// Parse and check topology TOML.
    pub fn from_toml(text: &str) -> Result<Self, TopologyError> {
        let raw: BTreeMap<String, BTreeMap<String, Vec<String>>> =
            toml::from_str(text).map_err(|e| TopologyError::Parse(e.to_string()))?;
        let mut topologies = BTreeMap::new();
        for (topology, processes) in raw {
            let mut checked = BTreeMap::new();
            for (process, services) in processes {
                let services = parse_services(&process, services.iter().map(String::as_str))?;
                checked.insert(process, services);
            }
            check_topology(&topology, &checked)?;
            topologies.insert(topology, checked);
        }
        Ok(Self(topologies))
    }

    /// The processes of `topology`, each with its services.
    pub fn processes(
        &self,
        topology: &str,
    ) -> Result<&BTreeMap<String, Vec<ServiceKind>>, TopologyError> {
        self.0.get(topology).ok_or_else(|| TopologyError::NotFound {
            what: "topology",
            name: topology.to_owned(),
            known: self.0.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    /// The services process `process` of `topology` runs.
    pub fn services(&self, topology: &str, process: &str) -> Result<&[ServiceKind], TopologyError> {
        let processes = self.processes(topology)?;
        processes
            .get(process)
            .map(Vec::as_slice)
            .ok_or_else(|| TopologyError::NotFound {
                what: "process",
                name: process.to_owned(),
                known: processes.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }
}

/// A process's service list (`--services gateway,routing`), checked: known names, none
/// twice, at least one.
pub fn parse_services<'a>(
    process: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<ServiceKind>, TopologyError> {
    let mut services = Vec::new();
    for name in names {
        let service: ServiceKind = name.trim().parse()?;
        if services.contains(&service) {
            return Err(TopologyError::Repeated {
                process: process.to_owned(),
                service,
            });
        }
        services.push(service);
    }
    if services.is_empty() {
        return Err(TopologyError::Empty(process.to_owned()));
    }
    Ok(services)
}

fn check_topology(
    topology: &str,
    processes: &BTreeMap<String, Vec<ServiceKind>>,
) -> Result<(), TopologyError> {
    let count = |kind: ServiceKind| processes.values().filter(|s| s.contains(&kind)).count();
    for service in ServiceKind::ALL {
        if count(service) == 0 {
            return Err(TopologyError::Missing {
                topology: topology.to_owned(),
                service,
            });
        }
    }
    match count(ServiceKind::Agents) {
        1 => Ok(()),
        count => Err(TopologyError::AgentsNotOnce {
            topology: topology.to_owned(),
            count,
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_topology_file_has_a_monolith_and_a_split() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/topology.toml");
        let topologies = Topologies::load(&path).unwrap();
        let monolith = topologies.processes("monolith").unwrap();
        assert_eq!(monolith.len(), 1);
        assert_eq!(monolith.values().next().unwrap().len(), 4);
        let split = topologies.processes("split").unwrap();
        assert!(split.values().all(|services| services.len() == 1));
        assert_eq!(split.len(), 4);
    }

    #[test]
    fn a_topology_must_run_every_service_and_agents_exactly_once() {
        let missing = Topologies::from_toml("[t]\na = [\"gateway\", \"routing\", \"runtime\"]");
        assert_eq!(
            missing,
            Err(TopologyError::Missing {
                topology: "t".into(),
                service: ServiceKind::Agents
            })
        );
        let twice = Topologies::from_toml(
            "[t]\na = [\"gateway\", \"routing\", \"runtime\", \"agents\"]\nb = [\"agents\"]",
        );
        assert_eq!(
            twice,
            Err(TopologyError::AgentsNotOnce {
                topology: "t".into(),
                count: 2
            })
        );
        let scaled = Topologies::from_toml(
            "[t]\na = [\"gateway\", \"routing\", \"runtime\", \"agents\"]\nb = [\"runtime\", \"routing\"]",
        );
        assert!(
            scaled.is_ok(),
            "more runtime nodes and routers are fine: {scaled:?}"
        );
    }

    #[test]
    fn service_lists_refuse_unknown_repeated_and_empty() {
        assert_eq!(
            parse_services("p", ["gateway", "billing"]),
            Err(TopologyError::UnknownService("billing".into()))
        );
        assert_eq!(
            parse_services("p", ["routing", "routing"]),
            Err(TopologyError::Repeated {
                process: "p".into(),
                service: ServiceKind::Routing
            })
        );
        assert_eq!(
            parse_services("p", []),
            Err(TopologyError::Empty("p".into()))
        );
    }

    #[test]
    fn unknown_topologies_and_processes_name_what_there_is() {
        let t = Topologies::from_toml(
            "[m]\nnode = [\"gateway\", \"routing\", \"runtime\", \"agents\"]",
        )
        .unwrap();
        assert_eq!(
            t.services("m", "edge").unwrap_err().to_string(),
            "no process \"edge\" (there are: node)"
        );
        assert_eq!(
            t.services("x", "node").unwrap_err().to_string(),
            "no topology \"x\" (there are: m)"
        );
    }
}
