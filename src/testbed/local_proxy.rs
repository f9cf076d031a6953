//! A topology whose SOCKS proxy is a local client in `app` in front of a server in
//! `proxy`, as users run ssh (`ssh -D` in front of sshd) and shadowsocks (ss-local in
//! front of ss-server): the test services in `target`, the tunnel in `app` with the
//! local client's `--proxy` URL. `app` has no route to `target` but the TUN, and only
//! the proxy's server connects onward, so every byte that comes back went through the
//! tunnel, the local client and its server.

use std::io;
use std::path::PathBuf;

use super::dnsmasq::Dnsmasq;
use super::services::Services;
use super::tunnel::{start_tunnel, stop_cleanly};
use super::udp::UdpServices;
use super::{Namespace, Process, Topology};

/// A proxy made of a local client (in `app`) and its server (in `proxy`).
pub trait LocalProxy {
    /// The tunnel's `--proxy` URL for the local client, in the app namespace.
    fn url() -> String;
    /// What the client and the server logged, for failure messages.
    fn logs(&self) -> String;
}

impl LocalProxy for super::sshd::SshProxy {
    fn url() -> String {
        Self::url()
    }

    fn logs(&self) -> String {
        format!(
            "--- sshd:\n{}\n--- ssh:\n{}",
            self.sshd().log().unwrap_or_default(),
            self.client().log().unwrap_or_default()
        )
    }
}

impl LocalProxy for super::shadowsocks::Shadowsocks {
    fn url() -> String {
        Self::url()
    }

    fn logs(&self) -> String {
        Self::logs(self)
    }
}

/// The namespaces, the services, the proxy `P` and (once started) the tunnel. Fields
/// drop in order: the tunnel, the proxy (client, then server), dnsmasq, the UDP and
/// TCP services, the namespaces last.
#[derive(Debug)]
pub struct LocalProxyNet<P> {
    /// The tunnel, while one runs.
    pub tunnel: Option<Process>,
    /// The local client and its server.
    pub proxy: P,
    /// A resolver in `target`, for the tests that start one.
    pub dnsmasq: Option<Dnsmasq>,
    /// The UDP services in `target`, for the tests that start them.
    pub udp: Option<UdpServices>,
    _services: Services,
    /// The namespaces.
    pub topo: Topology,
    binary: PathBuf,
}

impl<P: LocalProxy> LocalProxyNet<P> {
    /// Creates the namespaces (tagged `tag`), runs `prepare` on them (before any
    /// process starts: `ip netns exec` binds a namespace's /etc/netns files when a
    /// process starts), starts the TCP services (HTTP blob and echo of `blob` bytes
    /// from `seed`) in `target`, then the proxy with `start(proxy, app)`. The tunnel is
    /// `binary`, started by [`LocalProxyNet::tunnel`].
    pub fn start(
        tag: &str,
        binary: PathBuf,
        (blob, seed): (usize, u64),
        prepare: impl FnOnce(&Topology) -> io::Result<()>,
        start: impl FnOnce(&Namespace, &Namespace) -> io::Result<P>,
    ) -> io::Result<Self> {
        let topo = Topology::create(tag)?;
        prepare(&topo)?;
        let services = Services::start(topo.target(), blob, seed)?;
        let proxy = start(topo.proxy(), topo.app())?;
        Ok(LocalProxyNet {
            tunnel: None,
            proxy,
            dnsmasq: None,
            udp: None,
            _services: services,
            topo,
            binary,
        })
    }

    /// The application's namespace.
    pub fn app(&self) -> &Namespace {
        self.topo.app()
    }

    /// Starts the tunnel on a device it creates, through the local client's SOCKS
    /// port, with `extra` arguments.
    pub fn tunnel(&mut self, extra: &[&str]) -> io::Result<()> {
        self.tunnel = Some(start_tunnel(self.app(), &self.binary, &P::url(), extra)?);
        Ok(())
    }

    /// Stops the tunnel with SIGTERM and returns its log (with the stats line).
    pub fn stop_tunnel(&mut self) -> io::Result<String> {
        let tunnel = self
            .tunnel
            .take()
            .ok_or_else(|| io::Error::other("no tunnel is running"))?;
        stop_cleanly(tunnel)
    }

    /// What the proxy's client and server logged, for failure messages.
    pub fn logs(&self) -> String {
        self.proxy.logs()
    }
}
