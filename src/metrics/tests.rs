#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::socks::{self, ReplyCode, v4};

const PROXY: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1080);

fn rejected(code: u8) -> UpstreamError {
    UpstreamError::Protocol {
        proxy: PROXY,
        source: socks::Error::Rejected {
            reply: ReplyCode(code),
        },
    }
}

#[test]
fn drop_reasons_are_indexed_in_declaration_order() {
    for (i, reason) in DropReason::ALL.iter().enumerate() {
        assert_eq!(reason.index(), i, "{reason:?}");
    }
    let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), DropReason::COUNT);
}

#[test]
fn socks_errors_are_counted_by_reply_code() {
    let m = Metrics::new();
    for code in 1..=8 {
        m.socks.record(SocksCommand::Connect, &rejected(code));
    }
    m.socks.record(SocksCommand::Connect, &rejected(5));
    m.socks.record(SocksCommand::Connect, &rejected(0x2a));
    m.socks.record(
        SocksCommand::Connect,
        &UpstreamError::Closed {
            proxy: PROXY,
            after_request: false,
        },
    );
    m.socks.record(
        SocksCommand::UdpAssociate,
        &UpstreamError::Dial {
            proxy: PROXY,
            source: std::io::ErrorKind::ConnectionRefused.into(),
        },
    );
    m.socks.record(
        SocksCommand::UdpAssociate,
        &UpstreamError::Protocol {
            proxy: PROXY,
            source: socks::Error::Rejected4 {
                code: v4::ReplyCode::REJECTED,
            },
        },
    );
    assert_eq!(m.socks.get(SocksCommand::Connect, "0x05"), 2);
    for code in ["0x01", "0x02", "0x03", "0x04", "0x06", "0x07", "0x08"] {
        assert_eq!(m.socks.get(SocksCommand::Connect, code), 1, "{code}");
    }
    assert_eq!(m.socks.get(SocksCommand::Connect, "other"), 2);
    assert_eq!(m.socks.get(SocksCommand::Connect, "unreachable"), 0);
    assert_eq!(m.socks.get(SocksCommand::UdpAssociate, "unreachable"), 1);
    assert_eq!(m.socks.get(SocksCommand::UdpAssociate, "0x01"), 1);
    assert_eq!(m.socks.get(SocksCommand::UdpAssociate, "0x05"), 0);
    let snap = m.snapshot();
    assert_eq!(snap.socks_error(SocksCommand::Connect, "0x05"), 2);
    assert_eq!(snap.socks_errors.len(), 11, "{:?}", snap.socks_errors);
}

#[test]
fn active_flows_and_bytes_move_while_flows_run() {
    let m = Metrics::new();
    {
        let _a = m.flows.active_guard();
        let _b = m.flows.active_guard();
        assert_eq!(m.snapshot().flows_active, 2);
        let mut counted = (0, 0);
        m.flows.count_bytes(&mut counted, (10, 0));
        m.flows.count_bytes(&mut counted, (15, 7));
        m.flows.count_bytes(&mut counted, (15, 7));
        assert_eq!(counted, (15, 7));
    }
    let snap = m.snapshot();
    assert_eq!(snap.flows_active, 0);
    assert_eq!((snap.bytes_up, snap.bytes_down), (15, 7));
}

fn busy() -> Arc<Metrics> {
    let m = Arc::new(Metrics::new());
    for _ in 0..4 {
        m.stack.drop_packet(DropReason::Malformed);
    }
    m.stack.drop_packet(DropReason::BadChecksum);
    bump(&m.flows.opened);
    bump(&m.flows.opened);
    bump(&m.flows.connected);
    add(&m.flows.bytes_up, 1234);
    add(&m.udp.bytes_down, 99);
    bump(&m.udp.queue_full);
    bump(&m.udp.oversized);
    bump(&m.dns.answered_fake);
    bump(&m.dns.seam_dropped);
    add(&m.stack.packets_out, 5);
    add(&m.egress.sent, 2);
    m.socks.record(SocksCommand::Connect, &rejected(5));
    m
}

#[test]
fn snapshot_reads_every_group() {
    let s = busy().snapshot();
    assert_eq!(s.dropped.get("malformed"), Some(&4));
    assert_eq!(s.dropped.get("bad-checksum"), Some(&1));
    assert_eq!(s.dropped.get("icmp"), None, "only reasons that occurred");
    assert_eq!((s.flows_opened, s.flows_connected), (2, 1));
    assert_eq!(s.bytes_up, 1234);
    assert_eq!(s.udp_bytes_down, 99);
    assert_eq!(s.udp_dropped, 2);
    assert_eq!(s.dns.answered_fake, 1);
    assert_eq!(s.dns_dropped, 1);
    assert_eq!(s.packets_out, 7, "smoltcp's and egress's");
}

#[test]
fn the_summary_line_round_trips_through_parse_field() {
    let s = busy().snapshot();
    let line = s.to_string();
    assert!(!line.contains('\n'), "{line}");
    let log = format!("2026-11-30T00:00:00Z  INFO tun2socks: stopped stats={line}");
    let field = |name| Snapshot::parse_field(&log, name);
    assert_eq!(field("flows_opened"), Some(2), "{log}");
    assert_eq!(field("bytes_up"), Some(1234));
    assert_eq!(field("udp_dropped"), Some(2));
    assert_eq!(field("dns_answered_fake"), Some(1));
    assert_eq!(field("drop.malformed"), Some(4));
    assert_eq!(field("drop.bad-checksum"), Some(1));
    assert_eq!(field("dropped"), Some(5));
    assert_eq!(field("socks.connect.0x05"), Some(1));
    assert_eq!(field("socks_errors"), Some(1));
    assert_eq!(field("flows_failed"), Some(0), "scalars are always there");
    assert_eq!(field("drop.icmp"), None);
    assert_eq!(field("opened"), None, "whole names only");
}

#[test]
fn prometheus_text_has_named_labelled_counters() {
    let text = prometheus::encode(&prometheus::registry(busy())).unwrap();
    for line in [
        "tun2socks_tcp_flows_opened_total 2",
        "tun2socks_tcp_flows_connected_total 1",
        "tun2socks_tcp_flows_active 0",
        "tun2socks_bytes_total{proto=\"tcp\",direction=\"up\"} 1234",
        "tun2socks_bytes_total{proto=\"udp\",direction=\"down\"} 99",
        "tun2socks_drops_total{reason=\"malformed\"} 4",
        "tun2socks_drops_total{reason=\"icmp\"} 0",
        "tun2socks_drops_total{reason=\"udp-queue-full\"} 1",
        "tun2socks_drops_total{reason=\"dns\"} 1",
        "tun2socks_socks_errors_total{command=\"connect\",code=\"0x05\"} 1",
        "tun2socks_socks_errors_total{command=\"udp-associate\",code=\"0x07\"} 0",
        "tun2socks_dns_queries_total{mode=\"fake-ip\"} 1",
        "tun2socks_packets_total{direction=\"out\"} 7",
        "# TYPE tun2socks_tcp_flows_opened counter",
        "# TYPE tun2socks_udp_associations_active gauge",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert_eq!(text.lines().last(), Some("# EOF"));
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body).
fn get(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, body.unwrap_or_default())
}

#[test]
fn the_endpoint_serves_get_metrics_only_and_stops_on_shutdown() {
    let metrics = busy();
    let listener = http::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            http::serve(listener, metrics, async {
                let _ = stopped.await;
            })
            .await
        })
    });
    let close = "Connection: close\r\nHost: x\r\n\r\n";
    let (status, body) = get(addr, &format!("GET /metrics HTTP/1.1\r\n{close}"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("tun2socks_tcp_flows_opened_total 2"),
        "{body}"
    );
    assert_eq!(get(addr, &format!("GET / HTTP/1.1\r\n{close}")).0, 404);
    assert_eq!(
        get(addr, &format!("GET /metricsx HTTP/1.1\r\n{close}")).0,
        404
    );
    assert_eq!(
        get(
            addr,
            &format!("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n{close}")
        )
        .0,
        405
    );
    // Garbage is answered with an error or a close, and the server stays up.
    let (status, _) = get(addr, "NOT HTTP AT ALL\r\n\r\n");
    assert!(status == 0 || status == 400, "{status}");
    assert_eq!(
        get(addr, &format!("GET /metrics HTTP/1.1\r\n{close}")).0,
        200
    );
    stop.send(()).unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn an_address_in_use_is_refused_with_its_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = http::bind(addr).unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

/// A tracing writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_stats_logger_logs_one_line_per_period_until_shutdown() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let metrics = busy();
    // Zero means off: returns at once even with a shutdown that never comes.
    log_every(metrics.clone(), Duration::ZERO, std::future::pending()).await;
    let started = tokio::time::Instant::now();
    let shutdown = tokio::time::sleep(Duration::from_secs(35));
    log_every(metrics, Duration::from_secs(10), shutdown).await;
    assert_eq!(started.elapsed(), Duration::from_secs(35));
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" stats ")).collect();
    assert_eq!(lines.len(), 3, "at 10, 20 and 30 s:\n{log}");
    for line in lines {
        assert!(line.contains("INFO"), "{line}");
        assert_eq!(
            Snapshot::parse_field(line, "flows_opened"),
            Some(2),
            "{line}"
        );
    }
}

#[test]
fn a_non_loopback_endpoint_is_allowed_with_a_warning() {
    let log = |addr: &str| {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            http::bind(addr.parse().unwrap()).unwrap();
        });
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    };
    let loopback = log("127.0.0.1:0");
    assert!(!loopback.contains("WARN"), "{loopback}");
    let any = log("0.0.0.0:0");
    assert!(
        any.contains("WARN") && any.contains("non-loopback"),
        "{any}"
    );
}
