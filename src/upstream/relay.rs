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
//! - any other name is looked up when first announced, one lookup at a time, and the
//!   answer kept ([`NAME_TTL`]); once that has passed, associations take the answer
//!   they have at once while a lookup in the background renews it;
//! - when the first lookup fails, hangs past [`LOOKUP_TIMEOUT`], or another
//!   association's lookup has not answered within [`WAIT_FOR_LOOKUP`], the
//!   association falls back to the proxy's own address with the announced port (where
//!   nearly every server runs its relay), logged. A failure is tried again in the
//!   background after [`FAILURE_TTL`], doubling with each further failure up to
//!   [`MAX_FAILURE_TTL`]; meanwhile associations fall back at once. So only the very
//!   first association for a name ever waits for a lookup;
//! - under `--setup` the first lookup's own query enters the tunnel and needs an
//!   association itself: that one waits [`WAIT_FOR_LOOKUP`], falls back, carries the
//!   query, and the lookup then answers;
//! - the address chosen has the family of the association's socket (a v4 socket
//!   cannot send to a v6 relay).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::UpstreamError;
use crate::config::ProxyHost;
use crate::socks::Address;

/// How long a looked-up relay name is trusted before it is looked up again.
pub const NAME_TTL: Duration = Duration::from_secs(300);
/// How long after a failed lookup of a relay name it is tried again the first time;
/// it doubles with each further failure of the same name, up to
/// [`MAX_FAILURE_TTL`].
pub const FAILURE_TTL: Duration = Duration::from_secs(5);
/// The longest pause between failed lookups of a name.
pub const MAX_FAILURE_TTL: Duration = NAME_TTL;
/// The longest a lookup of a relay name may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest an association waits for another association's lookup.
pub const WAIT_FOR_LOOKUP: Duration = Duration::from_millis(500);
/// How long an answer past its time is still served while it is renewed.
const STALE_FOR: Duration = Duration::from_secs(3600);
/// How long an answer of the routing table about an address is trusted.
pub const ROUTE_TTL: Duration = Duration::from_secs(30);
/// Names kept at most (a proxy announces one or a few).
const MAX_NAMES: usize = 64;

#[derive(Debug, Clone)]
struct Entry {
    /// Empty: the last lookup failed (with `error`).
    ips: Vec<IpAddr>,
    error: String,
    /// Look the name up again after this.
    until: Instant,
    /// Failed lookups in a row (0 after a success).
    failures: u32,
}

impl Entry {
    fn answer(self) -> Result<Vec<IpAddr>, String> {
        if self.ips.is_empty() {
            Err(self.error)
        } else {
            Ok(self.ips)
        }
    }
}

/// The relay names a proxy announced, and their addresses.
#[derive(Debug, Default)]
pub(super) struct RelayNames {
    names: Mutex<HashMap<String, Entry>>,
    /// One lookup at a time.
    lookup: tokio::sync::Mutex<()>,
}

/// What the cache holds for a name.
enum Cached {
    Fresh(Entry),
    /// Past its time: served while a lookup renews it.
    Stale(Entry),
    None,
}

impl RelayNames {
    fn names(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cached(&self, name: &str, now: Instant) -> Cached {
        match self.names().get(name) {
            Some(e) if now < e.until => Cached::Fresh(e.clone()),
            Some(e) if now < e.until + STALE_FOR => Cached::Stale(e.clone()),
            _ => Cached::None,
        }
    }

    /// Failed lookups of `name` in a row, as remembered.
    #[cfg(test)]
    fn failures(&self, name: &str) -> u32 {
        self.names().get(name).map_or(0, |e| e.failures)
    }

    /// Marks `name`'s entry as being renewed until `until` (so that one lookup,
    /// not one per association, renews it).
    fn renewing(&self, name: &str, until: Instant) {
        if let Some(e) = self.names().get_mut(name) {
            e.until = until;
        }
    }

    /// Stores the result of a lookup of `key` (`name` as announced, for the log).
    fn store(
        &self,
        key: String,
        name: &str,
        proxy_ip: IpAddr,
        result: &Result<Vec<IpAddr>, String>,
    ) {
        let now = Instant::now();
        let mut names = self.names();
        let entry = match result {
            Ok(ips) => {
                tracing::info!(relay = %name, ?ips, "resolved the proxy's UDP relay");
                Entry {
                    ips: ips.clone(),
                    error: String::new(),
                    until: now + NAME_TTL,
                    failures: 0,
                }
            }
            Err(e) => {
                let before = names.get(&key);
                let failures = before.map_or(0, |e| e.failures).saturating_add(1);
                let ttl = FAILURE_TTL
                    .saturating_mul(1 << (failures - 1).min(16))
                    .min(MAX_FAILURE_TTL);
                tracing::warn!(
                    relay = %name, error = %e, fallback = %proxy_ip, retry_in = ?ttl,
                    "cannot resolve the proxy's UDP relay; using the proxy's address"
                );
                match before {
                    // A renewal failed: keep serving the last good answer.
                    Some(last) if !last.ips.is_empty() => Entry {
                        until: now + ttl,
                        failures,
                        ..last.clone()
                    },
                    _ => Entry {
                        ips: Vec::new(),
                        error: e.clone(),
                        until: now + ttl,
                        failures,
                    },
                }
            }
        };
        names.retain(|_, e| now < e.until + STALE_FOR);
        if names.len() >= MAX_NAMES && !names.contains_key(&key) {
            // A proxy announcing this many names is odd; forget the oldest.
            if let Some(oldest) = names
                .iter()
                .min_by_key(|(_, e)| e.until)
                .map(|(k, _)| k.clone())
            {
                names.remove(&oldest);
            }
        }
        names.insert(key, entry);
    }

    /// Looks `key` up (bounded by [`LOOKUP_TIMEOUT`]); the caller holds the turn.
    async fn look_up<F, Fut>(
        &self,
        key: String,
        name: &str,
        proxy_ip: IpAddr,
        lookup: F,
    ) -> Result<Vec<IpAddr>, String>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = io::Result<Vec<IpAddr>>>,
    {
        let result = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup(key.clone())).await {
            Ok(Ok(ips)) if !ips.is_empty() => Ok(ips),
            Ok(Ok(_)) => Err("no addresses".to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
        };
        self.store(key, name, proxy_ip, &result);
        result
    }

    /// The addresses of `name`: from the cache (a stale answer at once, renewed in
    /// the background), or, the first time, by `lookup`, bounded by
    /// [`LOOKUP_TIMEOUT`] (a wait for another caller's lookup by
    /// [`WAIT_FOR_LOOKUP`]).
    async fn addresses<F, Fut>(
        self: &Arc<Self>,
        name: &str,
        proxy_ip: IpAddr,
        lookup: F,
    ) -> Result<Vec<IpAddr>, String>
    where
        F: FnOnce(String) -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<Vec<IpAddr>>> + Send + 'static,
    {
        let key = name.to_ascii_lowercase();
        match self.cached(&key, Instant::now()) {
            Cached::Fresh(entry) => return entry.answer(),
            Cached::Stale(entry) => {
                // Nobody waits: the answer we have now, and a lookup behind it.
                self.renewing(&key, Instant::now() + LOOKUP_TIMEOUT + WAIT_FOR_LOOKUP);
                let (this, name) = (self.clone(), name.to_string());
                tokio::spawn(async move {
                    let _turn = this.lookup.lock().await;
                    let _ = this.look_up(key, &name, proxy_ip, lookup).await;
                });
                return entry.answer();
            }
            Cached::None => {}
        }
        let Ok(_turn) = tokio::time::timeout(WAIT_FOR_LOOKUP, self.lookup.lock()).await else {
            return Err(format!(
                "another association's lookup did not answer within {WAIT_FOR_LOOKUP:?}"
            ));
        };
        // Someone else's lookup may have answered while we waited.
        match self.cached(&key, Instant::now()) {
            Cached::Fresh(entry) | Cached::Stale(entry) => entry.answer(),
            Cached::None => self.look_up(key, name, proxy_ip, lookup).await,
        }
    }

    /// Where to send datagrams for the relay a proxy announced. `proxy` is the
    /// address the control connection reached, `local` the association socket's
    /// address, `host` how the proxy was named on the command line.
    pub(super) async fn resolve<F, Fut>(
        self: &Arc<Self>,
        relay: &Address,
        proxy: SocketAddr,
        local: SocketAddr,
        host: &ProxyHost,
        lookup: F,
    ) -> Result<SocketAddr, UpstreamError>
    where
        F: FnOnce(String) -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<Vec<IpAddr>>> + Send + 'static,
    {
        let fix = |ip: IpAddr, port: u16| {
            if ip.is_unspecified() || ip.to_canonical().is_unspecified() {
                SocketAddr::new(proxy.ip(), port)
            } else if local.is_ipv4() {
                // A dual-stack server may name its v4 relay as ::ffff:a.b.c.d,
                // which a v4 socket cannot send to.
                SocketAddr::new(ip.to_canonical(), port)
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
        let ips = match self.addresses(name, proxy.ip(), lookup).await {
            Ok(ips) => ips,
            Err(why) => {
                tracing::debug!(relay = %name, why, "UDP relay at the proxy's address");
                return Ok(SocketAddr::new(proxy.ip(), port));
            }
        };
        let v4 = local.ip().to_canonical().is_ipv4();
        ips.iter()
            .map(|ip| ip.to_canonical())
            .find(|ip| ip.is_ipv4() == v4)
            .map(|ip| SocketAddr::new(ip, port))
            .ok_or_else(|| UpstreamError::Resolve {
                host: name.to_string(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no {} address for the proxy's UDP relay (the association's socket is {local})",
                        if v4 { "IPv4" } else { "IPv6" }
                    ),
                ),
            })
    }
}

/// The loop check for addresses learnt while running: relays at other addresses
/// than the proxy's, and the proxy's own addresses when looked up again
/// ([`super::Upstream::guard_loops`]).
#[derive(Debug)]
pub(super) struct LoopGuard {
    ifindex: u32,
    device: String,
    /// The fake-IP pools (with `--dns fake-ip`): an address in them is the
    /// tunnel's own invention, however it routes.
    fake_pools: Vec<ipnet::IpNet>,
    /// Addresses already asked about: does the route enter the TUN, and until when
    /// that answer holds ([`ROUTE_TTL`]: a user who fixes the routing is heard).
    seen: Mutex<HashMap<IpAddr, (bool, Instant)>>,
}

impl LoopGuard {
    pub(super) fn new(ifindex: u32, device: &str, fake_pools: &[ipnet::IpNet]) -> Self {
        LoopGuard {
            ifindex,
            device: device.to_owned(),
            fake_pools: fake_pools.to_vec(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `route` (the interface a packet to an address leaves by) says `ip`
    /// is reached through the TUN. Asked once per address and [`ROUTE_TTL`]; a
    /// failed question is logged and counts as no loop.
    pub(super) fn loops(
        &self,
        ip: IpAddr,
        route: impl FnOnce(IpAddr) -> Result<Option<u32>, String>,
    ) -> bool {
        let ip = ip.to_canonical();
        if self.fake_pools.iter().any(|pool| pool.contains(&ip)) {
            return true;
        }
        let now = Instant::now();
        let known = self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ip)
            .copied();
        if let Some((looped, until)) = known
            && now < until
        {
            return looped;
        }
        let looped = match route(ip) {
            Ok(out) => out == Some(self.ifindex),
            Err(error) => {
                tracing::debug!(address = %ip, error, "cannot ask the route");
                false
            }
        };
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= MAX_NAMES {
            seen.clear();
        }
        seen.insert(ip, (looped, now + ROUTE_TTL));
        looped
    }

    /// Fails with [`UpstreamError::RelayLoop`] if `relay` is reached through the
    /// TUN ([`LoopGuard::loops`]).
    pub(super) fn check(
        &self,
        relay: SocketAddr,
        route: impl FnOnce(IpAddr) -> Result<Option<u32>, String>,
    ) -> Result<(), UpstreamError> {
        let ip = relay.ip().to_canonical();
        let first = !self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ip)
            .is_some_and(|&(looped, until)| looped && Instant::now() < until);
        if !self.loops(relay.ip(), route) {
            return Ok(());
        }
        if first {
            tracing::warn!(
                relay = %relay, device = %self.device,
                "the proxy's UDP relay is routed through the tunnel itself; refusing its associations"
            );
        }
        Err(UpstreamError::RelayLoop {
            relay,
            device: self.device.clone(),
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
    const FALLBACK: &str = "198.18.0.2:5000";

    fn name(n: &str, port: u16) -> Address {
        Address::Domain(crate::socks::DomainName::new(n).unwrap(), port)
    }

    /// A lookup answering `ips`, counted in `calls`.
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

    /// Where an association whose socket is `local` sends for `relay` (the control
    /// connection reached [`PROXY`], or its v6 twin for a v6 socket).
    async fn relay_for<F, Fut>(
        names: &Arc<RelayNames>,
        host: &ProxyHost,
        relay: &Address,
        local: &str,
        lookup: F,
    ) -> Result<SocketAddr, UpstreamError>
    where
        F: FnOnce(String) -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<Vec<IpAddr>>> + Send + 'static,
    {
        let local: SocketAddr = local.parse().unwrap();
        let proxy = if local.is_ipv4() {
            PROXY.parse().unwrap()
        } else {
            "[fd18::2]:1080".parse().unwrap()
        };
        names.resolve(relay, proxy, local, host, lookup).await
    }

    /// [`relay_for`] `relay`:5000 from a v4 socket, which must succeed.
    async fn at<F, Fut>(
        names: &Arc<RelayNames>,
        host: &ProxyHost,
        relay: &str,
        lookup: F,
    ) -> SocketAddr
    where
        F: FnOnce(String) -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<Vec<IpAddr>>> + Send + 'static,
    {
        relay_for(names, host, &name(relay, 5000), "198.18.0.1:40000", lookup)
            .await
            .unwrap()
    }

    /// Lets background renewals run.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn ip_host() -> ProxyHost {
        ProxyHost::Ip("198.18.0.2".parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn addresses_need_no_lookup_and_unspecified_means_the_proxy() {
        let names = Arc::new(RelayNames::default());
        let host = ProxyHost::Name("proxy.example".into());
        let calls = Arc::new(AtomicUsize::new(0));
        let cases = [
            (Address::Ip("0.0.0.0:5000".parse().unwrap()), FALLBACK),
            (Address::Ip("[::]:5000".parse().unwrap()), FALLBACK),
            (Address::Ip("198.18.0.9:7".parse().unwrap()), "198.18.0.9:7"),
            (
                Address::Ip("[::ffff:198.18.0.9]:7".parse().unwrap()),
                "198.18.0.9:7",
            ),
            (
                Address::Ip("[::ffff:0.0.0.0]:7".parse().unwrap()),
                "198.18.0.2:7",
            ),
            (name("::ffff:198.18.0.9", 7), "198.18.0.9:7"),
            (name("198.18.0.9", 7), "198.18.0.9:7"),
            (name("0.0.0.0", 8), "198.18.0.2:8"),
            (name("[fd18::9]", 9), "[fd18::9]:9"),
            (name("Proxy.Example", 5001), "198.18.0.2:5001"),
            (name("proxy.example.", 5002), "198.18.0.2:5002"),
        ];
        for (relay, want) in cases {
            let lookup = counting(&calls, &["203.0.113.1"]);
            let got = relay_for(&names, &host, &relay, "198.18.0.1:40000", lookup).await;
            assert_eq!(got.unwrap(), want.parse().unwrap(), "{relay:?}");
        }
        assert_eq!(calls.load(SeqCst), 0, "no lookup for any of these");
    }

    #[tokio::test(start_paused = true)]
    async fn another_name_is_looked_up_once_per_ttl_and_the_family_matches() {
        let names = Arc::new(RelayNames::default());
        let host = ip_host();
        let calls = Arc::new(AtomicUsize::new(0));
        let ips: &[&str] = &["fd18::7", "198.18.0.7"];
        for _ in 0..100 {
            let got = at(&names, &host, "relay.example", counting(&calls, ips)).await;
            assert_eq!(got, "198.18.0.7:5000".parse().unwrap());
        }
        let relay = name("RELAY.example", 5000);
        let v6 = relay_for(
            &names,
            &host,
            &relay,
            "[fd18::1]:40000",
            counting(&calls, ips),
        );
        assert_eq!(v6.await.unwrap(), "[fd18::7]:5000".parse().unwrap());
        assert_eq!(calls.load(SeqCst), 1, "one lookup for 101 associations");
        // Past the TTL the answer is served at once and renewed behind it.
        tokio::time::advance(NAME_TTL).await;
        let started = Instant::now();
        let renewed: &[&str] = &["198.18.0.17"];
        let slow = {
            let calls = calls.clone();
            move |_| async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                calls.fetch_add(1, SeqCst);
                Ok(vec!["198.18.0.17".parse().unwrap()])
            }
        };
        let stale = at(&names, &host, "relay.example", slow).await;
        assert_eq!(stale, "198.18.0.7:5000".parse().unwrap());
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "nobody waits for a renewal"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(calls.load(SeqCst), 2, "looked up again after the TTL");
        for _ in 0..10 {
            let got = at(&names, &host, "relay.example", counting(&calls, renewed)).await;
            assert_eq!(got, "198.18.0.17:5000".parse().unwrap());
        }
        assert_eq!(calls.load(SeqCst), 2, "one renewal");
        // Only an IPv6 address for a v4 socket: a clear error, not a failed connect.
        let relay = name("v6only.example", 5000);
        let lookup = counting(&calls, &["fd18::8"]);
        let err = relay_for(&names, &host, &relay, "198.18.0.1:40000", lookup).await;
        let err = err.unwrap_err().to_string();
        assert!(err.contains("no IPv4 address"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_or_hung_lookup_falls_back_to_the_proxy_and_is_remembered() {
        let names = Arc::new(RelayNames::default());
        let host = ip_host();
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = |calls: &Arc<AtomicUsize>| {
            let calls = calls.clone();
            move |_: String| {
                calls.fetch_add(1, SeqCst);
                std::future::ready(Err::<Vec<IpAddr>, _>(io::Error::other("SERVFAIL")))
            }
        };
        for _ in 0..10 {
            let got = at(&names, &host, "bad.example", failing(&calls)).await;
            assert_eq!(got, FALLBACK.parse().unwrap(), "the proxy's address");
        }
        assert_eq!(calls.load(SeqCst), 1, "the failure is remembered");
        // Tried again after FAILURE_TTL, in the background, then after twice as
        // long, and so on; associations meanwhile fall back at once.
        for (lookups, ttl) in [(2, FAILURE_TTL), (3, 2 * FAILURE_TTL), (4, 4 * FAILURE_TTL)] {
            tokio::time::advance(ttl - Duration::from_millis(1)).await;
            at(&names, &host, "bad.example", failing(&calls)).await;
            settle().await;
            assert_eq!(calls.load(SeqCst), lookups - 1, "not before {ttl:?}");
            tokio::time::advance(Duration::from_millis(1)).await;
            let started = Instant::now();
            let got = at(&names, &host, "bad.example", failing(&calls)).await;
            assert_eq!(got, FALLBACK.parse().unwrap());
            assert_eq!(
                started.elapsed(),
                Duration::ZERO,
                "nobody waits for a retry"
            );
            settle().await;
            assert_eq!(calls.load(SeqCst), lookups, "tried again after {ttl:?}");
        }
        assert_eq!(names.failures("bad.example"), 4);
        // A success ends it.
        tokio::time::advance(8 * FAILURE_TTL).await;
        at(
            &names,
            &host,
            "bad.example",
            counting(&calls, &["198.18.0.8"]),
        )
        .await;
        settle().await;
        let good = at(&names, &host, "bad.example", failing(&calls)).await;
        assert_eq!(good, "198.18.0.8:5000".parse().unwrap());
        assert_eq!(names.failures("bad.example"), 0);
        // And a failed renewal keeps the last good answer.
        tokio::time::advance(NAME_TTL).await;
        at(&names, &host, "bad.example", failing(&calls)).await;
        settle().await;
        let kept = at(&names, &host, "bad.example", failing(&calls)).await;
        assert_eq!(kept, "198.18.0.8:5000".parse().unwrap());
        assert_eq!(names.failures("bad.example"), 1);

        // A lookup that never answers is given up after LOOKUP_TIMEOUT.
        let started = Instant::now();
        let hung = at(&names, &host, "hang.example", |_| std::future::pending()).await;
        assert_eq!(hung, FALLBACK.parse().unwrap());
        assert_eq!(started.elapsed(), LOOKUP_TIMEOUT);
    }

    #[test]
    fn a_relay_routed_through_the_tunnel_is_refused_and_asked_about_once() {
        let guard = LoopGuard::new(7, "tun0", &["198.18.128.0/17".parse().unwrap()]);
        let asked = AtomicUsize::new(0);
        let route = |out: Option<u32>| {
            let asked = &asked;
            move |_| {
                asked.fetch_add(1, SeqCst);
                Ok(out)
            }
        };
        let inside: SocketAddr = "198.19.2.2:5000".parse().unwrap();
        for _ in 0..3 {
            let err = guard.check(inside, route(Some(7))).unwrap_err();
            assert!(matches!(err, UpstreamError::RelayLoop { .. }), "{err}");
            assert!(err.to_string().contains("routing loop"), "{err}");
        }
        // v4-mapped is the same address.
        let mapped: SocketAddr = "[::ffff:198.19.2.2]:5001".parse().unwrap();
        assert!(guard.check(mapped, route(Some(2))).is_err());
        assert_eq!(asked.load(SeqCst), 1, "asked once per address");
        let outside: SocketAddr = "198.19.1.9:5000".parse().unwrap();
        guard.check(outside, route(Some(2))).unwrap();
        // No route, or a question that fails, is not a loop.
        guard
            .check("198.19.1.10:1".parse().unwrap(), route(None))
            .unwrap();
        guard
            .check("198.19.1.11:1".parse().unwrap(), |_| Err("EPERM".into()))
            .unwrap();
        assert_eq!(asked.load(SeqCst), 3);
        // A fake address loops whatever its route says, and needs no question.
        let fake: SocketAddr = "198.18.128.1:1080".parse().unwrap();
        assert!(guard.check(fake, route(Some(2))).is_err());
        assert_eq!(asked.load(SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_routing_fix_is_heard_after_route_ttl() {
        let guard = LoopGuard::new(7, "tun0", &[]);
        let relay: SocketAddr = "198.19.2.2:5000".parse().unwrap();
        assert!(guard.check(relay, |_| Ok(Some(7))).is_err());
        // The user routes the relay around the tunnel; the old answer holds a while.
        tokio::time::advance(ROUTE_TTL - Duration::from_millis(1)).await;
        assert!(guard.check(relay, |_| Ok(Some(2))).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        guard.check(relay, |_| Ok(Some(2))).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_whose_query_needs_an_association_itself_does_not_wedge() {
        // Under --setup the lookup's DNS query enters the tunnel, whose association
        // for it needs the same relay name: it must not wait for the lookup it is
        // part of. It falls back to the proxy's address after WAIT_FOR_LOOKUP, the
        // query goes, and the lookup answers.
        let names = Arc::new(RelayNames::default());
        let host = ip_host();
        let calls = Arc::new(AtomicUsize::new(0));
        let nested = Arc::new(std::sync::Mutex::new(None));
        let lookup = {
            let (names, host, calls, nested) =
                (names.clone(), host.clone(), calls.clone(), nested.clone());
            move |_: String| async move {
                calls.fetch_add(1, SeqCst);
                let never = |_| std::future::pending::<io::Result<Vec<IpAddr>>>();
                let inner = at(&names, &host, "relay.example", never).await;
                *nested.lock().unwrap() = Some(inner);
                Ok(vec!["198.18.0.7".parse().unwrap()])
            }
        };
        let started = Instant::now();
        let outer = at(&names, &host, "relay.example", lookup).await;
        assert_eq!(outer, "198.18.0.7:5000".parse().unwrap());
        assert_eq!(started.elapsed(), WAIT_FOR_LOOKUP, "held by its own query");
        assert_eq!(
            *nested.lock().unwrap(),
            Some(FALLBACK.parse().unwrap()),
            "the query's association used the proxy's address"
        );
        // And the answer is kept.
        let again = at(
            &names,
            &host,
            "relay.example",
            counting(&calls, &["203.0.113.9"]),
        );
        assert_eq!(again.await, "198.18.0.7:5000".parse().unwrap());
        assert_eq!(calls.load(SeqCst), 1);
    }
}
