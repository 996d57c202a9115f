//! Connecting to NATS over mutual TLS, and the traced publish/request primitives.
//!
//! [`connect`] reads the CA, certificate and key itself (rustls), so a missing file, an
//! expired certificate or a server without TLS gives an error that says so, instead of a
//! bare I/O error. Every identity gets its own reply-inbox prefix, which the access
//! policy lets only it subscribe to.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, ConnectOptions, HeaderMap, Message};
use bytes::Bytes;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use thiserror::Error;
use tokio::sync::broadcast;
use tracing::Instrument as _;

use crate::deadline::{Clock, Deadline, SystemClock};
use crate::event::CloudEvent;
use crate::subject::Subjects;
use crate::trace::{self, BusMetrics};

/// How to reach NATS and who we are.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Server URLs, e.g. `tls://127.0.0.1:4222`; more than one for a cluster.
    pub servers: Vec<String>,
    /// PEM file with the CA that signed the server's certificate.
    pub ca: PathBuf,
    /// PEM file with this workload's client certificate.
    pub cert: PathBuf,
    /// PEM file with this workload's private key.
    pub key: PathBuf,
    /// Connection name shown by the server (`/connz`), e.g. `patchbay-runtime/node-1`.
    pub name: String,
    /// Reply-inbox prefix; the access policy allows each identity only its own
    /// (`_INBOX.<kind>.<name>`). `None` derives it from the certificate's SPIFFE id.
    pub inbox_prefix: Option<String>,
    /// Prefix prepended to application subjects (see [`Subjects`]).
    pub subjects: Subjects,
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
    /// Messages buffered per subscription before the client drops them. Sized
    /// deliberately: async-nats drops silently when full (counted in [`Bus::dropped`]).
    pub subscription_capacity: usize,
    /// Edge metrics to count publishes and received messages into; `None` counts nothing.
    pub metrics: Option<BusMetrics>,
    /// Most handlers one event may pass through before a handler refuses it (see
    /// [`crate::hops`]): stops a function whose output triggers itself.
    pub max_hops: usize,
    /// How often to look for a renewed certificate and key in [`Self::cert`] and
    /// [`Self::key`] (see [`crate::rotation`]); `None` never looks.
    pub cert_reload: Option<Duration>,
}

impl BusConfig {
    /// A configuration for `server` with the given CA, certificate and key files.
    #[must_use]
    pub fn new(
        server: impl Into<String>,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        Self {
            servers: vec![server.into()],
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
            name: "patchbay".into(),
            inbox_prefix: None,
            subjects: Subjects::default(),
            connect_timeout: Duration::from_secs(5),
            subscription_capacity: 64 * 1024,
            metrics: None,
            max_hops: crate::hops::DEFAULT_MAX_HOPS,
            cert_reload: Some(Duration::from_secs(30)),
        }
    }

    /// Look for a renewed certificate every `every` (`None`: never).
    #[must_use]
    pub fn cert_reload(mut self, every: Option<Duration>) -> Self {
        self.cert_reload = every;
        self
    }

    /// Set the hop limit (see [`crate::hops`]).
    #[must_use]
    pub fn max_hops(mut self, max: usize) -> Self {
        self.max_hops = max.max(1);
        self
    }

    /// Count this connection's traffic into `metrics` (edge metrics, see [`BusMetrics`]).
    #[must_use]
    pub fn metrics(mut self, metrics: BusMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Set the connection name.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Set the reply-inbox prefix.
    #[must_use]
    pub fn inbox_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.inbox_prefix = Some(prefix.into());
        self
    }

    /// Set the subject space.
    #[must_use]
    pub fn subjects(mut self, subjects: Subjects) -> Self {
        self.subjects = subjects;
        self
    }

    /// Set the connect timeout.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Set the per-subscription buffer.
    #[must_use]
    pub fn subscription_capacity(mut self, capacity: usize) -> Self {
        self.subscription_capacity = capacity;
        self
    }

    fn servers_display(&self) -> String {
        self.servers.join(",")
    }
}

/// What kind of connect failure happened, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectErrorKind {
    /// A CA, certificate or key file is missing or unreadable.
    Credentials,
    /// The client certificate is expired or not yet valid.
    CertificateValidity,
    /// No server answered at the address.
    Unreachable,
    /// The server does not offer TLS.
    TlsNotOffered,
    /// The TLS handshake failed (wrong CA, certificate refused by the server).
    Handshake,
    /// The server accepted TLS but refused the identity.
    Unauthorized,
    /// Connecting took longer than the timeout.
    TimedOut,
}

/// Why [`connect`] failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// A credentials file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        /// Which file (CA, certificate, key).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A credentials file holds no usable PEM item.
    #[error("{path} holds no PEM {what}: {reason}")]
    BadPem {
        /// Which file (CA, certificate, key).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The client certificate is outside its validity period.
    #[error(
        "client certificate {path} is not valid now: valid from {not_before} until {not_after}"
    )]
    CertificateValidity {
        /// Its path.
        path: PathBuf,
        /// Start of validity.
        not_before: String,
        /// End of validity.
        not_after: String,
    },
    /// A renewed certificate names another identity than the connection was made with.
    #[error("renewed certificate {path} is for {now}, but this connection is {was}")]
    IdentityChanged {
        /// The certificate file.
        path: PathBuf,
        /// The identity the connection has.
        was: String,
        /// The identity the new certificate carries.
        now: String,
    },
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("invalid TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    /// The server could not be reached or the connection failed.
    #[error("cannot connect to NATS at {servers} ({kind:?}): {reason}")]
    Server {
        /// The servers tried.
        servers: String,
        /// What kind of failure.
        kind: ConnectErrorKind,
        /// The underlying message.
        reason: String,
    },
}

impl ConnectError {
    /// The kind of failure.
    #[must_use]
    pub fn kind(&self) -> ConnectErrorKind {
        match self {
            Self::ReadFile { .. }
            | Self::BadPem { .. }
            | Self::TlsConfig(_)
            | Self::IdentityChanged { .. } => ConnectErrorKind::Credentials,
            Self::CertificateValidity { .. } => ConnectErrorKind::CertificateValidity,
            Self::Server { kind, .. } => *kind,
        }
    }
}

/// Something the connection reported outside any call (server errors such as permission
/// violations, slow consumers, reconnects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusNotice(pub String);

impl fmt::Display for BusNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A connected bus client with Patchbay's conventions applied.
#[derive(Clone)]
pub struct Bus {
    client: Client,
    identity: Option<SpiffeId>,
    subjects: Subjects,
    source: String,
    notices: broadcast::Sender<BusNotice>,
    dropped: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
    /// `kind/name` of [`Bus::identity`], sent in the `patchbay-from` header.
    from: Option<Arc<str>>,
    metrics: Option<BusMetrics>,
    /// See [`BusConfig::max_hops`].
    max_hops: usize,
    /// Renewed client certificates swapped in (see [`crate::rotation`]).
    renewals: Arc<AtomicU64>,
    /// Dropped with the last clone, which stops the certificate watcher.
    _stop_watch: Arc<tokio::sync::watch::Sender<()>>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("subjects", &self.subjects)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

pub(crate) fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|source| ConnectError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConnectError> {
    let pem = read(what, path)?;
    let bad = |reason: String| ConnectError::BadPem {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// A workload identity as carried in a certificate's URI SAN:
/// `spiffe://<trust-domain>/<kind>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    /// Trust domain, e.g. `patchbay.local`.
    pub trust_domain: String,
    /// Workload kind, e.g. `runtime`.
    pub kind: String,
    /// Workload name, e.g. `node-1`.
    pub name: String,
}

impl SpiffeId {
    /// Parse `spiffe://<trust-domain>/<kind>/<name>`.
    #[must_use]
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        let (td, kind, name) = (parts.next()?, parts.next()?, parts.next()?);
        let ok = |t: &str| crate::subject::Token::new(t).is_ok();
        (parts.next().is_none() && !td.is_empty() && ok(kind) && ok(name)).then(|| Self {
            trust_domain: td.to_owned(),
            kind: kind.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The reply-inbox prefix reserved for this identity: `_INBOX.<kind>.<name>`.
    #[must_use]
    pub fn inbox_prefix(&self) -> String {
        format!("_INBOX.{}.{}", self.kind, self.name)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/{}/{}",
            self.trust_domain, self.kind, self.name
        )
    }
}

/// Check the certificate's validity period and return its SPIFFE id, if it has one.
pub(crate) fn inspect_certificate(
    path: &Path,
    cert: &CertificateDer<'_>,
) -> Result<Option<SpiffeId>, ConnectError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| ConnectError::BadPem {
            what: "certificate",
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let validity = parsed.validity();
    if !validity.is_valid() {
        return Err(ConnectError::CertificateValidity {
            path: path.to_owned(),
            not_before: validity.not_before.to_string(),
            not_after: validity.not_after.to_string(),
        });
    }
    let spiffe = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => SpiffeId::parse(uri),
                _ => None,
            })
        });
    Ok(spiffe)
}

/// The SPIFFE id in the client certificate of `config`, if it carries one.
pub fn certificate_identity(config: &BusConfig) -> Result<Option<SpiffeId>, ConnectError> {
    let chain = load_certs("certificate", &config.cert)?;
    inspect_certificate(&config.cert, &chain[0])
}

/// The rustls client configuration for `config`: trust only `config.ca`, present
/// `config.cert`.
pub fn tls_client_config(config: &BusConfig) -> Result<rustls::ClientConfig, ConnectError> {
    Ok(tls_parts(config)?.0)
}

/// The TLS configuration, the replaceable client certificate it presents and the identity
/// that certificate carries.
fn tls_parts(
    config: &BusConfig,
) -> Result<
    (
        rustls::ClientConfig,
        Arc<crate::rotation::ClientCert>,
        Option<SpiffeId>,
    ),
    ConnectError,
> {
    let mut roots = RootCertStore::empty();
    for ca in load_certs("CA certificate", &config.ca)? {
        roots.add(ca)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (pair, identity) = crate::rotation::load_pair(config, &provider)?;
    let cert = crate::rotation::ClientCert::new(pair);
    let tls =
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_cert_resolver(
                Arc::clone(&cert) as Arc<dyn rustls::client::ResolvesClientCert>
            );
    Ok((tls, cert, identity))
}

fn classify(err: &async_nats::ConnectError) -> ConnectErrorKind {
    use async_nats::ConnectErrorKind as K;
    let text = err.to_string().to_ascii_lowercase();
    match err.kind() {
        K::TimedOut => ConnectErrorKind::TimedOut,
        K::AuthorizationViolation | K::Authentication => ConnectErrorKind::Unauthorized,
        _ if text.contains("tls required") || text.contains("not support tls") => {
            ConnectErrorKind::TlsNotOffered
        }
        // A plain-text server answers our ClientHello with a protocol error in clear text,
        // which rustls reports as a record of an invalid content type.
        _ if text.contains("invalidcontenttype") || text.contains("corrupt message") => {
            ConnectErrorKind::TlsNotOffered
        }
        K::Tls => ConnectErrorKind::Handshake,
        _ if text.contains("alert")
            || text.contains("certificate")
            || text.contains("handshake") =>
        {
            ConnectErrorKind::Handshake
        }
        _ if text.contains("connection reset") || text.contains("broken pipe") => {
            // The server closes the socket when it refuses a client certificate.
            ConnectErrorKind::Handshake
        }
        _ => ConnectErrorKind::Unreachable,
    }
}

/// Connect to NATS over mutual TLS.
pub async fn connect(config: &BusConfig) -> Result<Bus, ConnectError> {
    let (tls, cert, identity) = tls_parts(config)?;
    let (notices, _) = broadcast::channel(256);
    let dropped = Arc::new(AtomicU64::new(0));
    let events = notices.clone();
    let slow = Arc::clone(&dropped);
    let mut options = ConnectOptions::new()
        .name(&config.name)
        .require_tls(true)
        .tls_client_config(tls)
        .connection_timeout(config.connect_timeout)
        .subscription_capacity(config.subscription_capacity)
        .event_callback(move |event| {
            let events = events.clone();
            let slow = Arc::clone(&slow);
            async move {
                match &event {
                    async_nats::Event::SlowConsumer(_) => {
                        slow.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("slow consumer: messages dropped");
                    }
                    async_nats::Event::ServerError(e) => {
                        tracing::warn!(error = %e, "NATS server error")
                    }
                    other => tracing::info!(event = %other, "NATS connection event"),
                }
                let _ = events.send(BusNotice(event.to_string()));
            }
        });
    let inbox = config
        .inbox_prefix
        .clone()
        .or_else(|| identity.as_ref().map(SpiffeId::inbox_prefix));
    if let Some(prefix) = inbox {
        options = options.custom_inbox_prefix(prefix);
    }
    let servers: Vec<async_nats::ServerAddr> = config
        .servers
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(|e: std::io::Error| ConnectError::Server {
            servers: config.servers_display(),
            kind: ConnectErrorKind::Unreachable,
            reason: format!("invalid server URL: {e}"),
        })?;
    let client = options
        .connect(servers)
        .await
        .map_err(|e| ConnectError::Server {
            servers: config.servers_display(),
            kind: classify(&e),
            reason: e.to_string(),
        })?;
    // A refused client certificate under TLS 1.3 surfaces only after the handshake, on
    // the first round trip; flush so `connect` reports it instead of the first call.
    client.flush().await.map_err(|e| ConnectError::Server {
        servers: config.servers_display(),
        kind: ConnectErrorKind::Handshake,
        reason: e.to_string(),
    })?;
    let from = identity
        .as_ref()
        .map(|id| Arc::from(trace::identity_label(&id.kind, &id.name)));
    let (stop_watch, stopped) = tokio::sync::watch::channel(());
    let renewals = Arc::new(AtomicU64::new(0));
    if let Some(every) = config.cert_reload {
        let watch = crate::rotation::Watch {
            cert,
            config: config.clone(),
            identity: identity.clone(),
            client: client.clone(),
            notices: notices.clone(),
            rotations: Arc::clone(&renewals),
            stop: stopped,
        };
        tokio::spawn(crate::rotation::watch(watch, every));
    }
    Ok(Bus {
        client,
        identity,
        subjects: config.subjects.clone(),
        source: format!("/patchbay/{}", config.name),
        notices,
        dropped,
        clock: Arc::new(SystemClock),
        from,
        metrics: config.metrics.clone(),
        max_hops: config.max_hops,
        renewals,
        _stop_watch: Arc::new(stop_watch),
    })
}

/// The size of a message on the wire, approximately: payload, headers and the `NATS/1.0`
/// header line.
pub(crate) fn message_size(headers: &HeaderMap, payload: &Bytes) -> usize {
    let header_bytes: usize = headers
        .iter()
        .map(|(k, vs)| {
            let name: &str = k.as_ref();
            vs.iter()
                .map(|v| name.len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    payload.len() + header_bytes + 12
}

/// Why a publish failed.
#[derive(Debug, Error)]
pub enum PublishError {
    /// Message and headers exceed the server's `max_payload`.
    #[error("message to {subject} is {size} bytes, over the {max}-byte limit")]
    TooLarge {
        /// Target subject.
        subject: String,
        /// Size in bytes (payload plus headers, approximately).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The event is invalid.
    #[error(transparent)]
    Event(#[from] crate::event::EventError),
    /// A durable publish found no stream capturing the subject.
    #[error("no stream captures {subject}")]
    NoStream {
        /// Target subject.
        subject: String,
    },
    /// The client failed to send.
    #[error("publish to {subject} failed: {reason}")]
    Nats {
        /// Target subject.
        subject: String,
        /// The underlying message.
        reason: String,
    },
}

/// What kind of request failure happened, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestErrorKind {
    /// No reply before the timeout.
    TimedOut,
    /// The deadline had already passed; nothing was sent.
    DeadlineExceeded,
    /// Nobody listens on the subject.
    NoResponders,
    /// The request is larger than the server allows.
    TooLarge,
    /// The request could not be sent.
    Other,
}

/// Why a request failed.
#[derive(Debug, Error)]
#[error("request to {subject} failed ({kind:?}): {reason}")]
pub struct RequestError {
    /// What kind of failure.
    pub kind: RequestErrorKind,
    /// Target subject.
    pub subject: String,
    /// Details.
    pub reason: String,
}

/// Per-request options.
#[derive(Debug, Clone, Copy)]
pub struct RequestOptions {
    /// This hop's own timeout.
    pub timeout: Duration,
    /// The deadline inherited from upstream, never extended.
    pub deadline: Option<Deadline>,
}

impl RequestOptions {
    /// Options with `timeout` and no inherited deadline.
    #[must_use]
    pub fn timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            deadline: None,
        }
    }

    /// Inherit `deadline` (if any).
    #[must_use]
    pub fn deadline(mut self, deadline: Option<Deadline>) -> Self {
        self.deadline = deadline;
        self
    }
}

impl Bus {
    /// The underlying async-nats client, for what this crate does not wrap.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Who this connection is, from its certificate.
    #[must_use]
    pub fn identity(&self) -> Option<&SpiffeId> {
        self.identity.as_ref()
    }

    /// The subject space.
    #[must_use]
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The hop chain for handling a message with `headers` as `handler` (e.g.
    /// `fn/<name>`, `service/routing`): run the handling inside [`crate::hops::scope`]
    /// with it. Refused once the chain would exceed this connection's hop limit.
    pub fn enter_hop(
        &self,
        headers: Option<&HeaderMap>,
        handler: &str,
    ) -> Result<crate::hops::HopChain, crate::hops::HopLimitExceeded> {
        crate::hops::HopChain::from_headers(headers).enter(handler, self.max_hops)
    }

    /// The CloudEvents `source` this connection stamps on events it creates.
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A JetStream context on this connection.
    #[must_use]
    pub fn jetstream(&self) -> jetstream::Context {
        jetstream::new(self.client.clone())
    }

    /// The clock deadlines are read against.
    #[must_use]
    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// The clock, shared (for mechanisms that keep it, like [`crate::resilience::Resilience`]).
    #[must_use]
    pub fn shared_clock(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.clock)
    }

    /// Replace the clock (tests).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Notices the connection reports outside any call (permission violations, slow
    /// consumers, reconnects).
    #[must_use]
    pub fn notices(&self) -> broadcast::Receiver<BusNotice> {
        self.notices.subscribe()
    }

    /// Renewed client certificates this connection has swapped in without a restart.
    #[must_use]
    pub fn certificate_renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }

    /// Slow-consumer reports seen so far (each means the client dropped messages).
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The server's maximum message size.
    #[must_use]
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Headers for `event`: the CloudEvent attributes, the trace context of `span` and the
    /// deadline.
    #[must_use]
    pub fn headers(
        event: &CloudEvent,
        span: &tracing::Span,
        deadline: Option<Deadline>,
    ) -> HeaderMap {
        let mut headers = event.to_headers();
        trace::inject_span(span, &mut headers);
        if let Some(chain) = crate::hops::current() {
            chain.write(&mut headers);
        }
        if let Some(d) = deadline {
            d.write(&mut headers);
        }
        headers
    }

    /// Adds the `patchbay-from` header naming this connection's identity (if known), as
    /// every publish and request of this type does; for messages sent through
    /// [`Bus::client`] directly, so receivers can still tell who sent them.
    pub fn stamp_sender(&self, headers: &mut HeaderMap) {
        if let Some(from) = &self.from {
            headers.insert(trace::FROM, from.as_ref());
        }
    }

    pub(crate) fn count_published(&self, subject: &str) {
        if let Some(metrics) = &self.metrics {
            let from = self.from.as_deref().unwrap_or(trace::UNKNOWN_IDENTITY);
            metrics.published(from, &trace::subject_class(&self.subjects, subject));
        }
    }

    /// The consumer-side `process` span for a message on `subject` (see
    /// [`trace::process_span`]), counting the message as received by this identity from
    /// the one its `patchbay-from` header names. Consumers call it once per message they
    /// take up, so edge metrics see every hop.
    #[must_use]
    pub fn process_span(&self, subject: &str, headers: Option<&HeaderMap>) -> tracing::Span {
        if let Some(metrics) = &self.metrics {
            let from = trace::sender(headers).unwrap_or(trace::UNKNOWN_IDENTITY);
            let to = self.from.as_deref().unwrap_or(trace::UNKNOWN_IDENTITY);
            metrics.received(from, to, &trace::subject_class(&self.subjects, subject));
        }
        trace::process_span(subject, headers)
    }

    /// The `process` span for a message pulled from a JetStream consumer:
    /// [`Bus::process_span`] plus the delivery count, and on a redelivery a span link to
    /// the context the first attempt was processed under (see [`trace::record_delivery`]).
    #[must_use]
    pub fn process_delivery(&self, msg: &jetstream::Message) -> tracing::Span {
        let span = self.process_span(&msg.subject, msg.headers.as_ref());
        let delivered = msg
            .info()
            .map_or(1, |info| u64::try_from(info.delivered).unwrap_or(1));
        trace::record_delivery(&span, msg.headers.as_ref(), delivered);
        span
    }

    fn check_size(
        &self,
        subject: &str,
        headers: &HeaderMap,
        payload: &Bytes,
    ) -> Result<(), PublishError> {
        let size = message_size(headers, payload);
        let max = self.max_payload();
        if max > 0 && size > max {
            return Err(PublishError::TooLarge {
                subject: subject.to_owned(),
                size,
                max,
            });
        }
        Ok(())
    }

    /// The edge metrics, when this connection counts them.
    pub(crate) fn metrics(&self) -> Option<&BusMetrics> {
        self.metrics.as_ref()
    }

    /// Publish `event` on `subject` (core NATS: at most once) inside a `publish` span.
    pub async fn publish(
        &self,
        subject: &str,
        event: &CloudEvent,
        deadline: Option<Deadline>,
    ) -> Result<(), PublishError> {
        event.validate()?;
        let span = trace::publish_span(subject, &event.id);
        let mut headers = Self::headers(event, &span, deadline);
        self.stamp_sender(&mut headers);
        self.check_size(subject, &headers, &event.data)?;
        self.client
            .publish_with_headers(subject.to_owned(), headers, event.data.clone())
            .instrument(span)
            .await
            .map_err(|e| PublishError::Nats {
                subject: subject.to_owned(),
                reason: e.to_string(),
            })?;
        self.count_published(subject);
        Ok(())
    }

    /// Publish `event` to the JetStream stream holding `subject` and wait for the stream's
    /// acknowledgement. The `Nats-Msg-Id` is [`CloudEvent::dedup_id`] (a hash of `source`
    /// and `id`, since CloudEvents ids are unique only per source), so a retried publish
    /// is stored once and two producers' events never shadow each other.
    pub async fn publish_durable(
        &self,
        subject: &str,
        event: &CloudEvent,
        deadline: Option<Deadline>,
    ) -> Result<jetstream::publish::PublishAck, PublishError> {
        self.publish_durable_with_id(subject, event, &event.dedup_id(), deadline)
            .await
    }

    /// Like [`Bus::publish_durable`] with an explicit de-duplication id (e.g. derived from
    /// the input that produced this event, so a redelivered input stores it once).
    pub async fn publish_durable_with_id(
        &self,
        subject: &str,
        event: &CloudEvent,
        message_id: &str,
        deadline: Option<Deadline>,
    ) -> Result<jetstream::publish::PublishAck, PublishError> {
        use jetstream::context::PublishErrorKind as K;
        event.validate()?;
        let span = trace::publish_span(subject, &event.id);
        let mut headers = Self::headers(event, &span, deadline);
        self.stamp_sender(&mut headers);
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id);
        self.check_size(subject, &headers, &event.data)?;
        let failed = |e: &jetstream::context::PublishError| match e.kind() {
            K::StreamNotFound => PublishError::NoStream {
                subject: subject.to_owned(),
            },
            _ => PublishError::Nats {
                subject: subject.to_owned(),
                reason: e.to_string(),
            },
        };
        let js = self.jetstream();
        let ack = async {
            js.publish_with_headers(subject.to_owned(), headers, event.data.clone())
                .await
                .map_err(|e| failed(&e))?
                .await
                .map_err(|e| failed(&e))
        }
        .instrument(span)
        .await?;
        self.count_published(subject);
        if let Some(metrics) = &self.metrics {
            metrics.stored_per_commit("single", 1);
        }
        Ok(ack)
    }

    /// `event` as a message for a [`crate::batch`] publish: validated, with the headers
    /// [`Bus::publish_durable`] would send (CloudEvent attributes, the trace context of
    /// `span`, the current hop chain, `deadline`, the sender), de-duplicated by
    /// `message_id`, and checked against the server's max payload.
    pub fn durable(
        &self,
        subject: &str,
        event: &CloudEvent,
        message_id: &str,
        span: &tracing::Span,
        deadline: Option<Deadline>,
    ) -> Result<crate::batch::Durable, PublishError> {
        event.validate()?;
        let mut headers = Self::headers(event, span, deadline);
        self.stamp_sender(&mut headers);
        self.check_size(subject, &headers, &event.data)?;
        Ok(crate::batch::Durable {
            subject: subject.to_owned(),
            headers,
            payload: event.data.clone(),
            id: message_id.to_owned(),
        })
    }

    /// Send `event` as a request on `subject` and wait for the reply, within
    /// `options.timeout` and never past `options.deadline`. The deadline travels with the
    /// request so the responder can honour it too.
    pub async fn request(
        &self,
        subject: &str,
        event: &CloudEvent,
        options: RequestOptions,
    ) -> Result<Message, RequestError> {
        let error = |kind, reason: String| RequestError {
            kind,
            subject: subject.to_owned(),
            reason,
        };
        let deadline = Deadline::effective(options.deadline, self.clock(), options.timeout);
        let Some(remaining) = deadline.remaining(self.clock()) else {
            return Err(error(
                RequestErrorKind::DeadlineExceeded,
                "deadline passed before the request was sent".into(),
            ));
        };
        event
            .validate()
            .map_err(|e| error(RequestErrorKind::Other, e.to_string()))?;
        let span = trace::publish_span(subject, &event.id);
        let mut headers = Self::headers(event, &span, Some(deadline));
        self.stamp_sender(&mut headers);
        self.check_size(subject, &headers, &event.data)
            .map_err(|e| error(RequestErrorKind::TooLarge, e.to_string()))?;
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(event.data.clone())
            .timeout(Some(remaining));
        let reply = self
            .client
            .send_request(subject.to_owned(), request)
            .instrument(span)
            .await
            .map_err(|e| {
                use async_nats::RequestErrorKind as K;
                let kind = match e.kind() {
                    K::TimedOut => RequestErrorKind::TimedOut,
                    K::NoResponders => RequestErrorKind::NoResponders,
                    K::MaxPayloadExceeded => RequestErrorKind::TooLarge,
                    K::InvalidSubject | K::Other => RequestErrorKind::Other,
                };
                error(kind, e.to_string())
            })?;
        self.count_published(subject);
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_into_kind_and_name_and_reserve_an_inbox() {
        let id = SpiffeId::parse("spiffe://patchbay.local/runtime/node-1");
        assert_eq!(
            id.as_ref().map(SpiffeId::inbox_prefix).as_deref(),
            Some("_INBOX.runtime.node-1")
        );
        assert_eq!(
            id.map(|i| i.to_string()).as_deref(),
            Some("spiffe://patchbay.local/runtime/node-1")
        );
        for bad in [
            "https://x/a/b",
            "spiffe://td/a",
            "spiffe://td/a/b/c",
            "spiffe://td/a/b.c",
            "spiffe:///a/b",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad}");
        }
    }
}
