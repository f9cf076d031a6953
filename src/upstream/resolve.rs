//! The proxy's own addresses: resolved once, reused by every flow, looked up again
//! only when every address failed, and then no more often than a growing backoff
//! allows. Once the host's DNS goes through the tunnel, a lookup per flow would
//! loop (the lookup would need the proxy, whose address needs the lookup).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::UpstreamError;
use crate::config::{ProxyHost, ProxyUrl};

/// The first pause after a failed lookup; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest pause between lookups.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct State {
    addrs: Vec<SocketAddr>,
    /// Every address failed: look up again when the backoff allows.
    stale: bool,
    /// No lookup before this instant.
    not_before: Option<Instant>,
    backoff: Duration,
    lookups: u64,
}

/// The resolved addresses of the proxy, shared by every clone of an `Upstream`.
#[derive(Debug)]
pub(super) struct ProxyAddrs {
    state: Mutex<State>,
    /// One lookup at a time; the others wait for its result.
    lookup: tokio::sync::Mutex<()>,
}

impl ProxyAddrs {
    pub(super) fn new(proxy: &ProxyUrl) -> Self {
        let addrs = match proxy.host {
            ProxyHost::Ip(ip) => vec![SocketAddr::new(ip, proxy.port)],
            ProxyHost::Name(_) => Vec::new(),
        };
        ProxyAddrs {
            state: Mutex::new(State {
                addrs,
                stale: false,
                not_before: None,
                backoff: FIRST_BACKOFF,
                lookups: 0,
            }),
            lookup: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn current(&self) -> Vec<SocketAddr> {
        self.state().addrs.clone()
    }

    pub(super) fn contains(&self, addr: SocketAddr) -> bool {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self.state()
            .addrs
            .iter()
            .any(|a| a.port() == addr.port() && a.ip().to_canonical() == addr.ip())
    }

    /// How many lookups were made (tests: a flow must not cause one).
    #[cfg(test)]
    fn lookups(&self) -> u64 {
        self.state().lookups
    }

    /// A connection to one of the addresses succeeded.
    pub(super) fn dialled(&self) {
        let mut state = self.state();
        state.stale = false;
    }

    /// Every address failed: allow a new lookup (after the backoff).
    pub(super) fn all_failed(&self) {
        self.state().stale = true;
    }

    /// The addresses to dial. Looks the name up when there are none yet, when every
    /// address failed, or when `force`d; but never before the backoff allows, and
    /// while a lookup is running the others wait for it. Addresses `keep` refuses
    /// (their route enters the TUN: the lookup went through the tunnel and was
    /// answered from the fake-IP pool, say) are dropped; a lookup that leaves none
    /// counts as failed, and the last good addresses stay.
    pub(super) async fn resolve(
        &self,
        proxy: &ProxyUrl,
        force: bool,
        keep: impl Fn(IpAddr) -> bool,
    ) -> Result<Vec<SocketAddr>, UpstreamError> {
        let ProxyHost::Name(name) = &proxy.host else {
            return Ok(self.current());
        };
        let wanted = |state: &State| force || state.addrs.is_empty() || state.stale;
        if !wanted(&self.state()) {
            return Ok(self.current());
        }
        let _turn = self.lookup.lock().await;
        let now = Instant::now();
        {
            let state = self.state();
            // Someone else's lookup may have answered while we waited.
            if !wanted(&state) {
                return Ok(state.addrs.clone());
            }
            if let Some(at) = state.not_before.filter(|at| now < *at && !force) {
                if state.addrs.is_empty() {
                    return Err(UpstreamError::Resolve {
                        host: name.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!(
                                "the last lookup failed; next try in {} ms",
                                at.saturating_duration_since(now).as_millis()
                            ),
                        ),
                    });
                }
                return Ok(state.addrs.clone());
            }
        }
        let result = tokio::net::lookup_host((name.as_str(), proxy.port)).await;
        let mut state = self.state();
        state.lookups = state.lookups.saturating_add(1);
        let result = result.and_then(|addrs| {
            let (kept, looping): (Vec<_>, Vec<_>) = addrs.partition(|a| keep(a.ip()));
            if kept.is_empty() && !looping.is_empty() {
                return Err(std::io::Error::other(format!(
                    "every address ({looping:?}) is routed through the tunnel itself"
                )));
            }
            Ok(kept)
        });
        match result {
            Ok(addrs) if !addrs.is_empty() => {
                tracing::info!(proxy = %name, ?addrs, "resolved the proxy");
                state.addrs = addrs;
                state.stale = false;
                state.not_before = None;
                state.backoff = FIRST_BACKOFF;
                Ok(state.addrs.clone())
            }
            other => {
                let source = match other {
                    Err(e) => e,
                    Ok(_) => std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
                };
                let backoff = state.backoff;
                state.not_before = Some(now + backoff);
                state.backoff = (backoff * 2).min(MAX_BACKOFF);
                tracing::warn!(
                    proxy = %name, error = %source, retry_in = ?backoff,
                    "cannot resolve the proxy"
                );
                if state.addrs.is_empty() {
                    Err(UpstreamError::Resolve {
                        host: name.clone(),
                        source,
                    })
                } else {
                    // Keep using the last good addresses.
                    state.stale = false;
                    Ok(state.addrs.clone())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_name_is_looked_up_once_and_again_only_after_failure() {
        let proxy: ProxyUrl = "socks5://localhost:1080".parse().unwrap();
        let addrs = ProxyAddrs::new(&proxy);
        assert!(addrs.current().is_empty());
        let first = addrs.resolve(&proxy, false, |_| true).await.unwrap();
        assert!(!first.is_empty());
        for _ in 0..100 {
            addrs.resolve(&proxy, false, |_| true).await.unwrap();
        }
        assert_eq!(addrs.lookups(), 1, "no lookup per dial");
        assert!(addrs.contains(first[0]));
        addrs.all_failed();
        addrs.resolve(&proxy, false, |_| true).await.unwrap();
        assert_eq!(addrs.lookups(), 2);
        addrs.dialled();
        addrs.resolve(&proxy, false, |_| true).await.unwrap();
        assert_eq!(addrs.lookups(), 2);
    }

    #[tokio::test]
    async fn failed_lookups_back_off() {
        let proxy: ProxyUrl = "socks5://no-such-host.invalid:1080".parse().unwrap();
        let addrs = ProxyAddrs::new(&proxy);
        assert!(addrs.resolve(&proxy, false, |_| true).await.is_err());
        for _ in 0..50 {
            let err = addrs.resolve(&proxy, false, |_| true).await.unwrap_err();
            assert!(err.to_string().contains("next try"), "{err}");
        }
        assert_eq!(addrs.lookups(), 1, "the backoff holds further lookups");
    }

    #[tokio::test]
    async fn addresses_that_loop_are_dropped_and_the_last_good_ones_kept() {
        let proxy: ProxyUrl = "socks5://localhost:1080".parse().unwrap();
        let addrs = ProxyAddrs::new(&proxy);
        let good = addrs.resolve(&proxy, false, |_| true).await.unwrap();
        assert!(!good.is_empty());
        // Looked up again, every answer now routes into the TUN (a fake-IP answer):
        // refused, and the last good addresses stay in use.
        addrs.all_failed();
        let kept = addrs.resolve(&proxy, false, |_| false).await.unwrap();
        assert_eq!(kept, good);
        assert_eq!(addrs.lookups(), 2);
        // With no good address yet, a looping answer is an error.
        let proxy: ProxyUrl = "socks5://localhost:1080".parse().unwrap();
        let fresh = ProxyAddrs::new(&proxy);
        let err = fresh.resolve(&proxy, false, |_| false).await.unwrap_err();
        assert!(
            err.to_string().contains("routed through the tunnel"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_address_needs_no_lookup() {
        let proxy: ProxyUrl = "socks5://[fd19:1::2]:1080".parse().unwrap();
        let addrs = ProxyAddrs::new(&proxy);
        assert_eq!(
            addrs.resolve(&proxy, true, |_| true).await.unwrap().len(),
            1
        );
        assert!(addrs.contains("[fd19:1::2]:1080".parse().unwrap()));
        assert!(!addrs.contains("[fd19:1::2]:1081".parse().unwrap()));
        assert_eq!(addrs.lookups(), 0);
    }
}
