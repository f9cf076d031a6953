//! OS-specific parts of tun2socks: opening the TUN device and configuring the
//! interface (MTU, transmit queue length, up state, addresses).
//!
//! This crate is the only place with `#[cfg(target_os)]` and `unsafe`. One module per
//! OS implements the same API and is chosen here by `#[cfg] #[path]`; callers never
//! write a `#[cfg]`. Linux is implemented; other systems compile and answer every call
//! with an `Unsupported` error.
//!
//! Every change to the system returns a [`LinkGuard`] that undoes it on drop. A
//! caller that knows the change will vanish anyway (the device is ours and goes away
//! with its descriptor) calls [`LinkGuard::forget`].
//!
//! [`Routing`] adds routes and policy rules ([`RoutingEntry`]), each returning a
//! [`RouteGuard`] that deletes it on drop, deletes a described entry (what a crashed
//! run left), and asks the kernel which interface a packet would leave by.
//! [`Sandbox`] runs a program in a private network namespace whose only route is a
//! TUN device served by the caller (`tun2socks exec`).
//!
//! [`Pipe`] relays bytes between sockets with `splice(2)`, without copying them
//! through userspace (the SOCKS server's bulk path).
//!
//! It must not: run async code (it only registers the TUN descriptor with tokio),
//! spawn threads, read configuration, or log packets.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use tun2socks_platform::{Link, open_tun};
//!
//! let tun = open_tun(Some("tun0"))?;
//! let link = Link::new(tun.ifindex())?;
//! let _mtu = link.set_mtu(1500)?;
//! let _addr = link.add_address("198.18.0.1/16".parse()?)?;
//! let _up = link.set_up()?;
//! // ... use `tun` ...
//! // dropping the guards restores MTU, removes the address, sets the link down.
//! # Ok(()) }
//! ```

mod error;
mod offload;
mod routing;

#[cfg(target_os = "linux")]
#[path = "linux/mod.rs"]
mod imp;

#[cfg(not(target_os = "linux"))]
#[path = "unsupported/mod.rs"]
mod imp;

pub use error::{LinkError, LinkOp, RouteError, RouteOp, SandboxError, TunError};
pub use imp::mmsg;
pub use imp::{
    LARGE_BLOCK, Link, LinkGuard, LinkState, LinkWatch, Pipe, ProgramExit, RouteGuard, Routing,
    Sandbox, SandboxSignal, SandboxSpec, Tun, TunOptions, VNET_HDR_LEN, if_index, open_tun,
    open_tun_with, release_code, return_large_blocks,
};
pub use offload::Offloads;
pub use routing::{Family, MAIN_TABLE, ParseError, Route, RoutingEntry, Rule};

/// The longest interface name the OS accepts, in bytes (without a terminating NUL).
pub const MAX_NAME_LEN: usize = imp::MAX_NAME_LEN;
