//! One DNS message through the decoders, the answer builders and every DNS mode.
//! The harness and its invariants live in `tun2socks::fuzzing::dns`, so that
//! `tests/fuzz_corpus.rs` replays this target's corpus on stable.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tun2socks::fuzzing::dns::dns_message(data));
