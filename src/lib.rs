//! tun2socks: a system-wide SOCKS proxifier.
//!
//! ```text
//!  application (curl, a browser, any process of the host or namespace)
//!       | kernel: default route -> tun0
//!       v
//!  TUN device --- raw IP packets (v4 and v6) ---------------------------------+
//!       |                                                                     |
//!  stack: classify each packet (etherparse)                                   |
//!       |-- TCP --> smoltcp Interface, any-IP; a SYN to a new destination     |
//!       |           gets a listening socket once the upstream CONNECT is up   |
//!       |              | accepted flow                                        |
//!       |              v                                                      |
//!       |           flow task: SOCKS CONNECT, then copy both ways with        |
//!       |           backpressure and half-close                               |
//!       |-- UDP --> NAT table keyed by the app's source endpoint; each entry  |
//!       |           owns a SOCKS5 UDP ASSOCIATE; replies written back <-------+
//!       |           (egress: UDP replies, DNS answers, ICMP errors)           |
//!       |-- DNS --> port 53, any address: through UDP, over TCP, or fake-IP  |
//!       |           answered locally (flows to fake addresses go by name)    |
//!       v
//!  upstream socket to the proxy (never through the TUN)
//!       |
//!  SOCKS server (ours: `tun2socks server`; or dante, ssh -D, any RFC 1928 server)
//!       |
//!  destination
//! ```
//!
//! Modules follow the data path: [`socks`] is the sans-IO protocol core shared by
//! the client side ([`upstream`]) and the reference server ([`server`]). Beside the
//! path, [`exec`] runs one program in a private namespace whose only route is the
//! tunnel, and [`testbed`] builds the network-namespace topology that the integration tests
//! and `tun2socks selftest` run in.

pub mod busy;
pub mod config;
pub mod device;
pub mod dns;
pub mod egress;
pub mod exec;
pub mod flow;
/// Fuzz harnesses: only with the `fuzzing` feature (the fuzz crate, the corpus test).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod offload;
pub mod selftest;
pub mod server;
pub mod setup;
pub mod signals;
pub mod socks;
pub mod stack;
pub mod testbed;
pub mod upstream;
