//! Notices that a network interface has gone: deleted (`ip link del`, `ip tuntap
//! del`), or moved to another network namespace, both of which the kernel announces
//! as `RTM_DELLINK` in the namespace the interface left.
//!
//! A TUN descriptor does not say so by itself: the kernel detaches it and wakes its
//! readers once, before the detach is visible, so a reader that polls at that moment
//! sees nothing, and afterwards the descriptor never becomes ready again. A process
//! serving the device would wait forever on a device that no longer exists.
//!
//! The watch is an rtnetlink socket subscribed to the namespace's link notifications
//! (`RTNLGRP_LINK`). It is readable only when some link changes, so a process that
//! waits on it never wakes while the links stay as they are. When notifications were
//! lost (`ENOBUFS`: the socket's buffer overflowed), it asks the kernel whether the
//! interface still exists instead of guessing, over a second netlink socket opened
//! with the watch (so in the watched namespace, whichever thread asks).
//!
//! Synchronous and non-blocking, like the rest of this crate: the caller registers
//! the descriptor with its event loop and calls [`LinkWatch::gone`] when it is
//! readable.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::link::Link;
use crate::LinkError;

/// `RTMGRP_LINK`: the multicast group of link notifications (as a bind mask).
const RTMGRP_LINK: u32 = 1;
/// Receive buffer for one datagram of notifications.
const RECV_BUFFER: usize = 64 * 1024;
/// Socket receive buffer: room for a burst of link changes (each a few KiB).
const SOCKET_BUFFER: usize = 256 * 1024;

/// Watches for one interface's removal from the calling thread's network namespace.
#[derive(Debug)]
pub struct LinkWatch {
    socket: Socket,
    ifindex: u32,
    buf: Vec<u8>,
    /// For asking whether the interface still exists, in the namespace watched
    /// (whichever thread asks later).
    link: Link,
}

impl LinkWatch {
    /// Subscribes to the link notifications of the calling thread's network namespace,
    /// watching interface `ifindex`. Open it while the interface exists: a removal
    /// before this call is not reported (use [`LinkWatch::gone`] once, after opening,
    /// to check).
    pub fn new(ifindex: u32) -> io::Result<LinkWatch> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
        socket.set_non_blocking(true)?;
        let _ = socket.set_rx_buf_sz(SOCKET_BUFFER);
        let link = Link::new(ifindex).map_err(io::Error::other)?;
        Ok(LinkWatch {
            socket,
            ifindex,
            buf: Vec::with_capacity(RECV_BUFFER),
            link,
        })
    }

    /// The interface watched.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Registers the watch with the current tokio runtime's reactor, for readability.
    /// Must be called from within a runtime.
    pub fn into_async_fd(self) -> io::Result<AsyncFd<LinkWatch>> {
        // SAFETY: `LinkWatch` owns its descriptor (the netlink `Socket`) for its whole
        // life, `as_raw_fd` always returns that same descriptor, and no method of
        // `LinkWatch` closes or replaces it. The `AsyncFd` owns the `LinkWatch`, so
        // the descriptor stays open and unchanged until the `AsyncFd` is dropped or
        // gives the `LinkWatch` back.
        let registered = unsafe { AsyncFd::register_with_interest(self, Interest::READABLE) };
        registered.map_err(|error| error.into_parts().1)
    }

    /// Reads every queued notification without blocking. `Ok(true)` once one says
    /// the interface was removed (and the kernel confirms it is gone), `Ok(false)`
    /// when none did (`WouldBlock` is not an error here: the caller waits for the
    /// descriptor to be readable again). An error means the watch itself failed.
    pub fn gone(&mut self) -> io::Result<bool> {
        let mut removal = false;
        loop {
            self.buf.clear();
            match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
                Ok(len) => {
                    // A truncated datagram may have lost the notification: ask.
                    if len > self.buf.len() || mentions_removal(&self.buf, self.ifindex) {
                        removal = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Notifications were dropped for want of buffer: ask.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => removal = true,
                Err(e) => return Err(e),
            }
        }
        if !removal {
            return Ok(false);
        }
        match self.link.state() {
            Ok(_) => Ok(false),
            Err(LinkError::Refused { errno, .. }) if errno == libc::ENODEV => Ok(true),
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

impl AsFd for LinkWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl AsRawFd for LinkWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Whether `datagram` holds an `RTM_DELLINK` for `ifindex`, or a message that could
/// not be decoded (which might have been one: the caller then asks the kernel).
fn mentions_removal(mut datagram: &[u8], ifindex: u32) -> bool {
    while !datagram.is_empty() {
        let Ok(buffer) = NetlinkBuffer::new_checked(datagram) else {
            return true;
        };
        let length = buffer.length() as usize;
        if length == 0 {
            return true;
        }
        let (this, rest) = datagram.split_at(length.min(datagram.len()));
        datagram = rest.get(align4(length) - length..).unwrap_or(&[]);
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(this) {
            Ok(message) => {
                if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) =
                    message.payload
                {
                    if link.header.index == ifindex {
                        return true;
                    }
                }
            }
            Err(_) => return true,
        }
    }
    false
}

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_route::link::LinkMessage;

    fn datagram(messages: &[RouteNetlinkMessage]) -> Vec<u8> {
        let mut out = Vec::new();
        for message in messages {
            let mut packet = NetlinkMessage::new(
                NetlinkHeader::default(),
                NetlinkPayload::InnerMessage(message.clone()),
            );
            packet.finalize();
            let mut bytes = vec![0; packet.buffer_len()];
            packet.serialize(&mut bytes);
            bytes.resize(align4(bytes.len()), 0);
            out.extend_from_slice(&bytes);
        }
        out
    }

    fn link(index: u32) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link
    }

    #[test]
    fn only_a_deletion_of_the_watched_link_counts() {
        let new = RouteNetlinkMessage::NewLink(link(7));
        let other = RouteNetlinkMessage::DelLink(link(8));
        let ours = RouteNetlinkMessage::DelLink(link(7));
        assert!(!mentions_removal(&datagram(std::slice::from_ref(&new)), 7));
        assert!(!mentions_removal(
            &datagram(&[new.clone(), other.clone()]),
            7
        ));
        assert!(mentions_removal(&datagram(&[new, other, ours]), 7));
        assert!(!mentions_removal(&[], 7));
    }

    #[test]
    fn an_undecodable_datagram_is_checked_with_the_kernel() {
        assert!(mentions_removal(&[1, 2, 3], 7));
        let mut bad = datagram(&[RouteNetlinkMessage::NewLink(link(7))]);
        // A length field of zero would never advance.
        bad[..4].copy_from_slice(&0u32.to_ne_bytes());
        assert!(mentions_removal(&bad, 7));
    }
}
