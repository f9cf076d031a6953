//! The UDP super-packet egress writes for a run of datagrams (see the parent
//! module): one IP and UDP header, the datagrams back to back, and the offload
//! header that tells the kernel how to cut it.

use std::net::{IpAddr, SocketAddr};

use etherparse::{IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, UdpHeader};

use super::{TTL, canonical};
use crate::offload::{FLAG_NEEDS_CSUM, UDP_CSUM_OFFSET, VnetHdr, gso, pseudo_header_sum};

/// Builds into `buf` one UDP packet `from` -> `to` whose payload is `datagrams`
/// back to back (`size` bytes each but the last), with the pseudo-header sum in the
/// checksum field; returns its offload header (`gso_type` UDP_L4, `gso_size` `size`,
/// `NEEDS_CSUM`). `None` for mixed families or a packet too large.
pub(super) fn write_udp_super(
    buf: &mut Vec<u8>,
    from: SocketAddr,
    to: SocketAddr,
    datagrams: &[(SocketAddr, &[u8])],
    size: usize,
) -> Option<VnetHdr> {
    let total: usize = datagrams.iter().map(|(_, p)| p.len()).sum();
    let udp_len = u16::try_from(total.checked_add(8)?).ok()?;
    let (src, dst) = (canonical(from.ip()), canonical(to.ip()));
    let ip_len = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip =
                Ipv4Header::new(udp_len, TTL, IpNumber::UDP, s.octets(), d.octets()).ok()?;
            ip.header_checksum = ip.calc_header_checksum();
            ip.write(buf).ok()?;
            Ipv4Header::MIN_LEN
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: udp_len,
                next_header: IpNumber::UDP,
                hop_limit: TTL,
                source: s.octets(),
                destination: d.octets(),
            };
            ip.write(buf).ok()?;
            Ipv6Header::LEN
        }
        _ => return None,
    };
    let udp = UdpHeader {
        source_port: from.port(),
        destination_port: to.port(),
        length: udp_len,
        checksum: pseudo_header_sum(src, dst, 17, usize::from(udp_len))?,
    };
    buf.extend_from_slice(&udp.to_bytes());
    for (_, payload) in datagrams {
        buf.extend_from_slice(payload);
    }
    let csum_start = u16::try_from(ip_len).ok()?;
    Some(VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: gso::UDP_L4,
        hdr_len: csum_start.checked_add(8)?,
        gso_size: u16::try_from(size).ok()?,
        csum_start,
        csum_offset: UDP_CSUM_OFFSET,
    })
}
