//! `patchbay up`: the whole system on this machine — nats-server with mTLS and
//! JetStream, the bootstrap, the resilience policies of `deploy/resilience.toml`, the core
//! services (routing, agents), runtime nodes, the gateway with a dev token, and the
//! example functions — until Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::envfile::{self, EnvFile};
use crate::function::{DeployArgs, FnCommand};
use patchbay_control::certs::Identity;
use patchbay_control::local::{self, NatsPlan, StateDir};

/// `patchbay up` flags.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Use this existing NATS (whose server trusts the state directory's CA) instead of
    /// starting one.
    #[arg(long = "existing-nats", env = "PATCHBAY_EXISTING_NATS")]
    pub existing_nats: Option<String>,
    /// The nats-server binary to start.
    #[arg(
        long,
        env = "PATCHBAY_NATS_SERVER",
        default_value = ".tools/venv/bin/nats-server"
    )]
    pub nats_server: PathBuf,
    /// Client port of the local nats-server.
    #[arg(long, default_value_t = patchbay_control::natsconf::DEFAULT_PORT)]
    pub port: u16,
    /// Monitoring port of the local nats-server (127.0.0.1).
    #[arg(long, default_value_t = patchbay_control::natsconf::DEFAULT_HTTP_PORT)]
    pub http_port: u16,
    /// Runtime nodes to start.
    #[arg(long, default_value_t = 1)]
    pub nodes: u16,
    /// First admin (metrics) port: each process takes the next one, in the order the
    /// summary lists them.
    #[arg(long, default_value_t = 9464)]
    pub admin_port: u16,
    /// Directory with `access.toml` and `streams.toml`.
    #[arg(long, default_value = "deploy")]
    pub deploy_dir: PathBuf,
    /// Public port of the gateway (127.0.0.1).
    #[arg(long, default_value_t = 8080)]
    pub gateway_port: u16,
    /// Directory with the example components (`make wasm` builds them).
    #[arg(long, env = "PATCHBAY_COMPONENTS", default_value = "build/components")]
    pub components: PathBuf,
    /// Start everything, deploy, print, then stop everything and exit (a smoke test).
    #[arg(long)]
    pub check: bool,
    /// How the services are laid out in processes: `monolith` (one `patchbay-node` runs
    /// the gateway, routing, agents and the first runtime node) or `split` (a process per
    /// service). Further `--nodes` are extra runtime processes either way.
    #[arg(long, value_enum, env = "PATCHBAY_UP_TOPOLOGY", default_value_t = UpTopology::Monolith)]
    pub topology: UpTopology,
}

/// The topologies `patchbay up` can start (the processes of `deploy/topology.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpTopology {
    /// One process runs every service.
    Monolith,
    /// One process per service.
    Split,
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Supervised {
    name: String,
    child: Child,
}

impl Supervised {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop in 5 s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary installed next to the running `patchbay`.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the patchbay binary")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found next to {}: build the workspace (`make build`)",
            name,
            exe.display()
        );
    }
    Ok(path)
}

/// An example function `up` deploys.
struct Example {
    /// Component file stem in the components directory (also the function name).
    name: &'static str,
    trigger: &'static str,
    publish: &'static [&'static str],
    config: &'static [(&'static str, &'static str)],
}

/// The contact-centre examples: triggers and allow-lists as each function documents.
const EXAMPLES: &[Example] = &[
    Example {
        name: "customer-lookup",
        trigger: "subject:cc.v1.customers.lookup",
        publish: &["cc.v1.customers.lookup.reply"],
        config: &[("default_tier", "standard")],
    },
    Example {
        name: "recording-index",
        trigger: "stream:CC_RECORDINGS:cc.v1.recordings.*.completed",
        publish: &["cc.v1.recordings.*.indexed"],
        config: &[],
    },
    Example {
        name: "survey-scheduler",
        trigger: "stream:CC_CALLS:cc.v1.calls.*.ended",
        publish: &["cc.v1.surveys.*.scheduled"],
        config: &[("delay_minutes", "30"), ("min_duration_s", "20")],
    },
    Example {
        name: "call-analytics",
        trigger: "stream:CC_CALLS:cc.v1.calls.>",
        publish: &[],
        config: &[],
    },
    // A plain wasi:http/proxy component (the test fixture `wasmtime serve` also runs),
    // served by the gateway at /hello/….
    Example {
        name: "http-echo",
        trigger: "http:/hello/...",
        publish: &[],
        config: &[],
    },
];

/// A long-running process `up` starts, with its identity and flags.
pub struct Workload {
    /// Label in the summary and log file name.
    pub label: String,
    binary: &'static str,
    /// The identity whose certificate the process gets; `None` for `patchbay-node`,
    /// which picks each service's own from the certificates directory.
    identity: Option<Identity>,
    args: Vec<String>,
    /// Environment set for the process, beyond the bus connection and admin listener.
    pub env: Vec<(&'static str, String)>,
    /// Its admin listener (`PATCHBAY_ADMIN_LISTEN`).
    pub admin: String,
}

impl Workload {
    /// Start the process against NATS at `url` with certificates from `state`, logging
    /// to the state's log directory; returns it (stopped when dropped) and its log file.
    pub fn spawn(&self, state: &StateDir, url: &str) -> anyhow::Result<(Supervised, PathBuf)> {
        let program = sibling(self.binary)?;
        let log = state
            .logs()
            .join(format!("{}.log", self.label.replace(' ', "-")));
        let out = std::fs::File::create(&log)?;
        let mut command = Command::new(&program);
        if let Some(identity) = &self.identity {
            let files = state.identity(identity);
            command
                .env(envfile::NATS_CERT, &files.cert)
                .env(envfile::NATS_KEY, &files.key);
        } else {
            command.env("PATCHBAY_CERTS_DIR", state.certs());
        }
        let child = command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env(envfile::NATS_URL, url)
            .env(envfile::NATS_CA, state.ca())
            .env("PATCHBAY_ADMIN_LISTEN", &self.admin)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok((
            Supervised {
                name: self.label.clone(),
                child,
            },
            log,
        ))
    }
}

/// Run `patchbay up`.
pub async fn run(args: UpArgs, state_dir: &Path) -> anyhow::Result<()> {
    let state = StateDir(state_dir.to_owned());
    let nodes: Vec<Identity> = (1..=args.nodes.max(1))
        .map(|i| Identity::new("runtime", &format!("node-{i}")))
        .collect::<Result<_, _>>()?;
    let plan = NatsPlan {
        state: state.clone(),
        deploy_dir: args.deploy_dir.clone(),
        port: args.port,
        http_port: Some(args.http_port),
        extra_identities: nodes.clone(),
        subject_prefix: String::new(),
    };
    let prepared = local::prepare(&plan)?;
    println!("certificates and config in {}", state_dir.display());

    let mut nats_process = None;
    let url = match &args.existing_nats {
        Some(url) => url.clone(),
        None => {
            if !args.nats_server.is_file() {
                bail!(
                    "nats-server not found at {}: run `make up` (it installs one) or pass --nats-server",
                    args.nats_server.display()
                );
            }
            let process = local::start_nats(&args.nats_server, &prepared).await?;
            let url = process.url.clone();
            nats_process = Some(process);
            url
        }
    };
    let admin_files = state.identity(&Identity::admin());
    let admin = patchbay_bus::connect(&prepared.bus_config(&url, &Identity::admin()))
        .await
        .context("the admin identity cannot connect")?;
    let report = local::bootstrap(&admin, &args.deploy_dir).await?;
    println!("JetStream assets: {report}");
    apply_resilience(&admin, &args.deploy_dir).await?;

    let mut env = EnvFile::load(&state.env_file())?;
    env.set(envfile::NATS_URL, &url);
    env.set(envfile::NATS_CA, state.ca().display().to_string());
    env.set(envfile::NATS_CERT, admin_files.cert.display().to_string());
    env.set(envfile::NATS_KEY, admin_files.key.display().to_string());
    env.save(&state.env_file())
        .with_context(|| format!("cannot write {}", state.env_file().display()))?;

    std::fs::create_dir_all(state.logs())?;
    let gateway_url = format!("http://127.0.0.1:{}", args.gateway_port);
    let mut workloads = workloads(args.topology, args.gateway_port, &args.deploy_dir, &nodes)?;
    let mut children = Vec::new();
    let mut admin_urls = Vec::new();
    for (i, workload) in workloads.iter_mut().enumerate() {
        workload.admin = format!("127.0.0.1:{}", args.admin_port + i as u16);
        let (child, log) = workload.spawn(&state, &url)?;
        admin_urls.push((workload.label.clone(), workload.admin.clone(), log));
        children.push(child);
    }

    // A dev token for the gateway: the one from the last run while it still works.
    let token = match env.get(envfile::TOKEN) {
        Some(token) if crate::token::is_valid(&admin, token).await => token.to_owned(),
        _ => {
            crate::token::create_token(
                &admin,
                "dev",
                vec![patchbay_gateway::token::Scope::Admin],
                Some(Duration::from_secs(30 * 24 * 3600)),
            )
            .await?
        }
    };
    env.set(envfile::GATEWAY_URL, &gateway_url);
    env.set(envfile::TOKEN, &token);
    env.save(&state.env_file())
        .with_context(|| format!("cannot write {}", state.env_file().display()))?;

    let mut deployed = Vec::new();
    for Example {
        name,
        trigger,
        publish,
        config,
    } in EXAMPLES
    {
        let file = args.components.join(format!("{name}.wasm"));
        if !file.is_file() {
            println!(
                "skipping {name}: {} not built (run `make wasm`)",
                file.display()
            );
            continue;
        }
        let deploy = DeployArgs {
            publish: publish.iter().map(|s| (*s).to_owned()).collect(),
            config: config
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..DeployArgs::new(file, *name, *trigger)
        };
        crate::function::run(FnCommand::Deploy(deploy), admin.clone())
            .await
            .with_context(|| format!("failed to deploy example function {name}"))?;
        deployed.push(*name);
    }

    println!();
    println!("Patchbay is up.");
    println!(
        "  NATS            {url}  (mTLS; monitoring http://127.0.0.1:{})",
        args.http_port
    );
    println!(
        "  gateway         {gateway_url}  (OpenAPI {gateway_url}/openapi.json; token in the env file)"
    );
    for (label, addr, log) in &admin_urls {
        println!(
            "  {label:<15} http://{addr}/metrics  /healthz  /readyz   log {}",
            log.display()
        );
    }
    if let Some(p) = &nats_process {
        println!("  nats-server log {}", p.log.display());
    }
    println!("  functions       {}", deployed.join(", "));
    println!(
        "  env file        {}  (source it to use the admin identity)",
        state.env_file().display()
    );
    println!();
    println!("Try:");
    println!("  source {}", state.env_file().display());
    println!("  patchbay fn ls");
    println!(
        "  patchbay fn invoke customer-lookup --type cc.customer.lookup.v1 --data '{{\"phone\":\"+44 20 7946 0000\"}}'"
    );
    println!(
        "  curl -H \"Authorization: Bearer $PATCHBAY_TOKEN\" $PATCHBAY_GATEWAY_URL/hello/world"
    );
    println!(
        "  curl -H \"Authorization: Bearer $PATCHBAY_TOKEN\" -H 'ce-specversion: 1.0' -H 'ce-id: call-1' \\\n       -H 'ce-source: /pbx' -H 'ce-type: cc.call.incoming.v1' -H 'content-type: application/json' \\\n       -d '{{\"call_id\":\"call-1\",\"dialled\":\"+442079460000\",\"caller\":\"+44 20 7946 0000\"}}' \\\n       $PATCHBAY_GATEWAY_URL/v1/events/cc.v1.calls.call-1.incoming"
    );
    println!(
        "  python3 -m pip install nats-py  # any NATS client works with the same certificates"
    );
    println!(
        "Traces: set OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 before `make up` to export to a collector."
    );

    if args.check {
        return Ok(());
    }
    println!("\nCtrl-C stops everything.");
    patchbay_telemetry::shutdown_signal().await;
    println!("stopping…");
    drop(children);
    drop(nats_process);
    Ok(())
}

/// The processes of `args.topology`: with `monolith`, one `patchbay-node` running the
/// gateway, routing, agents and the first runtime node (each service with its own
/// identity) plus a `patchbay-runtime` per further node; with `split`, a process each.
/// The gateway listens on `gateway_port`; routing and agents read `routing.toml` and
/// `agents.toml` in `config_dir`.
pub fn workloads(
    topology: UpTopology,
    gateway_port: u16,
    config_dir: &Path,
    nodes: &[Identity],
) -> anyhow::Result<Vec<Workload>> {
    let listen = format!("127.0.0.1:{gateway_port}");
    let rules = config_dir.join("routing.toml").display().to_string();
    let agents = config_dir.join("agents.toml").display().to_string();
    let runtime = |node: &Identity| Workload {
        label: format!("runtime {}", node.name()),
        binary: "patchbay-runtime",
        identity: Some(node.clone()),
        args: vec![],
        env: vec![("PATCHBAY_NODE", node.name().to_owned())],
        admin: String::new(),
    };
    let mut workloads = Vec::new();
    match topology {
        UpTopology::Monolith => {
            let (first, rest) = nodes.split_first().context("no runtime node")?;
            let service_arg = |service: &str, flag: String| {
                ["--service-arg".to_owned(), format!("{service}={flag}")]
            };
            let args = [
                service_arg("runtime", format!("--node={}", first.name())),
                service_arg("gateway", format!("--listen={listen}")),
                service_arg("routing", format!("--rules={rules}")),
                service_arg("agents", format!("--config={agents}")),
            ]
            .concat();
            workloads.push(Workload {
                label: "node".into(),
                binary: "patchbay-node",
                identity: None,
                args,
                env: vec![],
                admin: String::new(),
            });
            workloads.extend(rest.iter().map(runtime));
        }
        UpTopology::Split => {
            workloads.extend(nodes.iter().map(runtime));
            workloads.push(Workload {
                label: "gateway".into(),
                binary: "patchbay-gateway",
                identity: Some(Identity::new("gateway", "gateway")?),
                args: vec!["--listen".into(), listen],
                env: vec![],
                admin: String::new(),
            });
            workloads.push(Workload {
                label: "routing".into(),
                binary: "patchbay-routing",
                identity: Some(Identity::new("service", "routing")?),
                args: vec!["--rules".into(), rules],
                env: vec![],
                admin: String::new(),
            });
            workloads.push(Workload {
                label: "agents".into(),
                binary: "patchbay-agents",
                identity: Some(Identity::new("service", "agents")?),
                args: vec!["run".into(), "--config".into(), agents],
                env: vec![],
                admin: String::new(),
            });
        }
    }
    Ok(workloads)
}

/// Apply `<deploy>/resilience.toml` (if there is one) before the services start, so they
/// begin with its policies; `patchbay resilience apply` changes them later without a
/// restart.
async fn apply_resilience(admin: &patchbay_bus::Bus, deploy_dir: &Path) -> anyhow::Result<()> {
    let file = deploy_dir.join("resilience.toml");
    if !file.is_file() {
        return Ok(());
    }
    let policy = crate::resilience::validate_file(&file)
        .with_context(|| format!("{} refused", file.display()))?;
    let store = crate::resilience::open(admin).await?;
    let changes = crate::resilience::apply(&store, &policy, false).await?;
    println!(
        "resilience policies: {} target(s) from {}",
        changes.len(),
        file.display()
    );
    Ok(())
}
