//! Where to send an association's datagrams: the relay address the proxy announced
//! in its UDP ASSOCIATE reply.
//!
//! Most servers announce an address; many announce `0.0.0.0` / `::` ("my address").
//! A few announce a host name. Looking that name up for each association would cost
//! a DNS round trip per UDP flow, and under `--setup` the lookup's own query enters
//! the tunnel, whose DNS needs a UDP association, which needs the name: a loop. So:
//!
//! - a name equal to the proxy's own host name is the address the control connection
//!   reached (no lookup at all);
//! - any other name is looked up once and cached ([`NAME_TTL`]); a failed lookup is
//!   remembered for [`FAILURE_TTL`], so a burst of new flows does not each wait for it;
//! - one lookup at a time; one that hangs (the loop above, a dead resolver) is given
//!   up after [`LOOKUP_TIMEOUT`], and anyone waiting for it waits no longer;
//! - the address chosen has the family of the association's socket (a v4 socket
//!   cannot send to a v6 relay).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::UpstreamError;
use crate::config::ProxyHost;
use crate::socks::Address;

/// How long a looked-up relay name is trusted.
pub const NAME_TTL: Duration = Duration::from_secs(300);
/// How long a failed lookup of a relay name is remembered.
pub const FAILURE_TTL: Duration = Duration::from_secs(5);
/// The longest a lookup of a relay name (or a wait for another's) may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Names kept at most (a proxy announces one or a few).
const MAX_NAMES: usize = 64;

#[derive(Debug, Clone)]
struct Entry {
    /// Empty: the lookup failed (with `error`).
    ips: Vec<IpAddr>,
    error: String,
    until: Instant,
}

/// The relay names a proxy announced, and their addresses.
#[derive(Debug, Default)]
pub(super) struct RelayNames {
    names: Mutex<HashMap<String, Entry>>,
    /// One lookup at a time.
    lookup: tokio::sync::Mutex<()>,
}

impl RelayNames {
    fn cached(&self, name: &str, now: Instant) -> Option<Entry> {
        let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        names.get(name).filter(|e| now < e.until).cloned()
    }

    fn store(&self, name: String, entry: Entry) {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        names.retain(|_, e| now < e.until);
        if names.len() >= MAX_NAMES {
            // A proxy announcing this many names is odd; forget the oldest.
            if let Some(oldest) = names
                .iter()
                .min_by_key(|(_, e)| e.until)
                .map(|(k, _)| k.clone())
            {
                names.remove(&oldest);
            }
        }
        names.insert(name, entry);
    }

    /// The addresses of `name`, from the cache or by `lookup` (bounded by
    /// [`LOOKUP_TIMEOUT`], including any wait for another caller's lookup).
    async fn addresses<F, Fut>(&self, name: &str, lookup: F) -> Result<Vec<IpAddr>, String>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = io::Result<Vec<IpAddr>>>,
    {
        let key = name.to_ascii_lowercase();
        let answer = |e: Entry| {
            if e.ips.is_empty() {
                Err(e.error)
            } else {
                Ok(e.ips)
            }
        };
        if let Some(entry) = self.cached(&key, Instant::now()) {
            return answer(entry);
        }
        let deadline = Instant::now() + LOOKUP_TIMEOUT;
        let Ok(_turn) = tokio::time::timeout_at(deadline, self.lock()).await else {
            return Err("another lookup of a relay name did not finish".into());
        };
        // Someone else's lookup may have answered while we waited.
        if let Some(entry) = self.cached(&key, Instant::now()) {
            return answer(entry);
        }
        let result = match tokio::time::timeout_at(deadline, lookup(key.clone())).await {
            Ok(Ok(ips)) if !ips.is_empty() => Ok(ips),
            Ok(Ok(_)) => Err("no addresses".to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
        };
        let now = Instant::now();
        let entry = match &result {
            Ok(ips) => Entry {
                ips: ips.clone(),
                error: String::new(),
                until: now + NAME_TTL,
            },
            Err(e) => Entry {
                ips: Vec::new(),
                error: e.clone(),
                until: now + FAILURE_TTL,
            },
        };
        match &result {
            Ok(ips) => tracing::info!(relay = %name, ?ips, "resolved the proxy's UDP relay"),
            Err(e) => {
                tracing::warn!(relay = %name, error = %e, "cannot resolve the proxy's UDP relay")
            }
        }
        self.store(key, entry);
        result
    }

    async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lookup.lock().await
    }

    /// Where to send datagrams for the relay a proxy announced. `proxy` is the
    /// address the control connection reached, `local` the association socket's
    /// address, `host` how the proxy was named on the command line.
    pub(super) async fn resolve<F, Fut>(
        &self,
        relay: &Address,
        proxy: SocketAddr,
        local: SocketAddr,
        host: &ProxyHost,
        lookup: F,
    ) -> Result<SocketAddr, UpstreamError>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = io::Result<Vec<IpAddr>>>,
    {
        let fix = |ip: IpAddr, port: u16| {
            if ip.is_unspecified() {
                SocketAddr::new(proxy.ip(), port)
            } else {
                SocketAddr::new(ip, port)
            }
        };
        let (name, port) = match relay {
            Address::Ip(addr) => return Ok(fix(addr.ip(), addr.port())),
            Address::Domain(name, port) => (name.as_str(), *port),
        };
        // A literal in a name field (some servers do that).
        if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse() {
            return Ok(fix(ip, port));
        }
        if matches!(host, ProxyHost::Name(h) if h.eq_ignore_ascii_case(name.trim_end_matches('.')))
        {
            return Ok(SocketAddr::new(proxy.ip(), port));
        }
        let error = |msg: String| UpstreamError::Resolve {
            host: name.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, msg),
        };
        let ips = self.addresses(name, lookup).await.map_err(error)?;
        let v4 = local.ip().to_canonical().is_ipv4();
        ips.iter()
            .map(|ip| ip.to_canonical())
            .find(|ip| ip.is_ipv4() == v4)
            .map(|ip| SocketAddr::new(ip, port))
            .ok_or_else(|| {
                error(format!(
                    "no {} address (the association's socket is {local})",
                    if v4 { "IPv4" } else { "IPv6" }
                ))
            })
    }
}

/// The system resolver, for [`RelayNames::resolve`].
pub(super) async fn system_lookup(name: String) -> io::Result<Vec<IpAddr>> {
    Ok(tokio::net::lookup_host((name.as_str(), 0))
        .await?
        .map(|a| a.ip())
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    const PROXY: &str = "198.18.0.2:1080";
    const LOCAL4: &str = "198.18.0.1:40000";
    const LOCAL6: &str = "[fd18::1]:40000";

    fn name(n: &str, port: u16) -> Address {
        Address::Domain(crate::socks::DomainName::new(n).unwrap(), port)
    }

    fn counting(
        calls: &Arc<AtomicUsize>,
        ips: &'static [&'static str],
    ) -> impl FnOnce(String) -> std::future::Ready<io::Result<Vec<IpAddr>>> + use<> {
        let calls = calls.clone();
        move |_| {
            calls.fetch_add(1, SeqCst);
            std::future::ready(Ok(ips.iter().map(|s| s.parse().unwrap()).collect()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn addresses_need_no_lookup_and_unspecified_means_the_proxy() {
        let names = RelayNames::default();
        let host = ProxyHost::Name("proxy.example".into());
        let calls = Arc::new(AtomicUsize::new(0));
        let cases = [
            (
                Address::Ip("0.0.0.0:5000".parse().unwrap()),
                "198.18.0.2:5000",
            ),
            (Address::Ip("[::]:5000".parse().unwrap()), "198.18.0.2:5000"),
            (Address::Ip("198.18.0.9:7".parse().unwrap()), "198.18.0.9:7"),
            (name("198.18.0.9", 7), "198.18.0.9:7"),
            (name("0.0.0.0", 8), "198.18.0.2:8"),
            (name("[fd18::9]", 9), "[fd18::9]:9"),
            (name("Proxy.Example", 5001), "198.18.0.2:5001"),
            (name("proxy.example.", 5002), "198.18.0.2:5002"),
        ];
        for (relay, want) in cases {
            let got = names
                .resolve(
                    &relay,
                    PROXY.parse().unwrap(),
                    LOCAL4.parse().unwrap(),
                    &host,
                    counting(&calls, &["203.0.113.1"]),
                )
                .await
                .unwrap();
            assert_eq!(got, want.parse().unwrap(), "{relay:?}");
        }
        assert_eq!(calls.load(SeqCst), 0, "no lookup for any of these");
    }

    #[tokio::test(start_paused = true)]
    async fn another_name_is_looked_up_once_per_ttl_and_the_family_matches() {
        let names = RelayNames::default();
        let host = ProxyHost::Ip("198.18.0.2".parse().unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let ips: &[&str] = &["fd18::7", "198.18.0.7"];
        for _ in 0..100 {
            let got = names
                .resolve(
                    &name("relay.example", 5000),
                    PROXY.parse().unwrap(),
                    LOCAL4.parse().unwrap(),
                    &host,
                    counting(&calls, ips),
                )
                .await
                .unwrap();
            assert_eq!(got, "198.18.0.7:5000".parse().unwrap());
        }
        let v6 = names
            .resolve(
                &name("RELAY.example", 5000),
                "[fd18::2]:1080".parse().unwrap(),
                LOCAL6.parse().unwrap(),
                &host,
                counting(&calls, ips),
            )
            .await
            .unwrap();
        assert_eq!(v6, "[fd18::7]:5000".parse().unwrap());
        assert_eq!(calls.load(SeqCst), 1, "one lookup for 101 associations");
        tokio::time::advance(NAME_TTL).await;
        names
            .resolve(
                &name("relay.example", 5000),
                PROXY.parse().unwrap(),
                LOCAL4.parse().unwrap(),
                &host,
                counting(&calls, ips),
            )
            .await
            .unwrap();
        assert_eq!(calls.load(SeqCst), 2, "looked up again after the TTL");
        // Only an IPv6 address for a v4 socket: a clear error, not a failed connect.
        let err = names
            .resolve(
                &name("v6only.example", 5000),
                PROXY.parse().unwrap(),
                LOCAL4.parse().unwrap(),
                &host,
                counting(&calls, &["fd18::8"]),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no IPv4 address"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_remembered_briefly_and_a_hung_lookup_is_given_up() {
        let names = Arc::new(RelayNames::default());
        let host = ProxyHost::Ip("198.18.0.2".parse().unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = |calls: &Arc<AtomicUsize>| {
            let calls = calls.clone();
            move |_: String| {
                calls.fetch_add(1, SeqCst);
                std::future::ready(Err::<Vec<IpAddr>, _>(io::Error::other("SERVFAIL")))
            }
        };
        for _ in 0..10 {
            let err = names
                .resolve(
                    &name("bad.example", 1),
                    PROXY.parse().unwrap(),
                    LOCAL4.parse().unwrap(),
                    &host,
                    failing(&calls),
                )
                .await
                .unwrap_err();
            assert!(err.to_string().contains("SERVFAIL"), "{err}");
        }
        assert_eq!(calls.load(SeqCst), 1, "the failure is remembered");
        tokio::time::advance(FAILURE_TTL).await;
        let _ = names
            .resolve(
                &name("bad.example", 1),
                PROXY.parse().unwrap(),
                LOCAL4.parse().unwrap(),
                &host,
                failing(&calls),
            )
            .await;
        assert_eq!(calls.load(SeqCst), 2, "and tried again after it");

        // A lookup that never answers (its query looping through the tunnel) holds
        // no one for longer than LOOKUP_TIMEOUT: neither itself nor a second caller.
        let started = Instant::now();
        let hung = {
            let names = names.clone();
            let host = host.clone();
            tokio::spawn(async move {
                names
                    .resolve(
                        &name("hang.example", 1),
                        PROXY.parse().unwrap(),
                        LOCAL4.parse().unwrap(),
                        &host,
                        |_| std::future::pending::<io::Result<Vec<IpAddr>>>(),
                    )
                    .await
            })
        };
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        let waiter = names
            .resolve(
                &name("other.example", 1),
                PROXY.parse().unwrap(),
                LOCAL4.parse().unwrap(),
                &host,
                counting(&calls, &["198.18.0.5"]),
            )
            .await
            .unwrap();
        assert_eq!(waiter, "198.18.0.5:1".parse().unwrap());
        assert_eq!(
            started.elapsed(),
            LOOKUP_TIMEOUT,
            "the waiter got its turn when the hung lookup was given up"
        );
        let hung = hung.await.unwrap().unwrap_err();
        assert!(hung.to_string().contains("no answer within"), "{hung}");
    }
}
