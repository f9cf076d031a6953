//! The counters in the Prometheus / OpenMetrics text format, encoded by the
//! `prometheus-client` crate (a [`Collector`] that reads the atomics at each scrape).
//!
//! Names start with `tun2socks_`; counters end in `_total`. Labelled families:
//! `drops_total{reason}`, `socks_errors_total{command,code}`,
//! `dns_queries_total{mode}`, `dns_failures_total{kind}`, `bytes_total{proto,direction}`,
//! `udp_datagrams_total{direction}`, `packets_total{direction}`. Every label value
//! is always present (zeros included), so `rate()` works from the first scrape.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::Metrics;
use crate::stack::classify::DropReason;

/// The media type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry holding the collector for `metrics`, with the `tun2socks` prefix.
pub fn registry(metrics: Arc<Metrics>) -> Registry {
    let mut registry = Registry::with_prefix("tun2socks");
    registry.register_collector(Box::new(TunnelCollector(metrics)));
    registry
}

/// The text exposition of `registry` (ends with `# EOF`).
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[derive(Debug)]
struct TunnelCollector(Arc<Metrics>);

type Res = Result<(), std::fmt::Error>;

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Relaxed)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Res {
    let m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(m)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Res {
    let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(m)
}

/// A counter family with one label.
fn family1<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> Res {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        let labels = [(label, value)];
        ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter family with two labels.
fn family2<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: (&str, &str),
    values: impl IntoIterator<Item = ((&'a str, &'a str), u64)>,
) -> Res {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for ((a, b), n) in values {
        let set = [(labels.0, a), (labels.1, b)];
        ConstCounter::new(n).encode(m.encode_family(&set)?)?;
    }
    Ok(())
}

impl Collector for TunnelCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Res {
        let m = &*self.0;
        flows(&mut e, m)?;
        udp(&mut e, m)?;
        drops(&mut e, m)?;
        family2(
            &mut e,
            "socks_errors",
            "Requests the proxy failed, by command and reply code (0x01-0x08; other: \
             another code, refused login, bad reply, timeout; unreachable: no connection)",
            ("command", "code"),
            m.socks
                .each()
                .map(|(command, code, n)| ((command.name(), code), n)),
        )?;
        dns(&mut e, m)?;
        let s = &m.stack;
        family1(
            &mut e,
            "packets",
            "IP packets read from (in) and written to (out) the TUN device",
            "direction",
            [
                ("in", get(&s.packets_in)),
                (
                    "out",
                    get(&s.packets_out).saturating_add(get(&m.egress.sent)),
                ),
            ],
        )?;
        family1(
            &mut e,
            "ip_fragments",
            "UDP datagrams larger than the MTU: reassembled from the applications' IP fragments (in), sent to them as IP fragments (out)",
            "direction",
            [
                ("in", get(&s.reassembled)),
                ("out", get(&m.egress.fragmented)),
            ],
        )?;
        counter(
            &mut e,
            "stack_wakeups",
            "Passes of the stack's poll loop",
            get(&s.wakeups),
        )?;
        counter(
            &mut e,
            "stack_spin_hits",
            "Busy-poll passes of the stack that found work instead of sleeping for it",
            get(&s.spin_hits),
        )?;
        gauge(
            &mut e,
            "tcp_ring_bytes",
            "Bytes of TCP rings held by flows (counted against --memory-limit)",
            get(&s.ring_bytes),
        )?;
        gauge(
            &mut e,
            "tcp_ring_bytes_peak",
            "Most bytes of TCP rings held at once",
            get(&s.ring_bytes_peak),
        )?;
        counter(
            &mut e,
            "tcp_ring_growth_denied",
            "TCP ring growths refused because --memory-limit was spent",
            get(&s.ring_growth_denied),
        )
    }
}

fn flows(e: &mut DescriptorEncoder, m: &Metrics) -> Res {
    let f = &m.flows;
    counter(e, "tcp_flows_opened", "TCP flows opened", get(&f.opened))?;
    counter(
        e,
        "tcp_flows_connected",
        "TCP flows whose SOCKS CONNECT succeeded",
        get(&f.connected),
    )?;
    counter(
        e,
        "tcp_flows_failed",
        "TCP flows reset because the proxy was unreachable or refused",
        get(&f.failed),
    )?;
    gauge(e, "tcp_flows_active", "TCP flows open now", get(&f.active))?;
    let u = &m.udp;
    family2(
        e,
        "bytes",
        "Payload bytes carried, by protocol and direction (up: to the proxy)",
        ("proto", "direction"),
        [
            (("tcp", "up"), get(&f.bytes_up)),
            (("tcp", "down"), get(&f.bytes_down)),
            (("udp", "up"), get(&u.bytes_up)),
            (("udp", "down"), get(&u.bytes_down)),
        ],
    )
}

fn udp(e: &mut DescriptorEncoder, m: &Metrics) -> Res {
    let u = &m.udp;
    counter(
        e,
        "udp_associations_opened",
        "UDP associations set up with the proxy",
        get(&u.associations),
    )?;
    gauge(
        e,
        "udp_associations_active",
        "UDP associations open now",
        get(&u.active),
    )?;
    counter(
        e,
        "udp_refused",
        "UDP datagrams answered with port unreachable (no UDP at the proxy)",
        get(&u.refused),
    )?;
    counter(
        e,
        "udp_relay_unreachable",
        "Port unreachables from the proxy's UDP relay passed on to applications",
        get(&u.relay_unreachable),
    )?;
    family1(
        e,
        "udp_datagrams",
        "UDP datagrams relayed, by direction (up: to the proxy)",
        "direction",
        [
            ("up", get(&u.datagrams_up)),
            ("down", get(&u.datagrams_down)),
        ],
    )
}

fn drops(e: &mut DescriptorEncoder, m: &Metrics) -> Res {
    let classify = DropReason::ALL
        .iter()
        .zip(&m.stack.dropped)
        .map(|(reason, n)| (reason.name(), get(n)));
    let udp = m.udp.drops().map(|(reason, n)| (reason, get(n)));
    let others = [
        ("tcp-flow-limit", get(&m.flows.over_limit)),
        ("tcp-loop", get(&m.flows.loops_refused)),
        ("device-full", get(&m.stack.packets_out_dropped)),
        ("egress-device-full", get(&m.egress.device_full)),
        ("egress-unsendable", get(&m.egress.unsendable)),
        (
            "dns",
            get(&m.dns.seam_dropped).saturating_add(get(&m.dns.dropped)),
        ),
    ];
    family1(
        e,
        "drops",
        "Packets, segments or datagrams dropped or refused, by reason",
        "reason",
        classify.chain(udp).chain(others),
    )
}

fn dns(e: &mut DescriptorEncoder, m: &Metrics) -> Res {
    let d = &m.dns;
    family1(
        e,
        "dns_queries",
        "DNS queries by how they were handled: udp (relayed), tcp (DNS over TCP), \
         fake-ip (answered from the pool), local (answered here with no records)",
        "mode",
        [
            ("udp", get(&d.via_udp)),
            ("tcp", get(&d.via_tcp)),
            ("fake-ip", get(&d.answered_fake)),
            ("local", get(&d.answered_empty)),
        ],
    )?;
    counter(
        e,
        "dns_tcp_answers",
        "DNS answers received over TCP",
        get(&d.tcp_answers),
    )?;
    family1(
        e,
        "dns_failures",
        "DNS failures by kind",
        "kind",
        [
            ("malformed", get(&d.malformed)),
            ("servfail", get(&d.servfail)),
            ("tcp-error", get(&d.tcp_errors)),
            ("tcp-timeout", get(&d.tcp.timeouts)),
            ("fake-unknown", get(&d.fake_unknown)),
        ],
    )?;
    counter(
        e,
        "dns_tcp_connections",
        "DNS-over-TCP connections opened",
        get(&d.tcp.connections),
    )?;
    counter(
        e,
        "dns_truncated",
        "DNS answers truncated to the client's UDP limit",
        get(&d.truncated),
    )?;
    counter(
        e,
        "dns_fake_recycled",
        "Fake-IP addresses recycled for a new name",
        get(&d.fake_recycled),
    )?;
    gauge(
        e,
        "dns_fake_entries",
        "Names held in the fake-IP map now",
        get(&d.fake_entries),
    )
}
