//! The DNS-over-TCP splitter fed in arbitrary chunks.
//! The harness and its invariants live in `tun2socks::fuzzing::dns`, so that
//! `tests/fuzz_corpus.rs` replays this target's corpus on stable.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tun2socks::fuzzing::dns::dns_frames(data));
