//! The TUN adapter: the first and last stage of the data path. [`Device::open`]
//! opens (or attaches to) the TUN device, configures it, and registers its
//! descriptor with tokio; the stack's poll loop then moves raw IP packets with
//! [`Device::try_recv`] / [`Device::try_send`] and waits with [`Device::readable`] /
//! [`Device::writable`] (or the `poll_*` forms).
//!
//! With offload (`--offload auto`, the default) the device is opened with
//! `IFF_VNET_HDR` and `TUNSETOFFLOAD`: reads and writes carry a `virtio_net_hdr`
//! ([`crate::offload::VnetHdr`]) through [`Device::try_recv_hdr`] /
//! [`Device::try_send_hdr`]; the plain forms drop it on read and write an all-zero
//! one. What the kernel granted is [`Device::offload`].
//!
//! No allocation per packet: the caller owns the buffers. Every interface change is
//! held as a guard inside the [`Device`] and undone when it drops, except on a
//! device we created, whose settings vanish with it.
//!
//! This module must not parse packets (that is the stack's classifier), spawn tasks,
//! or hold packet queues; OS specifics stay in `tun2socks-platform`.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::task::{Context, Poll};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tun2socks_platform::{LinkError, LinkGuard, Tun, TunError, TunOptions, open_tun_with};

use crate::config::OffloadMode;
use crate::offload::{Features, HDR_LEN, VnetHdr};

mod removal;
mod setup;

pub use removal::Removal;
use setup::{configure, probe_offload};

/// Default transmit queue length of the TUN device, in packets. The kernel's default
/// (500) overflows as soon as several flows have large windows, and smoltcp recovers
/// from that loss slowly (DESIGN.md: 1.5-1.9 Gbit/s with 4 flows at the default,
/// 8.0 with 10000).
pub const DEFAULT_TXQUEUELEN: u32 = 10_000;

/// The default addresses: `198.18.0.1/16` (the RFC 2544 benchmarking range, unused
/// on real networks) and `fd18::1/64` (unique local).
pub fn default_addresses() -> Vec<IpNet> {
    let v4 = Ipv4Net::new_assert(Ipv4Addr::new(198, 18, 0, 1), 16);
    let v6 = Ipv6Net::new_assert(Ipv6Addr::new(0xfd18, 0, 0, 0, 0, 0, 0, 1), 64);
    vec![IpNet::V4(v4), IpNet::V6(v6)]
}

/// The MTU of a device we create when none is asked for. The TUN is a local endpoint
/// (its packets never cross a wire), so a large MTU costs nothing and cuts the
/// per-packet work: at 65,000 an application's TCP sends whole 64 KiB segments with
/// no segmentation offload at all, which moved a single upload stream from 7.8 to
/// 9.4 Gbit/s against 9,000 in paired runs (downloads within noise). It stops short
/// of 65,535 so that every datagram an application can send unfragmented (up to
/// 64,972 bytes over IPv4) still fits, behind a SOCKS5 UDP header naming a host of up
/// to 255 bytes (262 bytes), in one IPv4 datagram to the proxy (65,507 bytes).
pub const DEFAULT_MTU: u16 = 65_000;

/// How to open and configure the TUN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Interface name; `None` lets the kernel pick `tunN`. An existing TUN device of
    /// this name is attached to instead of created.
    pub name: Option<String>,
    /// Addresses (with prefix length) to assign. `None`: [`default_addresses`]
    /// (`198.18.0.1/16` and `fd18::1/64`) on a device we create, nothing on one we
    /// attach to (its owner has addressed it).
    pub addresses: Option<Vec<IpNet>>,
    /// MTU to set. `None`: [`DEFAULT_MTU`] on a device we create; an attached device
    /// keeps its own. IPv6 addresses need at least 1280.
    pub mtu: Option<u16>,
    /// Transmit queue length in packets; `None` means [`DEFAULT_TXQUEUELEN`] (10000).
    pub txqueuelen: Option<u32>,
    /// TUN offload: [`OffloadMode::Auto`] asks the kernel for checksum and
    /// segmentation offload and takes what it grants.
    pub offload: OffloadMode,
}

impl DeviceConfig {
    /// A configuration with the given MTU, a kernel-chosen name, the default
    /// addresses and the default transmit queue length.
    pub fn new(mtu: u16) -> DeviceConfig {
        DeviceConfig {
            name: None,
            addresses: None,
            mtu: Some(mtu),
            txqueuelen: None,
            offload: OffloadMode::default(),
        }
    }
}

/// Opening or configuring the device failed. Changes made before the failure have
/// already been undone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The TUN device could not be opened (permission, busy, bad name, ...).
    #[error(transparent)]
    Open(#[from] TunError),
    /// The interface could not be configured.
    #[error("configuring TUN device {name}: {error}{}", NoPermissionHint(error.errno()))]
    Configure {
        /// The interface name.
        name: String,
        /// The change that failed, with the kernel's errno.
        error: LinkError,
    },
    /// No tokio runtime is running on this thread.
    #[error("the TUN device needs a tokio runtime with I/O enabled: {0}")]
    NoRuntime(tokio::runtime::TryCurrentError),
    /// Registering the descriptor with the tokio reactor failed.
    #[error("registering TUN device {name} with tokio: {error}")]
    Register {
        /// The interface name.
        name: String,
        /// The OS error.
        error: io::Error,
    },
}

/// What to do when the kernel refused a change to the device for lack of privilege.
struct NoPermissionHint(Option<i32>);

impl std::fmt::Display for NoPermissionHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == Some(nix::libc::EPERM) {
            f.write_str(
                "; changing a device needs CAP_NET_ADMIN: without it, use a device you own \
                 (`ip tuntap add NAME mode tun user YOU`) that is already up, with its \
                 addresses, and give no --mtu, --address or --txqueuelen",
            )?;
        }
        Ok(())
    }
}

impl DeviceError {
    /// `true` when the OS refused for lack of privilege (opening the device, or
    /// changing it).
    pub fn permission_denied(&self) -> bool {
        match self {
            DeviceError::Open(TunError::PermissionDenied { .. }) => true,
            DeviceError::Configure { error, .. } => error.errno() == Some(nix::libc::EPERM),
            _ => false,
        }
    }
}

/// An open, configured TUN device registered with tokio.
///
/// Packets are whole IPv4 or IPv6 datagrams, no header. All methods take `&self`, so
/// one task can read while another writes.
#[derive(Debug)]
pub struct Device {
    /// Undone in reverse order on drop, before the descriptor closes.
    guards: Vec<LinkGuard>,
    io: AsyncFd<Tun>,
    mtu: u16,
    offload: Features,
    /// Whether the device goes away under us (see [`Removal`]).
    removal: Option<Removal>,
}

impl Device {
    /// Opens the TUN device `config.name` (creating it, or attaching to an existing
    /// TUN device of that name), sets its MTU and transmit queue length, brings it up
    /// and adds the addresses. Must be called inside a tokio runtime with I/O enabled
    /// (without a runtime it fails with [`DeviceError::NoRuntime`]; a runtime built
    /// without `enable_io` makes tokio panic).
    ///
    /// On a device we attached to, every change is undone when the `Device` drops
    /// (previous MTU, queue length and down state restored, our addresses removed);
    /// a device we created disappears with its descriptor instead.
    pub fn open(config: &DeviceConfig) -> Result<Device, DeviceError> {
        Device::open_queues(config, 1).map(|(device, _)| device)
    }

    /// [`Device::open`] with up to `queues` queues: the device is opened with
    /// `IFF_MULTI_QUEUE` when `queues > 1`, and the further queues come back as raw
    /// descriptors, each to be served by [`Device::from_tun`] on the runtime (thread)
    /// that reads it, while the returned `Device` (the first queue, which holds the
    /// configuration guards) lives longer than all of them. An existing device made
    /// without `multi_queue` gives one queue (logged); a queue the kernel refuses ends
    /// the list there (logged).
    pub fn open_queues(
        config: &DeviceConfig,
        queues: usize,
    ) -> Result<(Device, Vec<Tun>), DeviceError> {
        tokio::runtime::Handle::try_current().map_err(DeviceError::NoRuntime)?;
        let options = TunOptions {
            multi_queue: queues > 1,
            vnet_hdr: config.offload == OffloadMode::Auto,
        };
        let mut tun = match open_tun_with(config.name.as_deref(), &options) {
            Err(error) if options.vnet_hdr => {
                // A kernel without IFF_VNET_HDR for TUN: plain packets, if that opens.
                let plain = TunOptions {
                    vnet_hdr: false,
                    ..options
                };
                let tun = open_tun_with(config.name.as_deref(), &plain)?;
                tracing::warn!(%error, "TUN offload header refused; plain packets");
                tun
            }
            other => other?,
        };
        let offload = probe_offload(&mut tun);
        let more = further_queues(&tun, queues);
        let name = tun.name().to_owned();
        let (ifindex, created) = (tun.ifindex(), tun.created());
        let removal = Removal::open(ifindex, &name);
        let io = tun.into_async_fd().map_err(|error| DeviceError::Register {
            name: name.clone(),
            error,
        })?;
        let configure_err = |error| DeviceError::Configure {
            name: name.clone(),
            error,
        };
        let (guards, mtu) = configure(ifindex, created, config).map_err(configure_err)?;
        let guards = if created {
            // Our own device: its settings vanish with it, nothing to restore.
            guards.into_iter().for_each(LinkGuard::forget);
            Vec::new()
        } else {
            guards
        };
        tracing::info!(
            device = %name,
            ifindex,
            created,
            mtu,
            %offload,
            queues = more.len() + 1,
            "TUN device ready"
        );
        Ok((
            Device {
                guards,
                io,
                mtu,
                offload,
                removal: Some(removal),
            },
            more,
        ))
    }

    /// Serves a TUN device that is already open and configured, possibly in another
    /// network namespace (`tun2socks exec` receives it from the sandbox). `mtu` is
    /// the MTU it was configured with. Nothing is changed and nothing restored: the
    /// device belongs to whoever configured it. Must be called inside a tokio runtime
    /// with I/O enabled, like [`Device::open`]. A descriptor opened with
    /// `IFF_VNET_HDR` is read and written with its header, without offloads.
    pub fn from_tun(tun: Tun, mtu: u16) -> Result<Device, DeviceError> {
        tokio::runtime::Handle::try_current().map_err(DeviceError::NoRuntime)?;
        let offload = Features {
            vnet_hdr: tun.vnet_hdr(),
            ..Features::NONE
        };
        let name = tun.name().to_owned();
        let io = tun
            .into_async_fd()
            .map_err(|error| DeviceError::Register { name, error })?;
        Ok(Device {
            guards: Vec::new(),
            io,
            mtu,
            offload,
            removal: None,
        })
    }

    /// Serves a further queue of a multi-queue device that [`Device::open_queues`]
    /// opened: `mtu` and `offload` are the first queue's ([`Device::mtu`],
    /// [`Device::offload`]; offloads belong to the device, not to a queue). Must be
    /// called inside the tokio runtime that will read it.
    pub fn from_queue(tun: Tun, mtu: u16, offload: Features) -> Result<Device, DeviceError> {
        let mut device = Device::from_tun(tun, mtu)?;
        if device.offload.vnet_hdr {
            device.offload = offload;
        }
        Ok(device)
    }

    /// Takes the guards that undo the configuration of an attached device (none for a
    /// device we created), so that they outlive this queue: with several queues the
    /// device must keep its addresses and state until the last queue's stack has
    /// stopped, not just this one's. Dropping the result undoes the changes.
    pub fn take_guards(&mut self) -> DeviceGuards {
        DeviceGuards(std::mem::take(&mut self.guards))
    }

    /// Takes the watch for the device's removal (one that never fires for a device
    /// served from another namespace, [`Device::from_tun`], or when taken twice).
    pub fn take_removal(&mut self) -> Removal {
        self.removal
            .take()
            .unwrap_or_else(|| Removal::none(self.name()))
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        self.io.get_ref().name()
    }

    /// The interface index.
    pub fn ifindex(&self) -> u32 {
        self.io.get_ref().ifindex()
    }

    /// The MTU the device was configured with: the largest packet it sends or takes.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// `true` if [`Device::open`] created the device, `false` if it attached.
    pub fn created(&self) -> bool {
        self.io.get_ref().created()
    }

    /// What the device offloads (what the kernel granted at open).
    pub fn offload(&self) -> Features {
        self.offload
    }

    /// Reads one packet into `buf` (which should hold at least [`Device::mtu`] bytes,
    /// or [`crate::offload::MAX_PACKET`] with offload; a longer packet is truncated)
    /// and returns its length. `WouldBlock` means the queue is empty: wait with
    /// [`Device::readable`], then read again. A poll loop drains the device by
    /// calling this until `WouldBlock`. With offload, the packet's header is
    /// dropped: use [`Device::try_recv_hdr`] to see super-segments for what they are.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.try_recv_hdr(buf).map(|(n, _)| n)
    }

    /// [`Device::try_recv`] with the packet's offload header ([`VnetHdr::NONE`] on a
    /// device without offload).
    pub fn try_recv_hdr(&self, buf: &mut [u8]) -> io::Result<(usize, VnetHdr)> {
        if !self.offload.vnet_hdr {
            return self
                .try_io(Interest::READABLE, |tun| tun.recv(buf))
                .map(|n| (n, VnetHdr::NONE));
        }
        let mut hdr = [0u8; HDR_LEN];
        let n = self.try_io(Interest::READABLE, |tun| {
            tun.recv_vectored(&mut [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf)])
        })?;
        let n = n.checked_sub(HDR_LEN).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "TUN read shorter than its header",
            )
        })?;
        Ok((n, VnetHdr::decode(&hdr)))
    }

    /// Writes one packet. `WouldBlock` (the device's queue is full, `EAGAIN`) means:
    /// keep the packet, wait with [`Device::writable`], then retry. Other errors are
    /// the kernel's verdict on this packet (`EINVAL`: not IPv4 or IPv6; `EIO`: the
    /// device is down) and do not make the device unusable. With offload it goes out
    /// with an all-zero header (a whole, checksummed packet).
    pub fn try_send(&self, packet: &[u8]) -> io::Result<()> {
        self.try_send_hdr(&VnetHdr::NONE, packet)
    }

    /// [`Device::try_send`] with an offload header (partial checksum, super-segment).
    /// Without offload only [`VnetHdr::NONE`] is accepted (`Unsupported` otherwise).
    pub fn try_send_hdr(&self, hdr: &VnetHdr, packet: &[u8]) -> io::Result<()> {
        if !self.offload.vnet_hdr {
            if *hdr != VnetHdr::NONE {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "offload header on a device without offload",
                ));
            }
            return self.try_io(Interest::WRITABLE, |tun| tun.send(packet));
        }
        let hdr = hdr.encode();
        self.try_io(Interest::WRITABLE, |tun| {
            tun.send_vectored(&[IoSlice::new(&hdr), IoSlice::new(packet)])
        })
    }

    /// Waits until a packet may be readable. Readiness stays set until
    /// [`Device::try_recv`] returns `WouldBlock`, so a spurious wake-up costs one
    /// failed read, never a lost one.
    pub async fn readable(&self) -> io::Result<()> {
        self.io.readable().await.map(drop)
    }

    /// Waits until a packet may be writable (see [`Device::readable`]).
    pub async fn writable(&self) -> io::Result<()> {
        self.io.writable().await.map(drop)
    }

    /// [`Device::readable`] for a hand-written poll loop: `Ready` once a read may
    /// succeed; `Pending` registers `cx`'s waker.
    pub fn poll_recv_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.poll_read_ready(cx).map_ok(drop)
    }

    /// [`Device::writable`] for a hand-written poll loop.
    pub fn poll_send_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.poll_write_ready(cx).map_ok(drop)
    }

    /// Runs `op` through tokio's readiness tracking, so a `WouldBlock` clears the
    /// readiness that `readable`/`writable` wait on. When tokio has not yet seen the
    /// descriptor ready (just after open, or after clearing), `op` is still tried
    /// once directly: a `WouldBlock` then leaves readiness clear, which is right, and
    /// a success just delivers the packet without waiting for the reactor.
    fn try_io<R>(
        &self,
        interest: Interest,
        mut op: impl FnMut(&Tun) -> io::Result<R>,
    ) -> io::Result<R> {
        let mut tried = false;
        let result = self.io.try_io(interest, |tun| {
            tried = true;
            op(tun)
        });
        match result {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock && !tried => {
                op(self.io.get_ref())
            }
            other => other,
        }
    }
}

/// Opens up to `queues - 1` queues of `tun` beside it.
fn further_queues(tun: &Tun, queues: usize) -> Vec<Tun> {
    if queues <= 1 {
        return Vec::new();
    }
    if !tun.multi_queue() {
        // Information, not a warning: `--threads` defaults to the number of cores, and
        // a single-queue device made by hand is an ordinary, working setup.
        tracing::info!(
            device = tun.name(),
            "the device was made without multi_queue (`ip tuntap add ... multi_queue`); \
             serving it with one queue"
        );
        return Vec::new();
    }
    let mut more = Vec::with_capacity(queues - 1);
    for _ in 1..queues {
        match tun.open_queue() {
            Ok(queue) => more.push(queue),
            Err(error) => {
                tracing::warn!(device = tun.name(), %error, opened = more.len() + 1, "cannot open another queue");
                break;
            }
        }
    }
    more
}

/// The changes made to an attached device, undone (in reverse order) on drop; see
/// [`Device::take_guards`].
#[derive(Debug)]
#[must_use = "dropping it undoes the device's configuration at once"]
pub struct DeviceGuards(Vec<LinkGuard>);

impl DeviceGuards {
    /// Drops the guards without undoing anything: for a device that has gone (its
    /// settings went with it, and restoring them could only fail).
    pub fn forget(mut self) {
        for guard in self.0.drain(..) {
            guard.forget();
        }
    }
}

impl Drop for DeviceGuards {
    fn drop(&mut self) {
        while let Some(guard) = self.0.pop() {
            drop(guard);
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Undo in reverse order: addresses go before the link goes down, and the MTU
        // is restored last. The descriptor closes after this, with the fields.
        while let Some(guard) = self.guards.pop() {
            drop(guard);
        }
    }
}
