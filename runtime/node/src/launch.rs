//! Building each service's flags inside one process, and starting it.
//!
//! A service's flags are exactly the ones its own binary takes (the same `clap` definition,
//! the same `PATCHBAY_*` variables and defaults), plus whatever `--service-arg
//! <service>=<flag>` adds. What the process decides for it is only its certificate: the
//! one of its own identity from the certificates directory, never a shared one, so each
//! service keeps exactly the permissions it has alone.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use patchbay_bus::args::BusArgs;
use patchbay_telemetry::ServiceContext;

use crate::topology::ServiceKind;

/// A service's future, boxed so that one supervisor handles them all.
pub type ServiceFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// One service's parsed flags, ready to run.
#[derive(Debug, Clone)]
pub enum Service {
    /// The gateway.
    Gateway(Box<patchbay_gateway::service::Args>),
    /// Routing.
    Routing(Box<patchbay_routing::service::Args>),
    /// Agents.
    Agents(Box<patchbay_agents::service::Args>),
    /// A runtime node.
    Runtime(Box<patchbay_host::service::Args>),
}

impl Service {
    /// Parse `kind`'s flags from `extra` (its `--service-arg`s) and the environment, and
    /// point its bus connection at its own certificate in `certs_dir`.
    pub fn configure(
        kind: ServiceKind,
        extra: &[String],
        certs_dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut service = match kind {
            ServiceKind::Gateway => Self::Gateway(Box::new(parse(kind, extra, certs_dir)?)),
            ServiceKind::Routing => Self::Routing(Box::new(parse(kind, extra, certs_dir)?)),
            ServiceKind::Agents => Self::Agents(Box::new(parse(kind, extra, certs_dir)?)),
            ServiceKind::Runtime => Self::Runtime(Box::new(parse(kind, extra, certs_dir)?)),
        };
        let identity = service.identity();
        let (kind_part, name) = identity
            .split_once('/')
            .with_context(|| format!("identity {identity:?} is not kind/name"))?;
        let stem = format!("{kind_part}-{name}");
        let (cert, key) = (
            certs_dir.join(format!("{stem}.crt")),
            certs_dir.join(format!("{stem}.key")),
        );
        for file in [&cert, &key] {
            if !file.is_file() {
                bail!(
                    "the {kind} service connects as {identity}, but {} does not exist (issue it with `patchbay certs`)",
                    file.display()
                );
            }
        }
        let bus = service.bus_mut();
        bus.cert = cert;
        bus.key = key;
        Ok(service)
    }

    /// Which service this is.
    #[must_use]
    pub fn kind(&self) -> ServiceKind {
        match self {
            Self::Gateway(_) => ServiceKind::Gateway,
            Self::Routing(_) => ServiceKind::Routing,
            Self::Agents(_) => ServiceKind::Agents,
            Self::Runtime(_) => ServiceKind::Runtime,
        }
    }

    /// The identity the service connects as (`service/routing`, `runtime/node-1`, …).
    #[must_use]
    pub fn identity(&self) -> String {
        match self {
            Self::Gateway(a) => a.identity(),
            Self::Routing(a) => a.identity(),
            Self::Agents(a) => a.identity(),
            Self::Runtime(a) => a.identity(),
        }
    }

    fn bus_mut(&mut self) -> &mut BusArgs {
        match self {
            Self::Gateway(a) => &mut a.bus,
            Self::Routing(a) => &mut a.bus,
            Self::Agents(a) => &mut a.bus,
            Self::Runtime(a) => &mut a.bus,
        }
    }

    /// Worker threads of the service's runtime: the function hosts (gateway, runtime) get
    /// the machine's cores, the event-driven services one each.
    #[must_use]
    pub fn threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        match self {
            Self::Gateway(_) | Self::Runtime(_) => cores,
            Self::Routing(_) | Self::Agents(_) => 1,
        }
    }

    /// The service's entry point, until `shutdown` resolves; with `fault`, the run panics
    /// after that long (fault injection for tests and game days).
    #[must_use]
    pub fn serve(
        self,
        context: ServiceContext,
        shutdown: impl Future<Output = ()> + Send + 'static,
        fault: Option<Duration>,
    ) -> ServiceFuture {
        let kind = self.kind();
        let service: ServiceFuture = match self {
            Self::Gateway(a) => Box::pin(patchbay_gateway::service::serve(*a, context, shutdown)),
            Self::Routing(a) => Box::pin(patchbay_routing::service::serve(*a, context, shutdown)),
            Self::Agents(a) => Box::pin(patchbay_agents::service::serve(*a, context, shutdown)),
            Self::Runtime(a) => Box::pin(patchbay_host::service::serve(*a, context, shutdown)),
        };
        match fault {
            None => service,
            Some(after) => Box::pin(async move {
                tokio::select! {
                    result = service => result,
                    () = tokio::time::sleep(after) => {
                        tracing::warn!(service = %kind, "injected fault: panicking");
                        #[allow(clippy::panic)]
                        { panic!("injected fault in the {kind} service") }
                    }
                }
            }),
        }
    }
}

/// The argv a service's flags are parsed from: defaults the process supplies first (the
/// CA from the certificates directory unless `PATCHBAY_NATS_CA` says otherwise,
/// placeholders for the certificate `configure` replaces), then the `--service-arg`s, which
/// win.
fn argv(kind: ServiceKind, extra: &[String], certs_dir: &Path) -> Vec<String> {
    let mut argv = vec![format!("patchbay-node[{kind}]")];
    if std::env::var_os("PATCHBAY_NATS_CA").is_none() {
        argv.push("--nats-ca".into());
        argv.push(certs_dir.join("ca.crt").display().to_string());
    }
    for flag in ["--nats-cert", "--nats-key"] {
        argv.push(flag.into());
        argv.push("-".into());
    }
    argv.extend(extra.iter().cloned());
    argv
}

fn parse<A: Args>(kind: ServiceKind, extra: &[String], certs_dir: &Path) -> anyhow::Result<A> {
    let command = A::augment_args(clap::Command::new(kind.name()).args_override_self(true));
    let matches = command
        .try_get_matches_from(argv(kind, extra, certs_dir))
        .with_context(|| format!("invalid flags for the {kind} service"))?;
    A::from_arg_matches(&matches).with_context(|| format!("invalid flags for the {kind} service"))
}

/// Split `--service-arg <service>=<flag>` values by service.
pub fn service_args(values: &[String]) -> anyhow::Result<Vec<(ServiceKind, String)>> {
    values
        .iter()
        .map(|value| {
            let (service, flag) = value
                .split_once('=')
                .with_context(|| format!("--service-arg {value:?} is not <service>=<flag>"))?;
            Ok((service.parse()?, flag.to_owned()))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn certs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for stem in [
            "ca",
            "service-routing",
            "runtime-node-7",
            "gateway-gateway",
            "service-agents",
        ] {
            for ext in ["crt", "key"] {
                std::fs::write(dir.path().join(format!("{stem}.{ext}")), "x").unwrap();
            }
        }
        dir
    }

    #[test]
    fn each_service_connects_with_the_certificate_of_its_own_identity() {
        let dir = certs();
        let runtime = Service::configure(
            ServiceKind::Runtime,
            &["--node".into(), "node-7".into()],
            dir.path(),
        )
        .unwrap();
        assert_eq!(runtime.identity(), "runtime/node-7");
        let Service::Runtime(args) = &runtime else {
            unreachable!()
        };
        assert_eq!(args.bus.cert, dir.path().join("runtime-node-7.crt"));
        assert_eq!(args.bus.key, dir.path().join("runtime-node-7.key"));

        let routing = Service::configure(ServiceKind::Routing, &[], dir.path()).unwrap();
        let Service::Routing(args) = &routing else {
            unreachable!()
        };
        assert_eq!(args.bus.cert, dir.path().join("service-routing.crt"));
    }

    #[test]
    fn a_missing_certificate_names_the_identity_and_the_file() {
        let dir = certs();
        let error = Service::configure(ServiceKind::Runtime, &["--node=node-9".into()], dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("runtime/node-9") && error.contains("runtime-node-9.crt"),
            "{error}"
        );
    }

    #[test]
    fn service_args_are_split_by_service_and_checked() {
        let parsed = service_args(&[
            "routing=--rules=x.toml".into(),
            "gateway=--listen=127.0.0.1:0".into(),
        ])
        .unwrap();
        assert_eq!(parsed[0], (ServiceKind::Routing, "--rules=x.toml".into()));
        assert!(service_args(&["billing=--x".into()]).is_err());
        assert!(service_args(&["--rules".into()]).is_err());
    }
}
