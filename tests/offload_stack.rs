//! TUN offload through the stack on an in-memory device that carries each packet's
//! `virtio_net_hdr`: a 64 KiB TCP super-segment with a partial checksum goes in and
//! is delivered intact and acknowledged; the same bytes, echoed by the proxy, come
//! out as TSO super-segments whose `gso_size` is the application's MSS, with partial
//! checksums that complete to valid ones, and whose payload reassembles to the data.
//! A segment without an offload header whose checksum is wrong is still dropped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tun2socks::config::ProxyUrl;
use tun2socks::offload::{
    FLAG_NEEDS_CSUM, Features, VnetHdr, complete_checksum, gso, pseudo_header_sum,
};
use tun2socks::stack::{self, StackConfig, StackStats};
use tun2socks::upstream::{DialOptions, Upstream};

use common::memdev::{Framed, OffloadDevice};

const APP: [u8; 4] = [10, 0, 0, 2];
const DST: [u8; 4] = [93, 184, 216, 34];
const APP_PORT: u16 = 40000;
const DST_PORT: u16 = 443;
/// The MSS the application announces.
const MSS: u16 = 1460;
/// The super-segment's payload: 44 full segments and a short one, under 64 KiB.
const BULK: usize = 44 * 1460 + 700;

/// A SOCKS5 proxy that accepts any CONNECT and echoes.
async fn echo_proxy() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                common::accept_socks5_connect(&mut s).await.unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

struct Harness {
    to_stack: mpsc::Sender<Framed>,
    from_stack: mpsc::Receiver<Framed>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<io::Result<StackStats>>,
}

impl Harness {
    fn start(proxy: SocketAddr) -> Harness {
        let (to_stack, rx) = mpsc::channel(4096);
        let (tx, from_stack) = mpsc::channel(4096);
        let device = OffloadDevice {
            rx: Mutex::new(rx),
            tx,
            features: Features {
                vnet_hdr: true,
                csum: true,
                tso: true,
                uso: true,
            },
        };
        // Fixed 512 KiB rings: the window takes a 64 KiB segment at once.
        let config = StackConfig {
            tcp_initial_buffer: 512 * 1024,
            busy_poll: Duration::ZERO,
            ..StackConfig::default()
        };
        let url: ProxyUrl = format!("socks5://{proxy}").parse().unwrap();
        let upstream = Upstream::new(url, DialOptions::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(stack::run(device, config, upstream, async {
            let _ = stopped.await;
        }));
        Harness {
            to_stack,
            from_stack,
            stop,
            task,
        }
    }

    async fn recv(&mut self) -> Option<Framed> {
        tokio::time::timeout(Duration::from_secs(5), self.from_stack.recv())
            .await
            .ok()?
    }
}

/// A TCP segment from the application (full checksum unless `partial`).
struct Seg<'a> {
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    payload: &'a [u8],
}

fn build(s: &Seg) -> Vec<u8> {
    let b = PacketBuilder::ipv4(APP, DST, 64).tcp(APP_PORT, DST_PORT, s.seq, 65535);
    let b = if let Some(ack) = s.ack { b.ack(ack) } else { b };
    let b = if s.syn {
        b.syn()
            .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(MSS)])
            .unwrap()
    } else {
        b
    };
    let mut out = Vec::new();
    b.write(&mut out, s.payload).unwrap();
    out
}

/// Parsed fields of a packet the stack wrote.
#[derive(Debug)]
struct Out {
    seq: u32,
    ack: u32,
    syn: bool,
    payload: Vec<u8>,
}

fn parse(packet: &[u8]) -> Out {
    let sliced = SlicedPacket::from_ip(packet).unwrap();
    assert!(matches!(sliced.net, Some(NetSlice::Ipv4(_))));
    let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
        panic!("not TCP")
    };
    Out {
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        syn: tcp.syn(),
        payload: tcp.payload().to_vec(),
    }
}

/// Checks a written TCP packet's offload header and completes its checksum, which
/// must then be valid.
fn check_partial(hdr: &VnetHdr, packet: &[u8]) -> Vec<u8> {
    assert_eq!(hdr.flags, FLAG_NEEDS_CSUM, "{hdr:?}");
    assert_eq!((hdr.csum_start, hdr.csum_offset), (20, 16), "{hdr:?}");
    let mut full = packet.to_vec();
    complete_checksum(hdr, &mut full).unwrap();
    let sum = tun2socks::offload::fold(tun2socks::offload::sum_words(
        u64::from(pseudo_header_sum(DST.into(), APP.into(), 6, full.len() - 20).unwrap()),
        &full[20..],
    ));
    assert_eq!(sum, 0xffff, "the completed checksum is valid");
    full
}

#[tokio::test]
async fn a_64_kib_super_segment_goes_in_whole_and_comes_back_as_tso() {
    let proxy = echo_proxy().await;
    let mut h = Harness::start(proxy);
    let isn = 1000u32;
    let syn = build(&Seg {
        seq: isn,
        ack: None,
        syn: true,
        payload: &[],
    });
    h.to_stack.send((VnetHdr::NONE, syn)).await.unwrap();
    let (hdr, synack) = h.recv().await.expect("SYN-ACK");
    check_partial(&hdr, &synack);
    let synack = parse(&synack);
    assert!(synack.syn && synack.ack == isn + 1, "{synack:?}");
    let mut their = synack.seq.wrapping_add(1);
    let ours = isn + 1;
    let ack = build(&Seg {
        seq: ours,
        ack: Some(their),
        syn: false,
        payload: &[],
    });
    h.to_stack.send((VnetHdr::NONE, ack)).await.unwrap();

    // One super-segment, as the kernel hands it over with TSO: the checksum field
    // holds only the pseudo-header sum (a full check would drop it).
    let data: Vec<u8> = (0..BULK).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut sup = build(&Seg {
        seq: ours,
        ack: Some(their),
        syn: false,
        payload: &data,
    });
    let pseudo = pseudo_header_sum(APP.into(), DST.into(), 6, sup.len() - 20).unwrap();
    sup[36..38].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: gso::TCPV4,
        hdr_len: 40,
        gso_size: MSS,
        csum_start: 20,
        csum_offset: 16,
    };
    h.to_stack.send((hdr, sup)).await.unwrap();

    // Until the echo is all back: the ACK of the whole super-segment, and the data
    // in TSO super-segments of the application's MSS.
    let end = ours.wrapping_add(BULK as u32);
    let mut acked = false;
    let mut echoed: Vec<u8> = Vec::new();
    let mut super_segments = 0;
    let mut packets = 0;
    while echoed.len() < BULK {
        let (hdr, packet) = h.recv().await.unwrap_or_else(|| {
            panic!(
                "stalled: acked {acked}, echoed {} of {BULK} in {packets} packets",
                echoed.len()
            )
        });
        packets += 1;
        let full = check_partial(&hdr, &packet);
        let out = parse(&full);
        acked |= out.ack == end;
        if out.payload.is_empty() {
            continue;
        }
        assert_eq!(out.seq, their, "in order, no retransmission");
        if hdr.gso_kind() == gso::TCPV4 {
            super_segments += 1;
            assert_eq!(hdr.gso_size, MSS, "cut at the application's MSS");
            assert_eq!(hdr.hdr_len, 40);
            assert!(out.payload.len() > usize::from(MSS));
        } else {
            assert_eq!(hdr.gso_kind(), gso::NONE);
            assert!(out.payload.len() <= usize::from(MSS));
        }
        their = their.wrapping_add(out.payload.len() as u32);
        echoed.extend_from_slice(&out.payload);
        let ack = build(&Seg {
            seq: end,
            ack: Some(their),
            syn: false,
            payload: &[],
        });
        h.to_stack.send((VnetHdr::NONE, ack)).await.unwrap();
    }
    assert!(acked, "the super-segment was acknowledged whole");
    assert!(echoed == data, "the echo reassembles to the data");
    assert!(
        super_segments >= 1 && packets < BULK / usize::from(MSS),
        "{packets} packets, {super_segments} super-segments"
    );
    let _ = h.stop.send(());
    let stats = h.task.await.unwrap().unwrap();
    assert_eq!(stats.dropped.values().sum::<u64>(), 0, "{stats:?}");
}

#[tokio::test]
async fn a_segment_with_a_bad_full_checksum_is_still_dropped() {
    let proxy = echo_proxy().await;
    let h = Harness::start(proxy);
    let mut syn = build(&Seg {
        seq: 5,
        ack: None,
        syn: true,
        payload: &[],
    });
    syn[36] ^= 0xff;
    h.to_stack.send((VnetHdr::NONE, syn)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = h.stop.send(());
    let stats = h.task.await.unwrap().unwrap();
    assert_eq!(stats.flows_opened, 0);
    assert_eq!(stats.dropped.values().sum::<u64>(), 1, "{stats:?}");
}
