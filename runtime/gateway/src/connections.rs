//! Connection admission on the public listener: a global cap and a per-client-address cap
//! on open connections, checked the moment a connection is accepted — before TLS, before
//! any byte of HTTP is read and so before authentication — and the refusal a connection
//! over a cap gets.
//!
//! Why caps at all: every open connection holds a file descriptor, and the gateway shares
//! its descriptor limit with the admin listener (`/healthz`, `/metrics`), the NATS
//! connection and the function engine. Without a cap, a flood of half-sent requests takes
//! every descriptor and the process goes deaf on every socket. Slow connections are shed
//! by the header and body timeouts ([`crate::server`], [`crate::body`]); the caps bound
//! how many can be open meanwhile.
//!
//! This module counts and answers; it does not decide the limits (configuration does) or
//! time anything out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::problem::Problem;

/// Refusals being written at the same time at most. Each holds its socket for up to
/// [`REFUSAL_LINGER`]; past this many a refused connection is closed without an answer,
/// so answering a flood can never cost more than a fixed number of descriptors.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// How long a refusal may take to write its answer and read (and discard) what the client
/// already sent. Closing a socket with unread input makes the kernel send a reset, which
/// can destroy the answer before the client reads it; a short drain avoids that.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Bytes of the client's request read and discarded during [`REFUSAL_LINGER`] at most.
const REFUSAL_DRAIN_BYTES: usize = 64 << 10;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The listener holds its maximum of open connections.
    #[error("the gateway holds its maximum of {limit} connections")]
    Full {
        /// The global cap.
        limit: usize,
    },
    /// This client address holds its maximum of open connections.
    #[error("{ip} holds its maximum of {limit} connections")]
    PerAddress {
        /// The client address.
        ip: IpAddr,
        /// The per-address cap.
        limit: usize,
    },
}

impl Refusal {
    /// The `reason` label of `patchbay_gateway_refused_total`.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Full { .. } => "connection-limit",
            Self::PerAddress { .. } => "connection-limit-per-ip",
        }
    }

    /// The answer: 503 when the gateway as a whole is full (a capacity problem, like a
    /// shed request), 429 when this client holds too many (its own doing). Both ask to
    /// come back in a second and say the connection closes.
    #[must_use]
    pub fn problem(&self) -> Problem {
        let problem = match self {
            Self::Full { .. } => Problem::typed(
                StatusCode::SERVICE_UNAVAILABLE,
                "connection-limit",
                "Too many connections",
            ),
            Self::PerAddress { .. } => Problem::typed(
                StatusCode::TOO_MANY_REQUESTS,
                "connection-limit-per-ip",
                "Too many connections from this address",
            ),
        };
        problem
            .with_detail(self.to_string())
            .with_retry_after(Duration::from_secs(1))
    }

    /// The whole HTTP/1.1 response written on a refused socket: the problem, with
    /// `Connection: close`.
    #[must_use]
    pub fn response_bytes(&self) -> Vec<u8> {
        let problem = self.problem();
        let body = serde_json::to_vec(&problem.body()).unwrap_or_default();
        let status = problem.status;
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error"),
            crate::problem::PROBLEM_JSON,
            body.len(),
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Open connections, in total and per client address.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
    refusing: Arc<Semaphore>,
}

impl ConnectionLimits {
    /// Caps of `max_total` connections, `max_per_ip` per client address.
    #[must_use]
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            counts: Mutex::new(Counts::default()),
            refusing: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
        })
    }

    /// Count a new connection from `ip`, or say why it is refused. The connection counts
    /// until the permit is dropped. Memory is bounded: an address is forgotten when its
    /// last connection closes, so there are never more entries than open connections.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refusal> {
        // IPv4 clients of a dual-stack socket arrive as `::ffff:a.b.c.d`.
        let ip = ip.to_canonical();
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= self.max_total {
            return Err(Refusal::Full {
                limit: self.max_total,
            });
        }
        let mine = counts.per_ip.entry(ip).or_insert(0);
        if *mine >= self.max_per_ip {
            return Err(Refusal::PerAddress {
                ip,
                limit: self.max_per_ip,
            });
        }
        *mine += 1;
        counts.total += 1;
        Ok(ConnectionPermit {
            limits: Arc::clone(self),
            ip,
        })
    }

    /// Open connections now.
    #[must_use]
    pub fn open(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }

    /// Answer a refused plain-TCP connection in the background and close it.
    ///
    /// A refused connection is accepted and answered rather than left in the kernel's
    /// backlog or reset: a client then reads a definite "too many connections, retry in 1
    /// s" (503 or 429, `Connection: close`) instead of a timeout or a reset that looks
    /// like a network fault. The answer is written before the request is read, which
    /// HTTP/1.1 allows for a response that closes the connection. When too many refusals
    /// are already being written, the socket is closed at once — under a flood the caps
    /// must hold even for the refusals.
    pub fn refuse(&self, mut stream: TcpStream, refusal: Refusal) {
        let Ok(permit) = Arc::clone(&self.refusing).try_acquire_owned() else {
            return drop(stream);
        };
        tokio::spawn(async move {
            let _permit = permit;
            let answer = async {
                stream.write_all(&refusal.response_bytes()).await?;
                stream.shutdown().await?;
                let mut sink = [0u8; 4096];
                let mut seen = 0;
                while seen < REFUSAL_DRAIN_BYTES {
                    match stream.read(&mut sink).await? {
                        0 => break,
                        n => seen += n,
                    }
                }
                std::io::Result::Ok(())
            };
            let _ = tokio::time::timeout(REFUSAL_LINGER, answer).await;
        });
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut counts = self
            .limits
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_client_address_is_capped_without_affecting_others() {
        let limits = ConnectionLimits::new(10, 2);
        let _a1 = limits.admit(A).unwrap();
        let a2 = limits.admit(A).unwrap();
        assert_eq!(
            limits.admit(A).unwrap_err(),
            Refusal::PerAddress { ip: A, limit: 2 }
        );
        let _b1 = limits.admit(B).unwrap();
        drop(a2);
        let _a3 = limits.admit(A).unwrap();
        assert_eq!(limits.open(), 3);
    }

    #[test]
    fn the_global_cap_holds_and_frees_on_drop() {
        let limits = ConnectionLimits::new(2, 2);
        let a = limits.admit(A).unwrap();
        let _b = limits.admit(B).unwrap();
        assert_eq!(limits.admit(B).unwrap_err(), Refusal::Full { limit: 2 });
        drop(a);
        assert!(limits.admit(B).is_ok());
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_the_ipv4_address() {
        let limits = ConnectionLimits::new(10, 1);
        let _a = limits.admit(A).unwrap();
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert!(limits.admit(mapped).is_err());
        assert!(limits.admit(IpAddr::V6(Ipv6Addr::LOCALHOST)).is_ok());
    }

    #[test]
    fn forgotten_addresses_leave_no_entries_behind() {
        let limits = ConnectionLimits::new(1000, 1000);
        let permits: Vec<_> = (0..100u8)
            .map(|i| {
                limits
                    .admit(IpAddr::V4(Ipv4Addr::new(10, 1, 0, i)))
                    .unwrap()
            })
            .collect();
        drop(permits);
        assert_eq!(limits.open(), 0);
        assert!(limits.counts.lock().unwrap().per_ip.is_empty());
    }

    #[test]
    fn refusals_are_complete_http_responses_that_close_the_connection() {
        let full = String::from_utf8(Refusal::Full { limit: 5 }.response_bytes()).unwrap();
        let (head, body) = full.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(head.contains("\r\nretry-after: 1"), "{head}");
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["status"], 503);
        assert_eq!(
            body["type"],
            "https://patchbay.dev/problems/connection-limit"
        );

        let per_ip = Refusal::PerAddress { ip: A, limit: 1 }.response_bytes();
        assert!(per_ip.starts_with(b"HTTP/1.1 429 Too Many Requests\r\n"));
    }
}
