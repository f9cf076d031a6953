//! Setting a device up: the offload probe, and the link settings (MTU, queue length,
//! up, addresses) applied in order and undone in reverse when one fails. An attached
//! device needs no privilege beyond what attaching takes when it is already as asked
//! (up; the MTU, addresses and queue length left as they are).

use tun2socks_platform::{Link, LinkError, LinkGuard, Offloads, Tun};

use super::{DEFAULT_MTU, DEFAULT_TXQUEUELEN, DeviceConfig, default_addresses};
use crate::offload::Features;

/// Asks for the most offload the kernel grants: TCP (checksum, TSO4, TSO6) with UDP
/// (USO4, USO6; Linux 6.2+), then TCP alone, then checksums alone; none if it refuses
/// even that (the header stays, all zero). Logged.
pub(super) fn probe_offload(tun: &mut Tun) -> Features {
    if !tun.vnet_hdr() {
        return Features::NONE;
    }
    let tcp = Offloads::CSUM.union(Offloads::TSO4).union(Offloads::TSO6);
    let all = tcp.union(Offloads::USO4).union(Offloads::USO6);
    let mut refused = Vec::new();
    for set in [all, tcp, Offloads::CSUM] {
        match tun.set_offload(set) {
            Ok(()) => {
                if !refused.is_empty() {
                    tracing::info!(granted = %set, refused = ?refused, "TUN offload partly refused");
                }
                return Features {
                    vnet_hdr: true,
                    csum: true,
                    tso: set.contains(tcp),
                    uso: set.contains(all),
                };
            }
            Err(error) => refused.push(format!("{set}: {error}")),
        }
    }
    tracing::warn!(refused = ?refused, "TUN offload refused by the kernel; plain packets");
    Features {
        vnet_hdr: true,
        ..Features::NONE
    }
}

/// MTU first (IPv6 addresses need >= 1280), queue length, up, then addresses. On
/// failure, what was already changed is undone in reverse order. Returns the guards
/// and the MTU the device ends up with.
pub(super) fn configure(
    ifindex: u32,
    created: bool,
    config: &DeviceConfig,
) -> Result<(Vec<LinkGuard>, u16), LinkError> {
    let link = Link::new(ifindex)?;
    let mut guards = Vec::new();
    match apply(&link, created, config, &mut guards) {
        Ok(mtu) => Ok((guards, mtu)),
        Err(error) => {
            while let Some(guard) = guards.pop() {
                drop(guard);
            }
            Err(error)
        }
    }
}

fn apply(
    link: &Link,
    created: bool,
    config: &DeviceConfig,
    guards: &mut Vec<LinkGuard>,
) -> Result<u16, LinkError> {
    let mtu = match (config.mtu, created) {
        (Some(mtu), _) => {
            guards.push(link.set_mtu(u32::from(mtu))?);
            mtu
        }
        (None, true) => {
            guards.push(link.set_mtu(u32::from(DEFAULT_MTU))?);
            DEFAULT_MTU
        }
        (None, false) => u16::try_from(link.state()?.mtu).unwrap_or(u16::MAX),
    };
    let queue = config.txqueuelen.unwrap_or(DEFAULT_TXQUEUELEN);
    match link.set_txqueuelen(queue) {
        Ok(guard) => guards.push(guard),
        // A device the user owns (`ip tuntap add ... user NAME`) is theirs to attach
        // to without CAP_NET_ADMIN, but not to reconfigure: keep its queue length,
        // unless one was asked for.
        Err(error)
            if !created
                && config.txqueuelen.is_none()
                && error.errno() == Some(nix::libc::EPERM) =>
        {
            tracing::info!(
                wanted = queue,
                "no permission to set the device's txqueuelen (CAP_NET_ADMIN); keeping its own"
            );
        }
        Err(error) => return Err(error),
    }
    guards.push(link.set_up()?);
    let (addresses, defaults) = match (&config.addresses, created) {
        (Some(addresses), _) => (addresses.clone(), false),
        (None, true) => (default_addresses(), true),
        (None, false) => (Vec::new(), false),
    };
    for address in addresses {
        match link.add_address(address) {
            Ok(guard) => guards.push(guard),
            // IPv6 turned off on this host (`disable_ipv6`: EACCES; booted with
            // `ipv6.disable=1`: EAFNOSUPPORT): the default IPv6 address is left out
            // and the device carries IPv4. An address asked for still fails.
            Err(error)
                if defaults
                    && address.addr().is_ipv6()
                    && matches!(
                        error.errno(),
                        Some(nix::libc::EACCES | nix::libc::EAFNOSUPPORT)
                    ) =>
            {
                tracing::warn!(
                    %address,
                    %error,
                    "IPv6 is disabled here: the device carries IPv4 only"
                );
            }
            Err(error) => return Err(error),
        }
    }
    Ok(mtu)
}
