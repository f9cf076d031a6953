//! TUN offload features: what the kernel may hand us (and take from us) in one
//! packet beyond a plain IP datagram once the device carries a `virtio_net_hdr`
//! (`IFF_VNET_HDR`). The values are Linux's `TUN_F_*` bits; this type only names them,
//! the ioctl lives in the OS module.

use std::fmt;

/// A set of TUN offload features (`TUN_F_*`, for `TUNSETOFFLOAD`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Offloads(u32);

impl Offloads {
    /// No offload: every packet is a whole, checksummed IP datagram.
    pub const NONE: Offloads = Offloads(0);
    /// `TUN_F_CSUM`: packets may carry a partial checksum (`NEEDS_CSUM`).
    pub const CSUM: Offloads = Offloads(0x01);
    /// `TUN_F_TSO4`: TCP/IPv4 super-segments (needs `CSUM`).
    pub const TSO4: Offloads = Offloads(0x02);
    /// `TUN_F_TSO6`: TCP/IPv6 super-segments (needs `CSUM`).
    pub const TSO6: Offloads = Offloads(0x04);
    /// `TUN_F_USO4`: UDP/IPv4 super-packets (`UDP_SEGMENT`; Linux 6.2+).
    pub const USO4: Offloads = Offloads(0x20);
    /// `TUN_F_USO6`: UDP/IPv6 super-packets (Linux 6.2+).
    pub const USO6: Offloads = Offloads(0x40);

    /// The raw `TUN_F_*` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Every feature of `self` and of `other`.
    #[must_use]
    pub const fn union(self, other: Offloads) -> Offloads {
        Offloads(self.0 | other.0)
    }

    /// `true` if every feature of `other` is in `self`.
    pub const fn contains(self, other: Offloads) -> bool {
        self.0 & other.0 == other.0
    }

    /// `true` if no feature is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Offloads {
    /// `csum,tso4,tso6,uso4,uso6` (the features present), or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Offloads::CSUM, "csum"),
            (Offloads::TSO4, "tso4"),
            (Offloads::TSO6, "tso6"),
            (Offloads::USO4, "uso4"),
            (Offloads::USO6, "uso6"),
        ];
        let mut first = true;
        for (feature, name) in names {
            if self.contains(feature) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_combine_and_print() {
        let tcp = Offloads::CSUM.union(Offloads::TSO4).union(Offloads::TSO6);
        assert_eq!(tcp.bits(), 0x07);
        assert!(tcp.contains(Offloads::TSO4));
        assert!(!tcp.contains(Offloads::USO4));
        assert_eq!(tcp.to_string(), "csum,tso4,tso6");
        assert_eq!(Offloads::NONE.to_string(), "none");
        assert!(Offloads::NONE.is_empty());
        let all = tcp.union(Offloads::USO4).union(Offloads::USO6);
        assert_eq!(all.bits(), 0x67);
        assert_eq!(all.to_string(), "csum,tso4,tso6,uso4,uso6");
    }
}
