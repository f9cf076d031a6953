//! Waiting until a server in a namespace listens, without touching it: the listeners
//! are read with `ss` (iproute2), so no probe connection reaches the server's accept
//! loop or its connection counters.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::namespace::Namespace;

/// How often the listeners are read again.
const POLL: Duration = Duration::from_millis(20);

/// Waits until a TCP socket in `namespace` listens on `addr` (or on the wildcard
/// address of its port), or fails with `TimedOut` after `timeout`.
pub fn wait_for_tcp(namespace: &Namespace, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    wait_for(namespace, Protocol::Tcp, addr, timeout)
}

/// Waits until a UDP socket in `namespace` is bound to `addr` (or to the wildcard
/// address of its port), or fails with `TimedOut` after `timeout`.
pub fn wait_for_udp(namespace: &Namespace, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    wait_for(namespace, Protocol::Udp, addr, timeout)
}

#[derive(Debug, Clone, Copy)]
enum Protocol {
    Tcp,
    Udp,
}

fn wait_for(
    namespace: &Namespace,
    protocol: Protocol,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<()> {
    let flags = match protocol {
        Protocol::Tcp => "-Hltn",
        Protocol::Udp => "-Hlun",
    };
    let deadline = Instant::now() + timeout;
    loop {
        let output = namespace.run("ss", [flags])?;
        let listeners = String::from_utf8_lossy(&output.stdout);
        if listeners.lines().any(|line| covers(line, addr)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "nothing listens on {protocol:?} {addr} in {} after {timeout:?}",
                    namespace.name()
                ),
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// Whether a line of `ss -Hl` output is a socket that receives what is sent to
/// `wanted`. An unspecified `wanted` address matches any listener on its port.
fn covers(line: &str, wanted: SocketAddr) -> bool {
    let Some((ip, port)) = line.split_whitespace().nth(3).and_then(parse_local) else {
        return false;
    };
    if port != wanted.port() {
        return false;
    }
    match ip {
        None => true,
        Some(_) if wanted.ip().is_unspecified() => true,
        // A dual-stack `[::]` socket receives IPv4 too; `0.0.0.0` never gets IPv6.
        Some(IpAddr::V6(v6)) if v6.is_unspecified() => true,
        Some(ip) if ip.is_unspecified() => wanted.is_ipv4(),
        Some(ip) => ip == wanted.ip(),
    }
}

/// Parses ss's local address column: `198.19.1.2:80`, `[fd19:1::2]:80`,
/// `0.0.0.0:80`, `[::]:80`, `*:80`, `127.0.0.53%lo:53`. `None` for the address
/// means `*`.
fn parse_local(local: &str) -> Option<(Option<IpAddr>, u16)> {
    let (host, port) = local.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.split_once('%').map_or(host, |(host, _interface)| host);
    if host == "*" {
        return Some((None, port));
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((Some(host.parse().ok()?), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
    }

    #[test]
    fn parses_every_local_form() {
        let cases = [
            ("198.19.1.2:80", Some((ip("198.19.1.2"), 80))),
            ("[fd19:1::2]:1080", Some((ip("fd19:1::2"), 1080))),
            ("0.0.0.0:22", Some((ip("0.0.0.0"), 22))),
            ("[::]:22", Some((ip("::"), 22))),
            ("*:5201", Some((None, 5201))),
            ("127.0.0.53%lo:53", Some((ip("127.0.0.53"), 53))),
            ("[fe80::1]%to-app:53", Some((ip("fe80::1"), 53))),
            ("nonsense", None),
            ("1.2.3.4:port", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_local(text), expected, "{text}");
        }
    }

    #[test]
    fn matches_exact_and_wildcard_listeners() {
        let line = |local: &str| format!("LISTEN 0      128    {local}    0.0.0.0:*");
        assert!(covers(&line("198.19.2.2:80"), addr("198.19.2.2:80")));
        assert!(!covers(&line("198.19.2.2:80"), addr("198.19.2.2:81")));
        assert!(!covers(&line("198.19.2.2:80"), addr("198.19.1.2:80")));
        assert!(covers(&line("0.0.0.0:80"), addr("198.19.2.2:80")));
        assert!(!covers(&line("0.0.0.0:80"), addr("[fd19:2::2]:80")));
        assert!(covers(&line("[::]:80"), addr("198.19.2.2:80")));
        assert!(covers(&line("[::]:80"), addr("[fd19:2::2]:80")));
        assert!(covers(&line("*:80"), addr("[fd19:2::2]:80")));
        assert!(covers(&line("[fd19:2::2]:80"), addr("[fd19:2::2]:80")));
        assert!(covers(&line("198.19.2.2:80"), addr("0.0.0.0:80")));
        assert!(!covers("", addr("0.0.0.0:80")));
    }
}
