//! Linux: TUN devices through `/dev/net/tun` and `TUNSETIFF`, interface changes
//! through rtnetlink. Everything here is synchronous and talks to the network
//! namespace of the calling thread (a socket or device belongs to the namespace it
//! was created in, whichever thread uses it later).

mod allocator;
mod link;
mod link_watch;
pub mod mmsg;
mod netlink;
mod resident;
mod route;
mod sandbox;
mod splice;
mod tun;

pub use allocator::{LARGE_BLOCK, return_large_blocks};
pub use link::{Link, LinkGuard, LinkState};
pub use link_watch::LinkWatch;
pub use resident::release_code;
pub use route::{RouteGuard, Routing};
pub use sandbox::{ProgramExit, Sandbox, SandboxSignal, SandboxSpec};
pub use splice::Pipe;
pub use tun::{Tun, TunOptions, VNET_HDR_LEN, if_index, open_tun, open_tun_with};

/// `IFNAMSIZ` less the terminating NUL.
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;
