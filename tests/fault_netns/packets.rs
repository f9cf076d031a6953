//! Malformed and unusual packets injected into the TUN from the app namespace: each
//! kind is dropped and counted under its reason, the tunnel survives and serves.
//! Good packets with IPv4 options (UDP and a TCP SYN) are served, and TCP SYNs with a
//! bad checksum open no flow (smoltcp drops them; today no counter shows it).

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use tun2socks::testbed::services::ECHO_PORT;
use tun2socks::testbed::udp::UDP_SINK_PORT;
use tun2socks::testbed::{Namespace, TARGET_V4, TARGET_V6};

use crate::support::*;

/// Sends IP packets into the tunnel's TUN from `ns`: raw sockets with the header
/// included (`IPPROTO_RAW`), routed by the default route into the TUN. The IPv4
/// kernel fills in the header checksum and total length; everything else is ours.
/// Returns how many packets the kernel took.
fn inject(ns: &Namespace, packets: Vec<Vec<u8>>) -> Result<usize> {
    Ok(ns.within(move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let v4 = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
        let v6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(255)))?;
        let mut taken = 0;
        for p in &packets {
            let sent = match p.first().map(|b| b >> 4) {
                Some(6) => v6.send_to(p, &SocketAddr::new(TARGET_V6.into(), 0).into()),
                _ => v4.send_to(p, &SocketAddr::new(TARGET_V4.into(), 0).into()),
            };
            if sent.is_ok() {
                taken += 1;
            }
        }
        Ok(taken)
    })?)
}

const APP_TUN_V4: [u8; 4] = [198, 18, 0, 1];
const APP_TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfd18, 0, 0, 0, 0, 0, 0, 1);

fn udp_v4(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4(APP_TUN_V4, TARGET_V4.octets(), 64)
        .udp(4242, UDP_SINK_PORT)
        .write(&mut out, payload)
        .unwrap();
    out
}

fn udp_v6(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv6(APP_TUN_V6.octets(), TARGET_V6.octets(), 64)
        .udp(4242, UDP_SINK_PORT)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// An IPv4 header (20 bytes + `options`) over `payload`, protocol `proto`, with the
/// given flags/fragment-offset word; checksum and total length are the kernel's.
fn ipv4_raw(proto: u8, frag: u16, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = (ihl * 4 + payload.len()) as u16;
    let mut p = vec![0x40 | ihl as u8, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34]);
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&APP_TUN_V4);
    p.extend_from_slice(&TARGET_V4.octets());
    p.extend_from_slice(options);
    p.extend_from_slice(payload);
    p
}

/// An IPv6 header with `next` and a payload length of `len` over `payload`.
fn ipv6_raw(next: u8, len: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&APP_TUN_V6.octets());
    p.extend_from_slice(&TARGET_V6.octets());
    p.extend_from_slice(payload);
    p
}

/// The malformed and unusual packets, by the drop counter each must raise.
fn malformed_packets() -> Vec<(&'static str, Vec<u8>)> {
    let good_v4 = udp_v4(b"corrupt me");
    let good_v6 = udp_v6(b"corrupt me");
    let udp_part = good_v4[20..].to_vec();
    let mut bad_sum_v4 = good_v4.clone();
    *bad_sum_v4.last_mut().unwrap() ^= 0xff;
    let mut bad_sum_v6 = good_v6.clone();
    *bad_sum_v6.last_mut().unwrap() ^= 0xff;
    // UDP length field longer than the datagram.
    let mut long_udp = good_v4.clone();
    long_udp[24..26].copy_from_slice(&500u16.to_be_bytes());
    // TCP data offset 15 (60 bytes) in a 20-byte segment; and a 10-byte TCP header.
    let mut tcp = Vec::new();
    etherparse::PacketBuilder::ipv4(APP_TUN_V4, TARGET_V4.octets(), 64)
        .tcp(4243, ECHO_PORT, 1, 1000)
        .syn()
        .write(&mut tcp, &[])
        .unwrap();
    let tcp_part = tcp[20..].to_vec();
    let mut bad_offset = tcp_part.clone();
    bad_offset[12] = 0xf0;
    // IPv6 hop-by-hop options (PadN) before a UDP datagram with a bad checksum.
    let mut hbh = vec![17, 0, 1, 4, 0, 0, 0, 0];
    let mut bad_udp6 = good_v6[40..].to_vec();
    *bad_udp6.last_mut().unwrap() ^= 0xff;
    hbh.extend_from_slice(&bad_udp6);
    // IPv6 destination options, then an unknown next header (253, experimental).
    let dest_unknown = [253, 0, 1, 4, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    // Fragments that can never be reassembled (fragments that can be wait for the
    // rest of their datagram: `src/stack/reassembly.rs`): an IPv6 fragment header
    // (offset 0, more fragments) over 9 bytes, where all but the last fragment
    // carry a multiple of 8.
    let mut frag6 = vec![17, 0, 0, 1, 0, 0, 0x12, 0x34];
    frag6.extend_from_slice(&good_v6[40..49]);
    vec![
        ("bad-checksum", bad_sum_v4),
        ("bad-checksum", bad_sum_v6),
        ("bad-checksum", ipv6_raw(0, hbh.len() as u16, &hbh)),
        ("malformed", ipv4_raw(17, 0, &[], &udp_part[..4])),
        ("malformed", long_udp),
        ("malformed", ipv4_raw(6, 0, &[], &tcp_part[..10])),
        ("malformed", ipv4_raw(6, 0, &[], &bad_offset)),
        ("malformed", ipv6_raw(17, 200, &good_v6[40..])),
        ("malformed", ipv6_raw(17, 4, &good_v6[40..44])),
        // More fragments, 9 bytes.
        ("fragment", ipv4_raw(17, 0x2000, &[], &udp_part[..9])),
        // The last fragment at offset 65,528: the datagram would pass 65,535 bytes.
        ("fragment", ipv4_raw(17, 0x1fff, &[], &udp_part[..16])),
        ("fragment", ipv6_raw(44, frag6.len() as u16, &frag6)),
        (
            "other-protocol",
            ipv6_raw(60, dest_unknown.len() as u16, &dest_unknown),
        ),
        ("other-protocol", ipv4_raw(253, 0, &[], b"experimental")),
        // Extension headers that say to discard the packet (RFC 8200 4.2-4.4): an
        // unknown option of type 01xxxxxx, a Routing header with a segment left, a
        // Hop-by-Hop header after another header.
        ("ipv6-extension", {
            let mut p = vec![17, 0, 0x4a, 4, 0, 0, 0, 0];
            p.extend_from_slice(&good_v6[40..]);
            ipv6_raw(60, p.len() as u16, &p)
        }),
        ("ipv6-extension", {
            let mut p = vec![17, 0, 0, 1, 0, 0, 0, 0];
            p.extend_from_slice(&good_v6[40..]);
            ipv6_raw(43, p.len() as u16, &p)
        }),
        ("ipv6-extension", {
            let mut p = vec![0, 0, 1, 4, 0, 0, 0, 0, 17, 0, 1, 4, 0, 0, 0, 0];
            p.extend_from_slice(&good_v6[40..]);
            ipv6_raw(60, p.len() as u16, &p)
        }),
        // IPv4 options (NOP x3, EOL) on an otherwise good datagram with a bad checksum.
        ("bad-checksum", {
            let mut udp = udp_part.clone();
            *udp.last_mut().unwrap() ^= 0xff;
            ipv4_raw(17, 0, &[1, 1, 1, 0], &udp)
        }),
    ]
}

fn syn_v4(sport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4(APP_TUN_V4, TARGET_V4.octets(), 64)
        .tcp(sport, ECHO_PORT, 1, 1000)
        .syn()
        .write(&mut out, &[])
        .unwrap();
    out
}

/// TCP SYNs to the echo port with their checksum broken, v4 and v6.
fn bad_checksum_syns() -> Vec<Vec<u8>> {
    let mut v6 = Vec::new();
    etherparse::PacketBuilder::ipv6(APP_TUN_V6.octets(), TARGET_V6.octets(), 64)
        .tcp(4244, ECHO_PORT, 1, 1000)
        .syn()
        .write(&mut v6, &[])
        .unwrap();
    let mut v4 = syn_v4(4245);
    v4[36] ^= 0xff;
    v6[56] ^= 0xff;
    vec![v4, v6]
}

#[test]
fn malformed_packets_are_dropped_counted_and_survived() -> Result<()> {
    needs_root!("malformed_packets_are_dropped_counted_and_survived");
    let mut net = Net::new("fjunk", &[], &[])?;
    echo_once(net.app())?;
    let packets = malformed_packets();
    let mut expected: BTreeMap<&str, u64> = Default::default();
    for (reason, _) in &packets {
        *expected.entry(reason).or_default() += 1;
    }
    // Each one 20 times, interleaved, so that no single lucky packet passes for all.
    let mut all = Vec::new();
    for _ in 0..20 {
        all.extend(packets.iter().map(|(_, p)| p.clone()));
    }
    let total = all.len();
    let taken = inject(net.app(), all)?;
    ensure!(
        taken == total,
        "the kernel refused {} of {total} packets",
        total - taken
    );
    // Still serving after the junk: TCP through the tunnel.
    echo_once(net.app())?;
    // A good IPv4 datagram with options must not be mistaken for junk.
    let sunk_before = net.udp.sink_received();
    inject(
        net.app(),
        vec![ipv4_raw(
            17,
            0,
            &[1, 1, 1, 0],
            &udp_v4(b"with options")[20..],
        )],
    )?;
    let arrived = wait_until(Duration::from_secs(3), || {
        net.udp.sink_received() > sunk_before
    });
    // TCP SYNs with a bad checksum (v4, v6) open no flow: smoltcp checks the checksum.
    inject(net.app(), bad_checksum_syns())?;
    // EXPERIMENT: a SYN with IPv4 options.
    inject(
        net.app(),
        vec![ipv4_raw(6, 0, &[1, 1, 1, 0], &syn_v4(4250)[20..])],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    net.assert_no_panics()?;
    let log = net.stop_tunnel()?;
    eprintln!(
        "{}",
        log.lines()
            .rev()
            .find(|l| l.contains("stopped stats="))
            .unwrap_or("")
    );
    let mut wrong = Vec::new();
    for (reason, n) in &expected {
        let got = stat(&log, reason);
        eprintln!("{reason}: {got} counted (at least {} sent)", n * 20);
        if got < n * 20 {
            wrong.push(format!("{reason}: {got} < {}", n * 20));
        }
    }
    if !wrong.is_empty() {
        bail!("drops not counted: {wrong:?}\n{log}");
    }
    ensure!(
        stat(&log, "udp_associations") >= 1 && arrived.is_some(),
        "a datagram with IPv4 options was not relayed:\n{log}"
    );
    // Two echoes and the SYN with options; none of the 20 bad-checksum SYNs.
    ensure!(stat(&log, "flows_opened") == 3, "{log}");
    Ok(())
}

/// A TCP connection from an application that sets IPv6 Destination Options and
/// Hop-by-Hop options on its socket (`IPV6_DSTOPTS`, `IPV6_HOPOPTS`: PadN), so that
/// every segment it sends carries them: 1 MiB echoed through the tunnel. (smoltcp
/// alone answers a segment behind Destination Options with "unrecognized next
/// header", and the application's connect failed with EPROTO.)
const EXTENSION_HEADER_APP: &str = r#"
import hashlib, os, socket, sys
s = socket.socket(socket.AF_INET6)
pad = bytes([0, 0, 1, 4, 0, 0, 0, 0])
if sys.argv[3] in ("dst", "both"):
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, pad)
if sys.argv[3] in ("hop", "both"):
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, pad)
s.settimeout(10)
s.connect((sys.argv[1], int(sys.argv[2])))
data = os.urandom(1 << 20)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
got = bytearray()
while True:
    b = s.recv(1 << 16)
    if not b:
        break
    got += b
print("echoed" if bytes(got) == data else "differs %d" % len(got))
"#;

#[test]
fn ipv6_extension_headers_are_processed_as_a_destination_does() -> Result<()> {
    needs_root!("ipv6_extension_headers_are_processed_as_a_destination_does");
    let mut net = Net::new("fext6", &[], &[])?;
    for which in ["dst", "hop", "both"] {
        let out = net
            .app()
            .command("python3")
            .args([
                "-c",
                EXTENSION_HEADER_APP,
                &TARGET_V6.to_string(),
                &ECHO_PORT.to_string(),
                which,
            ])
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            stdout.trim() == "echoed",
            "TCP with {which} options: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // An unknown option of type 10xxxxxx before a UDP datagram: discarded, and the
    // source is told with an ICMPv6 Parameter Problem (code 2) pointing at it.
    let mut dest = vec![17, 0, 1, 0, 0x8a, 2, 0, 0];
    dest.extend_from_slice(&udp_v6(b"unknown option")[40..]);
    let offending = ipv6_raw(60, dest.len() as u16, &dest);
    let error = net.app().within(move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let icmp = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        icmp.set_read_timeout(Some(Duration::from_secs(3)))?;
        let raw = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(255)))?;
        raw.send_to(&offending, &SocketAddr::new(TARGET_V6.into(), 0).into())?;
        let mut buf = [0u8; 2048];
        loop {
            // The raw ICMPv6 socket gets the ICMPv6 message without the IP header.
            let n = std::io::Read::read(&mut &icmp, &mut buf)?;
            if buf.first() == Some(&4) {
                return Ok(buf[..n].to_vec());
            }
        }
    })?;
    let msg = error;
    ensure!(msg[1] == 2, "code {} (want 2: unrecognized option)", msg[1]);
    let pointer = u32::from_be_bytes(msg[4..8].try_into()?);
    ensure!(
        pointer == 44,
        "pointer {pointer} (want 44: the option's type)"
    );
    // It quotes the offending packet: its addresses and the option.
    ensure!(
        msg.get(8 + 24..8 + 40) == Some(&TARGET_V6.octets()[..]) && msg.get(8 + 44) == Some(&0x8a),
        "quote: {msg:02x?}"
    );
    net.assert_no_panics()?;
    let log = net.stop_tunnel()?;
    // At least the one above. Once, in a full CI run (both cores busy, two queues),
    // the count was 3 with nothing else here sending such packets; not reproduced
    // in isolation, so the exact count is not asserted.
    ensure!(stat(&log, "ipv6-extension") >= 1, "{log}");
    Ok(())
}

/// A datagram whose fragments never all come is discarded after 30 s, and the
/// application that sent its first fragment is told: ICMP Time Exceeded, code 1
/// "fragment reassembly time exceeded" (RFC 1122 3.3.2, RFC 8200 4.5), quoting
/// it; a datagram whose first fragment never came gets no error.
#[test]
fn an_incomplete_datagram_gets_reassembly_time_exceeded() -> Result<()> {
    needs_root!("an_incomplete_datagram_gets_reassembly_time_exceeded");
    let mut net = Net::new("ffragtime", &[], &[])?;
    let whole4 = udp_v4(&[7; 3000]);
    let whole6 = udp_v6(&[7; 3000]);
    // First fragments only (more fragments; 1,480 and 1,448 bytes of data), and a
    // middle fragment alone.
    let first4 = ipv4_raw(17, 0x2000, &[], &whole4[20..1500]);
    let mut frag6 = vec![17, 0, 0, 1, 0, 0, 0x56, 0x78];
    frag6.extend_from_slice(&whole6[40..1488]);
    let first6 = ipv6_raw(44, frag6.len() as u16, &frag6);
    let middle4 = {
        let mut p = ipv4_raw(17, 0x2000 | 185, &[], &whole4[1500..1508]);
        p[4..6].copy_from_slice(&[0x43, 0x21]);
        p
    };
    let started = std::time::Instant::now();
    let errors = net.app().within(move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let icmp4 = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        let icmp6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        let raw4 = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
        let raw6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(255)))?;
        let to4 = SocketAddr::new(TARGET_V4.into(), 0).into();
        raw4.send_to(&first4, &to4)?;
        raw4.send_to(&middle4, &to4)?;
        raw6.send_to(&first6, &SocketAddr::new(TARGET_V6.into(), 0).into())?;
        let mut errors = Vec::new();
        let mut buf = [0u8; 2048];
        for (socket, v6) in [(&icmp4, false), (&icmp6, true)] {
            socket.set_read_timeout(Some(Duration::from_secs(40)))?;
            loop {
                let n = std::io::Read::read(&mut &*socket, &mut buf).map_err(|e| {
                    std::io::Error::other(format!("no ICMP error (IPv6: {v6}) within 40 s: {e}"))
                })?;
                // The IPv4 raw socket gets the IP header; the IPv6 one does not.
                let icmp = if v6 { &buf[..n] } else { &buf[20..n] };
                if icmp.first() == Some(&if v6 { 3 } else { 11 }) {
                    errors.push((v6, icmp.to_vec()));
                    break;
                }
            }
        }
        // Nothing more: the lone middle fragment (expired at the same moment) is
        // not told about.
        icmp4.set_read_timeout(Some(Duration::from_secs(1)))?;
        while let Ok(n) = std::io::Read::read(&mut &icmp4, &mut buf) {
            if buf.get(20) == Some(&11) {
                errors.push((false, buf[20..n].to_vec()));
            }
        }
        Ok(errors)
    })?;
    let waited = started.elapsed();
    ensure!(
        errors.len() == 2,
        "{} errors (want one each for IPv4 and IPv6)",
        errors.len()
    );
    ensure!(
        waited >= Duration::from_secs(29),
        "the errors came after {waited:?}, before the 30 s reassembly time"
    );
    for (v6, icmp) in &errors {
        ensure!(icmp[1] == 1, "code {} (want 1), v6={v6}", icmp[1]);
        // The quote starts with the first fragment's header: its identification.
        let id_at = if *v6 { 8 + 40 + 4 } else { 8 + 4 };
        let id = if *v6 {
            vec![0, 0, 0x56, 0x78]
        } else {
            vec![0x12, 0x34]
        };
        ensure!(
            icmp.get(id_at..id_at + id.len()) == Some(&id[..]),
            "quote: {icmp:02x?}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    net.assert_no_panics()?;
    let log = net.stop_tunnel()?;
    ensure!(stat(&log, "fragment") == 3, "{log}");
    Ok(())
}
