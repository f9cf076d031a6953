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
//!       v
//!  upstream socket to the proxy (never through the TUN)
//!       |
//!  SOCKS server (ours: `tun2socks server`; or dante, ssh -D, any RFC 1928 server)
//!       |
//!  destination
//! ```
//!
//! Modules follow the data path: [`socks`] is the sans-IO protocol core shared by
//! the client side ([`upstream`]) and the reference server ([`server`]).

pub mod device;
pub mod socks;
