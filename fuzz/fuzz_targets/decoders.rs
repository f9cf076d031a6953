//! Every message decoder on the same bytes.
//! The harness and its invariants live in `tun2socks::socks::fuzzing`, so that
//! `tests/fuzz_corpus.rs` replays this target's corpus on stable.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tun2socks::socks::fuzzing::decoders(data));
