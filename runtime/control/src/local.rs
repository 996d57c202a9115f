//! The local stack: from an empty state directory to a running, bootstrapped
//! nats-server with mutual TLS — the part of `patchbay up` the test harness shares.
//!
//! Layout of the state directory (default `.patchbay/`, git-ignored):
//! `certs/` (dev CA, server and workload certificates), `nats/nats.conf` and
//! `nats/jetstream/` (the server and its store), `logs/` (one file per process) and `env`
//! (`export` lines for other tools).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use patchbay_bus::{Bus, BusConfig, Subjects};

use crate::access::AccessPolicy;
use crate::certs::{CertAuthority, Identity, IssuedCert, Validity};
use crate::natsconf::{self, NatsConfigSpec, TlsFiles};
use crate::streams::{self, BootstrapReport, Declaration};

/// Paths inside a state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    /// Certificates.
    #[must_use]
    pub fn certs(&self) -> PathBuf {
        self.0.join("certs")
    }
    /// nats-server config and store.
    #[must_use]
    pub fn nats(&self) -> PathBuf {
        self.0.join("nats")
    }
    /// Process logs.
    #[must_use]
    pub fn logs(&self) -> PathBuf {
        self.0.join("logs")
    }
    /// The env file.
    #[must_use]
    pub fn env_file(&self) -> PathBuf {
        self.0.join("env")
    }
    /// Certificate and key of `identity`.
    #[must_use]
    pub fn identity(&self, identity: &Identity) -> IssuedCert {
        IssuedCert::paths(&self.certs(), identity)
    }
    /// The CA certificate.
    #[must_use]
    pub fn ca(&self) -> PathBuf {
        self.certs().join("ca.crt")
    }
}

/// What to prepare.
#[derive(Debug, Clone)]
pub struct NatsPlan {
    /// Where everything is written.
    pub state: StateDir,
    /// Directory holding `access.toml` and `streams.toml`.
    pub deploy_dir: PathBuf,
    /// Client port on 127.0.0.1; 0 picks a free one (read back from the ports file).
    pub port: u16,
    /// Monitoring port on 127.0.0.1, if any.
    pub http_port: Option<u16>,
    /// Identities beyond the policy's examples (e.g. more runtime nodes).
    pub extra_identities: Vec<Identity>,
    /// Prefix prepended to application subjects.
    pub subject_prefix: String,
}

/// The result of [`prepare`].
#[derive(Debug, Clone)]
pub struct PreparedNats {
    /// The state directory.
    pub state: StateDir,
    /// The rendered config file.
    pub config: PathBuf,
    /// Where nats-server writes its ports file.
    pub ports_dir: PathBuf,
    /// Every identity with a certificate and a user.
    pub identities: Vec<Identity>,
    /// The subject space.
    pub subjects: Subjects,
    /// Directory holding `access.toml` and `streams.toml`.
    pub deploy_dir: PathBuf,
}

impl PreparedNats {
    /// A bus configuration for `identity` against `url`.
    #[must_use]
    pub fn bus_config(&self, url: &str, identity: &Identity) -> BusConfig {
        let files = self.state.identity(identity);
        BusConfig::new(url, self.state.ca(), files.cert, files.key)
            .name(format!("patchbay/{identity}"))
            .subjects(self.subjects.clone())
    }
}

/// Create the CA (once), the server certificate, a certificate per identity (missing ones
/// only) and the nats-server configuration.
pub fn prepare(plan: &NatsPlan) -> anyhow::Result<PreparedNats> {
    let certs = plan.state.certs();
    std::fs::create_dir_all(&certs)
        .with_context(|| format!("cannot create {}", certs.display()))?;
    let nats_dir = plan.state.nats();
    let ports_dir = nats_dir.join("run");
    std::fs::create_dir_all(&ports_dir)
        .with_context(|| format!("cannot create {}", ports_dir.display()))?;
    let ca = CertAuthority::init(
        &certs,
        crate::certs::DEFAULT_TRUST_DOMAIN,
        Validity::days(crate::certs::DEFAULT_CA_VALIDITY_DAYS),
    )
    .context("failed to set up the dev certificate authority")?;
    let server = IssuedCert::server_paths(&certs);
    if !server.exists() {
        ca.issue_server(
            &certs,
            &crate::certs::DEFAULT_SERVER_HOSTS,
            Validity::default(),
        )
        .context("failed to issue the nats-server certificate")?;
    }
    let policy = AccessPolicy::load(&plan.deploy_dir.join("access.toml"))
        .context("invalid deploy/access.toml")?
        .with_subject_prefix(&plan.subject_prefix)
        .context("invalid subject prefix")?;
    let mut identities = policy.identities().to_vec();
    for extra in &plan.extra_identities {
        if !identities.contains(extra) {
            identities.push(extra.clone());
        }
    }
    for identity in &identities {
        if !plan.state.identity(identity).exists() {
            ca.issue(identity, &certs, Validity::default())
                .with_context(|| format!("failed to issue a certificate for {identity}"))?;
        }
    }
    let mut spec = NatsConfigSpec::local(
        &policy,
        TlsFiles {
            ca: ca.cert_path(),
            cert: server.cert,
            key: server.key,
        },
        nats_dir.join("jetstream"),
    );
    spec.port = plan.port;
    spec.http_port = plan.http_port;
    spec.ports_file_dir = Some(ports_dir.clone());
    spec.identities.clone_from(&identities);
    let text = natsconf::render(&spec).context("failed to render the nats-server config")?;
    let config = nats_dir.join("nats.conf");
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    Ok(PreparedNats {
        state: plan.state.clone(),
        config,
        ports_dir,
        identities,
        subjects: Subjects::new(plan.subject_prefix.clone()).context("invalid subject prefix")?,
        deploy_dir: plan.deploy_dir.clone(),
    })
}

/// A nats-server child process, killed on drop.
#[derive(Debug)]
pub struct NatsProcess {
    child: Child,
    /// `tls://127.0.0.1:<port>`.
    pub url: String,
    /// The client port.
    pub port: u16,
    /// Its log file.
    pub log: PathBuf,
}

impl NatsProcess {
    /// Stop the server (SIGKILL) and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start nats-server with `prepared`'s config and wait until it accepts an mTLS
/// connection from `cli/admin`.
pub async fn start_nats(binary: &Path, prepared: &PreparedNats) -> anyhow::Result<NatsProcess> {
    let logs = prepared.state.logs();
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let log = logs.join("nats-server.log");
    let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(binary)
        .arg("-c")
        .arg(&prepared.config)
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let mut process = NatsProcess {
        child,
        url: String::new(),
        port: 0,
        log,
    };
    let ports_file = prepared
        .ports_dir
        .join(format!("nats-server_{}.ports", process.pid()));
    let started = Instant::now();
    let port = loop {
        if let Ok(text) = std::fs::read_to_string(&ports_file)
            && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(port) = json["nats"][0]
                .as_str()
                .and_then(|u| u.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
        {
            break port;
        }
        if !process.is_running() {
            bail!(
                "nats-server exited at start; its log {} says:\n{}",
                process.log.display(),
                std::fs::read_to_string(&process.log).unwrap_or_default()
            );
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!(
                "nats-server did not report its port within 20 s (log: {})",
                process.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    process.port = port;
    process.url = format!("tls://127.0.0.1:{port}");
    // Ready when an admin can connect and JetStream answers.
    let admin = prepared.bus_config(&process.url, &Identity::admin());
    loop {
        let last = match patchbay_bus::connect(&admin).await {
            Ok(bus) => match bus.jetstream().query_account().await {
                Ok(_) => return Ok(process),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if started.elapsed() > Duration::from_secs(20) {
            bail!("nats-server is not ready after 20 s: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Create or update the JetStream assets of `deploy_dir/streams.toml` and store the host
/// rules of `deploy_dir/access.toml` that `fn deploy` checks against (admin only).
pub async fn bootstrap(bus: &Bus, deploy_dir: &Path) -> anyhow::Result<BootstrapReport> {
    let decl = Declaration::load(&deploy_dir.join("streams.toml"))
        .context("invalid deploy/streams.toml")?;
    // Loaded first: an invalid policy changes nothing.
    let policy = AccessPolicy::load(&deploy_dir.join("access.toml"))
        .context("invalid deploy/access.toml")?;
    let report = streams::bootstrap(&bus.jetstream(), &decl, bus.subjects().prefix())
        .await
        .context("bootstrap of JetStream assets failed")?;
    // What `fn deploy` checks triggers and allow-lists against.
    crate::admission::store(&bus.jetstream(), &policy)
        .await
        .context("failed to store the access policy's host rules")?;
    Ok(report)
}
