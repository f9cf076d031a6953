//! Busy polling of a UDP association: after datagrams, a busy association keeps
//! receiving on its sockets for a moment instead of going back to sleep.
//!
//! Why: on a virtual machine, waking a thread whose CPU has halted costs tens of
//! microseconds, and a datagram exchange through the server wakes it twice per round
//! trip (the client's datagram, the destination's reply). Measured through the
//! tunnel (UDP echo, hand-made TUN at MTU 1500, 2 vCPUs): p50 52-61 µs with the
//! server sleeping between datagrams, 18 µs with it polling.
//!
//! The policy is the tunnel's ([`crate::busy`]): spin only while datagrams come at
//! least as often as the window, never after bulk. On top of it, for a server that
//! serves many clients: one association spins at a time (the others sleep as before),
//! a spin lasts at most [`MAX_SPIN`], it gives way to every other thread ready on its
//! CPU on each pass (the client or destination it waits for may be one), and there is
//! no spinning at all on a single CPU, where it could only delay the peer it waits
//! for. A spin runs on a runtime worker without yielding to the runtime: the other
//! workers take that worker's tasks meanwhile.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::{Duration, Instant};

use super::batch::{self, Recv};
use super::{Association, Family};
use crate::socks::Address;

/// The longest one spin runs before the association looks at its control connection
/// and idle timer again.
pub(super) const MAX_SPIN: Duration = Duration::from_millis(2);

/// Whether the server's UDP associations may spin, and which one does.
#[derive(Debug)]
pub struct SpinSlot {
    allowed: bool,
    taken: AtomicBool,
}

impl SpinSlot {
    /// Spinning allowed with a nonzero `window`, on a machine with more than one CPU
    /// and a runtime with more than one worker (call from inside the server's
    /// runtime; outside one, spinning is off).
    pub fn new(window: Duration) -> SpinSlot {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = tokio::runtime::Handle::try_current()
            .map_or(1, |runtime| runtime.metrics().num_workers());
        SpinSlot::with_cpus(window, cpus.min(workers))
    }

    fn with_cpus(window: Duration, cpus: usize) -> SpinSlot {
        SpinSlot {
            allowed: !window.is_zero() && cpus > 1,
            taken: AtomicBool::new(false),
        }
    }

    /// The slot, if spinning is allowed and no other association spins now.
    fn take(&self) -> Option<Taken<'_>> {
        if !self.allowed {
            return None;
        }
        self.taken
            .compare_exchange(false, true, Acquire, Relaxed)
            .ok()
            .map(|_| Taken(&self.taken))
    }
}

/// The slot while held; given back when dropped.
struct Taken<'a>(&'a AtomicBool);

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.0.store(false, Release);
    }
}

impl Association<'_> {
    /// Records a pass that relayed `moved` bytes, and spins if the policy says so.
    /// Returns the datagrams to names not resolved yet that came during the spin
    /// (the spin ends at the first: resolving is the caller's, after an await).
    ///
    /// A flood keeps extending spins; between two, the association goes back
    /// through its `select!`, whose readiness polls spend the runtime's cooperative
    /// budget, so the worker's other tasks still get their turn (and the other
    /// workers take them meanwhile). An explicit `yield_now` after each spin was
    /// tried and dropped: a yielded task can be stolen by the other worker, on the
    /// other CPU, and the tunnel's UDP echo p50 over two runs of five rounds was
    /// 44/44/43/41/43 and 61/48/45/20/40 µs with it, 18/18/40/21/41 and
    /// 18/41/21/42/44 without.
    pub(super) fn after_work(&mut self, moved: u64) -> Vec<(Address, Vec<u8>)> {
        let now = Instant::now();
        self.busy.work(now);
        self.busy
            .moved(now, usize::try_from(moved).unwrap_or(usize::MAX));
        let Some(until) = self.busy.spin_until(now) else {
            return Vec::new();
        };
        let Some(_slot) = self.shared.spin.take() else {
            return Vec::new();
        };
        self.spin(until)
    }

    /// Receives and relays on every socket of the association, without waiting for
    /// readiness, until `until` passes without a datagram (each one extends it) or
    /// [`MAX_SPIN`] is reached.
    fn spin(&mut self, mut until: Instant) -> Vec<(Address, Vec<u8>)> {
        let started = Instant::now();
        loop {
            let before = self.counters.bytes();
            let (mut worked, named) =
                batch::with_batch(|b| self.relay_from_client(b, Recv::Direct));
            if !named.is_empty() {
                return named;
            }
            for family in [Family::V4, Family::V6] {
                worked |= batch::with_batch(|b| self.relay_to_client(family, b, Recv::Direct));
            }
            let now = Instant::now();
            if worked {
                self.counters.spin_hits = self.counters.spin_hits.saturating_add(1);
                let moved = self.counters.bytes().saturating_sub(before);
                match self
                    .busy
                    .extend(now, usize::try_from(moved).unwrap_or(usize::MAX))
                {
                    Some(later) => until = later,
                    None => return Vec::new(),
                }
            }
            if now >= until || now.saturating_duration_since(started) >= MAX_SPIN {
                return Vec::new();
            }
            // The client or destination this spin waits for may be ready on this CPU.
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdp};

    use tokio::net::{TcpListener, TcpStream, UdpSocket};

    use crate::busy::BusyPoll;
    use crate::server::{ServerConfig, Shared};
    use crate::socks::udp;

    /// A UDP echo on loopback, answering until `stop` arrives as a payload.
    fn echo() -> SocketAddr {
        let socket = StdUdp::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        });
        addr
    }

    /// Runs an association with `window` while a client thread sends `count`
    /// datagrams through it one round trip at a time, then, after a pause long
    /// enough for any spin to end, one more. Returns the association's counters and
    /// whether every echo came back whole and in turn.
    async fn ping_pong(window: Duration, count: usize) -> (super::super::Counters, bool) {
        let config = ServerConfig {
            udp_busy_poll: window,
            ..ServerConfig::default()
        };
        let shared = Shared::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client_control = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut control, _) = listener.accept().await.unwrap();
        let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let target = echo();
        let client = StdUdp::bind("127.0.0.1:0").unwrap();
        let client_port = client.local_addr().unwrap().port();
        let mut assoc = Association {
            shared: &shared,
            relay,
            out_v4: None,
            out_v6: None,
            client_ip: IpAddr::from([127, 0, 0, 1]),
            client_port: Some(client_port),
            names: HashMap::new(),
            counters: super::super::Counters::default(),
            busy: BusyPoll::new(window),
        };
        let driver = tokio::task::spawn_blocking(move || {
            client
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut all_ok = true;
            let mut buf = [0u8; 2048];
            for i in 0..=count {
                if i == count {
                    // Past any spin: the association must be woken as before.
                    std::thread::sleep(MAX_SPIN * 10);
                }
                let mut datagram = Vec::new();
                let payload = format!("datagram {i}");
                udp::encode_datagram(&Address::from(target), payload.as_bytes(), &mut datagram);
                client.send_to(&datagram, relay_addr).unwrap();
                match client.recv_from(&mut buf) {
                    Ok((n, _)) => all_ok &= buf[..n] == datagram[..],
                    Err(_) => all_ok = false,
                }
            }
            drop(client_control);
            all_ok
        });
        let ended = assoc.run(&mut control).await;
        assert_eq!(ended, "control connection closed");
        let all_ok = driver.await.unwrap();
        (assoc.counters, all_ok)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spinning_association_relays_every_datagram_and_still_wakes_after() {
        let count = 2000;
        let (counters, all_ok) = ping_pong(Duration::from_micros(200), count).await;
        assert!(all_ok, "an echo was lost or changed");
        assert_eq!(counters.to_remote, count as u64 + 1);
        assert_eq!(counters.to_client, count as u64 + 1);
        assert_eq!(counters.dropped, 0);
        if std::thread::available_parallelism().map_or(1, usize::from) > 1 {
            assert!(
                counters.spin_hits > 0,
                "a round trip at a time through loopback should be caught by the spin"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_busy_polling_off_it_never_spins() {
        let (counters, all_ok) = ping_pong(Duration::ZERO, 500).await;
        assert!(all_ok);
        assert_eq!(counters.to_client, 501);
        assert_eq!(counters.spin_hits, 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_single_worker_runtime_never_spins() {
        // The spin would hold the only worker, and with it the peers it waits for.
        assert!(SpinSlot::new(Duration::from_micros(200)).take().is_none());
    }

    #[test]
    fn one_spinner_at_a_time_and_none_when_off_or_on_one_cpu() {
        let window = Duration::from_micros(200);
        let slot = SpinSlot::with_cpus(window, 2);
        let first = slot.take();
        assert!(first.is_some());
        assert!(slot.take().is_none(), "a second association must not spin");
        drop(first);
        assert!(
            slot.take().is_some(),
            "the slot comes back when the spin ends"
        );

        assert!(SpinSlot::with_cpus(Duration::ZERO, 8).take().is_none());
        assert!(SpinSlot::with_cpus(window, 1).take().is_none());
    }
}
