//! The stack's delayed ACK, on raw packets through the in-memory device: a small
//! segment from the application that gets no reply is acknowledged after about a
//! millisecond, not smoltcp's default 10 ms (an application whose Nagle holds its next
//! write until that ACK would stall that long per request).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tun2socks::config::ProxyUrl;
use tun2socks::stack::{self, StackConfig};
use tun2socks::upstream::{DialOptions, Upstream};

use common::memdev::MemDevice;

const APP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 40000);
const DST: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 7, 7, 7)), 80);

/// A SOCKS5 proxy that accepts a CONNECT and then only reads: nothing ever comes back
/// to the application, so its segments are acknowledged on their own.
async fn sink_proxy() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                common::accept_socks5_connect(&mut s).await.unwrap();
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

fn segment(seq: u32, ack: Option<u32>, syn: bool, data: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (APP.ip(), DST.ip()) else {
        unreachable!()
    };
    let mut b =
        PacketBuilder::ipv4(s.octets(), d.octets(), 64).tcp(APP.port(), DST.port(), seq, 65535);
    if syn {
        b = b.syn();
    }
    if let Some(ack) = ack {
        b = b.ack(ack);
    }
    let mut out = Vec::new();
    b.write(&mut out, data).unwrap();
    out
}

/// (seq, ack number if ACK is set, SYN, payload length) of a packet from the stack.
fn parse(p: &[u8]) -> (u32, Option<u32>, bool, usize) {
    let s = SlicedPacket::from_ip(p).expect("stack sent a malformed packet");
    let Some(TransportSlice::Tcp(tcp)) = s.transport else {
        panic!("not TCP")
    };
    let ack = tcp.ack().then(|| tcp.acknowledgment_number());
    (tcp.sequence_number(), ack, tcp.syn(), tcp.payload().len())
}

#[tokio::test]
async fn a_lone_small_segment_is_acknowledged_within_a_few_milliseconds() {
    let proxy = sink_proxy().await;
    let (to_stack, rx) = mpsc::channel(64);
    let (tx, mut from_stack) = mpsc::channel(64);
    let device = MemDevice {
        rx: Mutex::new(rx),
        tx,
    };
    let url: ProxyUrl = format!("socks5://{proxy}").parse().unwrap();
    let upstream = Upstream::new(url, DialOptions::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(stack::run(
        device,
        StackConfig::default(),
        upstream,
        async {
            let _ = stopped.await;
        },
    ));
    let recv = async |from: &mut mpsc::Receiver<Vec<u8>>| {
        let p = tokio::time::timeout(Duration::from_secs(3), from.recv())
            .await
            .expect("the stack sent nothing for 3 s")
            .unwrap();
        parse(&p)
    };

    to_stack.send(segment(1000, None, true, b"")).await.unwrap();
    let (their_isn, _, syn, _) = recv(&mut from_stack).await;
    assert!(syn, "SYN-ACK");
    let mut ours = 1001u32;
    let theirs = their_isn.wrapping_add(1);
    to_stack
        .send(segment(ours, Some(theirs), false, b""))
        .await
        .unwrap();

    let mut delays = Vec::new();
    for _ in 0..15 {
        let data = b"0123456789";
        let sent = Instant::now();
        to_stack
            .send(segment(ours, Some(theirs), false, data))
            .await
            .unwrap();
        ours = ours.wrapping_add(data.len() as u32);
        loop {
            let (_, ack, _, len) = recv(&mut from_stack).await;
            assert_eq!(len, 0, "the sink proxy sends nothing back");
            if ack == Some(ours) {
                break;
            }
        }
        delays.push(sent.elapsed());
    }
    delays.sort();
    let median = delays[delays.len() / 2];
    // smoltcp's default would be 10 ms or more for every one of them.
    assert!(
        median < Duration::from_millis(6),
        "median ACK delay {median:?} (all: {delays:?})"
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
