//! The buffer policy with time passed in.

use super::*;

const KIB: usize = 1024;

fn buffers(limit: usize) -> Arc<Buffers> {
    Arc::new(Buffers {
        config: BufferConfig {
            initial: 4 * KIB,
            max_rx: 64 * KIB,
            max_tx: 64 * KIB,
            idle: Duration::from_secs(5),
        },
        budget: Budget::new(limit),
    })
}

fn rings(rx_len: usize, rx_cap: usize, tx_len: usize, tx_cap: usize) -> Rings {
    Rings {
        rx_len,
        rx_cap,
        rx_needed: rx_len,
        rx_max_window: 1 << 30,
        tx_len,
        tx_cap,
        tx_peer_window: 1 << 20,
        rx_read: 0,
    }
}

#[test]
fn nothing_is_charged_before_the_flow_connects_and_all_is_given_back_on_drop() {
    let b = buffers(1 << 20);
    let mut sizer = Sizer::new(b.clone());
    assert_eq!(b.budget.used(), 0);
    let t0 = Instant::now();
    // A receive ring at CONNECT; the send ring when the proxy first sends.
    assert_eq!(sizer.initial(t0), (4 * KIB, 0));
    assert_eq!(b.budget.used(), 4 * KIB);
    assert_eq!(sizer.initial_send(t0), 4 * KIB);
    assert_eq!(b.budget.used(), 8 * KIB);
    drop(sizer);
    assert_eq!(b.budget.used(), 0);
}

#[test]
fn a_filled_receive_ring_doubles_up_to_the_maximum_while_its_reader_keeps_up() {
    let b = buffers(1 << 20);
    let mut s = Sizer::new(b.clone());
    let t = Instant::now();
    let (mut rx, tx) = s.initial(t);
    let mut sizes = Vec::new();
    for _ in 0..10 {
        let plan = s.plan(&rings(rx, rx, 0, tx), t);
        if let Some(new) = plan.rx {
            rx = new;
            sizes.push(rx);
        }
        // The reader drains the ring before the next batch.
        assert_eq!(s.plan(&rings(0, rx, 0, tx), t), Plan::default());
    }
    assert_eq!(sizes, [8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB]);
    assert_eq!(b.budget.used(), 64 * KIB);
}

#[test]
fn a_ring_whose_reader_keeps_up_only_partly_still_grows() {
    // Several busy flows on a loaded machine: the stack never sees the ring empty,
    // but down to a quarter between batches; the reader keeps up.
    let b = buffers(1 << 20);
    let mut s = Sizer::new(b);
    let t = Instant::now();
    let (mut rx, tx) = s.initial(t);
    let mut grown = 0;
    for _ in 0..10 {
        if let Some(new) = s.plan(&rings(rx, rx, 0, tx), t).rx {
            rx = new;
            grown += 1;
        }
        assert_eq!(s.plan(&rings(rx / 4, rx, 0, tx), t).rx, None);
    }
    assert_eq!(grown, 4, "4 KiB doubled up to 64 KiB");
    // Drained only to a half: a reader that falls behind; no growth.
    let mut slow = Sizer::new(buffers(1 << 20));
    let (rx, tx) = slow.initial(t);
    assert!(slow.plan(&rings(rx, rx, 0, tx), t).rx.is_some());
    assert_eq!(slow.plan(&rings(rx, 2 * rx, 0, tx), t).rx, None);
    assert_eq!(slow.plan(&rings(2 * rx, 2 * rx, 0, tx), t).rx, None);
}

#[test]
fn a_ring_that_stays_full_because_its_reader_is_stuck_grows_once_only() {
    let b = buffers(1 << 20);
    let mut s = Sizer::new(b);
    let t = Instant::now();
    let (rx, tx) = s.initial(t);
    assert_eq!(s.plan(&rings(rx, rx, 0, tx), t).rx, Some(2 * rx));
    // Never drained since: no further growth however full it is.
    assert_eq!(s.plan(&rings(2 * rx, 2 * rx, 0, tx), t).rx, None);
}

#[test]
fn the_receive_ring_never_grows_beyond_the_window_the_connection_can_offer() {
    let b = buffers(1 << 20);
    let mut s = Sizer::new(b);
    let t = Instant::now();
    let mut r = rings(32 * KIB, 32 * KIB, 0, 4 * KIB);
    r.rx_max_window = 40 * KIB; // no window scaling: 64 KiB - 1, here smaller
    assert_eq!(s.plan(&r, t).rx, Some(40 * KIB));
    r.rx_cap = 40 * KIB;
    r.rx_len = 0;
    s.plan(&r, t);
    r.rx_len = 40 * KIB;
    assert_eq!(s.plan(&r, t).rx, None);
}

#[test]
fn a_full_send_ring_grows_only_when_the_application_could_take_more() {
    let b = buffers(1 << 20);
    let mut s = Sizer::new(b);
    let t = Instant::now();
    let mut r = rings(0, 4 * KIB, 4 * KIB, 4 * KIB);
    r.tx_peer_window = 2 * KIB; // a slow application
    assert_eq!(s.plan(&r, t).tx, None);
    r.tx_peer_window = 64 * KIB;
    assert_eq!(s.plan(&r, t).tx, Some(8 * KIB));
    r.tx_len = 3 * KIB; // not full
    r.tx_cap = 8 * KIB;
    assert_eq!(s.plan(&r, t).tx, None);
}

#[test]
fn a_spent_budget_stops_growth_but_never_the_first_rings() {
    let b = buffers(8 * KIB);
    let mut a = Sizer::new(b.clone());
    let mut c = Sizer::new(b.clone());
    let mut d = Sizer::new(b.clone());
    let t = Instant::now();
    a.initial(t);
    c.initial(t);
    d.initial(t); // 12 KiB charged under an 8 KiB limit: still given
    assert_eq!(b.budget.used(), 12 * KIB);
    assert_eq!(a.plan(&rings(4 * KIB, 4 * KIB, 0, 0), t).rx, None);
    assert_eq!(b.budget.denied(), 1);
    drop((c, d));
    assert_eq!(a.plan(&rings(4 * KIB, 4 * KIB, 0, 0), t).rx, Some(8 * KIB));
    assert_eq!(b.budget.used(), 8 * KIB);
}

#[test]
fn rings_shrink_back_after_the_idle_time_and_not_before() {
    let b = buffers(1 << 20);
    let mut s = Sizer::new(b.clone());
    let t0 = Instant::now();
    s.initial(t0);
    s.charge(60 * KIB + 32 * KIB); // as if grown to 64 + 32 KiB
    let grown = rings(0, 64 * KIB, 0, 32 * KIB);
    let at = s.shrink_at(&grown).unwrap();
    assert_eq!(at, t0 + Duration::from_secs(5));
    assert_eq!(s.plan(&grown, t0 + Duration::from_secs(4)), Plan::default());
    let plan = s.plan(&grown, at);
    // The receive ring back to 4 KiB, the empty send ring freed.
    let expected = Plan {
        rx: Some(4 * KIB),
        tx: Some(0),
    };
    assert_eq!(plan, expected);
    s.released(64 * KIB, 4 * KIB);
    s.released(32 * KIB, 0);
    assert_eq!(b.budget.used(), 4 * KIB);
    assert_eq!(s.shrink_at(&rings(0, 4 * KIB, 0, 0)), None);
}

#[test]
fn fixed_rings_are_made_whole_at_connect_and_never_resized() {
    let b = Arc::new(Buffers {
        config: BufferConfig {
            initial: 64 * KIB,
            max_rx: 64 * KIB,
            max_tx: 64 * KIB,
            idle: Duration::from_secs(5),
        },
        budget: Budget::new(1 << 20),
    });
    let mut s = Sizer::new(b.clone());
    let t0 = Instant::now();
    assert_eq!(s.initial(t0), (64 * KIB, 64 * KIB));
    let full = rings(64 * KIB, 64 * KIB, 64 * KIB, 64 * KIB);
    assert_eq!(s.plan(&full, t0), Plan::default());
    let idle = rings(0, 64 * KIB, 0, 64 * KIB);
    assert_eq!(s.plan(&idle, t0 + Duration::from_secs(60)), Plan::default());
    assert_eq!(s.shrink_at(&idle), None);
    assert_eq!(b.budget.used(), 128 * KIB);
}

#[test]
fn an_idle_receive_ring_keeps_the_window_it_advertised() {
    let b = buffers(1 << 20);
    let mut s = Sizer::new(b);
    let t0 = Instant::now();
    s.initial(t0);
    let mut r = rings(0, 64 * KIB, 0, 4 * KIB);
    r.rx_needed = 20 * KIB;
    assert_eq!(s.plan(&r, t0 + Duration::from_secs(6)).rx, Some(20 * KIB));
}

#[test]
fn budget_charges_are_exact_under_contention() {
    let b = Arc::new(Budget::new(1000));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let b = b.clone();
            std::thread::spawn(move || (0..1000).filter(|_| b.try_charge(1)).count())
        })
        .collect();
    let taken: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(taken, 1000);
    assert_eq!(b.used(), 1000);
    b.release(5000);
    assert_eq!(b.used(), 0);
}

#[test]
fn a_ring_its_reader_turns_over_within_the_period_grows_even_if_never_half_full() {
    let b = buffers(1 << 20);
    let mut s = Sizer::new(b.clone());
    let t0 = Instant::now();
    let (mut rx, tx) = s.initial(t0);
    let mut read = 0u64;
    let mut t = t0;
    let mut sizes = Vec::new();
    // Small segments, the ring a third full at every poll, drained between: a
    // whole ring goes through it every millisecond.
    for _ in 0..200 {
        t += Duration::from_micros(200);
        read += (rx / 5) as u64;
        let mut r = rings(rx / 3, rx, 0, tx);
        r.rx_needed = rx / 3;
        r.rx_read = read;
        if let Some(new) = s.plan(&r, t).rx {
            rx = new;
            sizes.push(rx);
        }
    }
    assert_eq!(sizes, [8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB]);

    // The same ring, a third full at each poll, but a slow reader: a ring's worth
    // takes 10 ms. No growth.
    let mut slow = Sizer::new(buffers(1 << 20));
    let (rx, tx) = slow.initial(t0);
    let mut read = 0u64;
    let mut t = t0;
    for _ in 0..200 {
        t += Duration::from_millis(1);
        read += (rx / 10) as u64;
        let mut r = rings(rx / 3, rx, 0, tx);
        r.rx_needed = rx / 3;
        r.rx_read = read;
        assert_eq!(slow.plan(&r, t).rx, None);
    }
}
