//! shadowsocks-libev as the SOCKS upstream, the way users of a tunnel in front of a
//! shadowsocks (or v2ray, clash) client run it: `ss-server` in the proxy namespace and
//! `ss-local -u` in the app namespace, so the tunnel's `--proxy
//! socks5://127.0.0.1:PORT` is ss-local's SOCKS5 inbound, and every connection and
//! datagram leaves the proxy namespace from ss-server.
//!
//! Both run in the foreground with `-v` (one `connect to HOST:PORT` line per TCP
//! destination in each log), with a random password per instance and the AEAD cipher
//! [`METHOD`]. Nothing is written outside the process logs.
//!
//! What ss-local is as a SOCKS server: SOCKS5 only, no authentication, CONNECT (the
//! destination goes to ss-server as an address or a name, which ss-server resolves)
//! and, with `-u`, UDP ASSOCIATE, answered with its own bound address
//! (`127.0.0.1:SOCKS_PORT`: TCP and UDP share the port); no BIND. Two limits of its
//! own, whatever the client:
//! - no half-close: an EOF from either side makes ss-local (and ss-server) close both
//!   directions, so what was still on its way back is lost;
//! - each datagram goes to ss-server in one UDP datagram, 55 bytes larger with an
//!   IPv4 target and 67 with an IPv6 one, sent with DF: one that no longer fits the
//!   link fails in ss-local with EMSGSIZE and is dropped.
//!
//! ss-server reaches IPv6 targets by itself (`-6` only makes it prefer IPv6 for
//! names), so it listens on the proxy's IPv4 address only.

use std::fs::File;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use super::context;
use super::namespace::Namespace;
use super::process::Process;
use super::skip::{Skip, require_program};
use super::topology::PROXY_V4;
use super::wait::{wait_for_tcp, wait_for_udp};

/// The port ss-server listens on (TCP and UDP) in the proxy namespace.
pub const SERVER_PORT: u16 = 8388;
/// The port of ss-local's SOCKS5 inbound (TCP, and UDP for its relay), on the app
/// namespace's loopback.
pub const SOCKS_PORT: u16 = 1080;
/// The cipher both ends use (AEAD: 32 bytes of salt and a 16-byte tag per datagram).
pub const METHOD: &str = "chacha20-ietf-poly1305";

/// How long each program gets to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Random bytes in a password (it goes as hex).
const PASSWORD_BYTES: usize = 16;

/// ss-server in the proxy namespace and ss-local in the app namespace, sharing a
/// random password. Dropping it stops ss-local, then ss-server (fields drop in
/// order).
#[derive(Debug)]
pub struct Shadowsocks {
    local: Process,
    server: Process,
}

impl Shadowsocks {
    /// Starts `ss-server -s PROXY_V4 -p SERVER_PORT -u` in `proxy`, then `ss-local
    /// -b 127.0.0.1 -l SOCKS_PORT -u` in `app` pointed at it; returns once both
    /// listen (TCP and UDP). An error carries the logs.
    pub fn start(proxy: &Namespace, app: &Namespace) -> io::Result<Shadowsocks> {
        Self::start_with(proxy, app, true)
    }

    /// As [`Shadowsocks::start`], but ss-local without `-u`, a common mistake: it
    /// still grants UDP ASSOCIATE (with its own address as the relay) but nothing
    /// listens there, so each datagram sent to the relay meets a port unreachable.
    pub fn start_without_local_udp(proxy: &Namespace, app: &Namespace) -> io::Result<Shadowsocks> {
        Self::start_with(proxy, app, false)
    }

    fn start_with(proxy: &Namespace, app: &Namespace, local_udp: bool) -> io::Result<Shadowsocks> {
        let password = random_password()?;
        let mut server = ss_command(proxy, "ss-server", &password, true);
        server.args(["-s", &PROXY_V4.to_string()]);
        let server = spawn_listening(proxy, server, Shadowsocks::server_addr(), true, None)?;
        let mut local = ss_command(app, "ss-local", &password, local_udp);
        local
            .args(["-s", &PROXY_V4.to_string()])
            .args(["-b", &Ipv4Addr::LOCALHOST.to_string()])
            .args(["-l", &SOCKS_PORT.to_string()]);
        let local = spawn_listening(
            app,
            local,
            Shadowsocks::socks_addr(),
            local_udp,
            Some(&server),
        )?;
        Ok(Shadowsocks { local, server })
    }

    /// Where ss-server listens in the proxy namespace: `198.19.1.2:8388`.
    pub fn server_addr() -> SocketAddr {
        (PROXY_V4, SERVER_PORT).into()
    }

    /// Where ss-local's SOCKS5 inbound listens in the app namespace:
    /// `127.0.0.1:1080`.
    pub fn socks_addr() -> SocketAddr {
        (Ipv4Addr::LOCALHOST, SOCKS_PORT).into()
    }

    /// `socks5://127.0.0.1:1080`, for the tunnel's `--proxy` in the app namespace.
    pub fn url() -> String {
        format!("socks5://{}", Shadowsocks::socks_addr())
    }

    /// The ss-local process: its log has `connect to HOST:PORT` per CONNECT.
    pub fn local(&self) -> &Process {
        &self.local
    }

    /// The ss-server process: its log has `connect to HOST:PORT` per connection it
    /// makes, with the name when the client sent one.
    pub fn server(&self) -> &Process {
        &self.server
    }

    /// What both logged, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- ss-server:\n{}\n--- ss-local:\n{}",
            self.server.log().unwrap_or_default(),
            self.local.log().unwrap_or_default()
        )
    }
}

/// Whether shadowsocks-libev's `ss-server` and `ss-local` are installed: `Ok`, or the
/// [`Skip`] that names what is missing (for `require_or_skip!`).
pub fn require_shadowsocks(what: &str) -> Result<(), Skip> {
    require_program("ss-server", what)?;
    require_program("ss-local", what)
}

/// `PROGRAM -p SERVER_PORT -k PASSWORD -m METHOD [-u] -v` in `ns`: what ss-server
/// and ss-local share (the UDP relay on with `udp`, verbose, in the foreground).
fn ss_command(ns: &Namespace, program: &str, password: &str, udp: bool) -> Command {
    let mut command = ns.command(program);
    command
        .args(["-p", &SERVER_PORT.to_string()])
        .args(["-k", password, "-m", METHOD, "-v"]);
    if udp {
        command.arg("-u");
    }
    command
}

/// Spawns `command` in `ns` and waits until it listens on `addr`, TCP (and UDP with
/// `udp`); on failure (it exits first, or does not listen in time) the error carries
/// its log, and `peer`'s (the other end) if given.
fn spawn_listening(
    ns: &Namespace,
    command: Command,
    addr: SocketAddr,
    udp: bool,
    peer: Option<&Process>,
) -> io::Result<Process> {
    let mut process = ns.spawn(command)?;
    // A zero timeout: one look at the listeners per poll.
    let listening = |_: &Process| {
        wait_for_tcp(ns, addr, Duration::ZERO).is_ok()
            && (!udp || wait_for_udp(ns, addr, Duration::ZERO).is_ok())
    };
    process.wait_ready(START_TIMEOUT, listening).map_err(|e| {
        let peer = peer.map_or_else(String::new, |peer| {
            format!(
                "\n--- `{}`:\n{}",
                peer.command_line(),
                peer.log().unwrap_or_default()
            )
        });
        io::Error::new(e.kind(), format!("listening on {addr}: {e}{peer}"))
    })?;
    Ok(process)
}

/// A fresh password: [`PASSWORD_BYTES`] from `/dev/urandom`, in hex.
fn random_password() -> io::Result<String> {
    let mut bytes = [0u8; PASSWORD_BYTES];
    File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(context("/dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hex_and_differ() {
        let (a, b) = (random_password().unwrap(), random_password().unwrap());
        assert_eq!(a.len(), 2 * PASSWORD_BYTES);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn addresses_and_url() {
        assert_eq!(Shadowsocks::server_addr().to_string(), "198.19.1.2:8388");
        assert_eq!(Shadowsocks::url(), "socks5://127.0.0.1:1080");
    }
}
