//! Dante (`danted`, Debian's `dante-server`) in the proxy namespace: an independent
//! SOCKS4/5 server with CONNECT and UDP ASSOCIATE, for the tunnel to use as its
//! upstream instead of ours.
//!
//! Dante's UDP needs care: the socks rules must allow `udpassociate udpreply`, each
//! address family needs an `external:` address, and Dante matches UDP rules against
//! the address the client declares (PySocks declares the domain "0"), so the pass
//! rules here match any source. `udp.connectdst: no` keeps its relay socket
//! unconnected, so replies from a second remote port reach the client (full cone).

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::context;
use super::namespace::Namespace;
use super::process::Process;
use super::stale::unique_id;
use super::topology::{APP_NET_V4, APP_NET_V6, PROXY_OUT_V4, PROXY_OUT_V6, PROXY_V4, PROXY_V6};
use super::wait::wait_for_tcp;

/// The port danted listens on (beside our server's 1080).
pub const DANTE_PORT: u16 = 1081;

/// How long danted gets to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running danted, stopped (and its files removed) on drop.
#[derive(Debug)]
pub struct Dante {
    process: Process,
    dir: PathBuf,
}

impl Dante {
    /// Starts danted in `ns` (the proxy namespace) on the proxy's app-side addresses
    /// (v4 and v6) at [`DANTE_PORT`], no authentication, clients from the app network,
    /// CONNECT, BIND and UDP allowed to anywhere, leaving by the target link.
    pub fn start(ns: &Namespace) -> io::Result<Dante> {
        Self::start_with(ns, config())
    }

    /// As [`Dante::start`] with Dante's default `udp.connectdst: yes`: its socket to
    /// a UDP destination is connected, so it hears that destination's ICMP errors
    /// and (running as root) passes a port unreachable on to the client from its
    /// relay port. Replies from a second remote port do not reach the client then.
    pub fn start_connecting(ns: &Namespace) -> io::Result<Dante> {
        Self::start_with(
            ns,
            config().replace("udp.connectdst: no", "udp.connectdst: yes"),
        )
    }

    fn start_with(ns: &Namespace, config: String) -> io::Result<Dante> {
        let dir =
            std::env::temp_dir().join(format!("t2s-dante-{}-{}", std::process::id(), unique_id()));
        fs::create_dir_all(&dir).map_err(context(dir.display()))?;
        let conf = dir.join("danted.conf");
        fs::write(&conf, config).map_err(context(conf.display()))?;
        let mut command = ns.command("danted");
        command
            .arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(dir.join("danted.pid"))
            .args(["-N", "1"]);
        let started = ns.spawn(command);
        let mut process = match started {
            Ok(process) => process,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        if let Err(e) = wait_for_tcp(ns, Dante::addr(), START_TIMEOUT) {
            let _ = process.try_wait();
            let log = process.log().unwrap_or_default();
            let _ = fs::remove_dir_all(&dir);
            return Err(io::Error::new(
                e.kind(),
                format!("danted did not listen: {e}\n{log}"),
            ));
        }
        Ok(Dante { process, dir })
    }

    /// Where the app reaches it over IPv4.
    pub fn addr() -> SocketAddr {
        (PROXY_V4, DANTE_PORT).into()
    }

    /// Where the app reaches it over IPv6.
    pub fn addr_v6() -> SocketAddr {
        (PROXY_V6, DANTE_PORT).into()
    }

    /// `socks5://198.19.1.2:1081`, for `--proxy`.
    pub fn url() -> String {
        format!("socks5://{}", Dante::addr())
    }

    /// The danted process (its log holds its errors).
    pub fn process(&self) -> &Process {
        &self.process
    }
}

impl Drop for Dante {
    fn drop(&mut self) {
        let _ = self.process.terminate();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The danted configuration: see the module documentation for the UDP parts.
pub fn config() -> String {
    format!(
        "logoutput: stderr\n\
         internal: {PROXY_V4} port = {DANTE_PORT}\n\
         internal: {PROXY_V6} port = {DANTE_PORT}\n\
         external: {PROXY_OUT_V4}\n\
         external: {PROXY_OUT_V6}\n\
         external.rotation: route\n\
         udp.connectdst: no\n\
         clientmethod: none\n\
         socksmethod: none\n\
         user.privileged: root\n\
         user.unprivileged: nobody\n\
         timeout.io.udp: 300\n\
         client pass {{ from: {APP_NET_V4} to: 0.0.0.0/0 }}\n\
         client pass {{ from: {APP_NET_V6} to: ::/0 }}\n\
         socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect bind udpassociate bindreply udpreply }}\n\
         socks pass {{ from: ::/0 to: ::/0 command: connect bind udpassociate bindreply udpreply }}\n\
         socks pass {{ from: 0.0.0.0/0 to: ::/0 command: connect bind udpassociate bindreply udpreply }}\n\
         socks pass {{ from: ::/0 to: 0.0.0.0/0 command: connect bind udpassociate bindreply udpreply }}\n"
    )
}
