//! Renders the nats-server configuration of a local Patchbay bus.
//!
//! The shape lives in `deploy/local/nats.conf.tmpl` (embedded at compile time, so the binary
//! and the template never disagree); [`render`] fills its `{{placeholders}}`:
//! mutual TLS with `verify_and_map` (client certificates from [`crate::certs`], mapped by their
//! SPIFFE URI SAN to users), JetStream with `sync_interval: always` (docs/architecture.md, "Delivery and failure"),
//! a loopback-only monitoring listener, the max payload, and one `authorization` user per
//! identity with the permissions of [`crate::access`]. There is no user without a certificate
//! and no `no_auth_user`, so an identity not rendered here cannot connect at all.
//!
//! It does not start nats-server or write files (the `patchbay up` command does), and it
//! renders a single server: clustering (routes, JetStream R3) belongs to `deploy/k8s`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::access::{AccessPolicy, Permissions};
use crate::certs::{self, Identity};

/// The nats-server template, `deploy/local/nats.conf.tmpl`.
pub const TEMPLATE: &str = include_str!("../../../deploy/local/nats.conf.tmpl");
/// Default client port.
pub const DEFAULT_PORT: u16 = 4222;
/// Default monitoring port (bound to loopback only).
pub const DEFAULT_HTTP_PORT: u16 = 8222;
/// Default max payload, 1 MiB (docs/architecture.md, "The wire").
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 20;
/// nats-server refuses payload limits above 64 MiB.
pub const MAX_MAX_PAYLOAD: u32 = 64 << 20;
/// TLS handshake timeout in seconds.
pub const DEFAULT_TLS_TIMEOUT_SECS: u32 = 2;

/// Errors rendering a configuration.
#[derive(Debug, thiserror::Error)]
pub enum NatsConfError {
    /// An identity that no access-policy group covers.
    #[error(
        "identity {identity} belongs to no group of the access policy, so it would get no permissions"
    )]
    NoGroup {
        /// The identity.
        identity: String,
    },
    /// The same identity twice.
    #[error("identity {identity} is listed twice")]
    DuplicateIdentity {
        /// The identity.
        identity: String,
    },
    /// A path nats-server could not be given.
    #[error("{what} path {path} is not valid UTF-8")]
    NonUtf8Path {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A host that is not a plain name or address.
    #[error("listen host {host:?} must be a host name or IP address")]
    BadHost {
        /// What was given.
        host: String,
    },
    /// A max payload nats-server would refuse.
    #[error("max payload {max_payload} must be between 1 and {MAX_MAX_PAYLOAD} bytes")]
    BadMaxPayload {
        /// What was given.
        max_payload: u32,
    },
    /// The trust domain is invalid.
    #[error(transparent)]
    TrustDomain(#[from] certs::CertError),
    /// The template has a placeholder this code does not fill (a template edit went wrong).
    #[error("template placeholder {{{{{name}}}}} is unknown")]
    UnknownPlaceholder {
        /// The placeholder name.
        name: String,
    },
}

/// Result of rendering.
pub type Result<T, E = NatsConfError> = std::result::Result<T, E>;

/// The server's own TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate that client certificates must chain to.
    pub ca: PathBuf,
    /// Server certificate.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
}

/// Everything a rendered configuration depends on.
#[derive(Debug, Clone)]
pub struct NatsConfigSpec<'a> {
    /// `server_name` (also names the JetStream node).
    pub server_name: String,
    /// Client listener host (`127.0.0.1` locally).
    pub listen_host: String,
    /// Client port; 0 renders as nats-server's "random port" (`-1`), for test harnesses
    /// that read the port back from `ports_file_dir`.
    pub port: u16,
    /// Monitoring port on 127.0.0.1 (`/varz`, `/jsz`, ...); `None` disables monitoring.
    pub http_port: Option<u16>,
    /// Where nats-server may write its ports file (test harnesses); `None` for no file.
    pub ports_file_dir: Option<PathBuf>,
    /// JetStream store directory.
    pub store_dir: PathBuf,
    /// Server TLS material.
    pub tls: TlsFiles,
    /// One nats-server user per identity, in this order.
    pub identities: Vec<Identity>,
    /// Where their permissions come from (with its subject prefix already set).
    pub policy: &'a AccessPolicy,
    /// Trust domain of the SPIFFE ids the users are named by.
    pub trust_domain: String,
    /// Largest message payload accepted, in bytes.
    pub max_payload: u32,
}

impl<'a> NatsConfigSpec<'a> {
    /// A local single-server spec with the defaults: 127.0.0.1:4222, monitoring on
    /// 127.0.0.1:8222, trust domain `patchbay.local`, 1 MiB payloads, and every example
    /// identity of the policy.
    #[must_use]
    pub fn local(policy: &'a AccessPolicy, tls: TlsFiles, store_dir: PathBuf) -> Self {
        Self {
            server_name: "patchbay".to_owned(),
            listen_host: "127.0.0.1".to_owned(),
            port: DEFAULT_PORT,
            http_port: Some(DEFAULT_HTTP_PORT),
            ports_file_dir: None,
            store_dir,
            tls,
            identities: policy.identities().to_vec(),
            policy,
            trust_domain: certs::DEFAULT_TRUST_DOMAIN.to_owned(),
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// Renders the nats-server configuration for `spec`.
pub fn render(spec: &NatsConfigSpec<'_>) -> Result<String> {
    certs::validate_trust_domain(&spec.trust_domain)?;
    if spec.max_payload == 0 || spec.max_payload > MAX_MAX_PAYLOAD {
        return Err(NatsConfError::BadMaxPayload {
            max_payload: spec.max_payload,
        });
    }
    if spec.listen_host.is_empty()
        || !spec
            .listen_host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
    {
        return Err(NatsConfError::BadHost {
            host: spec.listen_host.clone(),
        });
    }

    let mut users = String::new();
    for (i, identity) in spec.identities.iter().enumerate() {
        if spec.identities[..i].contains(identity) {
            return Err(NatsConfError::DuplicateIdentity {
                identity: identity.to_string(),
            });
        }
        let perms =
            spec.policy
                .permissions_for(identity)
                .ok_or_else(|| NatsConfError::NoGroup {
                    identity: identity.to_string(),
                })?;
        let group = spec.policy.group_of(identity).unwrap_or_default();
        users.push_str(&render_user(
            &identity.spiffe_id(&spec.trust_domain),
            &format!("{identity} (group {group})"),
            &perms,
        ));
    }

    let port = if spec.port == 0 {
        "-1".to_owned()
    } else {
        spec.port.to_string()
    };
    let host = if spec.listen_host.contains(':') {
        format!("[{}]", spec.listen_host)
    } else {
        spec.listen_host.clone()
    };
    let mut monitoring = match spec.http_port {
        Some(http) => format!("http: {}", quote(&format!("127.0.0.1:{http}"))),
        None => "# monitoring disabled".to_owned(),
    };
    if let Some(dir) = &spec.ports_file_dir {
        let _ = write!(
            monitoring,
            "\nports_file_dir: {}",
            quote(utf8("ports_file_dir", dir)?)
        );
    }
    let prefix_note = if spec.policy.subject_prefix().is_empty() {
        String::new()
    } else {
        format!(", subject prefix {}", spec.policy.subject_prefix())
    };

    fill(TEMPLATE, |name| {
        Ok(match name {
            "server_name" => quote(&spec.server_name),
            "listen" => quote(&format!("{host}:{port}")),
            "monitoring" => monitoring.clone(),
            "max_payload" => spec.max_payload.to_string(),
            "ca_file" => quote(utf8("CA", &spec.tls.ca)?),
            "cert_file" => quote(utf8("server certificate", &spec.tls.cert)?),
            "key_file" => quote(utf8("server key", &spec.tls.key)?),
            "tls_timeout" => DEFAULT_TLS_TIMEOUT_SECS.to_string(),
            "store_dir" => quote(utf8("JetStream store", &spec.store_dir)?),
            "trust_domain" => spec.trust_domain.clone(),
            "prefix_note" => prefix_note.clone(),
            "users" => users.trim_end().to_owned(),
            other => {
                return Err(NatsConfError::UnknownPlaceholder {
                    name: other.to_owned(),
                });
            }
        })
    })
}

/// One entry of `authorization.users`.
fn render_user(user: &str, comment: &str, perms: &Permissions) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "    # {comment}");
    let _ = writeln!(out, "    {{");
    let _ = writeln!(out, "      user: {}", quote(user));
    let _ = writeln!(out, "      permissions: {{");
    out.push_str(&render_permissions(perms, "        "));
    let _ = writeln!(out, "      }}");
    let _ = writeln!(out, "    }}");
    out
}

/// The body of a nats-server `permissions { … }` block, each line starting with `indent`.
#[must_use]
pub fn render_permissions(perms: &Permissions, indent: &str) -> String {
    let mut out = String::new();
    let inner = format!("{indent}  ");
    if perms.publish_allow.is_empty() {
        // An empty allow list would parse as "no restriction": deny everything explicitly.
        let _ = writeln!(out, "{indent}publish: {{ deny: [\">\"] }}");
    } else {
        let _ = writeln!(out, "{indent}publish: {{");
        let _ = writeln!(out, "{inner}allow: {}", list(&perms.publish_allow, &inner));
        if !perms.publish_deny.is_empty() {
            let _ = writeln!(out, "{inner}deny: {}", list(&perms.publish_deny, &inner));
        }
        let _ = writeln!(out, "{indent}}}");
    }
    if perms.subscribe_allow.is_empty() {
        let _ = writeln!(out, "{indent}subscribe: {{ deny: [\">\"] }}");
    } else {
        let _ = writeln!(out, "{indent}subscribe: {{");
        let _ = writeln!(
            out,
            "{inner}allow: {}",
            list(&perms.subscribe_allow, &inner)
        );
        let _ = writeln!(out, "{indent}}}");
    }
    if perms.allow_responses {
        let _ = writeln!(out, "{indent}allow_responses: true");
    }
    out
}

/// A quoted list: inline when short, one entry per line otherwise (operators read these).
fn list(items: &[String], indent: &str) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    if quoted.len() <= 2 {
        return format!("[{}]", quoted.join(", "));
    }
    let mut out = String::from("[\n");
    for item in quoted {
        let _ = writeln!(out, "{indent}  {item}");
    }
    let _ = write!(out, "{indent}]");
    out
}

/// Fills `{{name}}` placeholders in one pass (values are never re-scanned).
fn fill(template: &str, mut value: impl FnMut(&str) -> Result<String>) -> Result<String> {
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(NatsConfError::UnknownPlaceholder {
                name: after.chars().take(20).collect(),
            });
        };
        out.push_str(&value(&after[..end])?);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A nats-server double-quoted string (no variable interpolation inside quotes).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn utf8<'p>(what: &'static str, path: &'p Path) -> Result<&'p str> {
    path.to_str().ok_or_else(|| NatsConfError::NonUtf8Path {
        what,
        path: path.to_owned(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::certs::{CertAuthority, IssuedCert, Validity};
    use crate::test_nats::{TestNats, nats_server_binary};

    fn policy() -> AccessPolicy {
        AccessPolicy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/access.toml"))
            .unwrap()
    }

    fn tls_in(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.crt"),
            cert: dir.join("server-nats.crt"),
            key: dir.join("server-nats.key"),
        }
    }

    #[test]
    fn renders_tls_jetstream_and_one_user_per_identity() {
        let policy = policy();
        let spec = NatsConfigSpec::local(&policy, tls_in(Path::new("/certs")), "/data/js".into());
        let conf = render(&spec).unwrap();
        assert!(conf.contains("verify_and_map: true"));
        assert!(conf.contains("sync_interval: always"));
        assert!(conf.contains("store_dir: \"/data/js\""));
        assert!(conf.contains("listen: \"127.0.0.1:4222\""));
        assert!(conf.contains("http: \"127.0.0.1:8222\""));
        assert!(conf.contains("max_payload: 1048576"));
        assert!(!conf.contains("{{"), "unfilled placeholder:\n{conf}");
        for identity in policy.identities() {
            let user = format!("user: \"{}\"", identity.spiffe_id("patchbay.local"));
            assert_eq!(conf.matches(&user).count(), 1, "{user}");
        }
        assert_eq!(conf.matches("user: ").count(), policy.identities().len());
        assert!(conf.contains("\"_INBOX.runtime.node-1.>\""));
        assert!(!conf.contains("no_auth_user"));
    }

    #[test]
    fn refuses_identities_outside_the_policy() {
        let policy = policy();
        let mut spec = NatsConfigSpec::local(&policy, tls_in(Path::new("/c")), "/js".into());
        spec.identities.push("stranger/x".parse().unwrap());
        assert!(matches!(render(&spec), Err(NatsConfError::NoGroup { .. })));
        let mut spec = NatsConfigSpec::local(&policy, tls_in(Path::new("/c")), "/js".into());
        spec.identities.push(Identity::admin());
        assert!(matches!(
            render(&spec),
            Err(NatsConfError::DuplicateIdentity { .. })
        ));
        let mut spec = NatsConfigSpec::local(&policy, tls_in(Path::new("/c")), "/js".into());
        spec.max_payload = 0;
        assert!(matches!(
            render(&spec),
            Err(NatsConfError::BadMaxPayload { .. })
        ));
        spec.max_payload = DEFAULT_MAX_PAYLOAD;
        spec.listen_host = "127.0.0.1\"; evil".into();
        assert!(matches!(render(&spec), Err(NatsConfError::BadHost { .. })));
    }

    #[test]
    fn quotes_are_escaped() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quote("$JS.API.INFO"), "\"$JS.API.INFO\"");
    }

    #[test]
    fn empty_publish_list_renders_as_deny_all() {
        let perms = Permissions {
            subscribe_allow: vec!["_INBOX.x.y.>".into()],
            ..Permissions::default()
        };
        let text = render_permissions(&perms, "");
        assert!(text.contains("publish: { deny: [\">\"] }"), "{text}");
    }

    /// Writes a CA, the server certificate and every example identity's certificate.
    fn certs_for(dir: &Path, policy: &AccessPolicy) -> CertAuthority {
        let ca = CertAuthority::init(dir, "patchbay.local", Validity::days(2)).unwrap();
        ca.issue_server(dir, &certs::DEFAULT_SERVER_HOSTS, Validity::days(1))
            .unwrap();
        for identity in policy.identities() {
            ca.issue(identity, dir, Validity::days(1)).unwrap();
        }
        ca
    }

    #[test]
    fn nats_server_accepts_the_rendered_config() {
        let policy = policy().with_subject_prefix("tenant-a").unwrap();
        let dir = tempfile::tempdir().unwrap();
        certs_for(dir.path(), &policy);
        let spec = NatsConfigSpec::local(&policy, tls_in(dir.path()), dir.path().join("js"));
        let conf_path = dir.path().join("nats.conf");
        std::fs::write(&conf_path, render(&spec).unwrap()).unwrap();
        let output = std::process::Command::new(nats_server_binary())
            .arg("-c")
            .arg(&conf_path)
            .arg("-t")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "nats-server -t refused the config:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    mod live {
        //! The rendered policy against a real nats-server with mutual TLS: the operations
        //! each workload performs through async-nats work, and what it must not do is
        //! refused. (The exhaustive deny matrix is the integration suite's job.)

        use super::*;
        use async_nats::jetstream::{self, consumer};
        use futures::StreamExt;
        use tokio::sync::mpsc;

        struct Bus {
            server: TestNats,
            certs: PathBuf,
        }

        impl Bus {
            fn start(policy: &AccessPolicy) -> Self {
                let mut certs_dir = PathBuf::new();
                let server = TestNats::start(|dir| {
                    certs_dir = dir.join("certs");
                    certs_for(&certs_dir, policy);
                    let mut spec =
                        NatsConfigSpec::local(policy, tls_in(&certs_dir), dir.join("js"));
                    spec.port = 0;
                    spec.http_port = None;
                    render(&spec).unwrap()
                });
                Self {
                    server,
                    certs: certs_dir,
                }
            }

            async fn connect_with(
                &self,
                identity: &Identity,
                files: &IssuedCert,
                ca: &Path,
            ) -> Result<
                (async_nats::Client, mpsc::UnboundedReceiver<String>),
                async_nats::ConnectError,
            > {
                let (tx, rx) = mpsc::unbounded_channel();
                let client = async_nats::ConnectOptions::new()
                    .require_tls(true)
                    .add_root_certificates(ca.to_owned())
                    .add_client_certificate(files.cert.clone(), files.key.clone())
                    .custom_inbox_prefix(identity.inbox_prefix())
                    .event_callback(move |event| {
                        let tx = tx.clone();
                        async move {
                            if let async_nats::Event::ServerError(err) = event {
                                let _ = tx.send(err.to_string());
                            }
                        }
                    })
                    .connect(self.server.tls_url())
                    .await?;
                Ok((client, rx))
            }

            async fn connect(
                &self,
                identity: &str,
            ) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
                let identity: Identity = identity.parse().unwrap();
                let files = IssuedCert::paths(&self.certs, &identity);
                self.connect_with(&identity, &files, &self.certs.join("ca.crt"))
                    .await
                    .unwrap()
            }
        }

        /// A subject no workload may publish: its refusal marks the end of the errors caused
        /// by what was sent before it.
        const SENTINEL: &str = "$JS.API.STREAM.DELETE.PATCHBAY_SENTINEL";

        /// Waits for the refusal of the sentinel and returns the server errors that came
        /// before it. The server answers a connection's messages in order and async-nats
        /// hands errors to the callback in order, so this needs no timing assumption.
        async fn errors_until_sentinel(
            client: &async_nats::Client,
            errors: &mut mpsc::UnboundedReceiver<String>,
        ) -> Vec<String> {
            client.publish(SENTINEL, "".into()).await.unwrap();
            client.flush().await.unwrap();
            let mut before = Vec::new();
            loop {
                let err = tokio::time::timeout(std::time::Duration::from_secs(10), errors.recv())
                    .await
                    .expect("the sentinel publish was not refused")
                    .unwrap();
                if err.contains(SENTINEL) {
                    return before;
                }
                before.push(err);
            }
        }

        /// Publishes to `subject`; returns the server's error about it, if any.
        async fn publish_error(
            client: &async_nats::Client,
            errors: &mut mpsc::UnboundedReceiver<String>,
            subject: &str,
        ) -> Option<String> {
            client
                .publish(subject.to_owned(), "x".into())
                .await
                .unwrap();
            errors_until_sentinel(client, errors)
                .await
                .into_iter()
                .find(|err| err.contains(subject))
        }

        async fn admin_setup(bus: &Bus) -> jetstream::Context {
            let (admin, _) = bus.connect("cli/admin").await;
            let js = jetstream::new(admin);
            let decl = crate::streams::Declaration::load(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/streams.toml"),
            )
            .unwrap();
            crate::streams::bootstrap(&js, &decl, "").await.unwrap();
            js
        }

        #[tokio::test]
        async fn runtime_node_does_its_job_and_nothing_more() {
            let policy = policy();
            let bus = Bus::start(&policy);
            let admin = admin_setup(&bus).await;

            // What `patchbay fn deploy` (admin) prepares for a function "hello".
            let registry = admin.get_key_value("patchbay-functions").await.unwrap();
            registry.put("hello", "spec-v1".into()).await.unwrap();
            let artifacts = admin.get_object_store("patchbay-artifacts").await.unwrap();
            artifacts
                .put("sha256-abc", &mut &b"wasm"[..])
                .await
                .unwrap();
            let calls = admin.get_stream("CC_CALLS").await.unwrap();
            calls
                .create_consumer(consumer::pull::Config {
                    durable_name: Some("fn-hello".into()),
                    filter_subject: "cc.v1.calls.*.routed".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            admin
                .publish("cc.v1.calls.c1.routed", "{}".into())
                .await
                .unwrap()
                .await
                .unwrap();

            let (node, mut errors) = bus.connect("runtime/node-1").await;
            let js = jetstream::new(node.clone());

            // Registry: get and watch.
            let registry = js.get_key_value("patchbay-functions").await.unwrap();
            assert_eq!(registry.get("hello").await.unwrap().unwrap(), "spec-v1");
            let mut watch = registry.watch_with_history(">").await.unwrap();
            let first = watch.next().await.unwrap().unwrap();
            assert_eq!(first.key, "hello");
            registry.keys().await.unwrap();

            // Artifact download (metadata + chunks through an ordered consumer).
            let store = js.get_object_store("patchbay-artifacts").await.unwrap();
            let mut object = store.get("sha256-abc").await.unwrap();
            let mut bytes = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
                .await
                .unwrap();
            assert_eq!(bytes, b"wasm");

            // Function state: the one declared bucket, the function's keys under its name.
            let state = js.get_key_value("patchbay-fn-state").await.unwrap();
            state.put("hello.count", "1".into()).await.unwrap();
            let rev = state.entry("hello.count").await.unwrap().unwrap().revision;
            state.update("hello.count", "2".into(), rev).await.unwrap();
            let hello = patchbay_bus::Token::new("hello").unwrap();
            let keys = patchbay_registry::state_keys(
                &node,
                &state,
                &hello,
                std::time::Duration::from_secs(5),
            )
            .await
            .unwrap();
            assert_eq!(keys, ["count"]);

            // Stream trigger: pull from the function's consumer and ack.
            let consumer: consumer::PullConsumer = js
                .get_stream("CC_CALLS")
                .await
                .unwrap()
                .get_consumer("fn-hello")
                .await
                .unwrap();
            let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
            let message = batch.next().await.unwrap().unwrap();
            assert_eq!(message.subject.as_str(), "cc.v1.calls.c1.routed");
            // Acks go to the v1 reply subject the policy grants (not only through
            // allow_responses, which covers a single reply).
            let ack_subject = message.reply.as_deref().unwrap_or_default();
            assert!(
                ack_subject.starts_with("$JS.ACK.CC_CALLS.fn-hello."),
                "{ack_subject}"
            );
            let perms = policy
                .permissions_for(&"runtime/node-1".parse().unwrap())
                .unwrap();
            assert!(perms.allows_publish(ack_subject));
            message.double_ack().await.unwrap();

            // Function output and logs.
            assert_eq!(
                publish_error(&node, &mut errors, "cc.v1.calls.c1.analyzed").await,
                None
            );
            assert_eq!(
                publish_error(&node, &mut errors, "patchbay.v1.fn.hello.logs").await,
                None
            );

            // Refused: forging owned events, administering JetStream, others' consumers and
            // buckets, other inboxes.
            for subject in [
                "cc.v1.calls.c1.routed",
                "cc.v1.agents.a1.cmd.accept",
                "$JS.API.STREAM.CREATE.EVIL",
                "$JS.API.STREAM.DELETE.CC_CALLS",
                "$JS.API.CONSUMER.DELETE.CC_CALLS.fn-hello",
                "$JS.API.CONSUMER.MSG.NEXT.CC_CALLS.routing",
                "$KV.patchbay-functions.hello",
                "$KV.cc-agents.a1",
            ] {
                let err = publish_error(&node, &mut errors, subject).await;
                let err = err.unwrap_or_else(|| panic!("publish to {subject} was not refused"));
                assert!(
                    err.to_lowercase().contains("permissions violation"),
                    "{err}"
                );
            }
            let _sub = node.subscribe("_INBOX.gateway.gateway.>").await.unwrap();
            let refused = errors_until_sentinel(&node, &mut errors).await;
            assert!(
                refused
                    .iter()
                    .any(|e| e.contains("_INBOX.gateway.gateway.>")),
                "subscription to another identity's inbox was not refused: {refused:?}"
            );

            // The ack really landed: nothing is pending on the consumer.
            let info = admin
                .get_stream("CC_CALLS")
                .await
                .unwrap()
                .consumer_info("fn-hello")
                .await
                .unwrap();
            assert_eq!(info.num_ack_pending, 0);
            assert_eq!(info.ack_floor.stream_sequence, 1);
        }

        #[tokio::test]
        async fn services_consume_their_inputs_and_answer_requests() {
            let policy = policy();
            let bus = Bus::start(&policy);
            let admin = admin_setup(&bus).await;
            admin
                .publish("cc.v1.calls.c1.incoming", "{}".into())
                .await
                .unwrap()
                .await
                .unwrap();

            let (routing, mut routing_errors) = bus.connect("service/routing").await;
            let js = jetstream::new(routing.clone());
            let consumer: consumer::PullConsumer = js
                .get_stream("CC_CALLS")
                .await
                .unwrap()
                .get_consumer("routing")
                .await
                .unwrap();
            let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
            let message = batch.next().await.unwrap().unwrap();
            message.ack().await.unwrap();
            // Publishing its own event through JetStream gets a stream ack back.
            js.publish("cc.v1.calls.c1.routed", "{}".into())
                .await
                .unwrap()
                .await
                .unwrap();

            // A runtime node answers routing's customer lookup (allow_responses).
            let (node, mut node_errors) = bus.connect("runtime/node-1").await;
            let mut lookups = node.subscribe("cc.v1.customers.lookup").await.unwrap();
            // `flush` only empties the client's buffer; a server round trip makes sure the
            // subscription is registered before routing asks.
            assert!(
                errors_until_sentinel(&node, &mut node_errors)
                    .await
                    .is_empty()
            );
            let responder = tokio::spawn(async move {
                let request = lookups.next().await.unwrap();
                node.publish(request.reply.unwrap(), "customer".into())
                    .await
                    .unwrap();
                node.flush().await.unwrap();
            });
            let reply = routing
                .request("cc.v1.customers.lookup", "c1".into())
                .await
                .unwrap();
            assert_eq!(reply.payload, "customer");
            responder.await.unwrap();

            // The gateway may request a function invocation and is answered by the node.
            let (gateway, mut gateway_errors) = bus.connect("gateway/gateway").await;
            assert_eq!(
                publish_error(&gateway, &mut gateway_errors, "cc.v1.calls.c2.incoming").await,
                None
            );
            assert!(
                publish_error(&gateway, &mut gateway_errors, "cc.v1.calls.c2.routed")
                    .await
                    .is_some()
            );
            let tokens = jetstream::new(gateway)
                .get_key_value("patchbay-tokens")
                .await
                .unwrap();
            assert!(tokens.get("missing").await.unwrap().is_none());

            assert!(
                publish_error(&routing, &mut routing_errors, "cc.v1.calls.c1.assigned")
                    .await
                    .is_some()
            );
        }

        #[tokio::test]
        async fn refuses_expired_foreign_and_unmapped_certificates() {
            let policy = policy();
            let bus = Bus::start(&policy);
            let ca_cert = bus.certs.join("ca.crt");
            let node: Identity = "runtime/node-1".parse().unwrap();

            // Signed by another CA.
            let other = tempfile::tempdir().unwrap();
            let other_ca =
                CertAuthority::init(other.path(), "patchbay.local", Validity::days(1)).unwrap();
            let foreign = other_ca
                .issue(&node, other.path(), Validity::days(1))
                .unwrap();
            assert!(bus.connect_with(&node, &foreign, &ca_cert).await.is_err());

            // Expired, by our own CA.
            let ca = CertAuthority::load(&bus.certs).unwrap();
            let expired_dir = tempfile::tempdir().unwrap();
            let now = time::OffsetDateTime::now_utc();
            let expired = ca
                .issue(
                    &node,
                    expired_dir.path(),
                    Validity::between(now - time::Duration::days(3), now - time::Duration::days(1)),
                )
                .unwrap();
            assert!(bus.connect_with(&node, &expired, &ca_cert).await.is_err());

            // Valid, but for an identity that has no user in the config.
            let stranger: Identity = "runtime/node-9".parse().unwrap();
            let unmapped = ca
                .issue(&stranger, expired_dir.path(), Validity::days(1))
                .unwrap();
            assert!(
                bus.connect_with(&stranger, &unmapped, &ca_cert)
                    .await
                    .is_err()
            );

            // And the rightful certificate still works.
            let valid = IssuedCert::paths(&bus.certs, &node);
            let (client, _) = bus.connect_with(&node, &valid, &ca_cert).await.unwrap();
            client.flush().await.unwrap();
        }
    }
}
