//! The vendored smoltcp patch (vendor/smoltcp/PATCHES.md): a live socket's buffers
//! replaced with their contents kept (unread, out-of-order, unacknowledged and wrapped
//! data), a replacement below the advertised window refused, and the window scale
//! chosen for a buffer that grows later; a TSO super-segment acknowledged without the
//! delayed-ACK wait. Driven with hand-built packets through a
//! queue device, synchronously: no TUN, no runtime.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;

use etherparse::{PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::HardwareAddress;

/// Packets in, packets out.
#[derive(Default)]
struct Queue {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl phy::Device for Queue {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = 1500;
        caps
    }
}

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut p = vec![0u8; len];
        let r = f(&mut p);
        self.0.push(p);
        r
    }
}

const APP: [u8; 4] = [10, 0, 0, 2];
const DST: [u8; 4] = [10, 0, 0, 1];
const APP_PORT: u16 = 40000;
const DST_PORT: u16 = 80;
const ISN: u32 = 1000;

/// One connection accepted by a smoltcp socket, and the application's view of it.
struct Conn {
    iface: Interface,
    dev: Queue,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    now: Instant,
    /// The socket's next sequence number (what the application acknowledges).
    their: u32,
}

#[derive(Debug)]
struct Seg {
    seq: u32,
    window: u16,
    wscale: Option<u8>,
    payload: Vec<u8>,
}

fn parse(p: &[u8]) -> Seg {
    let s = SlicedPacket::from_ip(p).unwrap();
    let Some(TransportSlice::Tcp(t)) = s.transport else {
        panic!("not TCP")
    };
    let wscale = t.options_iterator().find_map(|o| match o.unwrap() {
        TcpOptionElement::WindowScale(w) => Some(w),
        _ => None,
    });
    Seg {
        seq: t.sequence_number(),
        window: t.window_size(),
        wscale,
        payload: t.payload().to_vec(),
    }
}

impl Conn {
    /// A socket with `rx`/`tx` byte rings, its window scale chosen for `shift_for`,
    /// accepting a SYN that offers scale 7; returns the connection and the SYN-ACK.
    fn accept(rx: usize, tx: usize, shift_for: usize) -> (Conn, Seg) {
        let mut dev = Queue::default();
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ip),
            &mut dev,
            Instant::from_millis(0),
        );
        iface.set_any_ip(true);
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; rx]),
            tcp::SocketBuffer::new(vec![0u8; tx]),
        );
        socket.set_window_shift_capacity(shift_for);
        socket.set_ack_delay(None);
        socket.set_nagle_enabled(false);
        socket.listen(DST_PORT).unwrap();
        let mut sockets = SocketSet::new(Vec::new());
        let handle = sockets.add(socket);
        let mut c = Conn {
            iface,
            dev,
            sockets,
            handle,
            now: Instant::from_millis(1),
            their: 0,
        };
        let mut syn = Vec::new();
        PacketBuilder::ipv4(APP, DST, 64)
            .tcp(APP_PORT, DST_PORT, ISN, 65535)
            .syn()
            .options(&[
                TcpOptionElement::MaximumSegmentSize(1460),
                TcpOptionElement::WindowScale(7),
            ])
            .unwrap()
            .write(&mut syn, &[])
            .unwrap();
        let out = c.exchange(syn);
        let synack = parse(out.last().expect("no SYN-ACK"));
        c.their = synack.seq.wrapping_add(1);
        c.exchange(c.segment(ISN + 1, b""));
        assert_eq!(c.socket().state(), tcp::State::Established);
        (c, synack)
    }

    fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.handle)
    }

    /// A segment from the application at `seq`, acknowledging everything so far,
    /// offering a large window.
    fn segment(&self, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        PacketBuilder::ipv4(APP, DST, 64)
            .tcp(APP_PORT, DST_PORT, seq, 65535)
            .ack(self.their)
            .write(&mut p, payload)
            .unwrap();
        p
    }

    /// Delivers `packet`, polls, returns what the socket sent.
    fn exchange(&mut self, packet: Vec<u8>) -> Vec<Vec<u8>> {
        self.dev.rx.push_back(packet);
        self.poll()
    }

    fn poll(&mut self) -> Vec<Vec<u8>> {
        self.now += smoltcp::time::Duration::from_millis(1);
        self.iface.poll(self.now, &mut self.dev, &mut self.sockets);
        std::mem::take(&mut self.dev.tx)
    }

    fn read_all(&mut self) -> Vec<u8> {
        let mut out = vec![0u8; 1 << 16];
        let n = self.socket().recv_slice(&mut out).unwrap();
        out.truncate(n);
        out
    }
}

fn ring(n: usize) -> tcp::SocketBuffer<'static> {
    tcp::SocketBuffer::new(vec![0u8; n])
}

#[test]
fn the_window_scale_is_chosen_for_the_capacity_given_not_the_first_ring() {
    // 1 KiB ring, scale for 1 MiB: 2^20 needs 21 bits, shift 5.
    let (_, synack) = Conn::accept(1024, 1024, 1 << 20);
    assert_eq!(synack.wscale, Some(5));
    assert_eq!(synack.window, 1024, "the SYN-ACK window is never scaled");
    // Without the call: shift 0 for a 1 KiB ring.
    let (_, synack) = Conn::accept(1024, 1024, 0);
    assert_eq!(synack.wscale, Some(0));
}

#[test]
fn a_paused_syn_needs_no_ring_and_gets_one_before_its_syn_ack() {
    let (mut c, _) = Conn::accept(0, 0, 1 << 20);
    // (accept() completed the handshake with empty rings: window 0.)
    assert_eq!(c.socket().recv_capacity(), 0);
    assert_eq!(c.socket().recv_capacity_needed(), 0);
    c.socket().replace_recv_buffer(ring(4096)).unwrap();
    c.socket().replace_send_buffer(ring(4096)).unwrap();
    let out = c.poll();
    let update = parse(out.last().expect("no window update after the rings grew"));
    assert_eq!(usize::from(update.window) << 5, 4096);
    let data = c.segment(ISN + 1, b"hello");
    c.exchange(data);
    assert_eq!(c.read_all(), b"hello");
}

#[test]
fn replacing_the_receive_ring_keeps_unread_and_out_of_order_data() {
    let (mut c, _) = Conn::accept(1024, 1024, 1 << 20);
    let a = vec![b'a'; 300];
    let b = vec![b'b'; 300];
    let cc = vec![b'c'; 300];
    // Wrap the ring first: 900 bytes in and read, so its read position is at 900.
    let filler = vec![b'x'; 900];
    c.exchange(c.segment(ISN + 1, &filler));
    assert_eq!(c.read_all(), filler);
    c.poll(); // the window update
    let base = ISN + 1 + 900;
    // In order, then a hole, then out of order.
    c.exchange(c.segment(base, &a));
    c.exchange(c.segment(base + 600, &cc));
    assert_eq!(c.socket().recv_queue(), 300);
    assert!(
        c.socket().replace_recv_buffer(ring(512)).is_err(),
        "a ring too small for the held and promised data was accepted"
    );
    let needed = c.socket().recv_capacity_needed();
    assert!(needed >= 900, "{needed}");
    let old = c.socket().replace_recv_buffer(ring(8192)).unwrap();
    assert_eq!(old.capacity(), 1024);
    assert_eq!(c.socket().recv_capacity(), 8192);
    // The hole is filled: all three arrive in order.
    c.exchange(c.segment(base + 300, &b));
    assert_eq!(c.read_all(), [a, b, cc].concat());
}

#[test]
fn a_receive_ring_below_the_advertised_window_is_refused() {
    let (mut c, synack) = Conn::accept(4096, 1024, 1 << 20);
    assert_eq!(synack.window, 4096);
    // The application was offered 4 KiB: a 2 KiB ring would renege on it.
    assert_eq!(c.socket().recv_capacity_needed(), 4096);
    let refused = c.socket().replace_recv_buffer(ring(2048)).unwrap_err();
    assert_eq!(refused.capacity(), 2048);
    assert_eq!(c.socket().recv_capacity(), 4096);
    // Data arrives and is read: the promise still stands (its right edge moved on).
    c.exchange(c.segment(ISN + 1, &[7u8; 1000]));
    c.read_all();
    c.poll();
    // 3096 bytes of window, as the scaled field carries it (shift 5: 3072).
    assert_eq!(c.socket().recv_capacity_needed(), 3072);
    assert!(c.socket().replace_recv_buffer(ring(4096)).is_ok());
}

#[test]
fn replacing_the_send_ring_keeps_queued_and_wrapped_data() {
    let (mut c, _) = Conn::accept(1024, 512, 1 << 20);
    // Send 400 and have it acknowledged: the ring's read position moves to 400.
    c.socket().send_slice(&[b'x'; 400]).unwrap();
    let sent: usize = c.poll().iter().map(|p| parse(p).payload.len()).sum();
    assert_eq!(sent, 400);
    c.their = c.their.wrapping_add(400);
    c.exchange(c.segment(ISN + 1, b""));
    assert_eq!(c.socket().send_queue(), 0);
    // 300 more, wrapping around the end of the 512-byte ring; queued, not sent yet.
    let data: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
    assert_eq!(c.socket().send_slice(&data).unwrap(), 300);
    assert!(c.socket().replace_send_buffer(ring(200)).is_err());
    let old = c.socket().replace_send_buffer(ring(4096)).unwrap();
    assert_eq!(old.capacity(), 512);
    assert_eq!(c.socket().send_capacity(), 4096);
    let out: Vec<u8> = c.poll().iter().flat_map(|p| parse(p).payload).collect();
    assert_eq!(out, data);
    // Sent but unacknowledged data survives a replacement too: shrink to exactly it.
    c.socket().replace_send_buffer(ring(300)).unwrap();
    assert_eq!(c.socket().send_queue(), 300);
    assert!(!c.socket().can_send());
}

#[test]
fn a_super_segment_is_acknowledged_at_once_a_small_one_waits() {
    let (mut c, _) = Conn::accept(64 * 1024, 1024, 0);
    c.socket()
        .set_ack_delay(Some(smoltcp::time::Duration::from_millis(10)));
    // One segment of less than the MSS (1460): its ACK waits for the delay timer
    // (or for a second segment).
    let small = vec![1u8; 1000];
    let out = c.exchange(c.segment(ISN + 1, &small));
    assert!(
        out.is_empty(),
        "a lone small segment is not acknowledged at once"
    );
    assert_eq!(c.read_all(), small);
    // Let that delayed ACK go out (the 10 ms timer).
    let mut acked = false;
    for _ in 0..15 {
        acked |= !c.poll().is_empty();
    }
    assert!(acked, "the delayed ACK goes out after the delay");
    // One TSO super-segment (three segments' worth) alone: acknowledged in the same
    // poll, as two segments would be.
    let big: Vec<u8> = (0..3 * 1460).map(|i| (i % 251) as u8).collect();
    let out = c.exchange(c.segment(ISN + 1 + 1000, &big));
    assert_eq!(out.len(), 1, "one ACK for the super-segment, at once");
    let ack = parse(&out[0]);
    assert!(ack.payload.is_empty());
    assert_eq!(c.read_all(), big);
}
