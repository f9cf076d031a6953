//! One IP packet through classify, the UDP payload, DNS for port 53, and egress.
//! The harness and its invariants live in `tun2socks::fuzzing::packet`, so that
//! `tests/fuzz_corpus.rs` replays this target's corpus on stable.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tun2socks::fuzzing::packet::packet_ingress(data));
