//! Operating-system errors to SOCKS5 reply codes: the one place where the server
//! decides what a failed connect, resolve or bind is called on the wire. (SOCKS4 has a
//! single failure code, 91, applied when the reply is encoded.)

use std::io;

use crate::socks::ReplyCode;

/// The reply code for a failed connect (or bind) to a destination.
///
/// refused -> 0x05, network unreachable/down -> 0x03, host unreachable -> 0x04,
/// timed out -> 0x06, permission denied (a local firewall rule) -> 0x02,
/// address family not available -> 0x08 (e.g. IPv6 on a host without IPv6),
/// anything else -> 0x01.
pub fn for_io_error(error: &io::Error) -> ReplyCode {
    use io::ErrorKind as K;
    match error.kind() {
        K::ConnectionRefused => ReplyCode::CONNECTION_REFUSED,
        K::NetworkUnreachable | K::NetworkDown => ReplyCode::NETWORK_UNREACHABLE,
        K::HostUnreachable => ReplyCode::HOST_UNREACHABLE,
        K::TimedOut => ReplyCode::TTL_EXPIRED,
        K::PermissionDenied => ReplyCode::NOT_ALLOWED,
        K::AddrNotAvailable => ReplyCode::NETWORK_UNREACHABLE,
        K::Unsupported => ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED,
        _ => match error.raw_os_error() {
            // EHOSTDOWN has no ErrorKind of its own.
            Some(112) => ReplyCode::HOST_UNREACHABLE,
            // EAFNOSUPPORT: no socket of that family on this host.
            Some(97) => ReplyCode::ADDRESS_TYPE_NOT_SUPPORTED,
            _ => ReplyCode::GENERAL_FAILURE,
        },
    }
}

/// The reply code for a host name that did not resolve.
pub const RESOLVE_FAILED: ReplyCode = ReplyCode::HOST_UNREACHABLE;

/// The reply code for a connect that did not finish within the server's limit.
pub const TIMED_OUT: ReplyCode = ReplyCode::TTL_EXPIRED;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_map_to_their_codes() {
        for (errno, code) in [
            (111, 0x05), // ECONNREFUSED
            (101, 0x03), // ENETUNREACH
            (100, 0x03), // ENETDOWN
            (113, 0x04), // EHOSTUNREACH
            (112, 0x04), // EHOSTDOWN
            (110, 0x06), // ETIMEDOUT
            (1, 0x02),   // EPERM
            (13, 0x02),  // EACCES
            (97, 0x08),  // EAFNOSUPPORT
            (99, 0x03),  // EADDRNOTAVAIL
            (5, 0x01),   // EIO
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(for_io_error(&e), ReplyCode(code), "errno {errno}: {e}");
        }
    }
}
