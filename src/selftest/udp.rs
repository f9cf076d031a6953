//! The selftest's UDP rows: echo and full cone through a SOCKS5 UDP association, and
//! the ICMP port unreachable that a tunnel to a SOCKS4 proxy (which has no UDP)
//! answers at once.
//!
//! Drives the tunnel from `app` with ordinary sockets ([`crate::testbed::udp_client`],
//! [`crate::testbed::udp_probes`]) against the services of [`crate::testbed::udp`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::testbed::Namespace;
use crate::testbed::tunnel::TUN_NAME;
use crate::testbed::udp::{CONE_REPLY_PORT, UDP_ECHO_PORT};
use crate::testbed::udp_client::{MIN_PAYLOAD, max_udp_payload, udp_echo_check};
use crate::testbed::udp_probes::{udp_cone_check, udp_expect_unreachable};
use crate::testbed::{TARGET_V4, TARGET_V6};

use super::Row;

/// Datagrams in each echo check, one at a time, sizes spread up to the MTU.
const ECHO_COUNT: usize = 200;
/// How long the port unreachable may take; the tunnel answers in well under a
/// millisecond, the bound is generous for a loaded machine.
const UNREACHABLE_WITHIN: Duration = Duration::from_secs(1);

/// The rows of a SOCKS5 variant: echo over IPv4 and IPv6 (none lost, none altered;
/// the p50 and p99 round trips), then the full-cone check on both families.
pub(super) fn socks5_rows(app: &Namespace, variant: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mtu = match tun_mtu(app) {
        Ok(mtu) => mtu,
        Err(e) => {
            rows.push((format!("{variant} UDP: MTU of {TUN_NAME}"), Err(e)));
            return rows;
        }
    };
    for (family, ip) in families() {
        let max = max_udp_payload(mtu, ip.is_ipv6());
        let name = format!(
            "{variant} UDP {family}: echo {ECHO_COUNT} datagrams, {MIN_PAYLOAD}-{max} bytes"
        );
        rows.push((name, echo(app, ip, max)));
    }
    let name = format!("{variant} UDP: full cone (reply from another port), IPv4 + IPv6");
    rows.push((name, cone(app)));
    rows
}

/// The row of a SOCKS4 variant: a datagram gets ICMP port unreachable, v4 and v6.
pub(super) fn socks4_rows(app: &Namespace, variant: &str) -> Vec<Row> {
    let name = format!("{variant} UDP: port unreachable at once (the protocol has no UDP)");
    vec![(name, unreachable(app))]
}

fn families() -> [(&'static str, IpAddr); 2] {
    [("IPv4", TARGET_V4.into()), ("IPv6", TARGET_V6.into())]
}

/// The MTU of the tunnel's device in `ns`, from `ip -o link show`.
fn tun_mtu(ns: &Namespace) -> Result<usize, String> {
    let out = ns
        .ip(["-o", "link", "show", "dev", TUN_NAME])
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_mtu(&text).ok_or_else(|| format!("no MTU in {text:?}"))
}

fn parse_mtu(link: &str) -> Option<usize> {
    let mut words = link.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

fn echo(app: &Namespace, ip: IpAddr, max: usize) -> Result<String, String> {
    let target = SocketAddr::new(ip, UDP_ECHO_PORT);
    let report =
        udp_echo_check(app, target, ECHO_COUNT, MIN_PAYLOAD..=max).map_err(|e| e.to_string())?;
    if !report.all_ok() {
        return Err(report.to_string());
    }
    match (report.percentile(50.0), report.percentile(99.0)) {
        (Some(p50), Some(p99)) => Ok(format!("p50 {}, p99 {}, none lost", us(p50), us(p99))),
        _ => Err(format!("no round trips measured: {report}")),
    }
}

fn cone(app: &Namespace) -> Result<String, String> {
    for (family, ip) in families() {
        udp_cone_check(app, ip).map_err(|e| format!("{family}: {e}"))?;
    }
    Ok(format!(
        "replies from port {CONE_REPLY_PORT} reached the socket"
    ))
}

fn unreachable(app: &Namespace) -> Result<String, String> {
    let mut took = Vec::new();
    for (family, ip) in families() {
        let target = SocketAddr::new(ip, UDP_ECHO_PORT);
        let after = udp_expect_unreachable(app, target, UNREACHABLE_WITHIN)
            .map_err(|e| format!("{family}: {e}"))?;
        took.push(format!("{} ({family})", us(after)));
    }
    Ok(format!("after {}", took.join(", ")))
}

/// Microseconds: UDP round trips through the tunnel are well under a millisecond.
fn us(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_mtu_of_ip_link_output() {
        let line = "7: tun0: <POINTOPOINT,UP,LOWER_UP> mtu 9000 qdisc fq_codel state UNKNOWN";
        assert_eq!(parse_mtu(line), Some(9000));
        assert_eq!(parse_mtu("7: tun0: <UP> qdisc noop"), None);
        assert_eq!(parse_mtu("7: tun0: mtu x"), None);
    }
}
