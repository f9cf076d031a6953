//! A sequence of packets through the whole stack on an in-memory device.
//! The harness and its invariants live in `tun2socks::fuzzing::stack`, so that
//! `tests/fuzz_corpus.rs` replays this target's corpus on stable.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tun2socks::fuzzing::stack::packet_stack(data));
