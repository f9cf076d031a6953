//! The virtio_net_hdr of TUN offload and the packets behind it: header decoding,
//! partial checksums, UDP super-packet cuts, and the TSO coalescer. The harness and
//! its invariants live in `tun2socks::fuzzing::offload`, so that
//! `tests/fuzz_corpus.rs` replays this target's corpus on stable.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tun2socks::fuzzing::offload::offload_frames(data));
