//! OS-specific parts of tun2socks: opening the TUN device, addresses, routes and
//! rules. This crate is the only place with `#[cfg(target_os)]` and `unsafe`. Every
//! change to the system returns a guard that undoes it on drop.
