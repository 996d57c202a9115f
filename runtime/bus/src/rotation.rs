//! Certificate rotation without a restart.
//!
//! Workload certificates are short-lived (30 days for dev certificates; minutes to hours
//! under SPIFFE/cert-manager style issuers), so a process must pick up a renewed pair
//! from its files while it runs. The TLS client presents whatever [`ClientCert`] holds
//! now (a rustls [`ResolvesClientCert`]); [`watch`] polls the certificate and key files,
//! and when they change it loads the new pair, checks it, swaps it in and forces a
//! reconnect so the server sees it at once (rather than at the next network blip).
//!
//! A new pair is refused — the old one stays, the connection carries on, and the refusal
//! is logged and reported as a [`BusNotice`](crate::BusNotice) — when it does not parse,
//! the key does not match the certificate, it is not valid now (expired or not yet
//! valid), or it names another identity than the one the connection was made with
//! (rotation renews an identity; it never changes who a process is). A pair written
//! half-way (certificate before key) is simply refused until both files agree.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;
use tokio::sync::{broadcast, watch as signal};

use crate::client::{
    BusConfig, BusNotice, ConnectError, SpiffeId, inspect_certificate, load_certs, read,
};

/// The client certificate the TLS handshake presents, replaceable while connected.
pub(crate) struct ClientCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCert").finish_non_exhaustive()
    }
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // A poisoned lock still holds a whole pair: swaps replace the Arc in one store.
        let current = match self.current.read() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        Some(Arc::clone(&current))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A checked certificate and key from `config`'s files, with the identity it carries.
pub(crate) fn load_pair(
    config: &BusConfig,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(Arc<CertifiedKey>, Option<SpiffeId>), ConnectError> {
    let chain = load_certs("certificate", &config.cert)?;
    let identity = inspect_certificate(&config.cert, &chain[0])?;
    let key_pem = read("private key", &config.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| ConnectError::BadPem {
        what: "private key",
        path: config.key.clone(),
        reason: e.to_string(),
    })?;
    let pair = CertifiedKey::from_der(chain, key, provider)?;
    Ok((Arc::new(pair), identity))
}

impl ClientCert {
    pub(crate) fn new(pair: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(pair),
        })
    }

    fn replace(&self, pair: Arc<CertifiedKey>) {
        let mut current = match self.current.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = pair;
    }
}

/// What the watcher needs besides the files.
pub(crate) struct Watch {
    pub cert: Arc<ClientCert>,
    pub config: BusConfig,
    pub identity: Option<SpiffeId>,
    pub client: async_nats::Client,
    pub notices: broadcast::Sender<BusNotice>,
    pub rotations: Arc<AtomicU64>,
    /// Closed when the last [`crate::Bus`] clone is dropped.
    pub stop: signal::Receiver<()>,
}

/// The files' contents, to notice a change (mtime alone misses a same-second rewrite).
fn fingerprint(config: &BusConfig) -> Option<(Vec<u8>, Vec<u8>)> {
    Some((
        std::fs::read(&config.cert).ok()?,
        std::fs::read(&config.key).ok()?,
    ))
}

/// Poll the certificate files every `every` and swap in a renewed pair (see the module
/// docs); returns when the bus is dropped.
pub(crate) async fn watch(mut w: Watch, every: Duration) {
    let provider = rustls::crypto::ring::default_provider();
    let mut seen = fingerprint(&w.config);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            changed = w.stop.changed() => if changed.is_err() { return },
        }
        let now = fingerprint(&w.config);
        if now.is_none() || now == seen {
            continue;
        }
        seen = now;
        let outcome = load_pair(&w.config, &provider).and_then(|(pair, identity)| {
            if identity == w.identity {
                Ok(pair)
            } else {
                Err(ConnectError::IdentityChanged {
                    path: w.config.cert.clone(),
                    was: display(w.identity.as_ref()),
                    now: display(identity.as_ref()),
                })
            }
        });
        match outcome {
            Ok(pair) => {
                w.cert.replace(pair);
                w.rotations.fetch_add(1, Ordering::Relaxed);
                tracing::info!(cert = %w.config.cert.display(), "client certificate renewed; reconnecting");
                let _ = w
                    .notices
                    .send(BusNotice("client certificate renewed".into()));
                if let Err(e) = w.client.force_reconnect().await {
                    tracing::warn!(error = %e, "reconnect after certificate renewal failed; the client retries");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewed client certificate refused; keeping the current one");
                let _ = w.notices.send(BusNotice(format!(
                    "renewed client certificate refused: {e}"
                )));
            }
        }
    }
}

fn display(identity: Option<&SpiffeId>) -> String {
    identity.map_or_else(|| "no SPIFFE id".to_owned(), ToString::to_string)
}
